"""Home Assistant discovery payloads carry what HA requires per platform; remote unlock only when enabled;
signed unlock commands are verified (fresh, single use, never retained)."""
from __future__ import annotations

import json

import pytest

from edgeface.config import parse_config
from edgeface.hass import device_discovery, discovery_messages, validate_discovery
from edgeface.remote import CommandVerifier, NonceStore, make_command, sign


def config(**mqtt):
    return parse_config({"door": {"door_id": "front", "contact_pin": 27}, "mqtt": mqtt})


def test_device_discovery_has_required_keys():
    payload = device_discovery(config())
    assert validate_discovery(payload) == []
    assert payload["dev"]["identifiers"] and payload["o"]["name"] == "edgeface"
    comps = {c["p"]: c for c in payload["cmps"].values() if set(c) - {"p"}}
    event = comps["event"]
    assert event["event_types"] == ["granted", "denied", "unknown"] and event["state_topic"] == "edgeface/front/event"
    door = [c for c in payload["cmps"].values() if c.get("device_class") == "door"]
    assert door and door[0]["state_topic"] == "edgeface/front/contact"
    sensors = [c for c in payload["cmps"].values() if c.get("p") == "sensor"]
    assert {c["state_topic"] for c in sensors} == {"edgeface/front/last_person", "edgeface/front/camera"}
    assert payload["availability"][0]["topic"] == "edgeface/front/availability"
    uids = [c["unique_id"] for c in payload["cmps"].values() if "unique_id" in c]
    assert len(uids) == len(set(uids))


def test_no_lock_unless_remote_unlock_is_enabled():
    off = device_discovery(config())
    locks = [c for c in off["cmps"].values() if c["p"] == "lock"]
    assert locks == [{"p": "lock"}]  # only the removal entry
    on = device_discovery(config(remote_unlock=True))
    lock = next(c for c in on["cmps"].values() if c["p"] == "lock")
    assert lock["command_topic"] == "edgeface/front/unlock/set" and lock["retain"] is False
    assert validate_discovery(on) == []


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
