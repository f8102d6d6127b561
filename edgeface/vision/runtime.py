"""The one place that chooses a TFLite interpreter implementation.

LiteRT (`ai_edge_litert`) works with numpy 2 and current OpenCV wheels on x86-64 and aarch64;
`tflite_runtime` is the fallback for older Raspberry Pi OS images (it needs numpy<2).
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


#: What the TFLite runtime writes to stderr (from C++, once per process) when it makes its CPU delegate: an INFO
#: line before every command's output. Its C++ logger has no switch reachable from Python (TF_CPP_MIN_LOG_LEVEL
#: does not apply to it), so the one place that creates interpreters drops this exact line and nothing else.
DELEGATE_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextmanager
def without_delegate_notice() -> Iterator[None]:
    """Run the block with file descriptor 2 going to a temporary file, then write everything it caught back to
    stderr except DELEGATE_NOTICE lines: real warnings and errors still show (after the block), in order. A file,
    not a pipe, so a chatty block can never block on a full pipe. Without a usable fd 2 the block just runs."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    caught = tempfile.TemporaryFile()
    try:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
        caught.seek(0)
        kept = b"".join(line for line in caught.read().splitlines(keepends=True)
                        if line.rstrip(b"\r\n") != DELEGATE_NOTICE)
        if kept:
            os.write(2, kept)
    finally:
        os.close(saved)
        caught.close()


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
        with without_delegate_notice():
            interpreter = _Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load TFLite model {path}: {first_line}") from exc
    return interpreter
