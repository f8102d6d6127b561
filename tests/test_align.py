"""Alignment: the same face always lands on the same template, whatever its pose in the frame."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeface.vision.align import TEMPLATES, align_face, similarity_transform
from edgeface.vision.detect import BlazeFaceDetector
from edgeface.errors import ImageError
from edgeface.vision.images import load_image
from edgeface.vision.landmarks import LandmarkRefiner
from edgeface.types import Face

from conftest import FIXTURES


def test_similarity_transform_recovers_a_known_rotation_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = np.deg2rad(17), 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


@pytest.mark.parametrize("name, size", [("facenet160", 160), ("arcface112", 112)])
def test_templates_are_upright_and_inside_the_crop(name, size) -> None:
    tpl = TEMPLATES[name]
    assert tpl.size == size
    for pts in (tpl.points, tpl.points5):
        assert (pts > 0).all() and (pts < size).all()
        assert pts[0, 0] < pts[1, 0] and abs(pts[0, 1] - pts[1, 1]) < 1  # eyes level, right eye left
        assert pts[2, 1] > pts[0, 1]  # nose below the eyes


def test_rotated_photo_gives_the_same_crop() -> None:
    """Enrollment photo upright, camera frame tilted 20 degrees: both crops must match closely."""
    detector, refiner = BlazeFaceDetector(), LandmarkRefiner()
    image = load_image(FIXTURES / "faces" / "guido_van_rossum" / "guido_van_rossum_01.jpg")
    h, w = image.shape[:2]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
    tilted = cv2.warpAffine(image, rotation, (w, h), borderMode=cv2.BORDER_REFLECT)
    crops = []
    for img in (image, tilted):
        (face,) = detector.detect(img)
        crops.append(align_face(img, refiner.refine(img, face), "arcface112").astype(np.float32))
    upright, from_tilted = crops
    correlation = np.corrcoef(upright.ravel(), from_tilted.ravel())[0, 1]
    assert correlation > 0.9


def test_bad_keypoints_are_refused() -> None:
    image = np.zeros((200, 200, 3), np.uint8)
    face = Face((10, 10, 100, 100), 0.9, np.full((6, 2), np.nan, np.float32))
    with pytest.raises(ImageError, match="finite"):
        align_face(image, face, "facenet160")
