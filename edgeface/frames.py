"""Frame sources behind one interface: `frames()` yields fresh RGB frames, `close()` stops them.

Live cameras (Pi camera, V4L2 index, RTSP) are read by a grabber thread that keeps ONLY the newest
frame, so a slow pipeline never works on stale images. A camera that fails or disappears is reopened
with exponential back-off instead of crashing the daemon; its health (ok / reconnecting / frozen) is
reported through `on_health` so the daemon can publish it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Union

import numpy as np

from edgeface.config import CameraConfig
from edgeface.errors import CameraError, ImageError
from edgeface.vision.images import list_images, load_image, to_rgb
from edgeface.models import demo_faces_dir
from edgeface.types import Frame

log = logging.getLogger(__name__)

HealthCallback = Callable[[str, str], None]  # (state, detail); state in HEALTH_STATES
HEALTH_STATES = ("ok", "reconnecting", "frozen", "stopped")

#: The shipped sample faces (installed with the package, or the checkout's), used by camera.source 'demo'.
DEMO_FACES = demo_faces_dir()


class FrameSource(Protocol):
    name: str
    health: str

    def frames(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


class _Health:
    """Health state with change notification (callbacks must never break the capture loop)."""

    def __init__(self, on_health: Optional[HealthCallback]) -> None:
        self._cb = on_health
        self.health = "reconnecting"
        self.detail = "not started"

    def _set_health(self, state: str, detail: str = "") -> None:
        if state == self.health and detail == self.detail:
            return
        self.health, self.detail = state, detail
        (log.info if state == "ok" else log.warning)("camera %s: %s %s", getattr(self, "name", "?"), state, detail)
        if self._cb:
            try:
                self._cb(state, detail)
            except Exception:  # noqa: BLE001  (a reporting failure must not stop the camera)
                log.exception("camera health callback failed")


class RateLimiter:
    """Lets at most `max_fps` events per second through; `wait()` sleeps the remainder (interruptible)."""

    def __init__(self, max_fps: Optional[float], stop: threading.Event) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self._next = 0.0
        self._stop = stop

    def wait(self) -> bool:
        """Sleep until the next slot; False if stopped meanwhile."""
        if self.interval:
            delay = self._next - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return False
            self._next = max(self._next, time.monotonic() - self.interval) + self.interval
        return not self._stop.is_set()


class Backoff:
    """Exponential back-off between reopen attempts: min_s, 2*min_s, ... capped at max_s."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s = min_s, max(max_s, min_s)
        self.next_s = min_s

    def reset(self) -> None:
        self.next_s = self.min_s

    def take(self) -> float:
        delay = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return delay


class FolderSource(_Health):
    """Images of a folder (recursively, sorted) as frames: tests and the demo. Not live: nothing is dropped."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, loop: bool = False, max_fps: Optional[float] = None,
                 repeat: int = 1, on_health: Optional[HealthCallback] = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(on_health)
        self.path = Path(path)
        if not self.path.is_dir():
            raise CameraError(f"camera.source: image folder {self.path} does not exist")
        self.files = list_images_recursive(self.path)
        if not self.files:
            raise CameraError(f"camera.source: no images (.jpg/.png/...) in folder {self.path}")
        self.loop = loop
        self.repeat = max(1, int(repeat))  # each photo shown this many frames: a person standing there
        self.name = f"folder:{self.path}"
        self._stop = threading.Event()
        self._rate = RateLimiter(max_fps, self._stop)
        self._clock = clock

    def frames(self) -> Iterator[Frame]:
        index = 0
        self._set_health("ok", f"{len(self.files)} images")
        while not self._stop.is_set():
            for file in self.files:
                if not self._rate.wait():
                    return
                try:
                    image = load_image(file)
                except ImageError as exc:
                    log.warning("skipping unreadable frame: %s", exc)
                    continue
                for k in range(self.repeat):
                    if k and not self._rate.wait():
                        return
                    yield Frame(image=image, timestamp=self._clock(), index=index, source=str(file))
                    index += 1
            if not self.loop:
                break
        self._set_health("stopped", "end of folder")

    def close(self) -> None:
        self._stop.set()


def list_images_recursive(path: Path) -> list[Path]:
    """Images in a folder and its sub-folders (one per person in the demo), sorted by path."""
    out = list_images(path)
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.extend(list_images_recursive(sub))
    return out


#: What a camera read gives: the RGB image, or (image, low-resolution RGB copy of the same instant).
Captured = Union[np.ndarray, tuple[np.ndarray, Optional[np.ndarray]]]


def split_capture(captured: Captured) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(image, lores or None) of one camera read."""
    if isinstance(captured, tuple):
        return captured
    return captured, None


