"""Read images and frames into the one pixel format every stage uses: RGB, uint8, HxWx3, C-contiguous.

Decompression bombs (a few MB that decode to GB): the width and height are read from the file's own header
(PNG IHDR, JPEG SOF, BMP, WebP, TIFF) and checked against MAX_IMAGE_PIXELS (a TIFF: MAX_TIFF_PIXELS) BEFORE
OpenCV sees the data; any other format is refused. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS, set in
edgeface/__init__.py) is only a second line: it is read when OpenCV loads, and edgeface cannot promise to be imported first.
Images over LARGE_IMAGE_PIXELS are decoded at half size, straight to 8-bit (libjpeg scales while it decodes, so
a 49 MP JPEG never exists at full size in memory): a face in such a photo is still far larger than any crop the
embedders take, and the peak memory of the largest accepted image stays under 300 MB (bench/image_bombs.py).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

#: Largest image we decode (pixels). 50 MP covers any camera; larger is a mistake or an attack.
MAX_IMAGE_PIXELS = 50_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
import cv2  # noqa: E402  (the pixel cap above must be set before OpenCV is imported)

from edgeface.errors import ImageError  # noqa: E402

#: Smallest side that can hold a detectable face.
MIN_IMAGE_SIDE = 16
#: Largest file we read into memory at all.
MAX_FILE_BYTES = 64 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Above this many pixels an image is decoded at half size, straight to 8-bit (no 16-bit or alpha copy first).
LARGE_IMAGE_PIXELS = 16_000_000
#: OpenCV decodes a TIFF at full size whatever the flags (then scales it), ~7 bytes per pixel at the peak: a 49 MP
#: TIFF peaked at 370 MB RSS (bench/image_bombs.py). Larger TIFFs are refused; JPEG/PNG take up to 50 MP.
MAX_TIFF_PIXELS = LARGE_IMAGE_PIXELS
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_header_size(data: bytes) -> Optional[tuple[str, int, int]]:
    """(format, width, height) read from the header of a JPEG, PNG, BMP, WebP or TIFF file ("PNG grey" / "JPEG grey"
    for 8-bit single-channel images); None when the data is none of these or the header is damaged. Reads a few dozen bytes (JPEG: walks the markers up to the frame
    header); never decodes pixels."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return ("PNG grey" if data[24] <= 8 and data[25] == 0 else "PNG"), w, h
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:
                w, h = struct.unpack("<HH", data[18:22])
            elif dib >= 40:
                w, h = struct.unpack("<ii", data[18:26])
            else:
                return None
            return "BMP", abs(w), abs(h)  # a negative height is a top-down bitmap
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg_size(data: bytes) -> Optional[tuple[str, int, int]]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return ("JPEG grey" if data[i + 9] == 1 else "JPEG"), w, h
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


def _webp_size(data: bytes) -> Optional[tuple[str, int, int]]:
    kind = data[12:16]
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return "WebP", w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return "WebP", w, h
    return None


def _tiff_size(data: bytes) -> Optional[tuple[str, int, int]]:
    """Width and height from the first IFD. A tag given more than once counts with its largest value: libtiff
    uses one of them (the first), so the check must bound every one (a small later width hid a 9000x9000 image
    behind a 100x100 one). A width or height that is not one SHORT or LONG is refused."""
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    size: dict[int, int] = {}
    for k in range(count):
        tag, typ, n, value = struct.unpack(end + "HHI4s", data[ifd + 2 + 12 * k:ifd + 14 + 12 * k])
        if tag in (256, 257):
            if typ not in (3, 4) or n != 1:
                return None
            v = struct.unpack(end + ("H" if typ == 3 else "I"), value[:2] if typ == 3 else value)[0]
            size[tag] = max(size.get(tag, 0), v)
    if 256 in size and 257 in size:
        return "TIFF", size[256], size[257]
    return None


def check_image_header(data: bytes, name: str) -> tuple[str, int, int]:
    """(format, width, height) from the header, or ImageError for an unknown format or more than MAX_IMAGE_PIXELS."""
    found = image_header_size(data)
    if found is None:
        raise ImageError(f"cannot decode image {name}: not a supported image or the file is truncated/corrupt "
                         "(expected JPEG, PNG, BMP, WebP or TIFF)")
    fmt, w, h = found
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {w}x{h} ({w * h} pixels, says its {fmt.split()[0]} header); the limit is "
                         f"{MAX_IMAGE_PIXELS} pixels")
    if fmt == "TIFF" and w * h > MAX_TIFF_PIXELS:
        raise ImageError(f"{name}: TIFF image is {w}x{h} ({w * h} pixels); TIFF is decoded at full size, so its limit "
                         f"is {MAX_TIFF_PIXELS} pixels (convert it to JPEG or PNG, which take up to {MAX_IMAGE_PIXELS})")
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels")
    return fmt, w, h


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to RGB uint8; grey, 16-bit and alpha images are converted, not refused."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise ImageError(f"cannot read image {path}: not a regular file")
    if size == 0:
        raise ImageError(f"cannot read image {path}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"cannot read image {path}: {size} bytes is larger than the {MAX_FILE_BYTES} byte limit")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    return decode_image(data, name=str(path))


def decode_image(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, WebP, TIFF) to RGB uint8; the size is checked first."""
    if not data:
        raise ImageError(f"cannot read image {name}: no data")
    fmt, w, h = check_image_header(data, name)
    buf = np.frombuffer(data, dtype=np.uint8)
    # Large: at half size, straight to 8-bit (a full-size, 16-bit or alpha copy first would double the peak);
    # 8-bit grey stays grey until the one RGB copy (measured in bench/image_bombs.py).
    if w * h <= LARGE_IMAGE_PIXELS:
        flags = cv2.IMREAD_UNCHANGED
    else:
        flags = cv2.IMREAD_REDUCED_GRAYSCALE_2 if fmt.endswith(" grey") else cv2.IMREAD_REDUCED_COLOR_2
    try:
        decoded = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        raise ImageError(f"cannot decode image {name}: {str(exc).strip().splitlines()[-1]}") from exc
    if decoded is None:
        raise ImageError(f"cannot decode image {name}: not a supported image or the file is truncated/corrupt")
    if decoded.ndim == 3 and decoded.shape[2] == 3 and decoded.dtype == np.uint8:
        cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=decoded)  # in place: no second full-size copy
        return to_rgb(decoded, name=name)
    return to_rgb(decoded, name=name, bgr=True)


def to_rgb(image: np.ndarray, *, name: str = "<array>", bgr: bool = False) -> np.ndarray:
    """Normalise any 2-D/3-D pixel array to RGB uint8 HxWx3; `bgr=True` for OpenCV's channel order."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")
    h, w = image.shape[:2]
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels")
    if h * w > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {w}x{h} ({h * w} pixels); the limit is {MAX_IMAGE_PIXELS} pixels")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        if not np.isfinite(image).all():
            raise ImageError(f"{name}: image has NaN or infinite pixel values")
        scale = 255.0 if float(image.max(initial=0.0)) <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {image.dtype}; expected uint8, uint16 or float")
    if image.ndim == 2:
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    else:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image
    return np.ascontiguousarray(rgb)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside a folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def save_image(path: str | os.PathLike[str], rgb: np.ndarray, quality: int = 92) -> None:
    """Write an RGB image atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError(f"cannot encode image for {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)
