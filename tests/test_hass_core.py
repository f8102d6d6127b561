"""edgeface against a REAL Home Assistant core (PyPI `homeassistant`, in its own venv made by tools/ha-venv.sh) and a
real mosquitto, both on 127.0.0.1: HA is onboarded over REST, the MQTT integration is added through its config flow,
the daemon runs on real JPEGs with MockFactory pins, and everything is checked through HA's REST API: the entities,
a granted and an unknown event, the door alarms, the access switch, an unlock from HA's lock service with a one-time
code that opens the mock relay exactly once and is refused when replayed, and availability offline on stop.

Skips (with the reason) when the HA venv or mosquitto is missing; CI builds the venv in .ci/run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest

from edgeface.testing import MosquittoBroker, free_port, mosquitto_path, pin_levels, stop_process, wait_until

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
HA_VENV = Path(os.environ.get("EDGEFACE_HA_VENV", Path.home() / ".cache" / "edgeface" / "ha-venv"))
HASS = HA_VENV / "bin" / "hass"
READY = HA_VENV / ".edgeface-ha-ready"
HA_START_TIMEOUT_S = 240.0
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # base32, 160 bits (a test value)

pytestmark = [
    pytest.mark.slow, pytest.mark.broker,
    pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)"),
    pytest.mark.skipif(not (HASS.exists() and READY.exists()),
                       reason=f"needs a Home Assistant core in {HA_VENV} (run tools/ha-venv.sh; needs Python >= 3.13)"),
]


class HomeAssistant:
    """`hass` in a temporary config dir on 127.0.0.1:<free port>, with only what the test needs (no default_config,
    nothing that reaches the network); `--skip-pip`: the venv has every requirement, HA never installs any."""

    def __init__(self, config_dir: Path) -> None:
        self.dir = config_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: Optional[str] = None
        self.log = config_dir / "home-assistant.log"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "configuration.yaml").write_text(f"""
homeassistant:
  name: edgeface test
  latitude: 52.52
  longitude: 13.40
  elevation: 0
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
  internal_url: {self.url}
http:
  server_host: 127.0.0.1
  server_port: {self.port}
api:
config:
logger:
  default: warning
input_text:
  last_person_changes:
    max: 255
automation:
  - alias: "Record every Last person state change"
    mode: queued
    triggers:
      - trigger: state
        entity_id: sensor.edgeface_front_last_person
    conditions:
      - condition: template
        value_template: "{{{{ trigger.to_state.state not in ['unavailable', 'unknown'] }}}}"
    actions:
      - action: input_text.set_value
        target:
          entity_id: input_text.last_person_changes
        data:
          value: >-
            {{{{ states('input_text.last_person_changes') }}}};{{{{ trigger.to_state.state }}}}/{{{{
            trigger.to_state.attributes.result }}}}