class _LiveSource(_Health):
    """Common loop of a live camera: open -> grabber thread keeps the newest frame -> yield at <= max_fps.

    Subclasses implement `_open()`, `_read() -> Captured | None` (None = camera lost) and `_release()`.
    """

    live = True

    def __init__(self, *, max_fps: Optional[float], reconnect_min_s: float, reconnect_max_s: float,
                 frozen_after_s: float, loop: bool = False, on_health: Optional[HealthCallback] = None) -> None:
        super().__init__(on_health)
        self._stop = threading.Event()
        self._rate = RateLimiter(max_fps, self._stop)
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.frozen_after_s = frozen_after_s
        self.loop = loop
        self._cond = threading.Condition()
        self._latest: Optional[Captured] = None  # one-frame buffer: the newest read replaces an unused one
        self._latest_t = 0.0
        self._seq = 0
        self._lost = False
        self._grabber: Optional[threading.Thread] = None
        self._session_stop = threading.Event()
        self.reconnects = 0

    # -- to implement --------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> Optional[Captured]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    # -- loop ----------------------------------------------------------------------------------
    def _grab_loop(self, session_stop: threading.Event) -> None:
        while not (self._stop.is_set() or session_stop.is_set()):
            try:
                image = self._read()
            except Exception as exc:  # noqa: BLE001  (driver errors: treat as a lost camera)
                log.warning("camera %s read failed: %s", self.name, exc)
                image = None
            with self._cond:
                if image is None:
                    self._lost = True
                    self._cond.notify_all()
                    return
                self._latest, self._latest_t = image, time.time()
                self._seq += 1
                self._cond.notify_all()

    def _try_open(self) -> bool:
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001  (any failure to open is retried)
            delay = self._backoff.take()
            self._set_health("reconnecting", f"{exc}; retry in {delay:.1f} s")
            self._stop.wait(delay)
            return False
        with self._cond:
            self._lost = False
            self._latest = None
        if self.live:
            self._session_stop = threading.Event()
            self._grabber = threading.Thread(target=self._grab_loop, args=(self._session_stop,),
                                             name=f"grab-{self.name}", daemon=True)
            self._grabber.start()
        return True

    def _lose(self, why: str) -> None:
        self._release_quietly()
        self.reconnects += 1
        delay = self._backoff.take()
        self._set_health("reconnecting", f"{why}; retry in {delay:.1f} s")
        self._stop.wait(delay)

    def _release_quietly(self) -> None:
        # stop the grabber first: releasing a capture while another thread reads it can crash drivers
        if self._grabber is not None:
            self._session_stop.set()
            self._grabber.join(timeout=2.0)
            self._grabber = None
        try:
            self._release()
        except Exception:  # noqa: BLE001
            log.debug("camera release failed", exc_info=True)

    def frames(self) -> Iterator[Frame]:
        index = 0
        try:
            while not self._stop.is_set():
                if not self._try_open():
                    continue
                with self._cond:
                    seen = self._seq
                last_change = time.monotonic()
                last_digest = b""
                while not self._stop.is_set():
                    if not self._rate.wait():
                        return
                    captured = self._next_image(seen)
                    if captured is None:
                        if not self.live and not self._lost:  # end of a video file
                            self._release_quietly()
                            if self.loop:
                                break
                            self._set_health("stopped", "end of video")
                            return
                        if self._lost:
                            self._lose("camera stopped delivering frames")
                            break
                        # no new frame within frozen_after_s
                        self._set_health("frozen", f"no new frame for {self.frozen_after_s:g} s")
                        self._lose("frozen")
                        break
                    seen = self._seq
                    image, lores = split_capture(captured)
                    digest = hashlib.blake2b(np.ascontiguousarray(image[::16, ::16]).tobytes(), digest_size=8).digest()
                    now = time.monotonic()
                    if digest != last_digest:
                        last_digest, last_change = digest, now
                    elif self.live and now - last_change > self.frozen_after_s:
                        self._set_health("frozen", f"image unchanged for {self.frozen_after_s:g} s")
                        self._lose("frozen image")
                        break
                    self._backoff.reset()
                    self._set_health("ok", "")
                    yield Frame(image=image, timestamp=time.time(), index=index, source=self.name, lores=lores)
                    index += 1
        finally:
            self._release_quietly()

    def _next_image(self, seen: int) -> Optional[Captured]:
        if not self.live:
            image = self._read()
            return image
        deadline = time.monotonic() + self.frozen_after_s
        with self._cond:
            while self._seq == seen and not self._lost and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            if self._seq == seen or self._latest is None:
                return None
            image, self._latest = self._latest, None
            return image

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()


