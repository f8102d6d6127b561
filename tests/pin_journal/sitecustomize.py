"""A GPIO line that outlives the process, for tests of what a crash leaves on the relay.

On a Pi a GPIO line keeps its last level when the process dies; gpiozero's MockFactory pins die with the
process. With this folder first on PYTHONPATH and EDGEFACE_PIN_JOURNAL=FILE, every level a process drives
on a mock pin is appended to FILE as `pid pin level` (one write per line, O_APPEND), so a test reads which
lines each process drove and the level each one was left at.
"""
import os

_JOURNAL = os.environ.get("EDGEFACE_PIN_JOURNAL")

if _JOURNAL:
    from gpiozero.pins.mock import MockPin

    _set_state = MockPin._set_state

    def _journalled_set_state(self, value):
        _set_state(self, value)
        fd = os.open(_JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()} {self.info.name} {int(bool(value))}\n".encode())
        finally:
            os.close(fd)

    MockPin._set_state = _journalled_set_state