""")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen([str(HASS), "-c", str(self.dir), "--skip-pip", "--log-file", str(self.log),
                                      "--log-no-color"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"hass exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", "/api/onboarding", auth=False, timeout=2) is not None:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"Home Assistant did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True, form: bool = False,
                timeout: float = 30) -> Any:
        data = None
        headers = {}
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # 127.0.0.1 only
            text = resp.read().decode()
        return json.loads(text) if text else None

    def onboard(self) -> None:
        """Owner account -> auth code -> access token, as the onboarding UI does it."""
        client_id = self.url + "/"
        code = self.request("POST", "/api/onboarding/users", {
            "client_id": client_id, "name": "Owner", "username": "owner", "password": "edgeface-test-pw",
            "language": "en"}, auth=False)["auth_code"]
        token = self.request("POST", "/auth/token", {"grant_type": "authorization_code", "code": code,
                                                     "client_id": client_id}, auth=False, form=True)
        self.token = token["access_token"]

    def add_mqtt(self, host: str, port: int) -> dict[str, Any]:
        """The MQTT integration through its config flow (what Settings > Devices > Add integration does)."""
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt",
                                                                         "show_advanced_options": False})
        for _ in range(3):  # a menu or form may come first; answer the broker form
            if flow.get("type") == "create_entry":
                return flow
            assert flow.get("type") == "form", flow
            assert flow.get("step_id") == "broker", flow
            flow = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                {"broker": host, "port": port})
        assert flow.get("type") == "create_entry", flow
        return flow

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self.request("GET", "/api/states")}

    def state(self, entity_id: str) -> Optional[dict[str, Any]]:
        try:
            return self.request("GET", f"/api/states/{entity_id}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def call(self, domain: str, service: str, **data: Any) -> Any:
        return self.request("POST", f"/api/services/{domain}/{service}", data)

    def wait_state(self, entity_id: str, pred, timeout: float = 30.0) -> dict[str, Any]:
        seen: list[Any] = []

        def check() -> bool:
            st = self.state(entity_id)
            seen.append(st)
            return st is not None and bool(pred(st))

        assert wait_until(check, timeout, interval=0.25), f"{entity_id}: last state {seen[-1] if seen else None}"
        return seen[-1]


@pytest.fixture(scope="module")
def broker():
    b = MosquittoBroker().start()
    yield b
    b.close()


@pytest.fixture(scope="module")
def hass(broker, tmp_path_factory):
    ha = HomeAssistant(tmp_path_factory.mktemp("ha-config"))
    started = time.monotonic()
    ha.start()
    try:
        ha.wait_ready(HA_START_TIMEOUT_S)
        ha.onboard()
        ha.add_mqtt(broker.host, broker.port)
        print(f"Home Assistant up and MQTT added in {time.monotonic() - started:.1f} s")
        yield ha
    finally:
        ha.stop()



def rising_edges(pin, since: int = 0) -> int:
    """Low-to-high changes of a mock pin after its `since`-th recorded state."""
    states = pin.states[max(0, since - 1):]
    return sum(1 for a, b in zip(states, states[1:]) if b.state and not a.state)


def test_edgeface_in_a_real_home_assistant(hass, broker, obama_gallery_file, analyzer, tmp_path, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource
    from edgeface.events.totp import code_now

    t_start = time.monotonic()
    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", SECRET)
    state = tmp_path / "state"
    state.mkdir()
    shutil.copyfile(obama_gallery_file, state / "gallery.db")
    cfg = parse_config({
        "state_dir": str(state),
        "camera": {"source": str(FACES)},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 5.0, "cooldown_s": 3.0, "unknown_interval_s": 5.0},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 1.0, "pin_factory": "mock", "contact_pin": 27,
                 "held_open_s": 1.0},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5, "remote_unlock": True,
                 "remote_unlock_totp": True},
    })
    pins = MockFactory()
    relay = pins.pin(17)
    contact = pins.pin(27)
    clock = {"t": time.time()}

    def tick() -> float:  # frame times of a 5 fps camera
        clock["t"] += 0.2
        return clock["t"]

    def show(photo: Path, n: int) -> None:
        folder = tmp_path / f"frames-{photo.stem}"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(photo, folder / photo.name)
        daemon.source = FolderSource(folder, repeat=n, clock=tick)
        daemon.run()

    daemon = Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins)
    try:
        contact.drive_low()  # the door is closed
        assert wait_until(lambda: daemon.contact.state == "closed")
        daemon.start()
        assert daemon.mqtt.wait_connected(10)
        entities = {
            "access": "event.edgeface_front_access", "door_event": "event.edgeface_front_door_event",
            "last_person": "sensor.edgeface_front_last_person", "camera": "sensor.edgeface_front_camera",
            "outbox": "sensor.edgeface_front_outbox", "relay": "binary_sensor.edgeface_front_relay",
            "door": "binary_sensor.edgeface_front_door", "lock": "lock.edgeface_front_remote_unlock",
            "switch": "switch.edgeface_front_access_enabled",
            "people": "sensor.edgeface_front_people", "people_enabled": "sensor.edgeface_front_people_enabled",
            "doorbell": "event.edgeface_front_doorbell", "refused": "sensor.edgeface_front_last_refused_unlock",
            "locked_out": "sensor.edgeface_front_unlock_codes_locked_out_until",
        }
        off_by_default = ("image.edgeface_front_last_face", "sensor.edgeface_front_barack_obama_arrived")
        for entity in entities.values():
            hass.wait_state(entity, lambda s: s["state"] != "unavailable", timeout=60)
        states = hass.states()
        ours = sorted(e for e in states if "edgeface_front" in e)
        assert ours == sorted(entities.values()), ours  # nothing else, nothing missing
        assert not any(e in states for e in off_by_default)  # presence and the face image only when asked for
        assert (states[entities["people"]]["state"], states[entities["people_enabled"]]["state"]) == ("1", "1")
        assert states[entities["doorbell"]]["attributes"]["device_class"] == "doorbell"
        assert states[entities["lock"]]["state"] == "locked"
        assert states[entities["relay"]]["state"] == "off" and states[entities["door"]]["state"] == "off"
        assert states[entities["switch"]]["state"] == "on" and states[entities["outbox"]]["state"] == "0"
        assert states[entities["access"]]["attributes"]["event_types"] == ["granted", "denied", "unknown"]
        assert "door_forced_open" in states[entities["door_event"]]["attributes"]["event_types"]

        # a granted and an unknown event; Last person changes ONCE per decision, name and result together
        hass.call("input_text", "set_value", entity_id="input_text.last_person_changes", value="")
        show(FACES / "barack_obama" / "barack_obama_04.jpg", 4)
        ev = hass.wait_state(entities["access"], lambda s: s["attributes"].get("event_type") == "granted")
        assert ev["attributes"]["person_name"] == "barack_obama" and "queued" not in ev["attributes"]
        hass.wait_state(entities["last_person"], lambda s: s["state"] == "barack_obama"
                        and s["attributes"].get("result") == "granted")
        show(FACES / "kit_harington" / "kit_harington_02.jpg", 5)
        ev = hass.wait_state(entities["access"], lambda s: s["attributes"].get("event_type") == "unknown")
        assert ev["attributes"]["person_name"] is None
        last = hass.wait_state(entities["last_person"], lambda s: s["state"] == "stranger")
        assert last["attributes"]["result"] == "unknown" and last["attributes"]["timestamp"] == ev["attributes"]["timestamp"]
        hass.wait_state(entities["doorbell"], lambda s: s["attributes"].get("event_type") == "ring")
        changes = hass.wait_state("input_text.last_person_changes", lambda s: s["state"].count(";") >= 2)
        time.sleep(1.0)  # a late extra change would show now
        assert hass.state("input_text.last_person_changes")["state"] == ";barack_obama/granted;stranger/unknown", \
            changes
        assert wait_until(lambda: relay.state is False, 5)

        # the door forced open (nobody was let in for a while), then held open
        time.sleep(3.2)  # past pulse_s + 2 s after the grant
        contact.drive_high()
        hass.wait_state(entities["door"], lambda s: s["state"] == "on")
        hass.wait_state(entities["door_event"], lambda s: s["attributes"].get("event_type") in
                        ("door_forced_open", "door_held_open"))
        hass.wait_state(entities["door_event"], lambda s: s["attributes"].get("event_type") == "door_held_open")
        contact.drive_low()
        hass.wait_state(entities["door_event"], lambda s: s["attributes"].get("event_type") == "door_closed")
        audit = [r["result"] for r in daemon.audit.rows("door")]
        assert "door_forced_open" in audit and "door_held_open" in audit

        # unlock from HA's lock service with the one-time code: the relay opens exactly once
        mark = len(relay.states)
        code = code_now(SECRET, time.time())
        hass.call("lock", "unlock", entity_id=entities["lock"], code=code)
        ev = hass.wait_state(entities["door_event"], lambda s: s["attributes"].get("event_type") == "remote_unlock")
        assert ev["attributes"]["detail"] == {"method": "totp"}
        hass.wait_state(entities["lock"], lambda s: s["state"] == "unlocked", timeout=10)
        hass.wait_state(entities["lock"], lambda s: s["state"] == "locked", timeout=10)  # the 1 s pulse ended
        assert rising_edges(relay, mark) == 1
        # the same code again: refused, the relay stays
        mark = len(relay.states)
        hass.call("lock", "unlock", entity_id=entities["lock"], code=code)
        ev = hass.wait_state(entities["door_event"],
                             lambda s: s["attributes"].get("event_type") == "remote_unlock_refused")
        assert "already used" in ev["attributes"]["detail"]["reason"]
        refused = hass.wait_state(entities["refused"], lambda s: "already used" in s["state"])  # beside the lock
        assert refused["attributes"]["method"] == "totp" and refused["attributes"]["locked_out_until"] is None
        time.sleep(0.5)
        assert rising_edges(relay, mark) == 0 and relay.state is False
        # a wrong code is refused; HA itself refuses a code of the wrong format before sending anything
        hass.call("lock", "unlock", entity_id=entities["lock"], code="000000" if code != "000000" else "111111")
        hass.wait_state(entities["door_event"], lambda s: "wrong code" in s["attributes"].get("detail", {})
                        .get("reason", ""))
        hass.wait_state(entities["refused"], lambda s: s["state"] == "wrong code")
        with pytest.raises(urllib.error.HTTPError):
            hass.call("lock", "unlock", entity_id=entities["lock"], code="12")
        # LOCK needs no code and is acknowledged
        hass.call("lock", "lock", entity_id=entities["lock"])
        hass.wait_state(entities["door_event"], lambda s: s["attributes"].get("event_type") == "remote_lock")
        assert relay.state is False and rising_edges(relay, mark) == 0
        assert pin_levels(relay)[-1] is False

        # the access switch: off in HA -> persisted off in edgeface; on again
        hass.call("switch", "turn_off", entity_id=entities["switch"])
        hass.wait_state(entities["switch"], lambda s: s["state"] == "off")
        assert not daemon.access.on and json.loads((state / "access.json").read_text())["enabled"] is False
        hass.call("switch", "turn_on", entity_id=entities["switch"])
        hass.wait_state(entities["switch"], lambda s: s["state"] == "on")
        assert daemon.access.on
        hass.wait_state(entities["outbox"], lambda s: s["state"] == "0" and s["attributes"]["delivered"] >= 8)
    finally:
        daemon.close()
        pins.close()
    # availability: every entity goes unavailable when the daemon stops
    for entity in entities.values():
        hass.wait_state(entity, lambda s: s["state"] == "unavailable", timeout=20)
    # HA had nothing to complain about in our discovery or messages
    problems = [line for line in hass.log.read_text(errors="replace").splitlines()
                if ("WARNING" in line or "ERROR" in line) and ("mqtt" in line.lower() or "edgeface" in line)]
    assert problems == []
    print(f"integration test body: {time.monotonic() - t_start:.1f} s")


def test_presence_and_face_image_entities_appear_when_enabled(hass, broker, obama_gallery_file, analyzer, tmp_path):
    """mqtt.ha_presence and mqtt.ha_face_image (both off by default): an *arrived* sensor per enrolled person that
    takes the time of the grant, and an image entity whose picture is the JPEG face crop."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    state = tmp_path / "state"
    state.mkdir()
    shutil.copyfile(obama_gallery_file, state / "gallery.db")
    cfg = parse_config({
        "state_dir": str(state), "camera": {"source": str(FACES)},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 5.0, "cooldown_s": 3.0},
        "door": {"door_id": "side", "relay_pin": 17, "pulse_s": 1.0, "pin_factory": "mock"},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5, "ha_presence": True,
                 "ha_face_image": True, "configuration_url": "http://door.local:8080"},
    })
    pins = MockFactory()
    clock = {"t": time.time()}

    def tick() -> float:
        clock["t"] += 0.2
        return clock["t"]

    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copyfile(FACES / "barack_obama" / "barack_obama_04.jpg", folder / "barack_obama_04.jpg")
    daemon = Daemon(cfg, analyzer=analyzer, source=FolderSource(folder, repeat=4, clock=tick), pin_factory=pins)
    try:
        daemon.start()
        assert daemon.mqtt.wait_connected(10)
        arrived, image = "sensor.edgeface_side_barack_obama_arrived", "image.edgeface_side_last_face"
        hass.wait_state(arrived, lambda s: s["state"] != "unavailable", timeout=60)
        hass.wait_state(image, lambda s: s["state"] != "unavailable", timeout=60)
        daemon.run()
        ev = hass.wait_state("event.edgeface_side_access", lambda s: s["attributes"].get("event_type") == "granted")
        st = hass.wait_state(arrived, lambda s: s["state"] not in ("unknown", "unavailable"))
        assert st["attributes"]["device_class"] == "timestamp"
        import datetime as dt

        granted_at = dt.datetime.fromisoformat(ev["attributes"]["timestamp"])
        assert dt.datetime.fromisoformat(st["state"]) == granted_at.replace(microsecond=0)  # HA keeps whole seconds
        pic = hass.wait_state(image, lambda s: s["state"] not in ("unknown", "unavailable"))
        req = urllib.request.Request(hass.url + pic["attributes"]["entity_picture"],
                                     headers={"Authorization": f"Bearer {hass.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # 127.0.0.1 only
            assert resp.headers["Content-Type"] == "image/jpeg" and resp.read()[:2] == b"\xff\xd8"
    finally:
        daemon.close()
        pins.close()


def test_the_automation_examples_in_docs_pass_home_assistants_config_check(tmp_path):
    """docs/mqtt.md's automation YAML, as a user pastes it, through `hass --script check_config` (triggers,
    conditions and templates are validated; an invalid key or template is an ERROR line)."""
    import re

    text = (REPO / "docs" / "mqtt.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("automation:")]
    assert len(blocks) == 1
    (tmp_path / "configuration.yaml").write_text(
        "homeassistant:\n  time_zone: UTC\n" + blocks[0]
        + "input_text:\n  front_seen:\n    max: 255\n  door_code:\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run([str(HASS), "--script", "check_config", "-c", str(tmp_path)], env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, lines
    assert [line for line in lines if "ERROR" in line or "Failed config" in line or "Invalid config" in line] == []
    assert not any("Attempting install" in line for line in lines)  # everything it needs is in the venv
