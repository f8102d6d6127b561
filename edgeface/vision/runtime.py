"""The one place that chooses a TFLite interpreter implementation.

LiteRT (`ai_edge_litert`) works with numpy 2 and current OpenCV wheels on x86-64 and aarch64;
`tflite_runtime` is the fallback for older Raspberry Pi OS images (it needs numpy<2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeface.errors import ModelError

try:  # pragma: no cover - which branch runs depends on the machine
    from ai_edge_litert.interpreter import Interpreter as _Interpreter

    INTERPRETER_BACKEND = "ai_edge_litert"
except ImportError:  # pragma: no cover
    try:
        from tflite_runtime.interpreter import Interpreter as _Interpreter  # type: ignore[no-redef]

        INTERPRETER_BACKEND = "tflite_runtime"
    except ImportError:
        _Interpreter = None  # type: ignore[assignment,misc]
        INTERPRETER_BACKEND = "none"


def default_num_threads() -> int:
    """Threads for one interpreter: all cores up to 4 (a Pi 4/5 has 4), never fewer than 1."""
    return max(1, min(4, os.cpu_count() or 1))


def load_interpreter(path: str | os.PathLike[str], num_threads: int | None = None) -> Any:
    """Load and allocate a TFLite model, turning every failure into a one-line ModelError."""
    path = Path(path)
    if _Interpreter is None:
        raise ModelError(
            "no TFLite interpreter installed: pip install ai-edge-litert (or tflite-runtime on older Pi images)"
        )
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    threads = default_num_threads() if num_threads is None else int(num_threads)
    try:
        interpreter = _Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load TFLite model {path}: {first_line}") from exc
    return interpreter
