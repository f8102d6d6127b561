"""Image input: every odd format is converted or refused with one clear line, never a crash."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeface.errors import ImageError
from edgeface.vision.images import decode_image, load_image, save_image, to_rgb

from conftest import FIXTURES

PHOTO = FIXTURES / "faces" / "alex_lacamoire" / "alex_lacamoire_01.jpg"


def test_jpeg_loads_as_rgb_uint8() -> None:
    rgb = load_image(PHOTO)
    bgr = cv2.imread(str(PHOTO))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_grey_rgba_and_16bit_pngs_are_converted(tmp_path) -> None:
    bgr = cv2.imread(str(PHOTO))
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(tmp_path / "deep.png"), bgr.astype(np.uint16) * 257)
    g = load_image(tmp_path / "grey.png")
    assert g.shape == bgr.shape and (g[:, :, 0] == g[:, :, 1]).all()
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), bgr[:, :, ::-1])
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png"), bgr[:, :, ::-1])


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"GIF89a not really", "not a supported image or the file is truncated/corrupt"),
])
def test_bad_files_raise_one_line_errors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg_is_refused_or_decoded_never_crashes(tmp_path) -> None:
    data = PHOTO.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:200])
    with pytest.raises(ImageError):
        load_image(path)


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_zero_size_tiny_and_huge_arrays_are_refused() -> None:
    with pytest.raises(ImageError, match="expected at least 16x16"):
        to_rgb(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="expected at least 16x16"):
        to_rgb(np.zeros((8, 640, 3), np.uint8))
    with pytest.raises(ImageError, match="the limit is 50000000 pixels"):
        to_rgb(np.zeros((10000, 6000), np.uint8))
    with pytest.raises(ImageError, match="expected an HxW, HxWx3 or HxWx4 image"):
        to_rgb(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        to_rgb(np.full((32, 32, 3), np.nan, np.float32))


def test_huge_encoded_image_is_refused(tmp_path) -> None:
    big = np.zeros((8000, 7000), np.uint8)
    ok, enc = cv2.imencode(".png", big)
    assert ok
    with pytest.raises(ImageError, match="the limit is 50000000 pixels"):
        decode_image(enc.tobytes(), name="big.png")


def test_save_is_atomic_and_round_trips(tmp_path) -> None:
    rgb = load_image(PHOTO)
    out = tmp_path / "copy.png"
    save_image(out, rgb)
    np.testing.assert_array_equal(load_image(out), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.png"]


def test_photo_over_16_mp_is_decoded_at_half_size_and_still_holds_the_face(analyzer) -> None:
    """A 20 MP phone photo is decoded at half size (peak memory, bench/image_bombs.py) and its face is still found."""
    face = cv2.imread(str(PHOTO))
    scale = 5000 / face.shape[1]
    big = cv2.resize(face, (5000, round(face.shape[0] * scale)), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((4000, 5000, 3), 128, np.uint8)
    canvas[: min(4000, big.shape[0])] = big[:4000]
    data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    rgb = decode_image(data, name="big.jpg")
    assert rgb.shape == (2000, 2500, 3)
    big_face, _ = analyzer.analyze_main(rgb)
    small_face, _ = analyzer.analyze_main(load_image(PHOTO))
    assert big_face is not None and small_face is not None
    distance = 1.0 - float(np.dot(big_face.embedding, small_face.embedding))
    assert distance < 0.1


def test_tiff_size_tags_given_twice_count_with_the_largest() -> None:
    """libtiff decodes the first width/height; a smaller pair after it must not pass the size check."""
    from edgeface.testing import tiff_image
    from edgeface.vision.images import image_header_size

    assert image_header_size(tiff_image(9000, 9000, hidden_by=(100, 100), truncated=True)) == ("TIFF", 9000, 9000)
    assert image_header_size(tiff_image(100, 100, hidden_by=(9000, 9000), truncated=True)) == ("TIFF", 9000, 9000)
    with pytest.raises(ImageError, match=r"is 9000x9000 \(81000000 pixels, says its TIFF header\)"):
        decode_image(tiff_image(9000, 9000, hidden_by=(100, 100), truncated=True), name="twice.tif")
    assert decode_image(tiff_image(640, 480, hidden_by=(640, 480)), name="same.tif").shape == (480, 640, 3)


def test_tiff_over_16_mp_is_refused_and_smaller_ones_decode() -> None:
    """OpenCV decodes a TIFF at full size whatever the flags (a 49 MP one peaked at 370 MB, bench/image_bombs.py)."""
    from edgeface.testing import tiff_image

    with pytest.raises(ImageError, match="TIFF image is 7000x7000 .*convert it to JPEG or PNG"):
        decode_image(tiff_image(7000, 7000, channels=3), name="big.tif")
    assert decode_image(tiff_image(4000, 4000, channels=3), name="ok.tif").shape == (4000, 4000, 3)
