"""Shared test fixtures: real photos (committed fixtures, and ../shared when it exists)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("EDGEFACE_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/{'/'.join(parts)} (development data; CI has it, a clone does not)")
    return path


@pytest.fixture(scope="session")
def fixture_faces() -> Path:
    """Committed photos: faces/<person>/*.jpg (7 people, 26 photos, MIT-licensed sources)."""
    return FIXTURES / "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    return shared_path("data", "faces")


@pytest.fixture(scope="session")
def shared_nonfaces() -> Path:
    return shared_path("data", "nonfaces")


@pytest.fixture(scope="session")
def analyzer():
    """The default config's detect -> align -> embed pipeline (shipped models), loaded once for the whole run."""
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.config import EdgefaceConfig

    cfg = EdgefaceConfig()
    a = FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
    yield a
    a.close()


@pytest.fixture(scope="session")
def obama_gallery_file(analyzer, tmp_path_factory) -> Path:
    """A gallery file (default config) with barack_obama enrolled from three fixture photos; tests copy it, never
    change it."""
    from edgeface.config import parse_config
    from edgeface.enroll import enroll_images
    from edgeface.gallery import Gallery, resolve_max_distance

    cfg = parse_config({})
    path = tmp_path_factory.mktemp("gallery") / "gallery.db"
    person = FIXTURES / "faces" / "barack_obama"
    with Gallery.open(path, model_id=analyzer.embedder.model_id, embedding_dim=analyzer.embedder.spec.embedding_dim,
                      max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir)) as g:
        g.enroll("barack_obama", enroll_images(analyzer, [person / f"barack_obama_0{i}.jpg" for i in (1, 2, 3)]))
    return path


def run_cli(capsys, config: Path, *args: object) -> tuple[int, list[str], str]:
    """(exit status, stdout lines, stderr) of one in-process `edgeface --config CONFIG ARGS...`."""
    from edgeface.cli import main

    capsys.readouterr()
    rc = main(["--config", str(config), *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def relay_rows(audit: Path) -> list[str]:
    """The relay events a daemon wrote to its audit log, oldest first ([] while the file is missing or locked)."""
    import sqlite3

    if not audit.exists():
        return []
    try:
        with sqlite3.connect(audit, timeout=0.2) as db:
            return [r[0] for r in db.execute("SELECT result FROM audit WHERE kind = 'relay' ORDER BY id")]
    except sqlite3.Error:
        return []


class NoAnalyzer:
    """A stand-in analyzer for tests that build the daemon to drive start-up and its access rules, never a frame."""

    class embedder:
        model_id = "test_model"

    def close(self) -> None:
        pass
