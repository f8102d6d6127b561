"""A cheap presence gate before detection: most frames at a door are an empty, unchanging doorway.

Each frame is shrunk to a small grayscale copy (`PresenceConfig.width` pixels wide) and compared with a slowly
updated background. The frame's overall brightness change (lighting flicker, auto-exposure) is removed first, so
only local change counts as motion. The detector runs when something moved, on every frame while motion or a face
was seen within `hold_s` (a person walking in or standing at the door is detected on every frame), and at least
every `detect_every_s` otherwise (a person who stands still long enough to become background is still decided).
Times are the frames' own timestamps, so replayed sequences behave the same on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

from edgeface.config import PresenceConfig
from edgeface.types import Frame


def small_gray(image: np.ndarray, width: int) -> np.ndarray:
    """The image as a float32 grayscale copy `width` pixels wide (a 2-D image is taken as already grey, e.g. the
    Y plane of a camera's YUV stream). Strided first, so a 1280x720 frame costs a fraction of a millisecond."""
    h, w = image.shape[:2]
    step = max(1, w // (width * 2))  # keep >= 2 source pixels per output pixel for the area average
    view = image[::step, ::step]
    if view.ndim == 3:
        view = view[:, :, 1]  # green: most of the luma, no colour conversion
    height = max(1, round(h * width / w))
    return cv2.resize(np.ascontiguousarray(view), (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)


@dataclass
class GateState:
    """Why the last frame was (not) given to the detector, for logs and benchmarks."""

    detect: bool = True
    reason: str = "first frame"
    changed: float = 0.0


class PresenceGate:
    """Says per frame whether the detector should run; told afterwards whether it found a face."""

    def __init__(self, cfg: PresenceConfig) -> None:
        self.cfg = cfg
        self._background: Optional[np.ndarray] = None
        self._last_detect = -np.inf
        self._last_activity = -np.inf  # motion or a face
        self.state = GateState()
        self.frames = 0
        self.detected = 0

    def should_detect(self, image: np.ndarray, timestamp: float) -> bool:
        """True when this frame must go to the detector (always True when the gate is disabled)."""
        self.frames += 1
        if not self.cfg.enabled:
            self.detected += 1
            self.state = GateState(True, "gate off")
            return True
        gray = small_gray(image, self.cfg.width)
        changed = 0.0
        if self._background is None or self._background.shape != gray.shape:
            self._background = gray
            reason = "first frame"
        else:
            diff = gray - self._background
            diff -= float(diff.mean())  # global brightness change is not motion (mean: a third of median's cost)
            changed = float(np.count_nonzero(np.abs(diff) > self.cfg.pixel_threshold)) / diff.size
            cv2.accumulateWeighted(gray, self._background, self.cfg.background_rate)
            reason = ""
        if changed >= self.cfg.min_changed:
            self._last_activity = timestamp
            reason = "motion"
        elif not reason and timestamp - self._last_activity <= self.cfg.hold_s:
            reason = "recent motion or face"
        elif not reason and timestamp - self._last_detect >= self.cfg.detect_every_s:
            reason = "periodic"
        detect = bool(reason)
        self.state = GateState(detect, reason or "no change", changed)
        if detect:
            self._last_detect = timestamp
            self.detected += 1
        return detect

    def found(self, timestamp: float, face: bool) -> None:
        """What the detector saw on a frame the gate let through: a face keeps every frame detected for hold_s."""
        if face:
            self._last_activity = timestamp

    def analyze(self, analyzer: Any, frame: Frame) -> Optional[Any]:
        """The frame's main face (a FaceResult) or None, running the analyzer only when the gate says so; on the
        low-resolution copy when the frame has one."""
        small = frame.lores if frame.lores is not None else frame.image
        if not self.should_detect(small, frame.timestamp):
            return None
        if frame.lores is None:
            result, _n = analyzer.analyze_main(frame.image)
        else:
            result, _n = analyzer.analyze_main(frame.image, detect_on=frame.lores)
        self.found(frame.timestamp, result is not None)
        return result
