"""Home Assistant discovery payloads carry what HA requires per platform; remote unlock only when enabled;
signed unlock commands are verified (fresh, single use, never retained)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from edgeface.config import parse_config
from edgeface.events.hass import device_discovery, discovery_messages, discovery_topic, node_id, validate_discovery
from edgeface.testing import Collector, MosquittoBroker, mosquitto_path, pin_levels, wait_until
from edgeface.events.totp import HA_CODE_FORMAT, HA_COMMAND_TEMPLATE, code_now
from edgeface.events.remote import CommandVerifier, NonceStore, make_command, sign


def config(contact_pin=27, prefix="edgeface", **mqtt):
    return parse_config({"door": {"door_id": "front", "contact_pin": contact_pin},
                         "mqtt": {"topic_prefix": prefix, **mqtt}})


def components(payload):
    """platform -> [component] of the live (not removal) components."""
    out: dict[str, list[dict]] = {}
    for c in payload["cmps"].values():
        if set(c) - {"p"}:
            out.setdefault(c["p"], []).append(c)
    return out


def test_device_discovery_has_required_keys():
    payload = device_discovery(config())
    assert validate_discovery(payload) == []
    assert payload["dev"]["identifiers"] == ["edgeface_front"] and payload["o"]["name"] == "edgeface"
    comps = components(payload)
    events = {c["state_topic"]: c for c in comps["event"]}
    assert events["edgeface/front/event"]["event_types"] == ["granted", "denied", "unknown"]
    assert set(events["edgeface/front/door_event"]["event_types"]) >= {
        "door_forced_open", "door_held_open", "remote_unlock", "remote_unlock_refused", "remote_lock"}
    door = [c for c in comps["binary_sensor"] if c.get("device_class") == "door"]
    assert door and door[0]["state_topic"] == "edgeface/front/contact"
    assert {c["state_topic"] for c in comps["sensor"]} == {
        "edgeface/front/last_decision", "edgeface/front/camera", "edgeface/front/outbox", "edgeface/front/gallery"}
    last = next(c for c in comps["sensor"] if c["name"] == "Last person")
    assert last["state_topic"] == last["json_attributes_topic"] == "edgeface/front/last_decision"  # one message
    assert last["value_template"] == "{{ value_json.name }}"
    people = {c["name"]: c["value_template"] for c in comps["sensor"] if c["state_topic"] == "edgeface/front/gallery"}
    assert people == {"People": "{{ value_json.people }}", "People enabled": "{{ value_json.enabled }}"}
    doorbell, = [c for c in comps["event"] if c.get("device_class") == "doorbell"]
    assert (doorbell["state_topic"], doorbell["event_types"]) == ("edgeface/front/doorbell", ["ring"])
    switch, = comps["switch"]
    assert (switch["command_topic"], switch["state_topic"]) == ("edgeface/front/access/set", "edgeface/front/access")
    assert payload["availability"][0]["topic"] == "edgeface/front/availability"
    uids = [c["unique_id"] for c in payload["cmps"].values() if "unique_id" in c]
    # removal entries: the lock and the refusal sensors (remote unlock off), the face image (off by default),
    # fleet_stale (fleet off)
    assert len(uids) == len(set(uids)) == len(payload["cmps"]) - 5


def test_every_component_has_qos_1():
    """HA ignores a device-level qos and subscribes with QoS 0 unless each component says otherwise."""
    payload = device_discovery(config(remote_unlock=True, remote_unlock_totp=True))
    live = [c for c in payload["cmps"].values() if set(c) - {"p"}]
    assert len(live) == 14 and all(c["qos"] == 1 for c in live)
    live[0].pop("qos")
    assert any("qos" in p for p in validate_discovery(payload))


def test_lock_only_with_one_time_codes():
    for kw in ({}, {"remote_unlock": True}):  # off, or signed commands only (HA cannot sign)
        locks = [c for c in device_discovery(config(**kw))["cmps"].values() if c["p"] == "lock"]
        assert locks == [{"p": "lock"}], kw  # only the removal entry
    on = device_discovery(config(remote_unlock=True, remote_unlock_totp=True))
    lock, = components(on)["lock"]
    assert lock["command_topic"] == "edgeface/front/unlock/set" and lock["retain"] is False
    assert lock["code_format"] == HA_CODE_FORMAT and lock["command_template"] == HA_COMMAND_TEMPLATE
    assert (lock["payload_unlock"], lock["payload_lock"], lock["state_topic"]) == ("UNLOCK", "LOCK",
                                                                                  "edgeface/front/relay")
    assert validate_discovery(on) == []


def test_removed_contact_pin_and_switch_remove_their_entities():
    payload = device_discovery(config(contact_pin=None, access_switch=False))
    assert payload["cmps"]["edgeface_front_door"] == {"p": "binary_sensor"}
    assert payload["cmps"]["edgeface_front_access_enabled"] == {"p": "switch"}
    assert validate_discovery(payload) == []


def test_topic_prefix_keeps_two_daemons_with_one_door_apart():
    a, b = config(prefix="edgeface"), config(prefix="garage")
    assert discovery_topic(a) == "homeassistant/device/edgeface_front/config"  # the default is unchanged
    assert discovery_topic(b) == "homeassistant/device/garage_front/config"
    ua = {c["unique_id"] for c in device_discovery(a)["cmps"].values() if "unique_id" in c}
    ub = {c["unique_id"] for c in device_discovery(b)["cmps"].values() if "unique_id" in c}
    assert ua.isdisjoint(ub)
    assert device_discovery(b)["dev"]["name"] == "edgeface front (garage)"
    slash, under = node_id(config(prefix="home/door")), node_id(config(prefix="home_door"))
    assert slash != under and re.fullmatch(r"[A-Za-z0-9_-]+", slash)
    assert components(device_discovery(b))["event"][0]["state_topic"] == "garage/front/event"


def test_validator_catches_missing_keys():
    bad = device_discovery(config())
    del bad["o"]["name"]
    bad["dev"].pop("identifiers")
    comp = next(c for c in bad["cmps"].values() if c["p"] == "event")
    comp.pop("event_types")
    problems = validate_discovery(bad)
    assert any("origin" in p for p in problems) and any("identifiers" in p for p in problems)
    assert any("event_types" in p for p in problems)


def test_discovery_topic_and_json():
    (topic, payload), = discovery_messages(config(ha_prefix="ha"))
    assert topic == "ha/device/edgeface_front/config"
    assert validate_discovery(json.loads(payload)) == []
    (topic, payload), = discovery_messages(config(ha_discovery=False))
    assert (topic, payload) == ("homeassistant/device/edgeface_front/config", "")  # removes the device


@pytest.fixture()
def verifier(tmp_path):
    store = NonceStore(tmp_path / "nonces.db", keep_s=120)
    yield CommandVerifier("s3cret", "front", max_age_s=30, nonces=store)
    store.close()


def test_signed_fresh_command_is_accepted_once(verifier):
    cmd = make_command("s3cret", "front", now=1_000_000)
    raw = json.dumps(cmd).encode()
    assert verifier.verify(raw, retained=False, now=1_000_005).accepted
    again = verifier.verify(raw, retained=False, now=1_000_006)
    assert not again.accepted and "replay" in again.reason


@pytest.mark.parametrize("mutate, why", [
    (lambda c: {**c, "sig": "0" * 64}, "bad signature"),
    (lambda c: {**c, "nonce": c["nonce"] + "x"}, "bad signature"),
    (lambda c: {k: v for k, v in c.items() if k != "sig"}, "malformed"),
])
def test_tampered_commands_are_refused(verifier, mutate, why):
    cmd = mutate(make_command("s3cret", "front", now=1_000_000))
    v = verifier.verify(json.dumps(cmd).encode(), retained=False, now=1_000_000)
    assert not v.accepted and why in v.reason


def test_stale_retained_wrong_door_and_garbage_are_refused(verifier):
    old = make_command("s3cret", "front", now=1_000_000)
    assert "stale" in verifier.verify(json.dumps(old).encode(), retained=False, now=1_000_031).reason
    fresh = make_command("s3cret", "front", now=1_000_000)
    assert "retained" in verifier.verify(json.dumps(fresh).encode(), retained=True, now=1_000_000).reason
    other = make_command("s3cret", "back", now=1_000_000)
    assert verifier.verify(json.dumps(other).encode(), retained=False, now=1_000_000).reason == "bad signature"
    assert not verifier.verify(b"UNLOCK", retained=False, now=1_000_000).accepted


def test_nonces_survive_a_restart(tmp_path):
    cmd = make_command("k", "front", now=500)
    raw = json.dumps(cmd).encode()
    s1 = NonceStore(tmp_path / "n.db", keep_s=60)
    assert CommandVerifier("k", "front", max_age_s=30, nonces=s1).verify(raw, retained=False, now=501).accepted
    s1.close()
    s2 = NonceStore(tmp_path / "n.db", keep_s=60)
    assert not CommandVerifier("k", "front", max_age_s=30, nonces=s2).verify(raw, retained=False, now=502).accepted
    s2.close()


def test_signature_is_hmac_sha256_of_the_documented_message():
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"front|abc12345|1700000000", hashlib.sha256).hexdigest()
    assert sign("k", "front", "abc12345", 1700000000) == expected


# ----------------------------------------------------------------- the daemon's HA commands on a real mosquitto
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
FACES = Path(__file__).resolve().parent / "fixtures" / "faces"
needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")


@pytest.fixture()
def broker():
    b = MosquittoBroker().start()
    yield b
    b.close()


def daemon_config(tmp_path, broker, **mqtt):
    return parse_config({
        "state_dir": str(tmp_path / "state"), "camera": {"source": str(FACES)},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 30.0, "pin_factory": "mock"},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5, "remote_unlock": True,
                 "remote_unlock_totp": True, **mqtt},
    })


@pytest.mark.broker
@needs_broker
def test_ha_unlock_with_a_one_time_code_lock_and_refusals(tmp_path, analyzer, broker, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", TOTP_SECRET)
    monkeypatch.delenv("EDGEFACE_UNLOCK_SECRET", raising=False)  # one-time codes only: signed commands are off
    cfg = daemon_config(tmp_path, broker)
    pins = MockFactory()
    relay = pins.pin(17)
    unlock = "edgeface/front/unlock/set"
    with Collector(broker.host, broker.port, "edgeface/front/#") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)  # its subscriptions are in place
            code = code_now(TOTP_SECRET, time.time())
            command = json.dumps({"action": "UNLOCK", "code": code})  # what HA's command_template renders
            sub.client.publish(unlock, command, qos=1)
            assert wait_until(lambda: relay.state is True)
            sub.client.publish(unlock, command, qos=1)  # replayed
            sub.client.publish(unlock, '{"action": "LOCK", "code": ""}', qos=1)  # ends the 30 s pulse
            assert wait_until(lambda: relay.state is False, 5)
            sub.client.publish(unlock, json.dumps(make_command("s3cret", "front")), qos=1)
            sub.client.publish(unlock, "UNLOCK", qos=1)  # HA without the command template: no code
            got = sub.json_on("edgeface/front/door_event") if wait_until(
                lambda: len(sub.on_topic("edgeface/front/door_event")) >= 5) else []
    assert [(e["event_type"], e["detail"].get("method")) for e in got] == [
        ("remote_unlock", "totp"), ("remote_unlock_refused", "totp"), ("remote_lock", None),
        ("remote_unlock_refused", "signed"), ("remote_unlock_refused", "totp")]
    reasons = [e["detail"].get("reason", "") for e in got]
    assert "already used" in reasons[1] and "signed commands are off" in reasons[3] and "no code" in reasons[4]
    assert got[2]["detail"] == {"was_unlocked": True}
    assert pin_levels(relay) == [False, True, False]  # opened once
    assert sub.on_topic("edgeface/front/relay")[-2:] == [b"unlocked", b"locked"]  # HA's lock state follows
    pins.close()


@pytest.mark.broker
@needs_broker
def test_retained_commands_are_ignored_after_a_restart(tmp_path, analyzer, broker, monkeypatch):
    """A retained UNLOCK (with a valid fresh code) or ON would re-fire on every reconnect: both are ignored."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", TOTP_SECRET)
    cfg = daemon_config(tmp_path, broker)
    with Collector(broker.host, broker.port, "edgeface/front/#") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=MockFactory()) as d1:
            d1.start()
            assert d1.mqtt.wait_connected(10)
            time.sleep(0.3)
            sub.client.publish("edgeface/front/access/set", "OFF", qos=1)
            assert wait_until(lambda: not d1.access.on)
            assert wait_until(lambda: sub.on_topic("edgeface/front/access")[-1:] == [b"OFF"])
        code = code_now(TOTP_SECRET, time.time())
        sub.client.publish("edgeface/front/unlock/set", json.dumps({"action": "UNLOCK", "code": code}), qos=1,
                           retain=True).wait_for_publish(5)
        sub.client.publish("edgeface/front/access/set", "ON", qos=1, retain=True).wait_for_publish(5)
        pins = MockFactory()
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as d2:
            assert not d2.access.on  # the switch state survived the restart
            d2.start()
            assert d2.mqtt.wait_connected(10)
            assert wait_until(lambda: len(d2.audit.rows("remote_unlock")) == 1 and d2.audit.rows("access_switch"))
            time.sleep(0.3)
            assert not d2.access.on and pin_levels(pins.pin(17)) == [False]
            assert d2.audit.rows("remote_unlock")[0]["result"] == "refused"
            assert "retained" in json.dumps(d2.audit.rows("remote_unlock")[0])
        for topic in ("edgeface/front/unlock/set", "edgeface/front/access/set"):
            sub.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    pins.close()


