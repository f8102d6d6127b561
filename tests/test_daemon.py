"""End to end: real JPEGs -> BlazeFace -> embedder -> SQLite gallery -> policy -> MockFactory relay, events
to a REAL mosquitto on 127.0.0.1, persistent outbox across broker outages and daemon restarts, SIGTERM in a
real subprocess, camera retry, config errors."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from io import StringIO
from pathlib import Path

import cv2
import pytest
import yaml
from gpiozero.pins.mock import MockFactory

from edgeface.config import parse_config
from edgeface.daemon.app import Daemon
from edgeface.frames import FolderSource
from edgeface.vision.images import load_image
from edgeface.testing import Collector, MosquittoBroker, pin_levels, wait_until, mosquitto_path
from edgeface.types import Frame

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"

needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")

#: Enrolled from these photos; the probe photos below are never enrolled.
KNOWN = {"barack_obama": ["barack_obama_01.jpg", "barack_obama_02.jpg", "barack_obama_03.jpg"],
         "guido_van_rossum": ["guido_van_rossum_01.jpg", "guido_van_rossum_02.jpg", "guido_van_rossum_03.jpg"]}
OBAMA_PROBE = FACES / "barack_obama" / "barack_obama_04.jpg"
GUIDO_PROBE = FACES / "guido_van_rossum" / "guido_van_rossum_05.jpg"
#: A stranger far from both enrolled people (sface_int8: >= 0.85 cosine distance; facenet_int8: >= 0.97).
#: steve_wozniak would do too at the shipped threshold (sface_int8 blend 0.49: he is 0.68-0.72 from guido_van_rossum's
#: template; facenet_int8 centroid 0.33: 0.46-0.58), a look-alike pair that a looser threshold (e.g. FaceNet's per-pair
#: 0.584) lets in.
STRANGER = FACES / "kit_harington" / "kit_harington_02.jpg"


@pytest.fixture(scope="module")
def enrolled_gallery(analyzer, tmp_path_factory):
    """A gallery file with the KNOWN people (enrolled once per module; each test copies it)."""
    from edgeface.enroll import enroll_images
    from edgeface.gallery import Gallery, resolve_max_distance

    cfg = parse_config({})
    path = tmp_path_factory.mktemp("gallery") / "gallery.db"
    g = Gallery.open(path, model_id=analyzer.embedder.model_id, embedding_dim=analyzer.embedder.spec.embedding_dim,
                     max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir))
    for name, files in KNOWN.items():
        report = g.enroll(name, enroll_images(analyzer, [FACES / name / f for f in files]))
        assert len(report.added) == len(files), report
    g.close()
    return path


def make_config(tmp_path: Path, gallery_file: Path, broker=None, **sections) -> "object":
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    shutil.copyfile(gallery_file, state / "gallery.db")
    data = {
        "state_dir": str(state),
        "camera": {"source": str(FACES), "max_fps": 100, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 5.0, "cooldown_s": 3.0,
                   "unknown_interval_s": 5.0},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 0.2, "pin_factory": "mock"},
        "mqtt": {"enabled": broker is not None, "host": "127.0.0.1", "port": broker.port if broker else 1883,
                 "outbox_path": "outbox.db", "keepalive_s": 5},
        "audit": {"path": "audit.db"},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data)


def photo_folder(tmp_path: Path, *photos: Path) -> Path:
    folder = tmp_path / f"camera-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for i, p in enumerate(photos):
        shutil.copyfile(p, folder / f"{i:03d}_{p.name}")
    return folder


class TickClock:
    """Frame timestamps of a 5 fps camera, so decisions do not depend on this machine's speed."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        self.t += 0.2
        return self.t


def high_durations(pin) -> list[float]:
    """How long each high period of the mock pin lasted. The mock records, with each new state, the time
    since the previous change, i.e. the duration of the state before it."""
    states = pin.states
    return [nxt.timestamp for cur, nxt in zip(states, states[1:]) if cur.state and not nxt.state]


