"""Refine a detection with MediaPipe's 468-point face mesh: five precise alignment points and a face-presence score.

BlazeFace's keypoints are coarse (one mouth point, eye points that drift with pose); the mesh gives eye
centres and mouth corners, which is what the ArcFace-style five-point templates expect. The presence score
also rejects detector false positives (patterns, logos) before they reach the gallery.

The mesh is only as good as its crop: from a BlazeFace box the face can sit off-centre or too loose in it. A
second pass crops again around the first pass's own points (what MediaPipe's tracker does between frames) and
gives better five points; it costs one more mesh run per face (`passes=2`, docs/accuracy.md "+mesh2").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import cv2
import numpy as np

from edgeface.models import check_io, resolve_model
from edgeface.vision.runtime import load_interpreter
from edgeface.types import Face

INPUT_SIZE = 192
#: Mesh indices: eye corners (subject's right: 33 outer, 133 inner; left: 362 inner, 263 outer), nose tip 1,
#: mouth corners 61 (right) and 291 (left).
_RIGHT_EYE = (33, 133)
_LEFT_EYE = (362, 263)
_NOSE_TIP = 1
_MOUTH = (61, 291)
#: The ROI is the detection box enlarged by this factor, rotated upright on the eye line (as MediaPipe does).
ROI_SCALE = 1.5


def _roi_matrix(face: Face) -> np.ndarray:
    """Affine map from frame pixels to the 192x192 upright crop around the face."""
    kps = np.asarray(face.keypoints, np.float64)
    return _upright_crop(kps[0], kps[1], face.center, max(face.box[2], face.box[3]))


def _mesh_roi_matrix(points: np.ndarray) -> np.ndarray:
    """The crop for a second pass: around the mesh's own extent, levelled on its eye corners."""
    low, high = points.min(axis=0).astype(np.float64), points.max(axis=0).astype(np.float64)
    right_eye = points[list(_RIGHT_EYE)].mean(axis=0).astype(np.float64)
    left_eye = points[list(_LEFT_EYE)].mean(axis=0).astype(np.float64)
    return _upright_crop(right_eye, left_eye, tuple((low + high) / 2.0), float((high - low).max()))


def _upright_crop(right_eye: np.ndarray, left_eye: np.ndarray, centre: tuple[float, float], extent: float) -> np.ndarray:
    """Rotate the eye line level about `centre` and fit ROI_SCALE x `extent` pixels into the mesh input."""
    angle = float(np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0]))
    cx, cy = centre
    side = max(extent, 1.0) * ROI_SCALE
    scale = INPUT_SIZE / side
    cos, sin = np.cos(-angle) * scale, np.sin(-angle) * scale
    # Rotate by -angle about the face centre, scale, then move the centre to the crop's centre.
    return np.array([[cos, -sin, INPUT_SIZE / 2 - (cos * cx - sin * cy)],
                     [sin, cos, INPUT_SIZE / 2 - (sin * cx + cos * cy)]])


class LandmarkRefiner:
    """Run the face mesh on a detection; return the face with `landmarks5` and `presence` filled in.

    `passes`: 1 crops the mesh input from the detection box; 2 runs it again on a crop made from the first
    pass's points (better alignment, twice the mesh time). The presence score is the first pass's, the one
    `detector.min_presence` was set for."""

    def __init__(self, model: str | os.PathLike[str] | None = None, *, num_threads: Optional[int] = None,
                 models_dir: str | os.PathLike[str] | None = None, passes: int = 1) -> None:
        if passes not in (1, 2):
            raise ValueError(f"face mesh passes {passes!r}: expected 1 or 2")
        self.passes = passes
        path, _ = resolve_model(model or "face_landmark", models_dir)
        self._interpreter = load_interpreter(path, num_threads)
        check_io(self._interpreter, path, input_shape=(1, INPUT_SIZE, INPUT_SIZE, 3))
        self._input = self._interpreter.get_input_details()[0]["index"]
        outputs = self._interpreter.get_output_details()
        self._mesh = next(o["index"] for o in outputs if int(o["shape"][-1]) == 1404)
        self._flag = next(o["index"] for o in outputs if int(o["shape"][-1]) == 1)

    def mesh(self, image: np.ndarray, face: Face) -> tuple[np.ndarray, float]:
        """All 468 mesh points (x, y) in frame pixels, and the face-presence probability (one pass)."""
        return self._run(image, _roi_matrix(face))

    def _run(self, image: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, float]:
        crop = cv2.warpAffine(image, matrix, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)
        self._interpreter.set_tensor(self._input, (crop.astype(np.float32) / 255.0)[None])
        self._interpreter.invoke()
        points = self._interpreter.get_tensor(self._mesh).reshape(468, 3)[:, :2].astype(np.float64)
        logit = float(self._interpreter.get_tensor(self._flag).reshape(-1)[0])
        presence = 1.0 / (1.0 + np.exp(-np.clip(logit, -80.0, 80.0)))
        inverse = cv2.invertAffineTransform(matrix)
        frame_points = points @ inverse[:, :2].T + inverse[:, 2]
        return frame_points.astype(np.float32), presence

    def refine(self, image: np.ndarray, face: Face) -> Face:
        points, presence = self.mesh(image, face)
        if self.passes == 2:
            points, _ = self._run(image, _mesh_roi_matrix(points))
        five = np.stack([
            points[list(_RIGHT_EYE)].mean(axis=0),
            points[list(_LEFT_EYE)].mean(axis=0),
            points[_NOSE_TIP],
            points[_MOUTH[0]],
            points[_MOUTH[1]],
        ]).astype(np.float32)
        return dataclasses.replace(face, landmarks5=five, presence=float(presence), mesh=points)

    def refine_all(self, image: np.ndarray, faces: list[Face], min_presence: float) -> list[Face]:
        """Every face refined, those the mesh calls non-faces (presence below `min_presence`) dropped."""
        refined = (self.refine(image, f) for f in faces)
        return [f for f in refined if f.presence is not None and f.presence >= min_presence]

    def close(self) -> None:
        self._interpreter = None

    def __enter__(self) -> "LandmarkRefiner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
