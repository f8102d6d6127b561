"""The frozen records that flow between stages: Frame -> Face -> (crop, embedding) -> Match -> Decision."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

#: Keypoint order of BlazeFace (the subject's right eye appears on the image's left).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear", "left_ear")

#: What the policy decided for one frame (see edgeface.decide).
Action = Literal["grant", "deny", "unknown", "none"]


@dataclass(frozen=True)
class Frame:
    """One camera image: RGB uint8 HxWx3, with the wall-clock time (seconds since the epoch) it was taken.

    `lores` is an optional smaller RGB copy of the same instant (the Pi camera's low-resolution stream): the
    presence gate and the detector look at it, faces are cropped from `image` (coordinates scaled up)."""

    image: np.ndarray = field(repr=False)
    timestamp: float
    index: int = 0
    source: str = ""
    lores: Optional[np.ndarray] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Face:
    """A detected face: box (x, y, w, h) in frame pixels, detector score in [0, 1], keypoints (6, 2) in pixels."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray = field(repr=False)
    #: Optional refined 5 points from the landmark model: right eye, left eye, nose tip, right and left mouth
    #: corner (pixels). When present, alignment uses them instead of the detector's coarse keypoints.
    landmarks5: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    #: Face-presence probability from the landmark model (None when it was not run).
    presence: Optional[float] = field(default=None, compare=False)
    #: The landmark model's 468 mesh points (x, y pixels) when it ran, kept for the liveness gate.
    mesh: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> float:
        """Face size in pixels: the larger side of the box (what a minimum-face-size setting compares)."""
        return max(self.box[2], self.box[3])

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return (x + w / 2.0, y + h / 2.0)

    def as_dict(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box], "score": round(float(self.score), 4)}


@dataclass(frozen=True)
class Match:
    """Open-set 1:N answer. `person_id`/`name` are None when nobody is within the threshold (unknown);
    the best candidate and its distance are still reported for the audit.
    Distances are cosine distances between unit vectors: 0 = identical, 2 = opposite, lower is stricter."""

    person_id: Optional[int]
    name: Optional[str]
    distance: float
    threshold: float
    candidate_id: Optional[int] = None
    candidate_name: Optional[str] = None

    @property
    def known(self) -> bool:
        return self.person_id is not None


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one frame: the action, for whom, why, and the evidence (distance, frames, box)."""

    action: Action
    person_id: Optional[int] = None
    person_name: Optional[str] = None
    reason: str = ""
    distance: Optional[float] = None
    threshold: Optional[float] = None
    frames_used: int = 0
    box: Optional[tuple[float, float, float, float]] = None
    timestamp: float = 0.0

    @property
    def result(self) -> Optional[str]:
        """The event word: granted / denied / unknown (None for action 'none')."""
        return {"grant": "granted", "deny": "denied", "unknown": "unknown"}.get(self.action)
