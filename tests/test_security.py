"""Security properties a user relies on: authenticated single-use remote unlock, MQTT over TLS with client
certificates, secrets kept out of logs, private state files, and erased biometrics after `people remove`.

Real substitutes only: a mosquitto broker on 127.0.0.1 with TLS (certificates made by
tools/make_test_certs.sh with openssl), real SQLite files, real log records.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeface.config import MqttConfig, parse_config
from edgeface.gallery import Chip, EnrollItem, Gallery
from edgeface.events.outbox import Outbox
from edgeface.events.remote import CommandVerifier, NonceStore, make_command, sign
from edgeface.security import (SecretRedactor, create_private_file, ensure_private_dir, install_redaction,
                               make_private, permission_problems)
from edgeface.testing import free_port, mosquitto_path, stop_process, wait_listening
from edgeface.types import Face

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-unlock-key-for-tests-7f1c"
needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI is not installed")


# --------------------------------------------------------------------------------------------- remote unlock

@pytest.fixture
def verifier(tmp_path):
    store = NonceStore(tmp_path / "nonces.db", keep_s=120)
    yield CommandVerifier(SECRET, "front", max_age_s=30, nonces=store)
    store.close()


def _payload(cmd: dict) -> bytes:
    return json.dumps(cmd).encode()


def test_remote_unlock_is_off_by_default():
    assert parse_config({}).mqtt.remote_unlock is False


def test_fresh_signed_command_is_accepted_once(verifier):
    now = time.time()
    cmd = make_command(SECRET, "front", now=now)
    assert verifier.verify(_payload(cmd), retained=False, now=now).accepted
    replay = verifier.verify(_payload(cmd), retained=False, now=now + 1)
    assert not replay.accepted and "replay" in replay.reason


def test_replay_after_restart_is_refused(tmp_path):
    now = time.time()
    cmd = make_command(SECRET, "front", now=now)
    store = NonceStore(tmp_path / "n.db", keep_s=120)
    assert CommandVerifier(SECRET, "front", max_age_s=30, nonces=store).verify(_payload(cmd), retained=False,
                                                                                 now=now).accepted
    store.close()
    store = NonceStore(tmp_path / "n.db", keep_s=120)  # the daemon restarted
    v = CommandVerifier(SECRET, "front", max_age_s=30, nonces=store).verify(_payload(cmd), retained=False, now=now + 2)
    store.close()
    assert not v.accepted and "replay" in v.reason


@pytest.mark.parametrize("case", ["stale", "future", "wrong_secret", "other_door", "tampered_ts", "retained",
                                  "no_sig", "not_json", "bool_ts", "short_nonce"])
def test_bad_commands_are_refused(verifier, case):
    now = time.time()
    cmd = make_command(SECRET, "front", now=now)
    retained = False
    if case == "stale":
        cmd = make_command(SECRET, "front", now=now - 31)
    elif case == "future":
        cmd = make_command(SECRET, "front", now=now + 31)
    elif case == "wrong_secret":
        cmd = make_command("another-secret", "front", now=now)
    elif case == "other_door":
        cmd = make_command(SECRET, "garage", now=now)
    elif case == "tampered_ts":
        cmd["ts"] = cmd["ts"] + 1
    elif case == "retained":
        retained = True
    elif case == "no_sig":
        del cmd["sig"]
    elif case == "bool_ts":
        cmd["ts"] = True
        cmd["sig"] = sign(SECRET, "front", cmd["nonce"], True)
    elif case == "short_nonce":
        cmd["nonce"] = "abc"
        cmd["sig"] = sign(SECRET, "front", "abc", cmd["ts"])
    payload = b"{not json" if case == "not_json" else _payload(cmd)
    verdict = verifier.verify(payload, retained=retained, now=now)
    assert not verdict.accepted, case
    assert verdict.reason


def test_empty_secret_is_refused(tmp_path):
    store = NonceStore(tmp_path / "n.db", keep_s=10)
    with pytest.raises(ValueError):
        CommandVerifier("", "front", max_age_s=30, nonces=store)
    store.close()


# --------------------------------------------------------------------------------------------- TLS broker

class TlsBroker:
    """mosquitto with one TLS listener (cafile/certfile/keyfile, require_certificate) on 127.0.0.1."""

    def __init__(self, workdir: Path, certs: Path, *, require_certificate: bool = True,
                 password_file: Path | None = None, tls: bool = True) -> None:
        self.port = free_port()
        self.log = workdir / "mosquitto.log"
        lines = []
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to 'mosquitto' and cannot read tmp_path
        lines += [f"listener {self.port} 127.0.0.1", "persistence false", f"log_dest file {self.log}",
                  "log_type all"]
        if tls:
            lines += [f"cafile {certs / 'ca.crt'}", f"certfile {certs / 'server.crt'}",
                      f"keyfile {certs / 'server.key'}", f"require_certificate {str(require_certificate).lower()}"]
        if password_file is not None:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_listening(self.proc, "127.0.0.1", self.port)

    def close(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI is not installed")
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(REPO / "tools" / "make_test_certs.sh"), str(d)], check=True, capture_output=True)
    other = tmp_path_factory.mktemp("other_ca")
    subprocess.run(["sh", str(REPO / "tools" / "make_test_certs.sh"), str(other)], check=True, capture_output=True)
    return d, other


def _tls_subscriber(port: int, certs: Path, topic: str):
    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-sub")
    c.tls_set(ca_certs=str(certs / "ca.crt"), certfile=str(certs / "client.crt"), keyfile=str(certs / "client.key"),
              cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, msg: got.append(bytes(msg.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert ready.wait(10), "TLS subscriber could not subscribe"
    return c, got


def _publisher(tmp_path: Path, port: int, **mqtt_kwargs):
    from edgeface.events.mqtt import MqttPublisher

    cfg = MqttConfig(host="127.0.0.1", port=port, ha_discovery=False, **mqtt_kwargs)
    outbox = Outbox(tmp_path / f"outbox-{port}-{len(list(tmp_path.iterdir()))}.db", max_events=1000)
    pub = MqttPublisher(cfg, door_id="front", outbox=outbox, password=mqtt_kwargs.pop("_password", None),
                        reconnect_min_s=1, reconnect_max_s=1)
    return pub, outbox


@pytest.mark.broker
@needs_broker
@needs_openssl
def test_mqtt_tls_with_client_certificate_delivers(tmp_path, certs):
    good, _other = certs
    broker = TlsBroker(tmp_path, good)
    sub = None
    pub, outbox = _publisher(tmp_path, broker.port, tls=True, ca_cert=str(good / "ca.crt"),
                             client_cert=str(good / "client.crt"), client_key=str(good / "client.key"))
    try:
        sub, got = _tls_subscriber(broker.port, good, pub.topics.event)
        pub.start()
        assert pub.wait_connected(10), pub.last_error
        pub.send_event("e-1", pub.topics.event, {"result": "granted"}, critical=True)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and json.loads(got[0]) == {"result": "granted"}
    finally:
        pub.stop()
        outbox.close()
        if sub is not None:
            sub.loop_stop()
            sub.disconnect()
        broker.close()


@pytest.mark.broker
@needs_broker
@needs_openssl
@pytest.mark.parametrize("variant", ["no_client_cert", "untrusted_ca", "wrong_client_ca"])
def test_mqtt_tls_refuses_untrusted_peers(tmp_path, certs, variant):
    """Without a client certificate the broker refuses us; with a foreign CA we refuse the broker.
    Either way nothing is sent and the event waits in the outbox."""
    good, other = certs
    broker = TlsBroker(tmp_path, good)
    kwargs = {"tls": True, "ca_cert": str(good / "ca.crt"),
              "client_cert": str(good / "client.crt"), "client_key": str(good / "client.key")}
    if variant == "no_client_cert":
        kwargs.pop("client_cert")
        kwargs.pop("client_key")
    elif variant == "untrusted_ca":
        kwargs["ca_cert"] = str(other / "ca.crt")
    else:  # a client certificate signed by another CA
        kwargs["client_cert"], kwargs["client_key"] = str(other / "client.crt"), str(other / "client.key")
    pub, outbox = _publisher(tmp_path, broker.port, **kwargs)
    try:
        pub.start()
        pub.send_event("e-1", pub.topics.event, {"result": "granted"}, critical=True)
        assert not pub.wait_connected(3)
        assert len(outbox) == 1
    finally:
        pub.stop(timeout=0.1)
        outbox.close()
        broker.close()
    assert "New client connected" not in broker.log.read_text(errors="replace")


# --------------------------------------------------------------------------------------------- secrets in logs

@pytest.mark.broker
@needs_broker
def test_secrets_never_reach_the_logs(tmp_path, caplog, monkeypatch):
    """MQTT password (right and wrong) and the unlock secret: used, refused, logged at DEBUG: never printed."""
    password = "mqtt-pa55word-do-not-log"
    pwfile = tmp_path / "passwd"
    pwfile.write_text(f"door:{password}\n")
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True)
    broker = TlsBroker(tmp_path, tmp_path, tls=False, password_file=pwfile)
    monkeypatch.setenv("EDGEFACE_MQTT_PASSWORD", password)
    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    from edgeface.config import read_secret
    from edgeface.events.mqtt import MqttPublisher

    try:
        for pw in (read_secret("EDGEFACE_MQTT_PASSWORD"), password + "-wrong"):
            cfg = MqttConfig(host="127.0.0.1", port=broker.port, username="door", ha_discovery=False,
                             remote_unlock=True)
            outbox = Outbox(tmp_path / f"o{len(pw)}.db")
            seen: list[bytes] = []
            pub = MqttPublisher(cfg, door_id="front", outbox=outbox, password=pw,
                                on_command=lambda t, p, r: seen.append(p), reconnect_min_s=1, reconnect_max_s=1)
            pub.client.enable_logger(logging.getLogger("paho"))
            pub.start()
            connected = pub.wait_connected(5)
            assert connected == (pw == password)
            pub.stop(timeout=0.5)
            outbox.close()
        store = NonceStore(tmp_path / "n.db", keep_s=60)
        ver = CommandVerifier(read_secret("EDGEFACE_UNLOCK_SECRET"), "front", max_age_s=30, nonces=store)
        now = time.time()
        for payload in (_payload(make_command(SECRET, "front", now=now)), b"junk",
                        _payload(make_command(SECRET + "x", "front", now=now))):
            logging.getLogger("edgeface.test").info("command verdict: %s", ver.verify(payload, retained=False, now=now))
        store.close()
    finally:
        broker.close()
    text = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    assert "refused the connection" in caplog.text  # the wrong password was reported...
    assert password not in text and SECRET not in text  # ...without the secrets
    assert "command verdict" in caplog.text


def test_secret_redactor_masks_messages_args_and_tracebacks():
    logger = logging.getLogger("edgeface.redact-test")
    logger.propagate = False
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = ListHandler()
    logger.addHandler(handler)
    try:
        red = install_redaction(["hunter2-password", None, "abc"], logger)  # 'abc' is too short to mask
        logger.warning("connecting with %s", "hunter2-password")
        try:
            raise RuntimeError("auth failed for hunter2-password")
        except RuntimeError:
            logger.exception("boom")
        logger.warning("abc stays")
    finally:
        logger.removeHandler(handler)
    assert records[0] == "connecting with ***"
    assert "hunter2-password" not in "\n".join(records) and "auth failed for ***" in records[1]
    assert records[2] == "abc stays"
    assert isinstance(red, SecretRedactor) and red.redact("x hunter2-password y") == "x *** y"


# --------------------------------------------------------------------------------------------- files on disk

def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_dir_and_file_helpers(tmp_path):
    d = ensure_private_dir(tmp_path / "state" / "edgeface")
    assert _mode(d) == 0o700
    os.chmod(d, 0o755)
    assert permission_problems([d]) and "expected 0700" in permission_problems([d])[0]
    ensure_private_dir(d)
    assert _mode(d) == 0o700 and permission_problems([d]) == []
    f = create_private_file(d / "x.db")
    assert _mode(f) == 0o600
    (d / "x.db-wal").write_bytes(b"")
    os.chmod(d / "x.db-wal", 0o644)
    make_private(f)
    assert _mode(d / "x.db-wal") == 0o600


def test_gallery_files_are_private(tmp_path):
    state = tmp_path / "state"
    g = Gallery.open(state / "gallery.db", model_id="m", max_distance=0.4)
    g.add_person("ada")
    try:
        assert _mode(state) == 0o700
        for p in state.iterdir():
            assert _mode(p) == 0o600, p
    finally:
        g.close()


def test_a_pre_existing_access_switch_file_is_made_private_and_still_read(tmp_path, caplog):
    """An access.json from an older install or a copy (0644) is tightened like the databases, its state kept."""
    from edgeface.events.access import AccessSwitch

    state = ensure_private_dir(tmp_path / "state")
    path = state / "access.json"
    path.write_text('{"enabled": false, "changed": 0, "by": "mqtt"}')
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        switch = AccessSwitch(path)
    assert _mode(path) == 0o600
    assert not switch.on and switch.reason_off() == "access switched off"
    assert "tightened permissions" in caplog.text


def _chip(rng: np.random.Generator) -> Chip:
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Chip(img, Face(box=(8.0, 8.0, 48.0, 48.0), score=0.9, keypoints=np.full((6, 2), 32.0, np.float32)))


def _item(rng: np.random.Generator, i: int, chip: bool) -> EnrollItem:
    v = rng.normal(size=128).astype(np.float32)
    return EnrollItem(source=f"img{i}.jpg", image_sha256=f"{i:064x}", embedding=v / np.linalg.norm(v), quality=0.9,
                      chip=_chip(rng) if chip else None)


def test_no_face_images_are_stored_unless_enabled(tmp_path):
    rng = np.random.default_rng(0)
    g = Gallery.open(tmp_path / "g.db", model_id="m", max_distance=0.4)  # keep_crops defaults to False
    try:
        g.enroll("ada", [_item(rng, i, chip=True) for i in range(3)])
        assert g.stats()["crops"] == 0
    finally:
        g.close()


def test_people_remove_erases_embeddings_and_images_from_the_file(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.db"
    g = Gallery.open(path, model_id="m", max_distance=0.4, keep_crops=True)
    ada = [_item(rng, i, chip=True) for i in range(3)]
    bob = [_item(rng, 10 + i, chip=True) for i in range(2)]
    g.enroll("ada", ada)
    g.enroll("bob", bob)
    assert g.stats()["crops"] == 5
    # what would identify ada: her vectors' bytes (as stored, little-endian float32) and her name
    needles = [np.asarray(it.embedding, "<f4").tobytes()[:32] for it in ada] + [b"ada"]
    g.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
    assert all(n in raw for n in needles[:-1]), "the test must first find ada's bytes in the file"

    g = Gallery.open(path, model_id="m", max_distance=0.4, keep_crops=True)
    assert g.remove("ada") == 3
    remaining = [p.name for p in g.people()]
    g.close()
    assert remaining == ["bob"]
    import sqlite3

    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM crops").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM embeddings e LEFT JOIN people p ON p.id = e.person_id "
                       "WHERE p.id IS NULL").fetchone()[0] == 0
    con.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
    for n in needles[:-1]:
        assert n not in raw, "a removed person's embedding bytes are still in the gallery file"
    assert np.asarray(bob[0].embedding, "<f4").tobytes()[:32] in raw


# --------------------------------------------------------------------------------------------- the daemon

@needs_broker
@pytest.mark.broker
@pytest.mark.slow
def test_daemon_run_keeps_secrets_out_of_logs_and_state_private(tmp_path, caplog, monkeypatch, analyzer):
    """A whole daemon run with an MQTT password and the unlock secret set: enrollment, grants, a stranger,
    good and bad remote commands, a broker that refuses a wrong password. No log line (DEBUG included, paho
    too) contains either secret, and every file the daemon created is 0600 in a 0700 state directory."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.enroll import enroll_images
    from edgeface.frames import FolderSource
    from edgeface.gallery import Gallery, resolve_max_distance

    password = "mqtt-Pa55-daemon-run-x9"
    pwfile = tmp_path / "passwd"
    pwfile.write_text(f"door:{password}\nwatcher:{password}\n")
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True)
    broker = TlsBroker(tmp_path, tmp_path, tls=False, password_file=pwfile)
    monkeypatch.setenv("EDGEFACE_MQTT_PASSWORD", password)
    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    faces = REPO / "tests" / "fixtures" / "faces"
    state = tmp_path / "state"
    cfg = parse_config({
        "state_dir": str(state), "log_level": "DEBUG",
        "camera": {"source": str(faces), "max_fps": 100},
        "gallery": {"path": "gallery.db", "keep_crops": True}, "audit": {"path": "audit.db"},
        "policy": {"min_frames": 1, "window_frames": 1, "cooldown_s": 0.5},
        "door": {"pin_factory": "mock", "pulse_s": 0.1},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "door", "remote_unlock": True,
                 "outbox_path": "outbox.db", "keepalive_s": 5}})
    pins = MockFactory()
    try:
        g = Gallery.open(state / "gallery.db", model_id=analyzer.embedder.model_id,
                         embedding_dim=analyzer.embedder.spec.embedding_dim, keep_crops=True,
                         max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir))
        g.enroll("barack_obama", enroll_images(analyzer, sorted((faces / "barack_obama").glob("*.jpg"))[:2],
                                               keep_chips=True))
        g.close()
        import paho.mqtt.client as mqtt  # a client that authenticates like Home Assistant would

        ha = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha")
        ha.username_pw_set("watcher", password)
        ha.connect("127.0.0.1", broker.port)
        ha.loop_start()
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(faces), pin_factory=pins) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)
            for payload in (json.dumps(make_command(SECRET, "front")), "junk",
                            json.dumps(make_command(SECRET + "-guess", "front"))):
                ha.publish("edgeface/front/unlock/set", payload, qos=1).wait_for_publish(5)
            daemon.run()
            time.sleep(0.5)
            results = [r["result"] for r in daemon.audit.rows("access")]
            remote = [r["result"] for r in daemon.audit.rows("remote_unlock")]
        ha.loop_stop()
        ha.disconnect()
        # a second daemon with a wrong password: refused by the broker, reported, not printed
        monkeypatch.setenv("EDGEFACE_MQTT_PASSWORD", password + "-wrong")
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(faces), pin_factory=pins) as daemon:
            daemon.start()
            assert not daemon.mqtt.wait_connected(3)
        files = sorted(state.iterdir())
        modes = {p.name: _mode(p) for p in files}
    finally:
        pins.close()
        broker.close()
    assert "granted" in results and "unknown" in results
    assert remote == ["accepted", "refused", "refused"]
    assert "refused the connection" in caplog.text
    text = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    assert password not in text, "the MQTT password reached a log record"
    assert SECRET not in text, "the unlock secret reached a log record"
    assert _mode(state) == 0o700
    assert {"gallery.db", "audit.db", "outbox.db", "nonces.db"} <= set(modes)
    assert all(m == 0o600 for m in modes.values()), modes


