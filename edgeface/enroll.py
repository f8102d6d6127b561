"""Enrollment: every input image goes through a quality gate before its embedding may enter the gallery.

A bad enrollment photo (two people, tiny, blurred, profile) poisons every later match of that person, so
the gate is strict and says why it rejected each image. The gate's thresholds were measured on the 117
real photos of ../shared/data/faces (see docs/gallery.md): all real photos pass the sharpness test,
every photo blurred by a Gaussian of 2 % of the face size fails it.

Storing is `Gallery.enroll` / `Gallery.enroll_many`: one transaction, so a failure writes nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np

from edgeface.vision.align import align_face
from edgeface.vision.analyzer import FaceAnalyzer
from edgeface.errors import GalleryError, ImageError
from edgeface.gallery import Chip, EnrollItem, EnrollReport, image_sha256, validate_name
from edgeface.vision.images import decode_image, list_images
from edgeface.types import Face, Frame

__all__ = ["QualityGate", "EnrollItem", "EnrollReport", "assess_image", "enroll_images", "scan_people_folder",
           "capture_from_frames", "make_chip", "sharpness", "frontality", "summary_line"]

#: Side of the loose face chip kept for re-embedding (pixels, longest side).
CHIP_SIZE = 256


@dataclass(frozen=True)
class QualityGate:
    """What an enrollment photo must be. Defaults measured on ../shared/data/faces (docs/gallery.md)."""

    #: Face box side in pixels (the door's policy.min_face_size is 80 too: enroll as well as you will match).
    min_face_size: float = 80.0
    #: Variance of the Laplacian of the grey 112x112 aligned crop. Real photos: min 101, median ~1100;
    #: Gaussian blur of 2 % of the face size: 10-48.
    min_sharpness: float = 60.0
    #: Nose tip position along the eye line: 0.5 = centred; |pos - 0.5| above this is a turned head.
    max_nose_offset: float = 0.35
    #: Eye-line tilt (degrees). Alignment removes roll, so this is loose; real photos reach 26.
    max_roll_deg: float = 30.0


def sharpness(rgb: np.ndarray, face: Face) -> float:
    """Variance of the Laplacian on the face aligned to 112x112 (embedder-independent, so one threshold)."""
    crop = align_face(rgb, face, "arcface112")
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _eyes_nose(face: Face) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = face.landmarks5 if face.landmarks5 is not None else face.keypoints
    pts = np.asarray(pts, np.float64)
    return pts[0], pts[1], pts[2]


def frontality(face: Face) -> tuple[float, float]:
    """(nose position along the eye line, 0.5 = centred; eye-line tilt in degrees)."""
    right, left, nose = _eyes_nose(face)
    axis = left - right
    dist = float(np.linalg.norm(axis))
    if dist < 1e-6:
        return 0.0, 0.0
    pos = float(np.dot(nose - right, axis) / dist ** 2)
    tilt = float(np.degrees(np.arctan2(axis[1], axis[0])))
    return pos, tilt


def make_chip(rgb: np.ndarray, face: Face) -> Chip:
    """A loose square region (2x the face box) around the face, at most CHIP_SIZE px, with the face moved into it."""
    x, y, w, h = face.box
    side = 2.0 * max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    x0, y0 = int(max(0, round(cx - side / 2))), int(max(0, round(cy - side / 2)))
    x1, y1 = int(min(rgb.shape[1], round(cx + side / 2))), int(min(rgb.shape[0], round(cy + side / 2)))
    region = rgb[y0:y1, x0:x1]
    scale = min(1.0, CHIP_SIZE / max(region.shape[:2]))
    if scale < 1.0:
        region = cv2.resize(region, (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale))),
                            interpolation=cv2.INTER_AREA)
    off = np.array([x0, y0], np.float64)

    def move(p: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if p is None else ((np.asarray(p, np.float64) - off) * scale).astype(np.float32)

    moved = Face(((x - x0) * scale, (y - y0) * scale, w * scale, h * scale), face.score, move(face.keypoints),
                 landmarks5=move(face.landmarks5), presence=face.presence)
    return Chip(np.ascontiguousarray(region), moved)


def assess_image(analyzer: FaceAnalyzer, rgb: np.ndarray, *, source: str, sha256: str,
                 gate: QualityGate = QualityGate(), keep_chip: bool = False) -> EnrollItem:
    """Run the quality gate on one image; accepted items carry the embedding, rejected ones the reason."""
    faces = analyzer.detect(rgb)
    big = [f for f in faces if f.size >= gate.min_face_size]
    if not faces:
        return EnrollItem(source, sha256, reason="no face found")
    if not big:
        return EnrollItem(source, sha256, reason=f"face too small ({max(f.size for f in faces):.0f} px, "
                                                 f"need >= {gate.min_face_size:.0f} px)")
    if len(big) > 1:
        return EnrollItem(source, sha256, reason=f"{len(big)} faces (need exactly one person in the photo)")
    face = big[0]
    pos, tilt = frontality(face)
    if abs(pos - 0.5) > gate.max_nose_offset:
        return EnrollItem(source, sha256, reason=f"head turned (nose at {pos:.2f} of the eye line, need "
                                                 f"{0.5 - gate.max_nose_offset:.2f}-{0.5 + gate.max_nose_offset:.2f})")
    if abs(tilt) > gate.max_roll_deg:
        return EnrollItem(source, sha256, reason=f"head tilted {tilt:.0f} degrees (max {gate.max_roll_deg:.0f})")
    sharp = sharpness(rgb, face)
    if sharp < gate.min_sharpness:
        return EnrollItem(source, sha256, reason=f"too blurred (sharpness {sharp:.0f} < {gate.min_sharpness:.0f})")
    result = analyzer.embed_faces(rgb, [face], for_enrollment=True)[0]
    # quality in [0, 1]: detector confidence x how frontal x how sharp (saturating); for ranking and audits only
    quality = float(face.score) * (1.0 - abs(pos - 0.5)) * min(1.0, sharp / (10 * gate.min_sharpness))
    return EnrollItem(source, sha256, result.embedding, round(quality, 4), None,
                      make_chip(rgb, face) if keep_chip else None)


def _read(path: Path) -> tuple[Optional[np.ndarray], str, Optional[str]]:
    """(rgb or None, sha256 of the file bytes, reason when unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", f"cannot read image: {exc.strerror or exc}"
    sha = image_sha256(data)
    try:
        return decode_image(data, name=str(path)), sha, None
    except ImageError as exc:
        # the reason without the file name, which the caller prints first ("rejected a.jpg: cannot decode image: ...")
        return None, sha, str(exc).replace(f" {path}:", ":").replace(f"{path}: ", "").replace(f" {path}", "")


def enroll_images(analyzer: FaceAnalyzer, paths: Sequence[str | os.PathLike[str]], *,
                  gate: QualityGate = QualityGate(), keep_chips: bool = False,
                  progress: Optional[Callable[[], None]] = None) -> list[EnrollItem]:
    """Gate every image file; unreadable files become rejected items (reason given), never exceptions."""
    items = []
    for p in paths:
        path = Path(p)
        rgb, sha, why = _read(path)
        if rgb is None:
            items.append(EnrollItem(str(path), sha or f"unreadable:{path}", reason=why))
        else:
            items.append(assess_image(analyzer, rgb, source=str(path), sha256=sha, gate=gate, keep_chip=keep_chips))
        if progress:
            progress()
    return items


def scan_people_folder(root: str | os.PathLike[str]) -> list[tuple[str, list[Path]]]:
    """people/<name>/*.jpg -> [(name, images)], names validated; one-line error for a bad layout."""
    root = Path(root)
    if not root.is_dir():
        raise GalleryError(f"enrollment folder {root} does not exist or is not a folder")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            name = validate_name(sub.name)
        except GalleryError as exc:
            raise GalleryError(f"{sub}: {exc}") from None
        images = list_images(sub)
        if images:
            out.append((name, images))
    if not out:
        raise GalleryError(f"enrollment folder {root} has no person subfolders with images "
                           "(expected people/<name>/*.jpg)")
    return out


def capture_from_frames(analyzer: FaceAnalyzer, frames: Iterable[Frame | np.ndarray], *, count: int = 5,
                        max_frames: int = 300, min_gap: int = 3, gate: QualityGate = QualityGate(),
                        keep_chips: bool = False, on_item: Optional[Callable[[EnrollItem], None]] = None,
                        ) -> list[EnrollItem]:
    """Take `count` good frames from a camera stream (at least `min_gap` frames apart, for variety).

    Returns accepted AND rejected items (each rejected frame says why), stopping after `count` accepted
    or `max_frames` frames. The caller stores them with Gallery.enroll."""
    if count < 1 or max_frames < 1:
        raise ValueError("count and max_frames must be >= 1")
    items: list[EnrollItem] = []
    accepted = 0
    last = -min_gap
    iterator: Iterator[Frame | np.ndarray] = iter(frames)
    for i in range(max_frames):
        try:
            frame = next(iterator)
        except StopIteration:
            break
        rgb = frame.image if isinstance(frame, Frame) else frame
        index = frame.index if isinstance(frame, Frame) else i
        if i - last < min_gap:
            continue
        item = assess_image(analyzer, rgb, source=f"frame {index}", sha256=image_sha256(rgb), gate=gate,
                            keep_chip=keep_chips)
        items.append(item)
        if on_item:
            on_item(item)
        if item.accepted:
            accepted += 1
            last = i
            if accepted >= count:
                break
    return items


def summary_line(report: EnrollReport) -> str:
    """One human line per enrolled person (for stderr)."""
    verb = "enrolled" if report.created else "updated"
    parts = [f"{verb} {report.name!r}: {len(report.added)} added"]
    if report.duplicates:
        parts.append(f"{len(report.duplicates)} duplicate(s) skipped")
    if report.rejected:
        parts.append(f"{len(report.rejected)} rejected")
    return ", ".join(parts)
