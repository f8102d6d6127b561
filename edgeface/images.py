"""Read images and frames into the one pixel format every stage uses: RGB, uint8, HxWx3, C-contiguous."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))
import cv2  # noqa: E402  (the pixel cap above must be set before OpenCV is imported)

from .errors import ImageError  # noqa: E402

#: Largest image we decode (pixels). 50 MP covers any camera; larger is a mistake or an attack.
MAX_IMAGE_PIXELS = 50_000_000
#: Smallest side that can hold a detectable face.
MIN_IMAGE_SIDE = 16
#: Largest file we read into memory at all.
MAX_FILE_BYTES = 64 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    data = np.fromfile(str(path), dtype=np.uint8)
    return decode_image(data.tobytes(), name=str(path))


def decode_image(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to RGB uint8."""
    if not data:
        raise ImageError(f"cannot read image {name}: no data")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"cannot decode image {name}: {str(exc).strip().splitlines()[-1]}") from exc
    if decoded is None:
        raise ImageError(f"cannot decode image {name}: not a supported image or the file is truncated/corrupt")
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