@pytest.mark.broker
@needs_broker
def test_last_person_says_stranger_with_result_and_time_as_attributes(tmp_path, analyzer, broker):
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource
    from edgeface.vision.images import load_image
    from edgeface.types import Frame

    cfg = daemon_config(tmp_path, broker, remote_unlock=False, remote_unlock_totp=False)
    image = load_image(FACES / "kit_harington" / "kit_harington_02.jpg")  # nobody is enrolled: a stranger
    with Collector(broker.host, broker.port, "edgeface/front/#") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=MockFactory()) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            t = time.time()
            assert [daemon.process_frame(Frame(image=image, timestamp=t + i * 0.2)).action for i in range(3)] \
                == ["none", "none", "unknown"]
            assert sub.last("edgeface/front/last_person") == b"stranger"
            attrs = json.loads(sub.last("edgeface/front/last_decision"))
            event = json.loads(sub.last("edgeface/front/event"))
    assert attrs["result"] == "unknown" and attrs["person_name"] is None and attrs["name"] == "stranger"
    assert (attrs["timestamp"], attrs["event_id"]) == (event["timestamp"], event["event_id"])


# ----------------------------------------------------------------- entities beyond the access events
def test_presence_image_and_refusal_entities_only_when_wanted():
    people = [(1, "Ada"), (2, "Bob")]
    default = device_discovery(config(), people=people)
    assert default["cmps"]["edgeface_front_presence_1"] == {"p": "sensor"}  # off by default: removal entries
    assert default["cmps"]["edgeface_front_face_image"] == {"p": "image"}
    assert "cu" not in default["dev"]
    on = device_discovery(config(ha_presence=True, ha_face_image=True, remote_unlock=True, remote_unlock_totp=True,
                                 configuration_url="http://door.local:8080"), people=people, removed_people=[3])
    assert validate_discovery(on) == []
    ada = on["cmps"]["edgeface_front_presence_1"]
    assert (ada["name"], ada["state_topic"], ada["device_class"]) == ("Ada arrived", "edgeface/front/presence/1",
                                                                      "timestamp")
    assert on["cmps"]["edgeface_front_presence_3"] == {"p": "sensor"}  # removed from the gallery
    image = on["cmps"]["edgeface_front_face_image"]
    assert (image["image_topic"], image["content_type"]) == ("edgeface/front/face_image", "image/jpeg")
    refused = on["cmps"]["edgeface_front_unlock_refused"]
    assert refused["state_topic"] == refused["json_attributes_topic"] == "edgeface/front/unlock/refused"
    assert on["cmps"]["edgeface_front_unlock_locked_out_until"]["device_class"] == "timestamp"
    assert on["dev"]["cu"] == "http://door.local:8080"
    off = device_discovery(config(ha_doorbell=False))
    assert off["cmps"]["edgeface_front_doorbell"] == {"p": "event"}


