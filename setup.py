"""Build step that puts the shipped models and the demo's sample faces into the package (edgeface/_data/).

The repository keeps them at the top level (models/, tests/fixtures/faces/); a wheel, an sdist-built wheel and
the Pi installer (`pip install .`) must carry them, so `build_py` copies every file that models/manifest.json
lists (plus the manifest, MODELS.md and the model reports) and the sample faces with their attribution. An
editable install copies nothing: edgeface.models finds the repository's folders next to the package.
Everything else is in pyproject.toml.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
FACES = HERE / "tests" / "fixtures"


def model_files() -> list[Path]:
    """The manifest, every file it lists (checked to exist with the listed size), and the docs beside them."""
    manifest = MODELS / "manifest.json"
    entries = json.loads(manifest.read_text(encoding="utf-8"))["models"]
    files = [manifest]
    for entry in entries:
        path = MODELS / entry["file"]
        if not path.is_file() or path.stat().st_size != int(entry["bytes"]):
            raise SystemExit(f"models/manifest.json lists {entry['file']} ({entry['bytes']} bytes) but {path} "
                             "is missing or has another size: refusing to build a package without it")
        files.append(path)
    files += sorted(p for p in MODELS.iterdir() if p.suffix in (".md", ".json") and p not in files)
    return files


def face_files() -> list[Path]:
    """The demo's sample faces (MIT, attributed in README.md / SOURCES.csv, which travel with them)."""
    return [FACES / "README.md", FACES / "SOURCES.csv"] + sorted((FACES / "faces").rglob("*.jpg"))


class BuildPyWithData(build_py):
    """build_py that also copies models/ and the sample faces into edgeface/_data/ of the build."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        data = Path(self.build_lib) / "edgeface" / "_data"
        shutil.rmtree(data, ignore_errors=True)  # a stale build folder never leaks an old model into a wheel
        for src in model_files():
            self._put(src, data / "models" / src.relative_to(MODELS))
        for src in face_files():
            self._put(src, data / "demo_faces" / src.relative_to(FACES))

    def _put(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildPyWithData})