@pytest.fixture()
def broker():
    if mosquitto_path() is None:
        pytest.skip("needs mosquitto (apt install mosquitto)")
    b = MosquittoBroker().start()
    yield b
    b.close()


@pytest.fixture()
def pins():
    f = MockFactory()
    yield f
    f.close()


def check_event_schema(ev: dict) -> None:
    assert uuid.UUID(ev["event_id"]).version == 4
    stamp = dt.datetime.fromisoformat(ev["timestamp"])
    assert stamp.tzinfo is not None
    for key in ("door_id", "result", "person_id", "person_name", "distance", "threshold", "model_id", "frames_used",
                "face_box", "score", "event_type"):
        assert key in ev, key


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.broker
@needs_broker
def test_enrolled_face_opens_the_relay_and_granted_event_arrives(tmp_path, analyzer, enrolled_gallery, broker, pins):
    cfg = make_config(tmp_path, enrolled_gallery, broker)
    source = FolderSource(photo_folder(tmp_path, OBAMA_PROBE), repeat=4, clock=TickClock())
    with Collector(broker.host, broker.port, "edgeface/#") as sub:
        daemon = Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins)
        pin = pins.pin(17)
        assert pin.state is False  # built released
        daemon.start()
        assert daemon.mqtt.wait_connected(10)
        daemon.run()
        events = [json.loads(p) for p in sub.wait_for("edgeface/front/event", 1)]
        assert [e["result"] for e in events] == ["granted"]
        ev = events[0]
        check_event_schema(ev)
        assert ev["person_name"] == "barack_obama" and ev["door_id"] == "front" and ev["frames_used"] == 3
        assert ev["distance"] <= ev["threshold"]
        assert ev["model_id"] == analyzer.embedder.model_id
        assert wait_until(lambda: pin.state is False, 3)
        assert pin_levels(pin) == [False, True, False]
        assert high_durations(pin)[0] >= 0.2 * 0.9  # held for the configured pulse
        assert sub.last("edgeface/front/last_person") == b"barack_obama"
        assert wait_until(lambda: sub.on_topic("edgeface/front/relay")[-1:] == [b"locked"])
        assert b"unlocked" in sub.on_topic("edgeface/front/relay")
        assert sub.last("edgeface/front/availability") == b"online"
        daemon.close()
        audit = daemon.audit.path
    rows = sqlite3.connect(audit).execute("SELECT kind, result, person_name FROM audit ORDER BY id").fetchall()
    assert ("access", "granted", "barack_obama") in rows
    assert [r[1] for r in rows if r[0] == "relay"] == ["unlocked", "locked"]


@pytest.mark.broker
@needs_broker
def test_stranger_gives_one_unknown_and_the_relay_never_moves(tmp_path, analyzer, enrolled_gallery, broker, pins):
    cfg = make_config(tmp_path, enrolled_gallery, broker)
    source = FolderSource(photo_folder(tmp_path, STRANGER, FACES / "kit_harington" / "kit_harington_01.jpg"),
                          repeat=5, clock=TickClock())  # 10 frames in 2 s < unknown_interval_s
    with Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        with Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins) as daemon:
            daemon.start()
            daemon.run()
            events = [json.loads(p) for p in sub.wait_for("edgeface/front/event", 1)]
            time.sleep(0.3)
            events = sub.json_on("edgeface/front/event")
        assert [e["result"] for e in events] == ["unknown"]
        check_event_schema(events[0])
        assert events[0]["person_id"] is None and events[0]["distance"] > events[0]["threshold"]
        assert pin_levels(pins.pin(17)) == [False]