class OpenCVSource(_LiveSource):
    """cv2.VideoCapture on a device index ('0'), an RTSP/HTTP URL, or a video file (files are not live:
    every frame is used, paced by max_fps)."""

    def __init__(self, source: Union[str, int], *, width: int = 0, height: int = 0, max_fps: Optional[float] = None,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0, frozen_after_s: float = 10.0,
                 loop: bool = False, on_health: Optional[HealthCallback] = None) -> None:
        super().__init__(max_fps=max_fps, reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s,
                         frozen_after_s=frozen_after_s, loop=loop, on_health=on_health)
        self.source: Union[str, int] = int(source) if isinstance(source, str) and source.isdigit() else source
        self.width, self.height = width, height
        self.live = not (isinstance(self.source, str) and "://" not in self.source)
        self.name = f"opencv:{self.source}"
        self._cap = None

    def _open(self) -> None:
        import cv2

        if not self.live and not Path(str(self.source)).is_file():
            raise CameraError(f"video file {self.source} not found")
        cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open {self.source}")
        if self.live and self.width and self.height:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._cap = cap

    def _read(self) -> Optional[np.ndarray]:
        cap = self._cap
        if cap is None:
            return None
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return None
        return to_rgb(bgr, name=self.name, bgr=True)

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


#: What a C extension built against numpy 1.x says when numpy 2 is imported (and the other way round).
_NUMPY_ABI_SIGNS = ("numpy.dtype size changed", "compiled using NumPy", "_ARRAY_API", "numpy.core.multiarray",
                    "numpy._core", "binary incompatibility")


