"""Replayed doorway sequences: synthetic door scenes with a face photo walking in, for tests and bench/.

A scene is a wall-and-door background (gradients, a door frame, a handle, a floor; seeded), with camera noise
and lighting flicker on every frame, so frame differencing is tested against an honest, never-identical image.
A person is a face photo (tests/fixtures/faces) that slides in from one side while growing, then stands still.
Frames carry synthetic timestamps at a fixed frame rate, so a replay decides the same on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from edgeface.types import Frame
from edgeface.vision.images import load_image


def door_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An empty doorway: a lit wall, a darker door in a frame, a handle, a floor (RGB uint8)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    base = rng.uniform(150, 200, 3).astype(np.float32)
    wall = base[None, None, :] * (0.75 + 0.25 * (1 - y) * (0.8 + 0.2 * x))[..., None]
    img = wall.copy()
    dx0, dx1 = int(width * 0.33), int(width * 0.67)
    dy0, floor = int(height * 0.08), int(height * 0.9)
    cv2.rectangle(img, (dx0 - 14, dy0 - 14), (dx1 + 14, floor), (90, 70, 50), -1)  # door frame
    door_colour = rng.uniform(100, 150, 3)
    img[dy0:floor, dx0:dx1] = door_colour * (0.85 + 0.15 * x[:, dx0:dx1])[..., None]
    cv2.circle(img, (dx1 - 30, int(height * 0.55)), 9, (200, 190, 120), -1)  # handle
    img[floor:] = np.array([110, 100, 90], np.float32) * (0.8 + 0.2 * y[floor:])[..., None]
    texture = cv2.GaussianBlur(rng.normal(0, 6, (height, width)).astype(np.float32), (0, 0), 3)
    img += texture[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Appearance:
    """One person in a sequence: `photo` enters at frame `start` over `enter_frames` (sliding in from `side` and
    growing to `height_frac` of the frame height), stays until frame `end` (exclusive)."""

    photo: Path
    start: int
    end: int
    enter_frames: int = 8
    side: str = "left"
    height_frac: float = 0.6

    def placement(self, k: int, width: int, height: int) -> Optional[tuple[float, float, float]]:
        """(centre x, centre y, height) of the photo on frame k, or None when it is not in view."""
        if not self.start <= k < self.end:
            return None
        p = 1.0 if self.enter_frames <= 0 else min(1.0, (k - self.start + 1) / self.enter_frames)
        h = height * self.height_frac * (0.6 + 0.4 * p)
        end_x = width / 2
        start_x = -0.5 * h if self.side == "left" else width + 0.5 * h
        return start_x + (end_x - start_x) * p, height * 0.45, h


@dataclass
class DoorwaySequence:
    """Frames of one replayed doorway: background + people + flicker + noise, at `fps` from `t0`."""

    n_frames: int
    people: list[Appearance] = field(default_factory=list)
    width: int = 1280
    height: int = 720
    fps: float = 10.0
    seed: int = 0
    t0: float = 1_800_000_000.0
    flicker: float = 0.03  # relative brightness swing (mains-lit rooms, auto exposure)
    noise: float = 3.0  # camera noise, grey levels (sigma)

    def __post_init__(self) -> None:
        self._background = door_background(self.width, self.height, self.seed).astype(np.int16)
        rng = np.random.default_rng(self.seed + 1)
        # a few noise fields reused in turn (generating 1280x720 noise per frame would dominate a replay)
        self._noise = [rng.normal(0, self.noise, (self.height, self.width, 1)).astype(np.int16) for _ in range(7)]
        self._photos: dict[Path, np.ndarray] = {}

    def timestamp(self, k: int) -> float:
        return self.t0 + k / self.fps

    def face_visible(self, k: int, person: Appearance) -> bool:
        """Whether at least half of the person's photo is inside frame k (where latency is counted from)."""
        place = person.placement(k, self.width, self.height)
        if place is None:
            return False
        cx, _cy, h = place
        w = h * self._photo(person.photo).shape[1] / self._photo(person.photo).shape[0]
        inside = max(0.0, min(cx + w / 2, self.width) - max(cx - w / 2, 0.0))
        return inside >= 0.5 * w

    def _photo(self, path: Path) -> np.ndarray:
        if path not in self._photos:
            self._photos[path] = load_image(path)
        return self._photos[path]

    def image(self, k: int) -> np.ndarray:
        img = self._background.copy()
        for person in self.people:
            place = person.placement(k, self.width, self.height)
            if place is not None:
                self._paste(img, self._photo(person.photo), *place)
        gain = 1.0 + self.flicker * np.sin(2 * np.pi * k / 7.3) + self.flicker * 0.3 * np.sin(k * 1.7)
        img = (img * gain).astype(np.int16) + self._noise[k % len(self._noise)]
        return np.clip(img, 0, 255).astype(np.uint8)

    def _paste(self, img: np.ndarray, photo: np.ndarray, cx: float, cy: float, h: float) -> None:
        ph, pw = photo.shape[:2]
        nh = max(2, int(round(h)))
        nw = max(2, int(round(pw * nh / ph)))
        scaled = cv2.resize(photo, (nw, nh), interpolation=cv2.INTER_AREA)
        x0, y0 = int(round(cx - nw / 2)), int(round(cy - nh / 2))
        sx0, sy0 = max(0, -x0), max(0, -y0)
        dx0, dy0 = max(0, x0), max(0, y0)
        dx1, dy1 = min(self.width, x0 + nw), min(self.height, y0 + nh)
        if dx1 > dx0 and dy1 > dy0:
            img[dy0:dy1, dx0:dx1] = scaled[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]

    def frames(self) -> Iterator[Frame]:
        for k in range(self.n_frames):
            yield Frame(image=self.image(k), timestamp=self.timestamp(k), index=k, source=f"replay:{k}")


def entrance(photo: Path, *, empty_frames: int = 300, stay_frames: int = 30, after_frames: int = 20,
             seed: int = 0, side: str = "left", height_frac: float = 0.6,
             **kw: object) -> tuple[DoorwaySequence, Appearance]:
    """A long empty doorway, then one person walks in and stands, then leaves (the photo `height_frac` of the
    frame height once in)."""
    person = Appearance(photo, start=empty_frames, end=empty_frames + stay_frames, side=side, height_frac=height_frac)
    seq = DoorwaySequence(empty_frames + stay_frames + after_frames, [person], seed=seed, **kw)  # type: ignore[arg-type]
    return seq, person


def standing_still(photo: Path, *, frames: int = 60, seed: int = 0, height_frac: float = 0.6,
                   **kw: object) -> tuple[DoorwaySequence, Appearance]:
    """A person already standing still in view when the replay starts (no motion to trigger the gate)."""
    person = Appearance(photo, start=0, end=frames, enter_frames=0, height_frac=height_frac)
    return DoorwaySequence(frames, [person], seed=seed, **kw), person  # type: ignore[arg-type]