def test_k_of_n_and_cooldown_with_real_frames(tmp_path, analyzer, enrolled_gallery, pins):
    cfg = make_config(tmp_path, enrolled_gallery, None, policy={"cooldown_s": 3.0})
    obama, stranger, guido = load_image(OBAMA_PROBE), load_image(STRANGER), load_image(GUIDO_PROBE)
    events = []
    with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins,
                event_sink=events.append) as daemon:
        t = 1_800_000_000.0

        def show(image, at):
            return daemon.process_frame(Frame(image=image, timestamp=at)).action

        # nobody reaches 3 matching frames out of the last 5 (K = 3, N = 5): no decision
        assert [show(img, t + i * 0.2) for i, img in enumerate([obama, stranger, obama, guido, stranger])] \
            == ["none"] * 5
        # obama's first frame has left the window: still 2 of 5; then 3 of 5: grant, relay pulses
        assert show(obama, t + 1.0) == "none"
        assert show(obama, t + 1.2) == "grant"
        # still standing there for 10 s: no second unlock (one visit, one grant)
        assert [show(obama, t + 1.4 + i * 0.5) for i in range(20)] == ["none"] * 20
        # Those 10 s are simulated; the 0.2 s pulse runs on the real clock: let it end, as it would have.
        assert wait_until(lambda: pins.pin(17).state is False, 3)
        # gone for longer than cooldown_s, then back: a new visit
        back = t + 1.4 + 19 * 0.5 + 3.5
        assert [show(obama, back + i * 0.2) for i in range(3)] == ["none", "none", "grant"]
        assert wait_until(lambda: pins.pin(17).state is False, 3)
    assert [e["result"] for e in events if e["kind"] == "access"] == ["granted", "granted"]
    assert pin_levels(pins.pin(17)) == [False, True, False, True, False]


def test_disabled_person_is_denied_and_the_relay_stays(tmp_path, analyzer, enrolled_gallery, pins):
    from edgeface.gallery import Gallery

    cfg = make_config(tmp_path, enrolled_gallery, None)
    g = Gallery.open(Path(cfg.state_dir) / "gallery.db", model_id=analyzer.embedder.model_id,
                     embedding_dim=analyzer.embedder.spec.embedding_dim, max_distance=0.4)
    g.disable("barack_obama")
    g.close()
    events = []
    source = FolderSource(photo_folder(tmp_path, OBAMA_PROBE), repeat=4, clock=TickClock())
    with Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins, event_sink=events.append) as daemon:
        daemon.run()
    assert [(e["result"], e["person_name"], e["reason"]) for e in events] == \
        [("denied", "barack_obama", "person disabled")]
    assert pin_levels(pins.pin(17)) == [False]


@pytest.mark.broker
@needs_broker
def test_broker_outage_and_daemon_restart_lose_nothing(tmp_path, analyzer, enrolled_gallery, broker, pins):
    cfg = make_config(tmp_path, enrolled_gallery, broker, policy={"cooldown_s": 1.0, "unknown_interval_s": 1.0})
    broker.stop()  # the broker is down the whole time the first daemon runs
    produced = []
    photos = [OBAMA_PROBE, STRANGER, GUIDO_PROBE, STRANGER, OBAMA_PROBE]
    source = FolderSource(photo_folder(tmp_path, *photos), repeat=4, clock=TickClock())
    with Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins,
                event_sink=lambda e: produced.append(e)) as d1:
        d1.start()
        d1.run()
        assert not d1.mqtt.connected
        assert len(d1.outbox) == len(produced)
    results = [e["result"] for e in produced]
    assert results.count("granted") >= 2 and "unknown" in results
    # a new daemon process on the same state dir, then the broker comes back
    broker.start()
    with Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=MockFactory()) as d2:
            d2.start()
            got = sub.wait_for("edgeface/front/event", len(produced), timeout=20)
            assert wait_until(lambda: len(d2.outbox) == 0)
            time.sleep(0.5)
            got = sub.json_on("edgeface/front/event")
    assert [e["event_id"] for e in got] == [e["event_id"] for e in produced]  # each once, in order
    # as produced; an event delivered >= 5 s after it happened is marked queued (tests/test_mqtt.py pins that)
    assert [{k: v for k, v in e.items() if k not in ("queued", "queued_s")} for e in got] == produced
    assert all(e["queued"] is True and e["queued_s"] >= 5.0 for e in got if "queued" in e)