def _enroll(daemon, analyzer, name):
    from edgeface.enroll import enroll_images

    photos = sorted((FACES / name).glob("*.jpg"))[:2]
    return daemon.gallery.enroll(name, enroll_images(analyzer, photos)).person_id


@pytest.mark.broker
@needs_broker
def test_one_last_decision_message_per_decision_with_presence_face_image_doorbell_and_counts(
        tmp_path, analyzer, broker, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.events import hass_state
    from edgeface.frames import FolderSource
    from edgeface.types import Frame
    from edgeface.vision.images import load_image

    monkeypatch.setattr(hass_state, "GALLERY_EVERY_S", 0.0)  # re-read the gallery on every frame
    cfg = daemon_config(tmp_path, broker, remote_unlock=False, remote_unlock_totp=False, ha_presence=True,
                        ha_face_image=True)
    obama = load_image(sorted((FACES / "barack_obama").glob("*.jpg"))[3])
    kit = load_image(FACES / "kit_harington" / "kit_harington_02.jpg")
    with Collector(broker.host, broker.port, ["edgeface/front/#", "homeassistant/#"]) as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=MockFactory()) as daemon:
            pid = _enroll(daemon, analyzer, "barack_obama")
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            t = time.time()
            actions = [daemon.process_frame(Frame(image=obama, timestamp=t + i * 0.2)).action for i in range(3)]
            actions += [daemon.process_frame(Frame(image=kit, timestamp=t + 10 + i * 0.2)).action for i in range(3)]
            assert actions == ["none", "none", "grant", "none", "none", "unknown"]
            assert wait_until(lambda: len(sub.on_topic("edgeface/front/last_decision")) >= 2)
            assert wait_until(lambda: sub.on_topic("edgeface/front/doorbell"))
            assert wait_until(lambda: len(sub.on_topic("edgeface/front/face_image")) >= 2)
            assert wait_until(lambda: sub.on_topic(f"edgeface/front/presence/{pid}"))
            time.sleep(0.5)
            events = sub.json_on("edgeface/front/event")
            decisions = sub.json_on("edgeface/front/last_decision")
            discovery = json.loads(sub.on_topic("homeassistant/device/edgeface_front/config")[-1])
            gallery = json.loads(sub.last("edgeface/front/gallery"))
    assert [(d["name"], d["result"]) for d in decisions] == [("barack_obama", "granted"), ("stranger", "unknown")]
    assert [d["event_id"] for d in decisions] == [e["event_id"] for e in events]  # one message each, in order
    ring, = sub.json_on("edgeface/front/doorbell")
    assert ring["event_type"] == "ring" and ring["access_event_id"] == events[1]["event_id"]
    assert sub.on_topic(f"edgeface/front/presence/{pid}") == [events[0]["timestamp"].encode()]
    assert all(img[:2] == b"\xff\xd8" for img in sub.on_topic("edgeface/front/face_image"))  # JPEG crops
    assert discovery["cmps"][f"edgeface_front_presence_{pid}"]["name"] == "barack_obama arrived"
    assert gallery == {"people": 1, "enabled": 1}


