"""The web app's live view: a small JPEG of the camera with the face box and name, written by the daemon at most
every web.live_interval_s, and only while someone is watching.

Why this way: the web app has no camera (the daemon owns it) and must not slow the loop. Each write is a resize,
one rectangle and a ~640 px JPEG (a few ms every few seconds); it is skipped unless the web app touched the
request file in the last WATCH_S seconds, so an idle door never writes to the SD card for it. Failures are logged
once and never reach the decision.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

log = logging.getLogger(__name__)

#: Longest side of the live JPEG (pixels).
LIVE_SIDE = 640
#: The live view is written while the web app asked for it within this many seconds.
WATCH_S = 30.0
LIVE_NAME, REQUEST_NAME = "live.jpg", "live.request"


class LiveSnapshot:
    def __init__(self, state_dir: Path, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = state_dir / LIVE_NAME
        self.request = state_dir / REQUEST_NAME
        self.interval_s = interval_s
        self._clock = clock
        self._last = -1e18
        self._failed = False

    def watched(self) -> bool:
        try:
            return time.time() - self.request.stat().st_mtime < WATCH_S
        except OSError:
            return False

    def frame(self, rgb: np.ndarray, box: Optional[Any], label: str) -> None:
        now = self._clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        if not self.watched():
            return
        try:
            self._write(rgb, box, label)
            self._failed = False
        except Exception:  # noqa: BLE001  (the live view is never worth a failed frame)
            if not self._failed:
                log.exception("live view snapshot not written")
            self._failed = True

    def _write(self, rgb: np.ndarray, box: Optional[Any], label: str) -> None:
        scale = min(1.0, LIVE_SIDE / max(rgb.shape[:2]))
        img = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb.copy()
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        if box is not None:
            x, y, w, h = (int(round(float(v) * scale)) for v in box)
            colour = (60, 160, 40) if label not in ("unknown", "") else (0, 140, 220)
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, 2)
            cv2.putText(img, label, (x, max(14, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 2, cv2.LINE_AA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
        if not ok:
            raise ValueError("JPEG encoding failed")
        tmp = self.path.with_name(f".{LIVE_NAME}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.tobytes())
        os.replace(tmp, self.path)  # the web app never reads half a JPEG (no fsync: a lost snapshot costs nothing)
