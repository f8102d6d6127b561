"""`edgeface door release`: drive the relay to its released level from the pin settings alone.

Why its own module: systemd runs this as ExecStopPost after every exit of the service, a crash included, and
on a Pi the GPIO line keeps its last level when the process dies. It must work when everything else is
broken: a typo in an unrelated key, a bad time zone, broken YAML, a missing gallery or models directory.
So it reads only door.relay_pin / active_high / pin_factory / door_id, leniently (YAML when the file parses,
else a line scan), takes them from the command line when given, and imports only click, PyYAML and
gpiozero (no pydantic, numpy, OpenCV or LiteRT: `tests/test_faults_process.py` checks the imports).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import click

from edgeface.errors import ConfigError

#: The config defaults (edgeface.config.DoorConfig) for a key the file does not have.
DEFAULT_RELAY_PIN = 17
DEFAULT_ACTIVE_HIGH = True
MAX_BCM_PIN = 53
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


@dataclass
class PinSettings:
    """What releasing the relay needs; `notes` say where each value came from when it was not plain."""

    relay_pin: Optional[int] = None
    active_high: Optional[bool] = None
    pin_factory: Optional[str] = None
    door_id: str = "door"
    notes: list[str] = field(default_factory=list)


def _from_yaml(text: str) -> Optional[dict]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    door = data.get("door") if isinstance(data, dict) else None
    return door if isinstance(door, dict) else None


def _scan(text: str) -> dict:
    """The door keys found by a line scan (for a file YAML cannot read): `key: value` anywhere, block or flow
    style. These four names are used only in the door section."""
    found: dict[str, Any] = {}
    for key, pattern in (("relay_pin", r"-?\d+"), ("active_high", r"[A-Za-z]+"), ("pin_factory", r"[A-Za-z]+"),
                         ("door_id", r"[A-Za-z0-9_.-]+")):
        m = re.search(rf"(?<![\w-]){key}[ \t]*:[ \t]*['\"]?({pattern})", text)
        if m:
            value: Any = m.group(1)
            if key == "relay_pin":
                value = int(value)
            elif key == "active_high":
                value = True if value.lower() in _TRUE else False if value.lower() in _FALSE else value
            elif key == "pin_factory" and value.lower() in ("null", "none"):
                value = None
            found[key] = value
    return found


def read_pin_settings(path: Optional[Path]) -> PinSettings:
    """The door's pin settings from a config file that may be broken anywhere else. Missing keys stay None."""
    settings = PinSettings()
    if path is None:
        settings.notes.append("no config file")
        return settings
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        settings.notes.append(f"cannot read {path}: {exc.strerror or exc}")
        return settings
    door = _from_yaml(text)
    if door is None:
        door = _scan(text)
        settings.notes.append(f"{path} is not valid YAML: read the door pin settings line by line")
    pin = door.get("relay_pin")
    if pin is not None:
        if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin <= MAX_BCM_PIN:
            raise ConfigError(f"{path}: door.relay_pin = {pin!r}: expected a BCM pin 0-{MAX_BCM_PIN} "
                              "(or give it: edgeface door release --pin N)")
        settings.relay_pin = pin
    active = door.get("active_high")
    if active is not None:
        if not isinstance(active, bool):
            raise ConfigError(f"{path}: door.active_high = {active!r}: expected true or false "
                              "(or give --active-high / --active-low)")
        settings.active_high = active
    factory = door.get("pin_factory")
    if factory is not None:
        settings.pin_factory = str(factory)
    if door.get("door_id") is not None:
        settings.door_id = str(door["door_id"])
    return settings


def release_relay(relay_pin: int, *, active_high: bool, pin_factory: Optional[str]) -> None:
    """Build the relay output released (gpiozero initial_value=False, active_high respected), then free it."""
    from gpiozero import DigitalOutputDevice

    from edgeface.door import make_pin_factory

    try:
        device = DigitalOutputDevice(relay_pin, active_high=active_high, initial_value=False,
                                     pin_factory=make_pin_factory(pin_factory))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (no GPIO here, pin busy, no permission)
        raise ConfigError(f"door.relay_pin = {relay_pin}: cannot drive the pin: {type(exc).__name__}: {exc}") from exc
    device.off()
    device.close()


@click.group("door")
def door_group() -> None:
    """Door relay utilities."""


@door_group.command("release")
@click.option("--pin", "pin", type=click.IntRange(0, MAX_BCM_PIN), default=None,
              help="Relay BCM pin (default: door.relay_pin from the config).")
@click.option("--active-high/--active-low", "active_high", default=None,
              help="Relay polarity (default: door.active_high from the config).")
@click.option("--pin-factory", "pin_factory", default=None,
              help="gpiozero pin factory: mock, lgpio, rpigpio, pigpio, native (default: door.pin_factory).")
@click.pass_obj
def release_cmd(obj: Any, pin: Optional[int], active_high: Optional[bool], pin_factory: Optional[str]) -> None:
    """Drive the relay pin to its released level (systemd ExecStopPost; safe at any time).

    Reads only the door's pin settings, so a config that is broken elsewhere still releases the relay."""
    path = obj.resolved_config_path() if obj is not None else None
    s = read_pin_settings(path) if pin is None or active_high is None or pin_factory is None else PinSettings()
    for note in s.notes:
        click.echo(f"warning: {note}", err=True)
    relay_pin = pin if pin is not None else s.relay_pin
    if relay_pin is None:
        relay_pin = DEFAULT_RELAY_PIN
        click.echo(f"warning: no door.relay_pin in {path or 'the config'}: using the default pin {relay_pin}",
                   err=True)
    high = active_high if active_high is not None else s.active_high
    high = DEFAULT_ACTIVE_HIGH if high is None else high
    release_relay(relay_pin, active_high=high, pin_factory=pin_factory or s.pin_factory)
    click.echo(f"door {s.door_id}: relay on pin {relay_pin} released ({'active high' if high else 'active low'})")
