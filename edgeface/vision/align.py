"""Alignment: warp a detected face to an embedder's canonical crop with a similarity transform.

Enrollment and recognition both go through `align_face`, so one face always gives the same crop.
The transform maps reference points onto a per-embedder template by least squares (Umeyama): the five
points of the landmark model (eye centres, nose tip, mouth corners) when a face has them, else BlazeFace's
coarse eye centres, nose tip and mouth centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgeface.errors import ImageError
from edgeface.types import Face

# ArcFace/InsightFace 112x112 template: right eye, left eye, nose tip, mouth corners (image coordinates).
_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_ARCFACE_4 = np.vstack([_ARCFACE_112[:3], _ARCFACE_112[3:5].mean(axis=0)])  # mouth centre instead of corners


@dataclass(frozen=True)
class AlignTemplate:
    """Where the 4 reference points (right eye, left eye, nose tip, mouth centre) land in a size x size crop."""

    name: str
    size: int
    points: np.ndarray

    points5: np.ndarray | None = None

    @staticmethod
    def from_arcface(name: str, size: int, zoom: float = 1.0, shift_y: float = 0.0) -> "AlignTemplate":
        """Scale the ArcFace template to `size`; zoom < 1 leaves more margin round the face."""
        centre = np.array([56.0, 56.0])

        def place(points: np.ndarray) -> np.ndarray:
            out = (points - centre) * zoom * (size / 112.0) + size / 2.0
            out[:, 1] += shift_y * size
            return out

        return AlignTemplate(name, size, place(_ARCFACE_4), place(_ARCFACE_112))


#: Templates by embedder family. The FaceNet template's zoom and vertical shift were chosen on the tuning half
#: of ../shared/data/openset (80 identities, 388 faces, facenet_int8, five-point alignment), by verification
#: TAR at FAR 0.1%: zoom 0.8 -> 86%, 0.9 -> 92%, 1.05 with the face 4% higher -> 93.5%, 1.25 -> 90%.
TEMPLATES = {
    "arcface112": AlignTemplate.from_arcface("arcface112", 112),
    "facenet160": AlignTemplate.from_arcface("facenet160", 160, zoom=1.05, shift_y=-0.04),
}


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst (Umeyama 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var_src = (src_c ** 2).sum() / len(src)
    scale = (s * d).sum() / var_src if var_src > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def reference_points(face: Face) -> np.ndarray:
    """The 4 alignment points of a face: right eye, left eye, nose tip, mouth centre (pixels)."""
    kps = np.asarray(face.keypoints, np.float64)
    if kps.shape[0] < 4 or kps.shape[1] != 2 or not np.isfinite(kps[:4]).all():
        raise ImageError(f"face keypoints have shape {kps.shape}; expected at least 4 finite (x, y) points")
    return kps[:4]


def align_face(image: np.ndarray, face: Face, template: AlignTemplate | str) -> np.ndarray:
    """The face warped into the template's size x size RGB crop (uint8)."""
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    if face.landmarks5 is not None and tpl.points5 is not None and np.isfinite(face.landmarks5).all():
        matrix = similarity_transform(face.landmarks5, tpl.points5)
    else:
        matrix = similarity_transform(reference_points(face), tpl.points)
    return cv2.warpAffine(image, matrix, (tpl.size, tpl.size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
