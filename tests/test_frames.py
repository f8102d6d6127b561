"""Frame sources: image folders, video files (with retry when missing), live cameras keeping only the
newest frame, reconnecting after a failure and reporting frozen images."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from edgeface.config import CameraConfig
from edgeface.errors import CameraError
from edgeface.frames import FolderSource, OpenCVSource, _LiveSource, open_source


def test_folder_source_yields_every_fixture_photo_once(fixture_faces):
    src = FolderSource(fixture_faces)
    frames = list(src.frames())
    assert len(frames) == 26
    assert all(f.image.dtype == np.uint8 and f.image.ndim == 3 and f.image.shape[2] == 3 for f in frames)
    assert [f.index for f in frames] == list(range(26))
    assert src.health == "stopped"


def test_folder_source_loop_until_closed(fixture_faces):
    src = FolderSource(fixture_faces / "barack_obama", loop=True)
    got = []
    for f in src.frames():
        got.append(f.source)
        if len(got) == 10:
            src.close()
    assert len(got) == 10 and got[0] == got[4]


def test_frame_rate_cap_is_an_upper_bound(fixture_faces):
    src = FolderSource(fixture_faces, loop=True, max_fps=5)
    n = 0
    t0 = time.monotonic()
    for _ in src.frames():
        n += 1
        if time.monotonic() - t0 > 1.0:
            break
    src.close()
    assert n <= 7  # 5 fps for ~1 s (+ the first frame, + one slot of slack); uncapped would be ~26+


def test_empty_or_missing_folder_is_a_camera_error(tmp_path):
    with pytest.raises(CameraError, match="no images"):
        FolderSource(tmp_path)
    with pytest.raises(CameraError, match="does not exist"):
        FolderSource(tmp_path / "nope")


def _write_video(path, n=12, size=(160, 120)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for i in range(n):
        img = np.full((size[1], size[0], 3), 0, np.uint8)
        img[:, :, 2] = 200  # red in BGR
        cv2.putText(img, str(i), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 2)
        writer.write(img)
    writer.release()


def test_video_file_frames_are_rgb(tmp_path):
    video = tmp_path / "clip.avi"
    _write_video(video)
    src = OpenCVSource(str(video))
    frames = list(src.frames())
    assert len(frames) == 12
    r, g, b = frames[0].image[5, 5]
    assert r > 150 and b < 80  # red stays red: BGR was converted


def test_missing_camera_is_retried_with_backoff_not_a_crash(tmp_path):
    """The daemon's camera fails (video missing): reopen attempts continue until it appears."""
    video = tmp_path / "late.avi"
    health = []
    src = OpenCVSource(str(video), reconnect_min_s=0.05, reconnect_max_s=0.2,
                       on_health=lambda state, detail: health.append(state))
    got = []

    def consume():
        for f in src.frames():
            got.append(f)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    assert health and health[0] == "reconnecting" and not got
    _write_video(tmp_path / "tmp.avi")
    (tmp_path / "tmp.avi").rename(video)
    t.join(timeout=10)
    assert not t.is_alive()
    assert len(got) == 12 and "ok" in health


class SyntheticCamera(_LiveSource):
    """A stand-in for camera hardware: frames numbered by a counter; can fail or freeze on demand."""

    def __init__(self, *, fail_after=None, frozen=False, fps=200.0, **kw):
        super().__init__(max_fps=None, reconnect_min_s=0.05, reconnect_max_s=0.1, frozen_after_s=0.3, **kw)
        self.name = "synthetic"
        self.counter = 0
        self.opens = 0
        self.fail_after = fail_after
        self.frozen = frozen
        self.period = 1.0 / fps
        self._reads_since_open = 0

    def _open(self):
        self.opens += 1
        self._reads_since_open = 0

    def _read(self):
        time.sleep(self.period)
        self._reads_since_open += 1
        if self.fail_after is not None and self.opens == 1 and self._reads_since_open > self.fail_after:
            raise OSError("USB camera unplugged")
        if not self.frozen:
            self.counter += 1
        img = np.zeros((32, 32, 3), np.uint8)
        img[0, 0, 0] = self.counter % 256
        img[0, 0, 1] = self.counter // 256
        return img

    def _release(self):
        pass


def test_live_source_never_hands_out_stale_frames():
    cam = SyntheticCamera(fps=200)
    numbers = []
    for f in cam.frames():
        numbers.append(int(f.image[0, 0, 0]) + 256 * int(f.image[0, 0, 1]))
        time.sleep(0.1)  # a slow pipeline: the camera makes up to ~20 frames meanwhile
        if len(numbers) == 8:
            cam.close()
    gaps = np.diff(numbers)
    assert (gaps > 0).all()  # never an old frame again
    # frames made during processing were skipped, not queued (a queue would give gaps of exactly 1)
    assert gaps[1:].mean() > 1.5


def test_live_camera_failure_reconnects_and_reports_health():
    health = []
    cam = SyntheticCamera(fail_after=5, on_health=lambda s, d: health.append(s))
    n = 0
    for _ in cam.frames():
        n += 1
        if n == 20:
            cam.close()
    assert cam.opens >= 2
    assert health[:3] == ["ok", "reconnecting", "ok"]


def test_frozen_camera_is_reported_and_reopened():
    health = []
    cam = SyntheticCamera(frozen=True, on_health=lambda s, d: health.append(s))
    t0 = time.monotonic()
    for _ in cam.frames():
        if "frozen" in health or time.monotonic() - t0 > 5:
            cam.close()
    assert "frozen" in health and cam.opens >= 1


def test_open_source_picks_the_source_kind(fixture_faces, tmp_path):
    assert isinstance(open_source(CameraConfig(source=str(fixture_faces))), FolderSource)
    assert isinstance(open_source(CameraConfig(source="demo")), FolderSource)
    assert isinstance(open_source(CameraConfig(source="0")), OpenCVSource)
    assert isinstance(open_source(CameraConfig(source="rtsp://127.0.0.1:1/x")), OpenCVSource)
    assert isinstance(open_source(CameraConfig(source=str(tmp_path / "v.mp4"))), OpenCVSource)


def test_picamera_off_a_pi_is_a_clear_error():
    pytest.importorskip("cv2")
    try:
        import picamera2  # noqa: F401
        pytest.skip("picamera2 is installed here")
    except ImportError:
        pass
    with pytest.raises(CameraError, match="picamera2"):
        open_source(CameraConfig(source="picamera"))
