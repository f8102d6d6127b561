"""Shipped model files: where they live, what they must be (manifest), and checking them before use."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeface.errors import ModelError

MANIFEST_NAME = "manifest.json"


#: Where a wheel or sdist install carries models/ and the sample faces (copied there by setup.py's build step).
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
#: A source checkout or an editable install: the repository's own folders next to the package.
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_models_dir() -> Path:
    """`$EDGEFACE_MODELS_DIR`, else the models installed with the package (wheel, sdist, Pi installer), else the
    repository's models/ (editable install or source checkout).

    The installed copy wins so that a site-packages install never picks up some unrelated checkout; when none has
    a manifest the packaged path is returned and load_manifest names it."""
    env = os.environ.get("EDGEFACE_MODELS_DIR")
    if env:
        return Path(env)
    for candidate in (PACKAGE_DATA / "models", REPO_ROOT / "models"):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    return PACKAGE_DATA / "models"


def demo_faces_dir() -> Path:
    """The demo's sample faces (tests/fixtures/faces in the repository, MIT-licensed; see its README.md):
    installed with the package, else the checkout's."""
    for candidate in (PACKAGE_DATA / "demo_faces" / "faces", REPO_ROOT / "tests" / "fixtures" / "faces"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DATA / "demo_faces" / "faces"


@dataclass(frozen=True)
class ModelInfo:
    """One manifest entry: what a model file must be and how to feed it."""

    name: str
    kind: str
    file: str
    sha256: str
    bytes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_size(self) -> int:
        return int(self.input_shape[1])


def load_manifest(models_dir: str | os.PathLike[str] | None = None) -> dict[str, ModelInfo]:
    """Read models/manifest.json into {name: ModelInfo}."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    path = models_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model manifest not found: {path} (set EDGEFACE_MODELS_DIR or models_dir)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model manifest {path} is unreadable: {exc}") from exc
    known = {"name", "kind", "file", "sha256", "bytes", "input_shape", "input_dtype"}
    out: dict[str, ModelInfo] = {}
    for entry in raw.get("models", []):
        try:
            info = ModelInfo(
                name=entry["name"], kind=entry["kind"], file=entry["file"], sha256=entry["sha256"].lower(),
                bytes=int(entry["bytes"]), input_shape=tuple(int(v) for v in entry["input_shape"]),
                input_dtype=entry["input_dtype"], extra={k: v for k, v in entry.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"model manifest {path}: bad entry {entry.get('name', '?')!r}: {exc}") from exc
        out[info.name] = info
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_file(path: str | os.PathLike[str], info: ModelInfo) -> None:
    """Refuse a missing, truncated or substituted model file before the interpreter sees it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path} ({info.name}; see models/MODELS.md)")
    size = path.stat().st_size
    if size != info.bytes:
        raise ModelError(
            f"model file {path} is {size} bytes, expected {info.bytes} for {info.name} (truncated or a different model)"
        )
    digest = sha256_file(path)
    if digest != info.sha256:
        raise ModelError(f"model file {path} has sha256 {digest[:12]}..., expected {info.sha256[:12]}... for {info.name}")


def embedder_model_path(model: str, models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the embedder `model` (a manifest name, a bare name or a path) lives or would be written.

    Reads nothing but the manifest: the daemon asks this before it decides whether the converter is needed, so a
    start with the model present never imports edgeface.convert."""
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    manifest = load_manifest(models_dir) if (models_dir / MANIFEST_NAME).is_file() else {}
    if model in manifest:
        return models_dir / manifest[model].file
    path = Path(model)
    if not path.suffix:  # a model name the manifest does not (yet) list: its file would be <name>.tflite
        return models_dir / f"{model}.tflite"
    if not path.is_absolute() and not path.exists() and (models_dir / path).exists():
        return models_dir / path
    return path


def resolve_model(name_or_path: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None,
                  *, verify: bool = True) -> tuple[Path, ModelInfo | None]:
    """Find a model by manifest name or by path; verify it against the manifest when it is a known file.

    A path that is not in the manifest is allowed (a user's own model) but then only its tensor shapes are checked.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    manifest = load_manifest(models_dir) if (models_dir / MANIFEST_NAME).is_file() else {}
    key = str(name_or_path)
    if key in manifest:
        info = manifest[key]
        path = models_dir / info.file
    else:
        path = Path(name_or_path)
        if not path.is_absolute() and not path.exists() and (models_dir / path).exists():
            path = models_dir / path
        info = next((m for m in manifest.values() if m.file == path.name), None)
        if info is None and not path.suffix:
            raise ModelError(f"unknown model {key!r}: not a file and not one of {sorted(manifest)} in {models_dir}")
    if verify and info is not None:
        verify_model_file(path, info)
    elif not path.is_file():
        raise ModelError(f"model file not found: {path}")
    return path, info


def check_io(interpreter: Any, path: Path, *, input_shape: tuple[int, ...] | None = None,
             output_last_dim: int | None = None) -> None:
    """Check tensor shapes so a wrong model gives a clear error instead of garbage results."""
    inp = interpreter.get_input_details()[0]
    shape = tuple(int(v) for v in inp["shape"])
    if input_shape is not None and shape[1:] != tuple(input_shape[1:]):
        raise ModelError(f"model {path} takes input {list(shape)}, expected {list(input_shape)}")
    if output_last_dim is not None:
        out = interpreter.get_output_details()[0]
        if int(out["shape"][-1]) != output_last_dim:
            raise ModelError(f"model {path} outputs {list(out['shape'])}, expected last dimension {output_last_dim}")