def _video_of(photo: Path, path: Path, n: int = 10) -> None:
    rgb = load_image(photo)
    h, w = rgb.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (w, h))
    for _ in range(n):
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.mark.broker
@needs_broker
def test_failing_camera_is_retried_and_reported(tmp_path, analyzer, enrolled_gallery, broker, pins):
    video = tmp_path / "door.avi"
    cfg = make_config(tmp_path, enrolled_gallery, broker, camera={"source": str(video)})
    with Collector(broker.host, broker.port, "edgeface/front/#") as sub:
        with Daemon(cfg, analyzer=analyzer, pin_factory=pins) as daemon:
            daemon.start()
            t = threading.Thread(target=daemon.run)
            t.start()
            assert wait_until(lambda: b"reconnecting" in sub.on_topic("edgeface/front/camera"))
            assert t.is_alive()  # the daemon waits for the camera, it did not crash
            _video_of(OBAMA_PROBE, tmp_path / "tmp.avi")
            (tmp_path / "tmp.avi").rename(video)
            assert wait_until(lambda: b"ok" in sub.on_topic("edgeface/front/camera"))
            granted = sub.wait_for("edgeface/front/event", 1, timeout=20)
            t.join(timeout=20)
            assert not t.is_alive()
        assert json.loads(granted[0])["result"] == "granted"


def test_sigterm_during_an_unlock_pulse_leaves_the_relay_released(tmp_path, enrolled_gallery):
    """`edgeface run` in a real subprocess (MockFactory pins live in that process). Every relay transition is
    written to the audit log with the pin's level as read back from gpiozero; we SIGTERM while a 30 s pulse is
    active and read the log after the process exited."""
    cfg = make_config(tmp_path, enrolled_gallery, None, door={"pulse_s": 30.0},
                      camera={"source": str(photo_folder(tmp_path, OBAMA_PROBE)), "loop": True, "max_fps": 20},
                      policy={"cooldown_s": 3600.0})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    audit = Path(cfg.state_dir) / "audit.db"
    # a real sd_notify socket, as systemd gives a Type=notify service with WatchdogSec
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "600000"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config_file), "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages: list[str] = []

    def drain_notify():
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except OSError:
                return

    def relay_rows():
        if not audit.exists():
            return []
        try:
            with sqlite3.connect(audit) as db:
                return db.execute("SELECT result, detail FROM audit WHERE kind = 'relay' ORDER BY id").fetchall()
        except sqlite3.Error:
            return []

    try:
        assert wait_until(lambda: any(r[0] == "unlocked" for r in relay_rows()) or proc.poll() is not None, 60), \
            "no unlock"
        assert proc.poll() is None, proc.stderr.read()
        assert wait_until(lambda: drain_notify() or "WATCHDOG=1" in messages, 10)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)  # far less than the 30 s pulse
        drain_notify()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err
    assert messages[0] == "READY=1" and "WATCHDOG=1" in messages and messages[-1] == "STOPPING=1"
    for part in ("models: detector", "gallery: ", "(2 people, 2 enabled)", "camera: folder:", "relay pin 17",
                 "mqtt: disabled"):
        assert part in err, part  # the start-up summary
    rows = relay_rows()
    assert [r[0] for r in rows] == ["unlocked", "locked"]
    assert json.loads(rows[0][1])["pin_level"] is True and json.loads(rows[-1][1])["pin_level"] is False
    with sqlite3.connect(audit) as db:
        assert db.execute("SELECT result FROM audit WHERE kind = 'daemon' ORDER BY id DESC LIMIT 1").fetchone() == \
            ("stopped",)


