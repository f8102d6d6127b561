"""A full state disk, and a crash right after the relay moved: no opening without a record, nothing lost.

What a user relies on: the door opens only after the access event is durably queued (outbox row and audit
row committed); with the state disk full a known face is turned away with one log line instead of opening
with no trace; the outbox does not re-send one event endlessly when it cannot delete it; a process killed
right after the relay pin went high leaves the grant in the audit log and the outbox. Real parts: a small
tmpfs mounted for the state directory (root only; skipped otherwise), real SQLite, mosquitto, real
photos, a real subprocess SIGKILLed by the relay pin itself.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from gpiozero.pins.mock import MockFactory

from edgeface.config import MqttConfig, parse_config
from edgeface.daemon.app import Daemon
from edgeface.frames import FolderSource
from edgeface.vision.images import load_image
from edgeface.events.mqtt import MqttPublisher
from edgeface.events.outbox import Outbox
from edgeface.testing import Collector, MosquittoBroker, mosquitto_path, pin_levels, wait_until
from edgeface.types import Frame

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
KNOWN = ["barack_obama_01.jpg", "barack_obama_02.jpg", "barack_obama_03.jpg"]
PROBE = FACES / "barack_obama" / "barack_obama_04.jpg"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

needs_broker = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")


@contextlib.contextmanager
def small_disk(where: Path, size: str = "8m"):
    """A real, separate file system of `size` (tmpfs), so that filling it gives the real ENOSPC."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs for the full-disk case: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a filler file until the file system says ENOSPC; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        # the last partial buffer: byte by byte until nothing fits
        try:
            while True:
                os.write(fh.fileno(), b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(OSError):
        (disk / "probe").write_bytes(b"\0" * 8192)
    return filler



def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


@pytest.mark.broker
@needs_broker
def test_full_state_disk_turns_a_known_face_away_then_grants_when_space_returns(tmp_path, analyzer, obama_gallery_file,
                                                                                caplog):
    broker = MosquittoBroker().start()
    pins = MockFactory()
    with small_disk(tmp_path / "disk") as disk, Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        state = disk / "state"
        state.mkdir(mode=0o700)
        shutil.copyfile(obama_gallery_file, state / "gallery.db")
        cfg = parse_config({
            "state_dir": str(state), "gallery": {"path": "gallery.db"},
            "policy": {"min_frames": 2, "window_frames": 3, "window_s": 5.0, "cooldown_s": 3.0},
            "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 0.2, "pin_factory": "mock"},
            "mqtt": {"host": broker.host, "port": broker.port, "outbox_path": "outbox.db", "ha_discovery": False},
            "audit": {"path": "audit.db"}})
        obama = load_image(PROBE)
        t = 1_800_000_000.0
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            filler = fill(disk)
            with caplog.at_level(logging.ERROR, logger="edgeface.daemon.pipeline"):
                full = [daemon.process_frame(Frame(obama, t + 0.2 * i)).action for i in range(4)]
            assert "grant" not in full and "deny" in full, full  # before the fix: "grant" and the relay moved
            assert pin_levels(pins.pin(17)) == [False], "the door opened with no record of it"
            assert any("withheld" in r.getMessage() and "barack_obama" in r.getMessage() for r in caplog.records), \
                [r.getMessage() for r in caplog.records]
            filler.unlink()  # space is back: the next visit is granted and recorded
            t += 60
            again = [daemon.process_frame(Frame(obama, t + 0.2 * i)).action for i in range(3)]
            assert "grant" in again
            assert wait_until(lambda: pin_levels(pins.pin(17)) == [False, True, False], 5)
            assert sub.wait_for("edgeface/front/event", 1, 20)
            assert wait_until(lambda: len(daemon.outbox) == 0, 20)
        granted = _rows(state / "audit.db", "SELECT event_id FROM audit WHERE kind = 'access' AND result = 'granted'")
        events = [json.loads(p) for p in sub.on_topic("edgeface/front/event")]
        assert [e["result"] for e in events] == ["granted"] and [(events[0]["event_id"],)] == granted
        assert [r[0] for r in _rows(state / "audit.db", "SELECT result FROM audit WHERE kind = 'relay'")] == \
            ["unlocked", "locked"]
    broker.close()
    pins.close()


@pytest.mark.broker
@needs_broker
def test_outbox_that_cannot_delete_a_delivered_event_backs_off_instead_of_resending(tmp_path, caplog):
    broker = MosquittoBroker().start()
    with small_disk(tmp_path / "disk", "4m") as disk, Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        outbox = Outbox(disk / "outbox.db")
        ids = [f"ev-{i}" for i in range(5)]
        for i in ids:
            outbox.add(i, "edgeface/front/event", json.dumps({"id": i}))
        filler = fill(disk)
        pub = MqttPublisher(MqttConfig(host=broker.host, port=broker.port, ha_discovery=False), door_id="front",
                            outbox=outbox)
        with caplog.at_level(logging.WARNING, logger="edgeface.events.mqtt"):
            pub.start()
            assert sub.wait_for("edgeface/front/event", 1, 10)
            time.sleep(3.0)  # before the fix: thousands of copies of ev-0 in these 3 s
            copies = [json.loads(p)["id"] for p in sub.on_topic("edgeface/front/event")]
            assert copies == ["ev-0"], f"{len(copies)} messages while the outbox could not be updated"
            assert len(outbox) == 5  # nothing lost
            filler.unlink()
            assert wait_until(lambda: len(outbox) == 0, 40), "the outbox did not drain after space came back"
            got = [json.loads(p)["id"] for p in sub.wait_for("edgeface/front/event", 5, 10)]
        pub.stop()
        outbox.close()
        assert got == ids  # each exactly once, in order
        assert any("cannot mark" in r.getMessage() and "ev-0" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]
    broker.close()


# ----------------------------------------------------------------------------------------------- write order

_KILLED_BY_THE_RELAY = textwrap.dedent("""
    import os, signal, sys
    from gpiozero.pins.mock import MockFactory, MockPin
    from edgeface.config import load_config
    from edgeface.daemon.app import Daemon
    from edgeface.daemon.service import run_daemon

    class KillOnUnlock(MockPin):
        '''The relay coil: the moment the pin goes high the process dies (a crash right after the pulse).'''
        def _change_state(self, value):
            super()._change_state(value)
            if value:
                os.kill(os.getpid(), signal.SIGKILL)

    daemon = Daemon(load_config(sys.argv[1]), pin_factory=MockFactory(pin_class=KillOnUnlock))
    run_daemon(daemon)
""")


@pytest.mark.slow
def test_sigkill_right_after_the_relay_moves_leaves_the_grant_recorded(tmp_path, obama_gallery_file):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copyfile(obama_gallery_file, state / "gallery.db")
    cam = tmp_path / "cam"
    cam.mkdir()
    shutil.copyfile(PROBE, cam / PROBE.name)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state), "camera": {"source": str(cam), "loop": True, "max_fps": 20},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 2, "window_frames": 3, "window_s": 5.0, "cooldown_s": 3600.0},
        "door": {"door_id": "front", "relay_pin": 17, "pulse_s": 30.0, "pin_factory": "mock"},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": 1, "outbox_path": "outbox.db",
                 "ha_discovery": False},
        "audit": {"path": "audit.db"}}))
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_BY_THE_RELAY)
    proc = subprocess.run([sys.executable, str(script), str(config)], env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    granted = _rows(state / "audit.db", "SELECT event_id, person_name FROM audit WHERE kind = 'access' "
                                        "AND result = 'granted'")
    queued = _rows(state / "outbox.db", "SELECT event_id, payload FROM outbox")
    assert len(granted) == 1 and granted[0][1] == "barack_obama", "killed after the pulse: no audit row"
    assert [q[0] for q in queued] == [granted[0][0]], "killed after the pulse: the event was not queued"
    assert json.loads(queued[0][1])["result"] == "granted"
    for name in ("audit.db", "outbox.db"):
        assert _rows(state / name, "PRAGMA integrity_check") == [("ok",)]


def test_read_only_state_folder_still_answers_the_read_only_commands(tmp_path, capsys, obama_gallery_file):
    """The state folder on a read-only file system (a mount, a backup copy): `people list`, `people show`,
    `gallery stats` and `identify` answer (the gallery is opened read-only: SQLite could not make its WAL
    files there); a command that writes still fails with one line."""
    import shutil

    from edgeface.cli import main

    disk = tmp_path / "ro"
    with small_disk(disk):
        shutil.copyfile(obama_gallery_file, disk / "gallery.db")
        done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"state_dir: {disk}\nmqtt:\n  enabled: false\n")
        capsys.readouterr()

        def run(*args: str) -> tuple[int, str, str]:
            rc = main(["--config", str(cfg), *args])
            out, err = capsys.readouterr()
            return rc, out, err

        assert run("people", "list") == (0, "barack_obama,enabled,3,\n", "")
        rc, out, _ = run("people", "show", "barack_obama")
        assert rc == 0 and "embeddings: 3" in out
        rc, out, _ = run("gallery", "stats")
        assert rc == 0 and "people: 1" in out
        rc, out, err = run("identify", str(PROBE))
        assert rc == 0 and out.startswith(f"{PROBE},barack_obama,"), err
        rc, _, err = run("people", "disable", "barack_obama")
        assert rc != 0 and err.count("\n") == 1
        assert sorted(p.name for p in disk.iterdir()) == ["gallery.db"]  # nothing was written there