def test_edgeface_run_masks_secrets_in_every_log_handler(tmp_path, monkeypatch):
    """`edgeface run` attaches the redactor to the log handlers: even a record that carries a secret (as a
    library might, e.g. in a connection URL) comes out masked."""
    from edgeface.cli import main

    password = "run-cli-password-77aa"
    monkeypatch.setenv("EDGEFACE_MQTT_PASSWORD", password)
    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    faces = REPO / "tests" / "fixtures" / "faces" / "elon_musk"
    cfg = tmp_path / "config.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "gallery": {"path": "gallery.db"}, "audit": {"path": "audit.db"},
        "camera": {"source": str(faces)}, "door": {"pin_factory": "mock"}, "mqtt": {"enabled": False}}))
    root = logging.getLogger()
    before = list(root.handlers)
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = ListHandler()
    root.addHandler(handler)
    try:
        assert main(["--config", str(cfg), "run", "--max-frames", "2"]) == 0
        logging.getLogger("some.library").warning("connecting to mqtt://door:%s@broker with key %s", password, SECRET)
    finally:
        root.removeHandler(handler)
        for h in root.handlers:
            if h not in before:
                root.removeHandler(h)
        for h in before:
            for f in list(h.filters):
                if isinstance(f, SecretRedactor):
                    h.removeFilter(f)
    assert any(isinstance(f, SecretRedactor) for f in handler.filters)
    text = "\n".join(lines)
    assert "connecting to mqtt://door:***@broker with key ***" in text
    assert password not in text and SECRET not in text
