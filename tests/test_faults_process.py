"""Process faults: the daemon SIGKILLed in the middle of an unlock pulse, enrollment SIGKILLed mid-write.

What a user relies on: after the crash the relay is driven released (systemd's ExecStopPost runs
`edgeface door release`, which must work even when everything else is broken), the restarted daemon
starts with the relay released and says so (retained MQTT state), the SQLite files pass
PRAGMA integrity_check, queued events are still delivered, and a killed enrollment leaves the person
either absent or completely enrolled, never half. Real subprocesses, real SIGKILL, real mosquitto.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edgeface.testing import Collector, MosquittoBroker, wait_until, mosquitto_path

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
KNOWN = ["barack_obama_01.jpg", "barack_obama_02.jpg", "barack_obama_03.jpg"]
PROBE = FACES / "barack_obama" / "barack_obama_04.jpg"
STRANGER = FACES / "steve_wozniak" / "steve_wozniak_01.jpg"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")


def _cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeface", "--config", str(config), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _write_config(tmp_path: Path, camera: Path, broker=None, **sections) -> Path:
    data = {
        "state_dir": str(tmp_path / "state"),
        "camera": {"source": str(camera), "loop": True, "max_fps": 20},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 2, "window_frames": 3, "window_s": 5.0, "cooldown_s": 3600.0},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 30.0, "pin_factory": "mock"},
        "mqtt": {"enabled": broker is not None, "host": "127.0.0.1", "port": broker.port if broker else 1883,
                 "outbox_path": "outbox.db", "keepalive_s": 5, "ha_discovery": False},
        "audit": {"path": "audit.db"},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _folder(tmp_path: Path, name: str, *photos: Path) -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for i, p in enumerate(photos):
        shutil.copyfile(p, d / f"{i:03d}_{p.name}")
    return d


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def _rows(db_path: Path, sql: str) -> list[tuple]:
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(db_path) as db:
            return db.execute(sql).fetchall()
    except sqlite3.Error:
        return []


@pytest.mark.slow
@pytest.mark.broker
@needs_broker
def test_sigkill_mid_pulse_then_restart_starts_released_and_loses_nothing(tmp_path):
    broker = MosquittoBroker().start()
    collector = Collector(broker.host, broker.port, ["edgeface/front/relay", "edgeface/front/event"])
    obama = _folder(tmp_path, "cam-obama", PROBE)
    config = _write_config(tmp_path, obama, broker)
    state = tmp_path / "state"
    enrolled = _cli(config, "enroll", "barack_obama", *[str(FACES / "barack_obama" / f) for f in KNOWN])
    assert enrolled.returncode == 0, enrolled.stderr
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "run"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        unlocked = wait_until(lambda: ("unlocked",) in _rows(state / "audit.db", "SELECT result FROM audit "
                                                                              "WHERE kind = 'relay'"), 90)
        assert unlocked and proc.poll() is None, "the daemon never unlocked"
        assert collector.wait_for("edgeface/front/event", 1, 20), "granted event not published"
        proc.send_signal(signal.SIGKILL)  # in the middle of a 30 s pulse
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # what the crash left: the relay was unlocked and the process never released it
    relay = [r[0] for r in _rows(state / "audit.db", "SELECT result FROM audit WHERE kind = 'relay' ORDER BY id")]
    assert relay == ["unlocked"]
    assert collector.last("edgeface/front/relay") == b"unlocked"
    for name in ("audit.db", "gallery.db", "outbox.db"):
        assert _integrity(state / name) == "ok", name

    # systemd's ExecStopPost
    released = _cli(config, "door", "release", timeout=60)
    assert released.returncode == 0 and "released" in released.stdout, released.stderr

    # Restart (systemd Restart=on-failure) in front of a stranger: released at start, the state says so.
    config = _write_config(tmp_path, _folder(tmp_path, "cam-stranger", STRANGER), broker)
    before = len(collector.on_topic("edgeface/front/relay"))
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "run"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(collector.on_topic("edgeface/front/relay")) > before, 60), "no relay state"
        assert wait_until(lambda: any(json.loads(p)["result"] == "unknown"
                                 for p in collector.on_topic("edgeface/front/event")), 60)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        collector.close()
        broker.close()
    assert proc.returncode == 0, err
    assert collector.on_topic("edgeface/front/relay")[before:] == [b"locked"]
    relay = [r[0] for r in _rows(state / "audit.db", "SELECT result FROM audit WHERE kind = 'relay' ORDER BY id")]
    assert relay == ["unlocked"], "the restarted daemon must never have moved the relay for a stranger"
    events = [json.loads(p) for p in collector.on_topic("edgeface/front/event")]
    ids = [e["event_id"] for e in events]
    # One grant. It may arrive twice with the same event_id: killed after the broker got it but before the
    # outbox row was deleted, the restarted daemon sends it again (QoS 1 at-least-once; de-duplicate by id).
    assert len({e["event_id"] for e in events if e["result"] == "granted"}) == 1
    assert all(ids.count(i) <= 2 for i in ids)
    for name in ("audit.db", "gallery.db", "outbox.db"):
        assert _integrity(state / name) == "ok", name
    assert _rows(state / "outbox.db", "SELECT count(*) FROM outbox") == [(0,)]


def test_systemd_unit_releases_the_relay_after_any_exit():
    unit = (REPO / "systemd" / "edgeface.service").read_text()
    post = [line for line in unit.splitlines() if line.startswith("ExecStopPost=")]
    assert post and re.search(r"\bdoor release\b", post[0]), "ExecStopPost must run `edgeface door release`"
    assert re.search(r"^Restart=(on-failure|always)$", unit, re.M)
    assert re.search(r"^UMask=0077$", unit, re.M) and re.search(r"^StateDirectoryMode=0700$", unit, re.M)


def test_door_release_works_when_everything_else_is_broken(tmp_path):
    """ExecStopPost after a crash: the gallery is gone, the models dir is wrong, the broker is down and the
    state dir cannot be written. Releasing the relay needs none of them."""
    ro = tmp_path / "ro"
    ro.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(ro / "missing" / "state"), "models_dir": str(tmp_path / "no-models"),
        "gallery": {"path": str(tmp_path / "nope" / "gallery.db")},
        "door": {"relay_pin": 22, "active_high": False, "pin_factory": "mock"},
        "mqtt": {"host": "127.0.0.1", "port": 1}}))
    os.chmod(ro, 0o500)
    try:
        done = _cli(config, "door", "release", timeout=60)
    finally:
        os.chmod(ro, 0o700)
    assert done.returncode == 0, done.stderr
    assert "relay on pin 22 released" in done.stdout
    assert not (ro / "missing").exists()


# ----------------------------------------------------------------------------------------------- enrollment

_KILL_IN_TRANSACTION = textwrap.dedent("""
    import os, sys, signal
    import numpy as np
    from edgeface.gallery import Gallery, EnrollItem, Chip
    from edgeface.types import Face
    path, keep, kill_after = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    g = Gallery.open(path, model_id="m", max_distance=0.4, keep_crops=keep)
    rng = np.random.default_rng(7)
    def item(i):
        v = rng.normal(size=128).astype(np.float32)
        chip = Chip(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                    Face(box=(8., 8., 48., 48.), score=.9, keypoints=np.full((6, 2), 32., np.float32)))
        return EnrollItem(source=f"eve{i}.jpg", image_sha256=f"{1000 + i:064x}", embedding=v / np.linalg.norm(v),
                          quality=.9, chip=chip)
    inserts = [0]
    def trace(sql):
        if "INTO EMBEDDINGS" in sql.upper():
            inserts[0] += 1
            if inserts[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)   # the power cut, mid-transaction
    g._conn.set_trace_callback(trace)
    g.enroll("eve", [item(i) for i in range(8)])
    print("finished without being killed")
