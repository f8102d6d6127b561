"""Camera faults: the device disappears, delivers garbage, or freezes on one image.

What a user relies on: the daemon never stops, says what is wrong (camera health over MQTT and in the
audit log), never unlocks on garbage, and picks up again on its own when the camera is back.
Substitutes are real: an OpenCV video file that is deleted and replaced, a folder whose JPEGs get
corrupted, and a camera driver (the `_LiveSource` open/read/release boundary) that serves real frames,
noise, wrongly shaped buffers, one frozen image, or errors as if unplugged.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from edgeface.config import parse_config
from edgeface.errors import CameraError
from edgeface.frames import FolderSource, OpenCVSource, _LiveSource
from edgeface.vision.images import load_image, to_rgb
from edgeface.testing import Collector, MosquittoBroker, wait_until, mosquitto_path

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
PHOTO = FACES / "barack_obama" / "barack_obama_04.jpg"


def _write_video(path: Path, image: np.ndarray, n: int = 12, size=(320, 240)) -> None:
    bgr = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), size)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.add(bgr, np.full_like(bgr, i)))
    writer.release()


class Consumer:
    """Drains a frame source in a thread, as the daemon does; records frames, health and any exception."""

    def __init__(self, source) -> None:
        self.source = source
        self.frames: list = []
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for frame in self.source.frames():
                self.frames.append(frame)
        except BaseException as exc:  # noqa: BLE001  (the test asserts there was none)
            self.error = exc

    def stop(self) -> None:
        self.source.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_video_file_deleted_then_replaced(tmp_path):
    video = tmp_path / "door.avi"
    _write_video(video, load_image(PHOTO))
    health: list[tuple[str, str]] = []
    src = OpenCVSource(str(video), loop=True, max_fps=200, reconnect_min_s=0.05, reconnect_max_s=0.2,
                       frozen_after_s=5, on_health=lambda s, d: health.append((s, d)))
    c = Consumer(src)
    try:
        assert wait_until(lambda: len(c.frames) >= 20, 20), "the looped video should deliver frames"
        video.unlink()  # the file (or the mount it lives on) disappears
        assert wait_until(lambda: any(s == "reconnecting" and "not found" in d for s, d in health), 20), health
        n_gone = len(c.frames)
        time.sleep(0.5)
        assert len(c.frames) - n_gone <= 12, "at most the rest of the already open file after deletion"
        other = load_image(FACES / "guido_van_rossum" / "guido_van_rossum_01.jpg")
        _write_video(tmp_path / "new.avi", other)
        os.replace(tmp_path / "new.avi", video)  # a new file appears under the same name
        assert wait_until(lambda: len(c.frames) > n_gone + 20, 20), "frames should resume from the new file"
        assert health[-1][0] == "ok"
    finally:
        c.stop()
    assert c.error is None


def test_corrupted_folder_files_are_skipped_with_a_log_line(tmp_path, caplog):
    folder = tmp_path / "cam"
    folder.mkdir()
    for i, p in enumerate(sorted((FACES / "barack_obama").glob("*.jpg"))):
        shutil.copyfile(p, folder / f"{i}.jpg")
    caplog.set_level(logging.WARNING, logger="edgeface.frames")
    src = FolderSource(folder, loop=True, max_fps=100)
    c = Consumer(src)
    try:
        assert wait_until(lambda: len(c.frames) >= 8, 20)
        data = (folder / "1.jpg").read_bytes()
        (folder / "1.jpg").write_bytes(data[: len(data) // 3])  # truncated mid-write
        (folder / "2.jpg").write_bytes(os.urandom(5000))  # garbage
        (folder / "3.jpg").unlink()  # gone
        n = len(c.frames)
        assert wait_until(lambda: len(c.frames) >= n + 10, 20), "the readable files keep coming"
        assert wait_until(lambda: sum("skipping unreadable frame" in r.getMessage() for r in caplog.records) >= 3, 10)
    finally:
        c.stop()
    assert c.error is None
    late = [Path(f.source).name for f in c.frames[n:]]
    assert set(late) <= {"0.jpg", "1.jpg"} and "0.jpg" in late
    # the truncated JPEG still decodes partly (libjpeg fills the rest): it is a frame, not a crash


class FlakyCamera(_LiveSource):
    """A camera driver substitute. `mode`: good | frozen | noise | badshape | unplugged."""

    def __init__(self, image: np.ndarray, **kw) -> None:
        super().__init__(**kw)
        self.name = "flaky"
        self.mode = "good"
        self.bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        self._rng = np.random.default_rng(0)
        self._n = 0
        self.opened = 0

    def _open(self) -> None:
        if self.mode == "unplugged":
            raise CameraError("/dev/video0: no such device")
        self.opened += 1

    def _read(self) -> Optional[np.ndarray]:
        time.sleep(0.02)  # ~50 fps sensor
        self._n += 1
        if self.mode == "unplugged":
            raise OSError(19, "No such device")
        if self.mode == "frozen":
            return to_rgb(self.bgr, bgr=True)
        if self.mode == "noise":
            return to_rgb(self._rng.integers(0, 256, self.bgr.shape, dtype=np.uint8), bgr=True)
        if self.mode == "badshape":
            return to_rgb(np.zeros((4, 7), np.uint8), bgr=True)  # a broken buffer: ImageError
        frame = self.bgr.copy()
        frame[0, 0] = self._n % 256  # a live sensor never repeats exactly
        frame[::16, ::16] = frame[::16, ::16] // 2 + (self._n % 7)
        return to_rgb(frame, bgr=True)

    def _release(self) -> None:
        pass


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")
def test_daemon_survives_camera_faults_and_reports_health(tmp_path):
    from edgeface.daemon.app import Daemon

    broker = MosquittoBroker().start()
    collector = Collector(broker.host, broker.port, "edgeface/front/camera")
    cfg = parse_config({
        "state_dir": str(tmp_path / "state"),
        "camera": {"max_fps": 25, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "frozen_after_s": 0.6},
        "door": {"pin_factory": "mock", "pulse_s": 0.5},
        "gallery": {"path": "gallery.db"}, "audit": {"path": "audit.db"},
                        "mqtt": {"outbox_path": "outbox.db", "host": broker.host, "port": broker.port, "ha_discovery": False, "keepalive_s": 5},
    })
    cam = FlakyCamera(load_image(PHOTO), max_fps=None, reconnect_min_s=0.05, reconnect_max_s=0.2,
                      frozen_after_s=0.6)
    pins = MockFactory()
    daemon = Daemon(cfg, source=cam, pin_factory=pins)
    cam._cb = daemon._on_camera_health  # what open_source(on_health=...) does for a configured camera
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    states = lambda: [p.decode() for p in collector.on_topic("edgeface/front/camera")]  # noqa: E731
    daemon.start()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert daemon.mqtt.wait_connected(10)
        assert wait_until(lambda: "ok" in states(), 20), states()
        seen = daemon.frames_seen
        for mode, expect in (("frozen", "frozen"), ("noise", None), ("badshape", "reconnecting"),
                             ("unplugged", "reconnecting")):
            n_before = len(states())
            cam.mode = mode
            if expect:  # (a transient state: "frozen" is followed by "reconnecting" at once)
                assert wait_until(lambda: expect in states()[n_before:], 20), (mode, states())
            else:
                time.sleep(1.0)  # noise frames are processed like any frame: no face, no decision
                assert daemon.frames_seen > seen
            assert worker.is_alive(), f"the daemon died on camera mode {mode}"
            cam.mode = "good"
            assert wait_until(lambda: states()[-1] == "ok", 20), (mode, states())
            assert wait_until(lambda: daemon.frames_seen > seen + 5, 20), f"no frames after recovery from {mode}"
            seen = daemon.frames_seen
        audit = [r["result"] for r in daemon.audit.rows("camera")]
    finally:
        daemon.stop()
        worker.join(20)
        daemon.close()
        pins.close()
        collector.close()
        broker.close()
    assert not errors and not worker.is_alive()
    assert {"ok", "frozen", "reconnecting"} <= set(audit)
    relay = [r for r in pins.pin(17).states if r.state]
    assert relay == [], "a camera fault must never move the relay"