def test_bad_config_value_stops_start_up_with_one_line(tmp_path, capsys):
    from edgeface.cli import main

    bad = tmp_path / "config.yaml"
    bad.write_text("door:\n  relay_pin: 99\n")
    assert main(["--config", str(bad), "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "door.relay_pin" in err and "99" in err
    bad.write_text("policy:\n  timezone: Mars/Olympus\n")
    assert main(["--config", str(bad), "run"]) == 2
    assert "policy.timezone" in capsys.readouterr().err


@pytest.mark.broker
def test_remote_unlock_needs_a_valid_signed_fresh_command(tmp_path, analyzer, enrolled_gallery, broker, pins,
                                                          monkeypatch):
    from edgeface.events.remote import make_command

    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", "test-secret")
    cfg = make_config(tmp_path, enrolled_gallery, broker, mqtt={"remote_unlock": True})
    with Collector(broker.host, broker.port, "edgeface/front/door_event") as sub:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)  # its subscription is in place
            good = json.dumps(make_command("test-secret", "front"))
            sub.client.publish("edgeface/front/unlock/set", good, qos=1)
            assert wait_until(lambda: pins.pin(17).state is True or len(pin_levels(pins.pin(17))) > 1)
            sub.client.publish("edgeface/front/unlock/set", good, qos=1)  # replay
            sub.client.publish("edgeface/front/unlock/set", "UNLOCK", qos=1)  # what plain HA would send
            got = sub.wait_for("edgeface/front/door_event", 3)
        types = [json.loads(p)["event_type"] for p in got]
        assert types == ["remote_unlock", "remote_unlock_refused", "remote_unlock_refused"]
    assert pin_levels(pins.pin(17)) == [False, True, False]


def test_demo_prints_granted_and_unknown_events(tmp_path, caplog):
    import logging

    from edgeface.daemon.demo import run_demo
    from edgeface.config import EdgefaceConfig
    from edgeface.gallery import default_max_distance

    out = StringIO()
    with caplog.at_level(logging.INFO):
        assert run_demo(out=out, mqtt_port=1, state_dir=tmp_path) == 0  # no broker there: must not matter
    # The demo matches as the service does: the config's match mode, with the threshold calibrated for it.
    cfg = EdgefaceConfig()
    thr = default_max_distance(cfg.embedder.model, match_mode=cfg.gallery.match_mode)
    assert any(f"max distance {thr} ({cfg.gallery.match_mode} match)" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records if "gallery" in r.getMessage()]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    granted = {e["person_name"] for e in events if e["result"] == "granted"}
    assert granted == {"barack_obama", "kit_harington", "steve_wozniak"}
    assert any(e["result"] == "unknown" for e in events)
    assert not any(e["result"] == "granted" and e["person_name"] is None for e in events)
    # Margins that hold on a Pi, whose distances differ from x86 by up to 0.016: every grant and every stranger is
    # at least 0.03 from the threshold (measured on x86: 0.22 or more).
    margins = sorted((round(abs(e["distance"] - e["threshold"]), 3), e["result"], e["person_name"] or "stranger")
                     for e in events if e["result"] in ("granted", "unknown"))
    print("demo margins from the threshold:", margins)
    assert len(margins) >= 6 and margins[0][0] >= 0.03, margins


def test_door_contact_opened_without_grant_is_a_forced_open_alarm(tmp_path, analyzer, enrolled_gallery, pins):
    cfg = make_config(tmp_path, enrolled_gallery, None, door={"contact_pin": 27, "held_open_s": 0.3})
    events = []
    with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins,
                event_sink=events.append) as daemon:
        contact = pins.pin(27)
        contact.drive_low()  # closed
        assert wait_until(lambda: daemon.contact.state == "closed")
        events.clear()
        before = len(daemon.audit.rows("door"))
        contact.drive_high()  # opened, nobody was granted
        assert wait_until(lambda: any(e.get("event_type") == "door_held_open" for e in events))
        contact.drive_low()
        assert wait_until(lambda: events[-1].get("event_type") == "door_closed")
        audit = daemon.audit
        kinds = [r["result"] for r in audit.rows("door")[before:]]
    assert kinds == ["door_opened", "door_forced_open", "door_held_open", "door_closed"]
    assert pin_levels(pins.pin(17)) == [False]


def test_door_release_command(tmp_path, capsys):
    from edgeface.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text("door:\n  relay_pin: 22\n  active_high: false\n  pin_factory: mock\n")
    assert main(["--config", str(cfg), "door", "release"]) == 0
    assert "relay on pin 22 released" in capsys.readouterr().out


def test_liveness_on_a_still_photo_never_opens_the_door(tmp_path, analyzer, enrolled_gallery, pins):
    """liveness.enabled: the same photo held still for 6 s (a printed-photo attack) gets one liveness deny."""
    cfg = make_config(tmp_path, enrolled_gallery, None, liveness={"enabled": True, "window_s": 4.0})
    events = []
    source = FolderSource(photo_folder(tmp_path, OBAMA_PROBE), repeat=30, clock=TickClock())  # 6 s at 5 fps
    with Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins, event_sink=events.append) as daemon:
        daemon.run()
    assert [(e["result"], e["person_name"]) for e in events] == [("denied", "barack_obama")]
    assert pin_levels(pins.pin(17)) == [False]


def test_gallery_damaged_while_running_denies_every_frame_and_logs_one_traceback(tmp_path, analyzer, enrolled_gallery,
                                                                                pins, caplog):
    """A vector overwritten on disk after start-up (bit rot, another process): every frame fails at the match, the
    relay never moves, and the journal gets one traceback and one count line, not one traceback per frame."""
    import logging

    import numpy as np

    cfg = make_config(tmp_path, enrolled_gallery, None)
    events = []
    source = FolderSource(photo_folder(tmp_path, OBAMA_PROBE), repeat=20, clock=TickClock())
    with Daemon(cfg, analyzer=analyzer, source=source, pin_factory=pins, event_sink=events.append) as daemon:
        bad = np.full(analyzer.embedder.spec.embedding_dim, np.nan, "<f4")
        with sqlite3.connect(Path(cfg.state_dir) / "gallery.db") as other:
            other.execute("UPDATE embeddings SET vector = ? WHERE id = 1", (bad.tobytes(),))
        with caplog.at_level(logging.INFO, logger="edgeface.daemon.app"):
            assert daemon.run() == 20
    assert pin_levels(pins.pin(17)) == [False]
    assert not [e for e in events if e.get("result") == "granted"]
    errors = [r for r in caplog.records if r.name == "edgeface.daemon.app" and r.levelno >= logging.ERROR]
    assert [bool(r.exc_info) for r in errors] == [True, False], [r.getMessage() for r in errors]
    assert "embedding 1 of 'barack_obama'" in str(errors[0].exc_info[1])
    assert errors[1].getMessage().startswith("19 more frame(s) failed the same way: GalleryError: ")


def test_frame_failure_log_counts_repeats_and_says_when_frames_recover(caplog) -> None:
    import logging

    from edgeface.daemon.app import FrameFailureLog

    now = [0.0]
    logger = logging.getLogger("edgeface.test_frames")
    failures = FrameFailureLog(logger, interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="edgeface.test_frames"):
        for i in range(30):  # 30 identical failures 0.1 s apart, then 61 s later one more
            failures.failed(i, ValueError("bad row"))
            now[0] += 0.1
        now[0] += 61.0
        failures.failed(30, ValueError("bad row"))
        failures.failed(31, KeyError("other"))  # a new kind: its own traceback
        failures.succeeded()
        failures.succeeded()  # nothing more to say
    lines = [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert lines == [
        ("ERROR", "frame 0 failed (the door stays locked)", True),
        ("ERROR", "30 more frame(s) failed the same way: ValueError: bad row", False),
        ("ERROR", "frame 31 failed (the door stays locked)", True),
        ("WARNING", "frames are processed again after 32 failed frame(s)", False),
    ]