""")


@pytest.mark.parametrize("keep_crops", [False, True])
@pytest.mark.parametrize("kill_after", [1, 5])
def test_sigkill_inside_the_enrollment_transaction_leaves_no_half_person(tmp_path, keep_crops, kill_after):
    from edgeface.gallery import EnrollItem, Gallery

    path = tmp_path / "gallery.db"
    g = Gallery.open(path, model_id="m", max_distance=0.4, keep_crops=keep_crops)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 128)).astype(np.float32)
    g.enroll("ada", [EnrollItem(f"ada{i}.jpg", f"{i:064x}", v / np.linalg.norm(v), 0.9) for i, v in enumerate(vecs)])
    g.close()
    script = tmp_path / "enroll_and_die.py"
    script.write_text(_KILL_IN_TRANSACTION)
    done = subprocess.run([sys.executable, str(script), str(path), "1" if keep_crops else "0", str(kill_after)],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
    assert _integrity(path) == "ok"
    g = Gallery.open(path, model_id="m", max_distance=0.4)
    try:
        assert [(p.name, p.n_embeddings) for p in g.people()] == [("ada", 3)]
        assert g.stats()["crops"] == 0
    finally:
        g.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 3


def _variants(src: Path, out: Path, n: int) -> list[Path]:
    """n distinct JPEGs of one face (brightness steps): distinct sha256, same person."""
    img = cv2.imread(str(src))
    out.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        p = out / f"v{i:02d}.jpg"
        cv2.imwrite(str(p), cv2.convertScaleAbs(img, alpha=1.0, beta=i - n // 2))
        paths.append(p)
    return paths


@pytest.mark.slow
def test_sigkill_of_the_enroll_command_at_random_moments(tmp_path):
    """`edgeface enroll` killed at spread-out moments of its run: every time the gallery is intact and each
    person is absent or has every photo (the write is one transaction at the end)."""
    config = _write_config(tmp_path, FACES)
    state = tmp_path / "state"
    photos = _variants(FACES / "guido_van_rossum" / "guido_van_rossum_01.jpg", tmp_path / "guido", 10)
    t0 = time.monotonic()
    full = _cli(config, "enroll", "reference", *map(str, photos))
    runtime = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    with sqlite3.connect(state / "gallery.db") as db:
        complete = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        db.execute("DELETE FROM embeddings")
        db.execute("DELETE FROM people")
    assert complete == 10
    outcomes = []
    rng = np.random.default_rng(3)
    for k, frac in enumerate([0.3, 0.6, 0.8, 0.9, 0.95, 0.98, 1.0]):
        delay = runtime * frac * rng.uniform(0.97, 1.03)
        proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "enroll", f"p{k}",
                                 *map(str, photos)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if (state / "gallery.db").exists():
            assert _integrity(state / "gallery.db") == "ok"
            rows = _rows(state / "gallery.db", "SELECT p.name, count(e.id) FROM people p "
                                               "LEFT JOIN embeddings e ON e.person_id = p.id GROUP BY p.id")
            for name, n in rows:
                assert n == complete, f"{name} is half enrolled: {n}/{complete} embeddings"
            outcomes.append(any(name == f"p{k}" for name, _n in rows))
            with sqlite3.connect(state / "gallery.db") as db:  # next round starts empty (no duplicates)
                db.execute("DELETE FROM embeddings")
                db.execute("DELETE FROM people")
    assert outcomes, "no kill happened after the gallery existed"
    print(f"\nenroll killed {len(outcomes)} times; person complete afterwards in {sum(outcomes)}, absent in "
          f"{len(outcomes) - sum(outcomes)}; never partial")


# ----------------------------------------------------------------------------------------------- door release
# ExecStopPost runs `edgeface door release` after every exit, a crash included. It must release the relay from
# the pin settings alone: a typo elsewhere in the file, a bad time zone or broken YAML must not leave it energised.

_DOOR = "door:\n  door_id: front\n  relay_pin: 22\n  active_high: false\n  pin_factory: mock\n"
BROKEN_CONFIGS = {
    "broken_yaml": _DOOR + "camera:\n  source: [unclosed\n  max_fps: 5\n",
    "unrelated_typo": _DOOR + "policy:\n  cooldwn_s: 3\n",
    "bad_time_zone": _DOOR + "policy:\n  timezone: Mars/Olympus_Mons\n",
    "bad_value_elsewhere": _DOOR + "gallery:\n  max_distance: banana\nmqtt:\n  port: -5\n",
    "tab_indented_yaml": _DOOR.replace("  ", "\t"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_CONFIGS))
def test_door_release_works_with_a_broken_config(tmp_path, kind):
    """YAML that parses gives the door section; YAML that does not gives nothing (no guessing), so the line the
    daemon recorded in its state dir (found through $STATE_DIRECTORY, as systemd sets it) is released."""
    from edgeface.door import LINE_RECORD_NAME, RelayLine, write_line_record

    config = tmp_path / "config.yaml"
    config.write_text(BROKEN_CONFIGS[kind])
    assert _cli(config, "check-config").returncode != 0  # the file really is broken for everything else
    state = tmp_path / "state"
    state.mkdir()
    write_line_record(state / LINE_RECORD_NAME, RelayLine(22, False, "mock", "front"))
    done = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(config), "door", "release"],
                          env={**ENV, "STATE_DIRECTORY": str(state)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "relay on pin 22 released (active low)" in done.stdout, done.stdout + done.stderr


def test_door_release_takes_the_pin_from_the_command_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\x00\xff garbage, not a config at all \xfe")
    done = _cli(config, "door", "release", "--pin", "5", "--active-low", "--pin-factory", "mock", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "relay on pin 5 released (active low)" in done.stdout
    missing = _cli(tmp_path / "nope.yaml", "door", "release", "--pin", "6", "--pin-factory", "mock", timeout=60)
    assert missing.returncode == 0 and "relay on pin 6 released (active high)" in missing.stdout, missing.stderr


def test_door_release_without_any_pin_setting_says_so_and_uses_the_default_pin(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("door: {pin_factory: mock}\n")
    done = _cli(config, "door", "release", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "relay on pin 17 released (active high)" in done.stdout
    assert "no door.relay_pin" in done.stderr


def test_door_release_drives_an_active_low_relay_high(tmp_path, capsys):
    """In-process with gpiozero's MockFactory as the default factory: the released level of an active-low relay
    is a high pin, whatever else the config file gets wrong."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from edgeface.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("door:\n  relay_pin: 24\n  active_high: false\npolicy:\n  timezone: Nowhere/Atlantis\n")
    old, Device.pin_factory = Device.pin_factory, MockFactory()
    try:
        assert main(["--config", str(config), "door", "release"]) == 0
        levels = [s.state for s in Device.pin_factory.pin(24).states]
        assert levels[:2] == [False, True], levels  # built released = driven high for active low
    finally:
        Device.pin_factory.close()
        Device.pin_factory = old
    assert "relay on pin 24 released (active low)" in capsys.readouterr().out


def test_door_release_imports_nothing_heavy(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(BROKEN_CONFIGS["bad_time_zone"])
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgeface", "--config", str(config), "door",
                           "release"], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("numpy", "cv2", "pydantic", "ai_edge_litert",
                                                              "tflite_runtime", "paho", "scipy"))
    assert not heavy, heavy


def test_the_cli_default_config_path_is_the_config_modules():
    from edgeface import cli, config

    assert cli.DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH
