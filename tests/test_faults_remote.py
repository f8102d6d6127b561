"""Refused remote-unlock commands: a flood is counted, not written one by one; odd fields are audited safely.

What a user relies on: thousands of refused commands (a script on the broker, a broken client) neither delay a
valid command nor push the grants out of the audit log; a nonce with a lone surrogate is refused and audited
instead of crashing the handler; the signature covers `ts` exactly as it was sent. Real mosquitto, real
SQLite, gpiozero MockFactory pins.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import NoAnalyzer
from gpiozero.pins.mock import MockFactory

from edgeface.events.audit import AuditLog
from edgeface.config import parse_config
from edgeface.daemon.app import Daemon
from edgeface.events.remote import CommandVerifier, NonceStore, RefusalLimiter, make_command, sign
from edgeface.testing import Collector, MosquittoBroker, mosquitto_path, pin_levels, wait_until

SECRET = "a-long-shared-secret-for-tests"
FACES = Path(__file__).resolve().parent / "fixtures" / "faces"
needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")


@pytest.fixture
def verifier(tmp_path):
    store = NonceStore(tmp_path / "nonces.db", keep_s=120)
    yield CommandVerifier(SECRET, "front", max_age_s=30, nonces=store)
    store.close()


def test_lone_surrogate_nonce_is_refused_not_raised(verifier):
    payload = b'{"nonce": "\\ud800abcdefghij", "ts": %d, "sig": "00"}' % int(time.time())
    verdict = verifier.verify(payload, retained=False, now=time.time())  # before the fix: UnicodeEncodeError
    assert not verdict.accepted and "malformed" in verdict.reason


def test_ts_is_verified_as_sent(verifier):
    now = time.time()
    ts_text = f"{int(now)}.50"  # what a client in another language may send: signed over its own text
    nonce = "n" * 16
    sig = sign(SECRET, "front", nonce, ts_text)
    as_sent = f'{{"nonce": "{nonce}", "ts": {ts_text}, "sig": "{sig}"}}'.encode()
    assert verifier.verify(as_sent, retained=False, now=now).accepted
    # the same value written another way is another message: the signature was not made over this text
    nonce2 = "m" * 16
    sig2 = sign(SECRET, "front", nonce2, ts_text)
    rewritten = f'{{"nonce": "{nonce2}", "ts": {int(now)}.5, "sig": "{sig2}"}}'.encode()
    verdict = verifier.verify(rewritten, retained=False, now=now)
    assert not verdict.accepted and "signature" in verdict.reason
    # and the commands edgeface itself makes (integer ts) still verify
    assert verifier.verify(json.dumps(make_command(SECRET, "front", now=now)).encode(), retained=False, now=now).accepted


def test_refused_noise_never_pushes_grants_out_of_the_audit_log(tmp_path):
    log = AuditLog(tmp_path / "audit.db", max_rows=1000)
    for i in range(38):
        log.record("access", result="granted", person_name=f"p{i}", event_id=f"g{i}")
    for i in range(3000):  # before the fix: rotation erased all 38 grants
        log.record("remote_unlock", result="refused", reason="bad signature")
        log.record("door", result="remote_unlock_refused", reason="bad signature")
    log.rotate()
    grants = [r for r in log.rows("access", limit=10_000) if r["result"] == "granted"]
    noise = log.rows("remote_unlock", limit=10_000)
    log.close()
    assert len(grants) == 38
    assert 0 < len(noise) <= 1000  # the noise class is bounded on its own


@pytest.mark.broker
@needs_broker
def test_flood_of_refused_commands_is_aggregated_and_a_valid_one_still_opens(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    broker = MosquittoBroker().start()
    pins = MockFactory()
    state = tmp_path / "state"
    cfg = parse_config({
        "state_dir": str(state), "camera": {"source": str(FACES / "paul_allen")},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 0.2, "pin_factory": "mock"},
        "mqtt": {"host": broker.host, "port": broker.port, "remote_unlock": True, "ha_discovery": False},
        "gallery": {"path": "gallery.db"}, "embedder": {"model": "test_model"}})

    n_bad = 3000
    caplog.set_level(logging.WARNING, logger="edgeface.daemon.commands")
    with Collector(broker.host, broker.port, "edgeface/front/door_event") as sub:
        with Daemon(cfg, analyzer=NoAnalyzer(), pin_factory=pins) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)  # its subscription is in place
            now = int(time.time())
            for i in range(n_bad):
                bad = {"nonce": f"flood-{i:08d}", "ts": now, "sig": "0" * 64}
                sub.client.publish("edgeface/front/unlock/set", json.dumps(bad), qos=0)
            surrogate = b'{"nonce": "\\udc80surrogate", "ts": %d, "sig": "00"}' % now
            sub.client.publish("edgeface/front/unlock/set", surrogate, qos=1)
            sub.client.publish("edgeface/front/unlock/set", json.dumps(make_command(SECRET, "front")), qos=1)
            assert wait_until(lambda: len(pin_levels(pins.pin(17))) > 1, 60), "the valid command never opened"
            assert pin_levels(pins.pin(17))[:2] == [False, True]
            audit = daemon.audit.path
        # after close: the last window's count is flushed too
        rows = sqlite3.connect(audit).execute(
            "SELECT result, detail FROM audit WHERE kind = 'remote_unlock' ORDER BY id").fetchall()
    broker.close()
    pins.close()
    refused = [json.loads(d) for r, d in rows if r == "refused"]
    assert [r for r, _ in rows].count("accepted") == 1
    limiter = RefusalLimiter()
    # each 10 s window: its first 10 one by one, then one summary; the flood lasts a few seconds (<= 3 windows)
    assert len(refused) <= 3 * (limiter.burst + 1), f"{len(refused)} audit rows for {n_bad + 1} refused commands"
    assert sum(d.get("count", 1) for d in refused) == n_bad + 1  # every attempt counted, none lost
    assert any("malformed" in (d.get("reason") or "") or "malformed" in json.dumps(d.get("reasons", {}))
               for d in refused)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeface.daemon.commands"]
    assert any("rate-limited" in m and "bad signature x" in m for m in lines), lines[-5:]
    assert sum("remote unlock refused" in m for m in lines) <= 3 * (RefusalLimiter().burst + 1)  # no log flood
