"""Aligned face crops of a photo folder (conversion's representative and evaluation sets), made by FaceAnalyzer:
the same detector, face mesh, main-face choice and alignment the daemon runs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeface.errors import ImageError


@dataclass
class CropSet:
    """Aligned uint8 crops with their person label (folder name) and source file; `skipped` = no face found."""

    crops: np.ndarray
    labels: list[str]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _image_groups(folder: Path) -> list[tuple[str, list[Path]]]:
    """[(label, images)]: one group per sub-folder (a person), or one group when images lie directly in `folder`."""
    from edgeface.vision.images import list_images

    if not folder.is_dir():
        raise ImageError(f"face folder not found: {folder}")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, list_images(d)) for d in subdirs]
    groups = [(label, imgs) for label, imgs in groups if imgs]
    direct = list_images(folder)
    if direct:
        groups.insert(0, (folder.name, direct))
    if not groups:
        raise ImageError(f"no images in {folder} (expected <person>/*.jpg or *.jpg)")
    return groups


def aligned_crops(folder: str | os.PathLike[str], *, template: str = "facenet160", limit: Optional[int] = None,
                  per_person: Optional[int] = None, detector: Any = None, refine: bool = True,
                  min_presence: float = 0.5) -> CropSet:
    """Detect the main face of each image under `folder` and align it as the daemon does by default.

    FaceAnalyzer with BlazeFace short-range (or `detector`) -> (refine: face mesh on every face, those below
    `min_presence` dropped) -> main face -> align_face(template). `per_person` takes at most that many images of each
    person.
    """
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.vision.detect import BlazeFaceDetector
    from edgeface.vision.images import load_image
    from edgeface.vision.landmarks import LandmarkRefiner

    own = detector is None
    analyzer = FaceAnalyzer(detector or BlazeFaceDetector(variant="short"), None,
                            refiner=LandmarkRefiner() if refine else None, min_presence=min_presence, template=template)
    crops: list[np.ndarray] = []
    labels: list[str] = []
    paths: list[str] = []
    skipped: list[str] = []
    try:
        for label, images in _image_groups(Path(folder)):
            taken = 0
            for path in images:
                if limit is not None and len(crops) >= limit:
                    break
                if per_person is not None and taken >= per_person:
                    break
                try:
                    rgb = load_image(path)
                except ImageError:
                    skipped.append(str(path))
                    continue
                _face, crop, _n = analyzer.main_crop(rgb)
                if crop is None:
                    skipped.append(str(path))
                    continue
                crops.append(crop)
                labels.append(label)
                paths.append(str(path))
                taken += 1
    finally:
        if own:
            analyzer.detector.close()
        if analyzer.refiner is not None:
            analyzer.refiner.close()
    size = crops[0].shape[0] if crops else 0
    arr = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return CropSet(arr, labels, paths, skipped)
