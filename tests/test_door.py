"""Door relay and contact on gpiozero MockFactory pins: levels over time, release on every exit path."""
from __future__ import annotations

import time

import pytest
from gpiozero.pins.mock import MockFactory

from edgeface.config import DoorConfig
from edgeface.door import Door, DoorContact, make_pin_factory
from edgeface.errors import ConfigError
from edgeface.testing import pin_levels, wait_until


@pytest.fixture()
def factory():
    f = MockFactory()
    yield f
    f.close()


@pytest.mark.parametrize("active_high", [True, False])
def test_built_released_and_pulse_holds_for_pulse_s(factory, active_high):
    changes = []
    door = Door(17, active_high=active_high, pulse_s=0.2, pin_factory=factory, on_change=changes.append)
    pin = factory.pin(17)
    released = not active_high
    assert pin.state == released and not door.unlocked
    door.pulse()
    assert pin.state == (not released) and door.state == "unlocked"
    assert wait_until(lambda: pin.state == released, 3.0)
    # the relay was active for pulse_s: the mock records with each state the time since the previous change
    assert [s.state for s in pin.states][-2:] == [not released, released]
    assert pin.states[-1].timestamp >= 0.2 * 0.95
    assert changes == ["unlocked", "locked"]
    door.close()


def test_a_new_pulse_extends_instead_of_toggling(factory):
    door = Door(17, pulse_s=0.3, pin_factory=factory)
    pin = factory.pin(17)
    door.pulse()
    time.sleep(0.15)
    door.pulse()
    time.sleep(0.2)  # 0.35 s after the first pulse: still held by the second
    assert pin.state is True
    assert wait_until(lambda: pin.state is False, 3.0)
    assert pin_levels(pin) == [False, True, False]
    door.close()


def test_close_during_pulse_releases_and_is_safe_twice(factory):
    door = Door(17, active_high=False, pulse_s=5.0, pin_factory=factory)
    pin = factory.pin(17)
    door.pulse()
    assert pin.state is False  # active low: unlocked
    door.close()
    assert pin_levels(pin)[-1] is True
    door.close()
    with pytest.raises(RuntimeError):
        door.pulse()


def test_context_manager_releases_on_exception(factory):
    pin = factory.pin(17)
    with pytest.raises(ZeroDivisionError):
        with Door(17, pulse_s=5.0, pin_factory=factory) as door:
            door.pulse()
            1 / 0
    assert pin_levels(pin)[-1] is False


def test_from_config_with_mock_factory():
    door = Door.from_config(DoorConfig(relay_pin=5, pin_factory="mock", pulse_s=0.2))
    try:
        door.pulse()
        assert door.unlocked
        assert wait_until(lambda: not door.unlocked, 3.0)
    finally:
        door.close()


def test_unknown_pin_factory_is_a_config_error():
    with pytest.raises(ConfigError, match="door.pin_factory"):
        make_pin_factory("bogus")


def test_contact_events_forced_and_held_open(factory):
    events = []
    door = Door(17, pulse_s=0.2, pin_factory=factory)
    contact = DoorContact(27, closed_is_low=True, held_open_s=0.3, pin_factory=factory,
                          was_granted=lambda: door.recently_unlocked(0.2 + 1.0),
                          on_event=lambda kind, detail: events.append((kind, detail)))
    pin = factory.pin(27)
    pin.drive_low()  # door closed
    assert wait_until(lambda: contact.state == "closed", 3.0)
    events.clear()
    # opened with no grant -> forced open
    pin.drive_high()
    assert wait_until(lambda: any(k == "door_forced_open" for k, _ in events), 3.0)
    # stays open -> held open alarm
    assert wait_until(lambda: any(k == "door_held_open" for k, _ in events), 3.0)
    pin.drive_low()
    assert wait_until(lambda: events[-1][0] == "door_closed", 3.0)
    events.clear()
    # a grant then an opening: not forced; closed in time: no held-open alarm
    door.pulse()
    pin.drive_high()
    assert wait_until(lambda: any(k == "door_opened" for k, _ in events), 3.0)
    pin.drive_low()
    time.sleep(0.4)
    kinds = [k for k, _ in events]
    assert kinds == ["door_opened", "door_closed"]
    assert events[0][1] == {"forced": False}
    contact.close()
    contact.close()
    door.close()


def test_a_pin_that_cannot_be_driven_is_a_one_line_config_error(factory):
    with pytest.raises(ConfigError, match=r"door.relay_pin = 99: cannot drive the pin") as e:
        Door(99, pin_factory=factory)
    assert "\n" not in str(e.value)
    door = Door(5, pin_factory=factory)
    with pytest.raises(ConfigError, match="in use"):
        Door(5, pin_factory=factory)  # e.g. a second daemon on the same relay
    door.close()
