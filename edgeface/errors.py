"""One exception tree: every edgeface error derives from EdgefaceError and its closest built-in."""
from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Process exit codes of the edgeface CLI."""

    OK = 0
    ERROR = 1
    INVALID_CONFIG = 2
    NO_FACE = 3
    INTERRUPTED = 130


class EdgefaceError(Exception):
    """Base class of every error edgeface reports to a user as one line."""

    exit_status: ExitStatus = ExitStatus.ERROR


class ConfigError(EdgefaceError, ValueError):
    """The configuration file or a value in it is invalid."""

    exit_status = ExitStatus.INVALID_CONFIG


class ModelError(EdgefaceError, OSError):
    """A model file is missing, truncated, or not the model we expect."""


class ImageError(EdgefaceError, ValueError):
    """An image cannot be read or has a shape we cannot process."""


class NoFaceError(EdgefaceError, LookupError):
    """No usable face was found where one was required."""

    exit_status = ExitStatus.NO_FACE


class GalleryError(EdgefaceError, RuntimeError):
    """The gallery database is unreadable, foreign, or inconsistent with the request."""


class CameraError(EdgefaceError, OSError):
    """A frame source cannot be opened or stopped delivering frames."""


class ConverterUnavailable(EdgefaceError, ImportError):
    """The model converter needs TensorFlow, which is an optional extra."""