@pytest.mark.broker
@needs_broker
def test_a_refused_code_and_the_lockout_show_on_the_refusal_sensor(tmp_path, analyzer, broker, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", TOTP_SECRET)
    monkeypatch.delenv("EDGEFACE_UNLOCK_SECRET", raising=False)
    cfg = daemon_config(tmp_path, broker)
    now = time.time()
    right = code_now(TOTP_SECRET, now)
    wrong = next(c for c in ("123456", "654321", "111111") if c not in
                 {code_now(TOTP_SECRET, now + k * 30) for k in (-1, 0, 1, 2)})
    topic = "edgeface/front/unlock/refused"
    with Collector(broker.host, broker.port, "edgeface/front/#") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=MockFactory()) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)
            sub.client.publish("edgeface/front/unlock/set", json.dumps({"action": "UNLOCK", "code": wrong}), qos=1)
            assert wait_until(lambda: sub.on_topic(topic))
            first = json.loads(sub.on_topic(topic)[0])
            for _ in range(4):  # five wrong in a row: codes are refused for a while
                sub.client.publish("edgeface/front/unlock/set", json.dumps({"action": "UNLOCK", "code": wrong}),
                                   qos=1)
            sub.client.publish("edgeface/front/unlock/set", json.dumps({"action": "UNLOCK", "code": right}), qos=1)
            assert wait_until(lambda: len(sub.on_topic(topic)) >= 6)
            last = json.loads(sub.on_topic(topic)[-1])
    assert (first["reason"], first["method"], first["locked_out_until"]) == ("wrong code", "totp", None)
    assert "locked out" in last["reason"] and last["locked_out_until"] is not None
