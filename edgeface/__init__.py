"""edgeface: offline face-recognition door access for the Raspberry Pi.

Data flow: frames (source) -> detect -> align -> embed -> match (gallery) -> decide (policy) -> door / events.
"""
from .errors import EdgefaceError

__all__ = ["EdgefaceError", "__version__"]
__version__ = "0.1.0"