def import_picamera2() -> type:
    """Picamera2, or a one-line CameraError that says how to fix the install.

    Raspberry Pi OS's python3-picamera2 (and simplejpeg under it) is compiled against the apt numpy; a numpy 2
    pip-installed into the venv makes that import fail with "numpy.dtype size changed". tools/install-pi.sh pins
    the venv to the system numpy; this names the mismatch when a venv was made some other way."""
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001  (ValueError from Cython's size check, ImportError, AttributeError)
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name == "picamera2":
            raise CameraError("camera.source 'picamera' needs picamera2 (on a Pi: sudo apt install "
                              "python3-picamera2, and a venv made with --system-site-packages)") from exc
        if any(sign in str(exc) for sign in _NUMPY_ABI_SIGNS):
            raise CameraError(
                f"camera.source 'picamera': picamera2 cannot load with numpy {np.__version__} from "
                f"{Path(np.__file__).parent} ({text}); Raspberry Pi OS's python3-picamera2 is built for the system "
                f"numpy: re-run tools/install-pi.sh (it keeps the venv on the apt numpy) or "
                f"`{Path(sys.prefix) / 'bin' / 'pip'} uninstall numpy`") from exc
        raise CameraError(f"camera.source 'picamera': picamera2 failed to import ({text})") from exc
    return Picamera2


class PiCameraSource(_LiveSource):
    """Raspberry Pi camera through picamera2 (imported here only: it exists on a Pi only).

    With `lores_width` > 0 the camera also delivers its low-resolution stream (the ISP scales it, free for the
    CPU): both are captured from the same request with `capture_arrays`, the gate and the detector use the small
    one, the face is cropped from the main one. The low-resolution stream is YUV420 (the only format a Pi 4's ISP
    gives it); it is converted to RGB here."""

    def __init__(self, *, width: int = 1280, height: int = 720, lores_width: int = 0, max_fps: Optional[float] = None,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0, frozen_after_s: float = 10.0,
                 on_health: Optional[HealthCallback] = None) -> None:
        super().__init__(max_fps=max_fps, reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s,
                         frozen_after_s=frozen_after_s, on_health=on_health)
        self._Picamera2 = import_picamera2()
        self.width, self.height = width, height
        self.lores_size = lores_size(width, height, lores_width)
        self.name = "picamera"
        self._cam = None

    def _open(self) -> None:
        cam = self._Picamera2()
        streams: dict = {"main": {"size": (self.width, self.height), "format": "RGB888"}}
        if self.lores_size is not None:
            streams["lores"] = {"size": self.lores_size, "format": "YUV420"}
        config = cam.create_video_configuration(**streams, buffer_count=2)
        cam.configure(config)
        cam.start()
        self._cam = cam

    def _read(self) -> Optional[Captured]:
        cam = self._cam
        if cam is None:
            return None
        if self.lores_size is None:
            array = cam.capture_array("main")
            # picamera2's "RGB888" is B,G,R in memory (libcamera naming); flip to RGB.
            return np.ascontiguousarray(array[:, :, 2::-1])
        arrays, _metadata = cam.capture_arrays(["main", "lores"])  # one request: the same instant
        main = np.ascontiguousarray(arrays[0][:, :, 2::-1])
        return main, yuv420_to_rgb(arrays[1], self.lores_size)

    def _release(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()


def lores_size(width: int, height: int, lores_width: int) -> Optional[tuple[int, int]]:
    """(w, h) of the low-resolution stream: lores_width (even) and the main stream's aspect ratio (even height),
    or None when it is off or not smaller than the main stream."""
    if lores_width <= 0 or lores_width >= width:
        return None
    w = lores_width - lores_width % 2
    h = max(2, round(height * w / width / 2) * 2)
    return w, h


def yuv420_to_rgb(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """picamera2's YUV420 array (h * 3/2 rows, rows maybe padded to the stride) as RGB of `size` (w, h)."""
    import cv2

    w, h = size
    if array.ndim != 2 or array.shape[0] != h * 3 // 2 or array.shape[1] < w:
        raise CameraError(f"picamera lores stream: expected a YUV420 array of {h * 3 // 2} rows x >= {w}, got "
                          f"shape {array.shape}")
    if array.shape[1] != w:  # padded rows: Y is (h, stride); U and V follow as (h/4, stride) halves each
        stride = array.shape[1]
        y = array[:h, :w]
        chroma = array[h:].reshape(-1)[: h * stride // 2].reshape(h, stride // 2)
        u = chroma[: h // 2, : w // 2]
        v = chroma[h // 2:, : w // 2]
        array = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(h * 3 // 2, w)
    return cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_YUV2RGB_I420)


def open_source(cfg: CameraConfig, *, on_health: Optional[HealthCallback] = None) -> FrameSource:
    """The frame source that camera.source names (see CameraConfig.source)."""
    src = cfg.source.strip()
    common = dict(max_fps=cfg.max_fps, reconnect_min_s=cfg.reconnect_min_s, reconnect_max_s=cfg.reconnect_max_s,
                  frozen_after_s=cfg.frozen_after_s, on_health=on_health)
    if src == "picamera":
        return PiCameraSource(width=cfg.width, height=cfg.height, lores_width=cfg.lores_width, **common)  # type: ignore[arg-type]
    if src == "demo":
        if not DEMO_FACES.is_dir():
            raise CameraError(f"camera.source 'demo' needs the sample faces in {DEMO_FACES} (installed with the "
                              "package; reinstall edgeface)")
        return FolderSource(DEMO_FACES, loop=cfg.loop, max_fps=cfg.max_fps, on_health=on_health)
    if "://" not in src and Path(src).expanduser().is_dir():
        return FolderSource(Path(src).expanduser(), loop=cfg.loop, max_fps=cfg.max_fps, on_health=on_health)
    if src.isdigit() or "://" in src:
        return OpenCVSource(src, width=cfg.width, height=cfg.height, **common)  # type: ignore[arg-type]
    # A video file; a missing one is retried (it may be on a mount that comes later) but say so now.
    if not Path(src).expanduser().exists():
        log.warning("camera.source %s does not exist (yet); retrying with back-off", src)
    return OpenCVSource(str(Path(src).expanduser()), width=cfg.width, height=cfg.height, loop=cfg.loop,
                        **common)  # type: ignore[arg-type]
