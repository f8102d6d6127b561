"""Running the daemon as a service: logging to the journal, systemd's notify/watchdog protocol, SIGTERM/SIGINT.

`run_daemon()` is what `edgeface run` and `edgeface demo` call; the relay is released on every way out. Imports
only the standard library here (sdnotify when systemd asked for notifications), so it is safe on the service path.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    """Logs go to stderr (the journal under systemd), one line each."""
    root = logging.getLogger()
    if not any(getattr(h, "_edgeface", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._edgeface = True  # type: ignore[attr-defined]
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))


class Watchdog:
    """sd_notify READY/WATCHDOG/STOPPING via `sdnotify` (a no-op when NOTIFY_SOCKET is unset).

    Pings only while the pipeline shows signs of life (a frame or a camera state change within the
    watchdog interval), so a hung pipeline gets restarted by systemd."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval_s = int(usec) / 1e6 if usec and usec.isdigit() else 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def notify(self, msg: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(msg)

    def start(self) -> None:
        self.notify("READY=1")
        if self._notifier is not None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s / 3):
            # a camera back-off wait counts as alive: health changes refresh the heartbeat
            limit = max(self.interval_s, self.daemon.cfg.camera.reconnect_max_s + self.daemon.cfg.camera.frozen_after_s)
            if self.daemon.heartbeat_age < limit:
                self.notify("WATCHDOG=1")
            else:
                log.error("pipeline stalled for %.0f s: not pinging the watchdog", self.daemon.heartbeat_age)

    def stop(self) -> None:
        self._stop.set()
        self.notify("STOPPING=1")


class SignalStopper:
    """SIGTERM/SIGINT -> daemon.stop() on a helper thread; the handler itself only records the signal.

    Why: a handler runs on the main thread between two bytecodes, possibly while that thread holds a lock
    (the audit log's, an Event's). A handler that released the relay re-entered the audit lock and hung the
    process (5 of 50 stops). Here the handler appends to a list and Python's C-level wakeup fd writes the signal's
    number to a pipe; the `signal-stop` thread reads it, releases the relay at once and unblocks the camera
    (daemon.stop(), which is safe from another thread); the shutdown itself (daemon.close()) stays on the main
    thread in run_daemon."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.received: list[int] = []
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._done = False
        self._old_handlers: dict[int, Any] = {}
        self._old_fd = -1
        self._thread = threading.Thread(target=self._loop, name="signal-stop", daemon=True)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)  # only a flag: no locks, no logging, no I/O

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread (an embedding program runs us elsewhere)
        self._thread.start()
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _loop(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)  # one byte per signal: its number (written by Python's C handler)
            except OSError:
                return
            if self._done or not data:
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                log.info("received %s: stopping", signal.Signals(signum).name)
                try:
                    self.daemon.stop()  # releases the relay at once and unblocks the camera
                except Exception:  # noqa: BLE001
                    log.exception("stopping the daemon failed")

    def uninstall(self) -> None:
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_fd)
        self._done = True
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        os.close(self._r)
        os.close(self._w)


def run_daemon(daemon: Any, *, max_frames: Optional[int] = None) -> int:
    """Run until SIGTERM/SIGINT or the end of the source; the relay is released on every way out."""
    watchdog = Watchdog(daemon)
    stopper = SignalStopper(daemon)
    stopper.install()
    try:
        daemon.start()
        watchdog.start()
        n = daemon.run(max_frames=max_frames)
        log.info("stopped after %d frames", n)
    finally:
        watchdog.stop()
        daemon.close()  # the shutdown runs here, on the main thread
        stopper.uninstall()
    return 0
