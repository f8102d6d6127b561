"""Liveness gate: refuse a grant unless the face in the decision window shows a blink or 3-D head motion.

Why these two cues: a printed photo (or a phone/tablet still image) held in front of the camera is a flat
plane. However it is tilted, moved or bent slightly, every face-mesh point moves by ONE homography between
two frames, so a homography fitted to the 468 mesh points leaves only landmark noise as residual. A real
head that turns even a few degrees does not: the nose tip, cheeks and temples lie at different depths
and move by different amounts (parallax), leaving a residual that grows with the rotation (about 0.0033
inter-ocular distances per degree, measured on the mesh of real faces). A photo also never blinks:
eye openness is measured after undoing the frame's homography (fitted on eye-free rigid points), so the
foreshortening of a tilted photo does not look like a closing eye.

What it does NOT stop (see docs/security.md): a VIDEO replayed on a screen (its content is a real 3-D
head, so it has parallax and blinks), a 3-D mask, or a photo cut out and bent strongly. It is a cheap
gate against the commonest attack (a printed or on-screen still photo), not anti-spoofing hardware.

Pure geometry on mesh points: `LivenessGate.observe(t, points)` per frame, `verdict(now)` when the policy
is about to grant. `MeshLiveness` adds the mesh inference (edgeface.vision.landmarks) for the daemon.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from edgeface.types import Decision

#: Eye contour indices of the MediaPipe 468-point mesh: (outer corner, inner corner) and two upper/lower
#: eyelid pairs per eye; the subject's right eye is on the image's left.
RIGHT_EYE = {"corners": (33, 133), "lids": ((160, 144), (158, 153))}
LEFT_EYE = {"corners": (263, 362), "lids": ((385, 380), (387, 373))}
#: Points that stay put relative to the skull (forehead, nose bridge/tip, cheeks, temples, jaw): used to
#: fit the frame-to-frame homography that rectifies the eyes before measuring openness.
RIGID_POINTS = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 19, 94, 50, 280, 101, 330, 36, 266, 205, 425,
                123, 352, 127, 356, 234, 454, 21, 251, 54, 284, 103, 332, 67, 297, 109, 338, 93, 323,
                132, 361, 58, 288, 172, 397, 136, 365)


@dataclass(frozen=True)
class LivenessVerdict:
    """Outcome of the gate for the frames of the decision window (numbers are for the audit/debugging)."""

    live: bool
    reason: str
    frames: int
    motion: float = 0.0  # largest mean point displacement vs the first frame (inter-ocular distances)
    parallax: float = 0.0  # robust-max homography residual vs the first frame (inter-ocular distances)
    blink: float = 0.0  # relative drop of rectified eye openness: 0 = none, 1 = fully closed

    def as_dict(self) -> dict[str, Any]:
        return {"live": self.live, "reason": self.reason, "frames": self.frames, "motion": round(self.motion, 4),
                "parallax": round(self.parallax, 4), "blink": round(self.blink, 4)}


def _homography(src: np.ndarray, dst: np.ndarray) -> Optional[np.ndarray]:
    """Least-squares homography src -> dst (normalised DLT); None when degenerate."""
    import cv2

    h, _ = cv2.findHomography(src.astype(np.float64), dst.astype(np.float64), 0)
    if h is None or not np.all(np.isfinite(h)):
        return None
    return h


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts.astype(np.float64), np.ones(len(pts))] @ h.T
    w = p[:, 2:3]
    w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return p[:, :2] / w


def inter_ocular(points: np.ndarray) -> float:
    """Distance between the outer eye corners (pixels): the scale every measure is divided by."""
    return float(np.linalg.norm(points[RIGHT_EYE["corners"][0]] - points[LEFT_EYE["corners"][0]]))


def eye_openness(points: np.ndarray) -> float:
    """Eye aspect ratio (mean of both eyes): eyelid gaps over eye width; ~0.25-0.35 open, < 0.1 closed."""
    ratios = []
    for eye in (RIGHT_EYE, LEFT_EYE):
        a, b = eye["corners"]
        width = float(np.linalg.norm(points[a] - points[b]))
        if width <= 1e-6:
            return 0.0
        gap = sum(float(np.linalg.norm(points[u] - points[d])) for u, d in eye["lids"]) / len(eye["lids"])
        ratios.append(gap / width)
    return float(np.mean(ratios))


def planar_residual(ref: np.ndarray, pts: np.ndarray) -> float:
    """RMS residual (pixels) of the best homography mapping `ref` mesh points onto `pts`."""
    h = _homography(ref, pts)
    if h is None:
        return float("inf")
    return float(np.sqrt(np.mean(np.sum((_apply(h, ref) - pts) ** 2, axis=1))))


class LivenessGate:
    """Keeps the mesh points of the current track (last `window_s` seconds) and judges liveness.

    Cues (`method`): "parallax" (3-D head motion), "blink", or "any" (either one suffices).
    Thresholds are fractions of the inter-ocular distance (parallax, motion) or of the open-eye ratio (blink).
    """

    def __init__(self, *, method: str = "any", window_s: float = 4.0, max_frames: int = 40,
                 min_frames: int = 3, min_motion: float = 0.02, min_parallax: float = 0.04,
                 min_blink: float = 0.45) -> None:
        if method not in ("any", "parallax", "blink"):
            raise ValueError(f"liveness.method = {method!r}: expected any, parallax or blink")
        self.method = method
        self.window_s = window_s
        self.min_frames = min_frames
        self.min_motion = min_motion
        self.min_parallax = min_parallax
        self.min_blink = min_blink
        self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=max_frames)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple[float, float, Optional[float]]]] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> "LivenessGate":
        return cls(method=cfg.method, window_s=cfg.window_s, max_frames=cfg.max_frames, min_frames=cfg.min_frames,
                   min_motion=cfg.min_motion, min_parallax=cfg.min_parallax, min_blink=cfg.min_blink)

    def reset(self) -> None:
        """Forget the track (a different person, or the face left the frame)."""
        self._frames.clear()
        self._cache.clear()

    def forget_before(self, t: float) -> None:
        """Drop frames older than t (a new track began at t)."""
        while self._frames and self._frames[0][0] < t:
            self._frames.popleft()

    def observe(self, t: float, points: np.ndarray) -> None:
        """Add one frame's 468 mesh points (x, y pixels) of the main face."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.shape != (468, 2) or not np.all(np.isfinite(pts)) or inter_ocular(pts) < 1.0:
            return  # a broken mesh is no evidence either way
        self._frames.append((float(t), pts))
        self._expire(t)

    def _expire(self, now: float) -> None:
        while self._frames and now - self._frames[0][0] > self.window_s:
            self._frames.popleft()

    def __len__(self) -> int:
        return len(self._frames)

    def verdict(self, now: Optional[float] = None) -> LivenessVerdict:
        """Is the face of the window live? Needs at least min_frames frames."""
        if now is not None:
            self._expire(now)
        frames = [p for _t, p in self._frames]
        n = len(frames)
        if n < self.min_frames:
            return LivenessVerdict(False, f"liveness: {n}/{self.min_frames} frames with a face mesh", n)
        motion, parallax, blink = self._measure(frames)
        moved = motion >= self.min_motion
        by_parallax = moved and parallax >= self.min_parallax
        by_blink = blink >= self.min_blink
        if self.method == "parallax":
            live = by_parallax
        elif self.method == "blink":
            live = by_blink
        else:
            live = by_parallax or by_blink
        if live:
            reason = "liveness: " + " and ".join(
                w for w, ok in (("3-D head motion", by_parallax), ("blink", by_blink)) if ok)
        elif moved:
            reason = ("liveness failed: the face moved like a flat picture "
                      f"(parallax {parallax:.3f} < {self.min_parallax}) and did not blink")
        else:
            reason = "liveness failed: no head motion and no blink (move the head or blink)"
        if self.method == "blink" and not live:
            reason = f"liveness failed: no blink (eye closure {blink:.2f} < {self.min_blink})"
        return LivenessVerdict(live, reason, n, motion, parallax, blink)

    def _stats(self, ref: np.ndarray, pts: np.ndarray) -> tuple[float, float, Optional[float]]:
        """(motion, planar residual, rectified eye openness) of one frame against the reference frame.

        Cached per (reference, frame): while the reference stays (a track shorter than the window) each
        verdict costs one new frame's worth of work, not the whole window's."""
        key = (id(ref), id(pts))
        hit = self._cache.get(key)
        if hit is not None:
            return hit[2]
        iod = inter_ocular(ref)
        d = (pts - pts.mean(axis=0)) - (ref - ref.mean(axis=0))
        motion = float(np.sqrt(np.mean(np.sum(d ** 2, axis=1)))) / iod
        residual = planar_residual(ref, pts) / iod if pts is not ref else 0.0
        rigid = list(RIGID_POINTS)
        h = _homography(pts[rigid], ref[rigid])
        openness = None if h is None else eye_openness(_apply(h, pts))
        # the arrays are kept in the entry: while cached, their id()s cannot be reused by new frames
        self._cache[key] = (ref, pts, (motion, residual, openness))
        return motion, residual, openness

    def _measure(self, frames: list[np.ndarray]) -> tuple[float, float, float]:
        """(motion, parallax, blink) of the window; the reference is its first frame."""
        ref = frames[0]
        live_keys = {(id(ref), id(p)) for p in frames}
        self._cache = {k: v for k, v in self._cache.items() if k in live_keys}
        stats = [self._stats(ref, pts) for pts in frames]
        motion = max(m for m, _r, _o in stats[1:])
        # Second-largest residual: one bad mesh (motion blur, a hand) must not decide alone.
        ordered = sorted(r for _m, r, _o in stats[1:])
        robust = ordered[-2] if len(ordered) >= 2 else ordered[-1]
        parallax = robust if math.isfinite(robust) else 0.0
        opens = [o for _m, _r, o in stats if o is not None]
        blink = 0.0
        if len(opens) >= 2 and max(opens) > 1e-6:
            # The eyes must have been open at some point in the window and (nearly) closed at another.
            blink = float(max(0.0, (max(opens) - min(opens)) / max(opens)))
        return motion, parallax, blink


