"""The door relay and the optional door contact, on gpiozero.

The relay is built released and is released again on every way out: close() (safe twice), the
context manager, the daemon's SIGTERM handler, an exception, and `edgeface door release` from the
systemd unit's ExecStopPost (for a crash the process could not clean up).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from edgeface.errors import ConfigError

if TYPE_CHECKING:  # importing config (pydantic) here would make `edgeface door release` heavy
    from edgeface.config import DoorConfig

log = logging.getLogger(__name__)

#: config door.pin_factory -> gpiozero factory class path
PIN_FACTORIES = {
    "mock": "gpiozero.pins.mock:MockFactory",
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "pigpio": "gpiozero.pins.pigpio:PiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
}


def make_pin_factory(name: Optional[str]) -> Any:
    """A gpiozero pin factory for config door.pin_factory (None = gpiozero's own choice)."""
    if name is None:
        return None
    try:
        module_name, cls_name = PIN_FACTORIES[name].split(":")
    except KeyError:
        raise ConfigError(f"door.pin_factory = {name!r}: expected one of {', '.join(PIN_FACTORIES)}") from None
    import importlib

    try:
        return getattr(importlib.import_module(module_name), cls_name)()
    except Exception as exc:  # noqa: BLE001  (missing library, not a Pi, no permission)
        raise ConfigError(f"door.pin_factory = {name!r}: cannot start it: {exc}") from exc


#: The file in state_dir where the daemon records the relay line it claimed (what `door release` releases first).
LINE_RECORD_NAME = "relay-line.json"
GPIO_HINT = "on a Pi: user in group gpio, python3-lgpio; elsewhere: door.pin_factory: mock"


@dataclass(frozen=True)
class RelayLine:
    """The relay line as driven: pin, polarity and the pin factory name (None = gpiozero's choice)."""

    relay_pin: int
    active_high: bool
    pin_factory: Optional[str] = None
    door_id: str = "front"

    def describe(self) -> str:
        return f"pin {self.relay_pin} ({'active high' if self.active_high else 'active low'})"


def write_line_record(path: Path, line: RelayLine) -> None:
    """Record the line this process drives (0600, atomic): after a crash `door release` releases exactly it."""
    from edgeface.security import write_private_atomic

    data = {"door_id": line.door_id, "relay_pin": line.relay_pin, "active_high": line.active_high,
            "pin_factory": line.pin_factory, "pid": os.getpid(), "claimed_at": time.time()}
    write_private_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def read_line_record(path: Path) -> RelayLine:
    """The recorded line; FileNotFoundError when there is none, ConfigError (one line) when it is damaged."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a relay line record (expected a JSON object)")
    pin, high, factory, door_id = (data.get(k) for k in ("relay_pin", "active_high", "pin_factory", "door_id"))
    if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin <= 53:
        raise ConfigError(f"{path}: relay_pin = {pin!r}: expected a BCM pin 0-53")
    if not isinstance(high, bool):
        raise ConfigError(f"{path}: active_high = {high!r}: expected true or false")
    if factory is not None and factory not in PIN_FACTORIES:
        raise ConfigError(f"{path}: pin_factory = {factory!r}: expected one of {', '.join(PIN_FACTORIES)} or null")
    return RelayLine(pin, high, factory, str(door_id) if isinstance(door_id, str) else "front")


def build_output(relay_pin: int, *, active_high: bool, pin_factory: Any) -> Any:
    """A released gpiozero output on `relay_pin`, or one ConfigError line saying why not.

    gpiozero warns once per pin factory it tries (4 warnings, 8 lines, off a Pi) before its own error: those
    reasons go into the one error line instead; on success they are logged (e.g. the native fallback)."""
    from gpiozero import DigitalOutputDevice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            device = DigitalOutputDevice(relay_pin, active_high=active_high, initial_value=False,
                                         pin_factory=pin_factory)
        except Exception as exc:  # noqa: BLE001  (no GPIO here, pin busy, no permission)
            tried = "; ".join(str(w.message) for w in caught)
            raise ConfigError(f"door.relay_pin = {relay_pin}: cannot drive the pin: {type(exc).__name__}: {exc}"
                              + (f" ({tried})" if tried else "") + f" ({GPIO_HINT})") from None
    for w in caught:
        log.warning("gpio: %s", w.message)
    return device


class Door:
    """A relay on `relay_pin`; `pulse()` unlocks for pulse_s without blocking (a timer releases it)."""

    def __init__(self, relay_pin: int, *, active_high: bool = True, pulse_s: float = 3.0,
                 pin_factory: Any = None, on_change: Optional[Callable[[str], None]] = None,
                 line_record: Optional[Path] = None, line: Optional[RelayLine] = None) -> None:
        """`line_record`: a file where the claimed line is recorded (`line` says pin factory name and door id)
        before the relay can ever move; a record that cannot be written frees the pin and raises ConfigError."""
        self.pulse_s = pulse_s
        self.relay_pin = relay_pin
        self._on_change = on_change
        self._lock = threading.RLock()
        self._timer: Optional[threading.Timer] = None
        self._closed = False
        self.last_pulse: Optional[float] = None  # time.monotonic() of the last unlock
        self._device = build_output(relay_pin, active_high=active_high, pin_factory=pin_factory)
        if line_record is not None:
            line = line or RelayLine(relay_pin, active_high)
            try:
                write_line_record(line_record, RelayLine(relay_pin, active_high, line.pin_factory, line.door_id))
            except OSError as exc:
                self._device.close()
                raise ConfigError(f"cannot record the relay line in {line_record}: {exc.strerror or exc} "
                                  "(`edgeface door release` needs it after a crash)") from None

    @classmethod
    def from_config(cls, cfg: DoorConfig, *, pin_factory: Any = None,
                    on_change: Optional[Callable[[str], None]] = None, state_dir: Optional[Path] = None) -> "Door":
        """With `state_dir` the claimed line is recorded there (LINE_RECORD_NAME) for `edgeface door release`."""
        return cls(cfg.relay_pin, active_high=cfg.active_high, pulse_s=cfg.pulse_s,
                   pin_factory=pin_factory if pin_factory is not None else make_pin_factory(cfg.pin_factory),
                   on_change=on_change,
                   line_record=Path(state_dir) / LINE_RECORD_NAME if state_dir is not None else None,
                   line=RelayLine(cfg.relay_pin, cfg.active_high, cfg.pin_factory, cfg.door_id))

    @property
    def unlocked(self) -> bool:
        with self._lock:
            return not self._closed and bool(self._device.value)

    @property
    def state(self) -> str:
        return "unlocked" if self.unlocked else "locked"

    def pulse(self, duration: Optional[float] = None) -> None:
        """Unlock now and lock again after `duration` (default pulse_s); a new pulse restarts the time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("door is closed")
            if self._timer is not None:
                self._timer.cancel()
            was = bool(self._device.value)
            self._device.on()
            self.last_pulse = time.monotonic()
            self._timer = threading.Timer(duration if duration is not None else self.pulse_s, self.release)
            self._timer.daemon = True
            self._timer.start()
        if not was:
            self._notify("unlocked")

    def release(self) -> None:
        """Lock (relay released) now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._closed:
                return
            was = bool(self._device.value)
            self._device.off()
        if was:
            self._notify("locked")

    def recently_unlocked(self, within_s: float) -> bool:
        last = self.last_pulse
        return last is not None and time.monotonic() - last <= within_s

    def _notify(self, state: str) -> None:
        log.info("door relay %s", state)
        if self._on_change:
            try:
                self._on_change(state)
            except Exception:  # noqa: BLE001
                log.exception("door state callback failed")

    def close(self) -> None:
        """Release the relay and free the pin (safe to call more than once)."""
        with self._lock:
            if self._closed:
                return
            self.release()
            self._closed = True
            self._device.close()

    def __enter__(self) -> "Door":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DoorContact:
    """A door contact switch: open/closed events, plus "held open too long" and "forced open" alarms.

    `on_event(kind, detail)` gets kind in door_opened, door_closed, door_held_open, door_forced_open.
    An opening counts as forced when `was_granted()` says no unlock happened in the last pulse window.
    """

    def __init__(self, pin: int, *, closed_is_low: bool = True, held_open_s: float = 30.0,
                 was_granted: Callable[[], bool], on_event: Callable[[str, dict], None],
                 pin_factory: Any = None, bounce_time: Optional[float] = None) -> None:
        from gpiozero import Button

        self.held_open_s = held_open_s
        self._was_granted = was_granted
        self._on_event = on_event
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()
        self._opened_at: Optional[float] = None
        self._closed = False
        # pull_up=True: a closed contact pulls the pin low = "pressed" = door closed.
        try:
            self._button = Button(pin, pull_up=closed_is_low, bounce_time=bounce_time, pin_factory=pin_factory)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"door.contact_pin = {pin}: cannot read the pin: {type(exc).__name__}: {exc}") from exc
        self._button.when_pressed = self._on_closed
        self._button.when_released = self._on_opened

    @property
    def is_open(self) -> bool:
        return not self._button.is_pressed

    @property
    def state(self) -> str:
        return "open" if self.is_open else "closed"

    def _emit(self, kind: str, detail: dict) -> None:
        try:
            self._on_event(kind, detail)
        except Exception:  # noqa: BLE001
            log.exception("door contact callback failed")

    def _on_opened(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._opened_at = time.monotonic()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.held_open_s, self._held_open)
            self._timer.daemon = True
            self._timer.start()
        forced = not self._was_granted()
        self._emit("door_opened", {"forced": forced})
        if forced:
            log.warning("door forced open (no grant in the last pulse window)")
            self._emit("door_forced_open", {})

    def _on_closed(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            opened = self._opened_at
            self._opened_at = None
        self._emit("door_closed", {"open_s": round(time.monotonic() - opened, 2) if opened else None})

    def _held_open(self) -> None:
        with self._lock:
            if self._closed or self._opened_at is None:
                return
            open_s = time.monotonic() - self._opened_at
        log.warning("door held open for %.0f s", open_s)
        self._emit("door_held_open", {"open_s": round(open_s, 2)})

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        self._button.close()

    def __enter__(self) -> "DoorContact":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
