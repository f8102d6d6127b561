"""edgeface: offline face-recognition door access for the Raspberry Pi.

Data flow: frames (source) -> detect -> align -> embed -> match (gallery) -> decide (policy) -> door / events.
"""
import os as _os

# OpenCV reads its decode pixel cap when it loads: set it before any edgeface module can import cv2 (it is a
# second line of defence; edgeface.vision.images checks every image's header size first). = images.MAX_IMAGE_PIXELS.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "50000000")

from edgeface.errors import EdgefaceError  # noqa: E402

__all__ = ["EdgefaceError", "__version__"]
__version__ = "0.1.0"