class MeshLiveness:
    """The gate plus the face-mesh inference that feeds it (one mesh run per frame with a face)."""

    def __init__(self, gate: LivenessGate, refiner: Any) -> None:
        self.gate = gate
        self.refiner = refiner

    @classmethod
    def from_config(cls, cfg: Any, *, models_dir: Any = None, num_threads: Optional[int] = None) -> "MeshLiveness":
        from edgeface.vision.landmarks import LandmarkRefiner

        return cls(LivenessGate.from_config(cfg), LandmarkRefiner(models_dir=models_dir, num_threads=num_threads))

    def observe(self, t: float, image: np.ndarray, face: Any) -> None:
        """Use the mesh the analyzer already computed for this face; run the model only when it did not."""
        points = getattr(face, "mesh", None)
        if points is None:
            points, _presence = self.refiner.mesh(image, face)
        self.gate.observe(t, points)

    def verdict(self, now: Optional[float] = None) -> LivenessVerdict:
        return self.gate.verdict(now)

    def reset(self) -> None:
        self.gate.reset()

    def forget_before(self, t: float) -> None:
        self.gate.forget_before(t)

    def close(self) -> None:
        close = getattr(self.refiner, "close", None)
        if close:
            close()


class LivenessPolicy:
    """decide.Policy with the liveness gate in front of every grant (the daemon uses it when liveness.enabled).

    A known face is held back from the policy until the gate says live; then the held frames of the track
    are replayed into the policy in order (its clock is passed in, so this is exactly as if they had been
    fed live) and the grant comes at once. Strangers and "no face" frames go straight through, so
    `unknown` events are unchanged. A track that stays not-live for the gate's window_s gets ONE `deny`
    with the liveness reason (audited and published like any deny), at most once per policy.cooldown_s
    per person. The caller feeds the gate (mesh points) for each frame before calling observe().
    """

    def __init__(self, policy: Any, gate: Any, *, window_s: Optional[float] = None, gap_s: float = 1.0) -> None:
        self.policy = policy
        self.gate = gate
        inner = getattr(gate, "gate", gate)
        self.window_s = float(window_s if window_s is not None else inner.window_s)
        #: A face missing for longer than this ends the track (one missed detection does not).
        self.gap_s = gap_s
        self._held: list[tuple[float, Any, float, Any]] = []
        self._track_start: Optional[float] = None
        self._last_face: Optional[float] = None
        self._denied: dict[int, float] = {}

    def _end_track(self, now: Optional[float] = None) -> None:
        self._held.clear()
        self._track_start = None
        self._last_face = None
        if now is None:
            self.gate.reset()
        else:
            self.gate.forget_before(now)  # the caller may already have fed this frame's mesh

    def reset(self) -> None:
        self._end_track()
        self.policy.reset()

    def observe(self, now: float, match: Any, *, face_size: float = 0.0, box: Any = None) -> Any:
        if self._last_face is not None and now - self._last_face > self.gap_s:
            self._end_track(now)  # the face left: a new track starts with this frame
        if match is None:
            return self.policy.observe(now, None)
        self._last_face = now
        if not match.known or face_size < self.policy.cfg.min_face_size:
            return self.policy.observe(now, match, face_size=face_size, box=box)
        if self._track_start is None:
            self._track_start = now
        verdict = self.gate.verdict(now)
        if verdict.live:
            held, self._held = self._held, []
            decisions = [self.policy.observe(t, m, face_size=fs, box=b) for t, m, fs, b in held
                         if now - t <= self.policy.cfg.window_s]
            decisions.append(self.policy.observe(now, match, face_size=face_size, box=box))
            return next((d for d in decisions if d.action != "none"), decisions[-1])
        self._held.append((now, match, face_size, box))
        self._held = [h for h in self._held if now - h[0] <= self.policy.cfg.window_s][-self.policy.cfg.window_frames:]
        pid = int(match.person_id)
        if now - self._track_start >= self.window_s:
            last = self._denied.get(pid)
            self._held.clear()
            self._track_start = now  # the next attempt gets a full window of fresh frames
            self.gate.forget_before(now)
            if last is None or now - last >= self.policy.cfg.cooldown_s:
                self._denied[pid] = now
                return Decision("deny", pid, match.name, verdict.reason, float(match.distance),
                                float(match.threshold), verdict.frames, box, now)
        return Decision("none", pid, match.name, f"waiting for liveness ({verdict.reason})", float(match.distance),
                        float(match.threshold), len(self._held), box, now)
