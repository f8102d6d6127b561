"""Installs as its users install it: a wheel (and a wheel built from the sdist) in a fresh venv outside the
repository carries the models and the sample faces; the Pi pieces (unit, installer, `pi` extra, picamera2
with a mismatched numpy) do what a Pi owner needs."""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from io import StringIO
from pathlib import Path

import pytest

from conftest import REPO
from edgeface.models import load_manifest

#: What a clean clone has: everything but local build products, venvs and caches.
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                        ".pytest_cache", "_data", "results", "*.db", "*.db-wal", "*.db-shm")


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _data_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {n for n in zf.namelist() if n.startswith("edgeface/_data/")}


def _events(jsonl: str) -> list[tuple[str, str | None]]:
    return [(e["result"], e["person_name"]) for e in map(json.loads, jsonl.splitlines())]


@pytest.mark.slow
def test_wheel_and_sdist_installed_outside_the_repo_run_models_and_demo(tmp_path):
    src = tmp_path / "clone"
    shutil.copytree(REPO, src, ignore=NOT_IN_A_CLONE)
    pytest.importorskip("build", reason="the sdist is built with `build` (in the dev extra)")
    # sdist, then a wheel built from that sdist (python -m build's default), and a wheel straight from the tree
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _pip("wheel", str(src), "--no-deps", "-w", str(tmp_path / "direct"), cwd=tmp_path)
    from_sdist, = (tmp_path / "dist").glob("edgeface-*.whl")
    direct, = (tmp_path / "direct").glob("edgeface-*.whl")
    manifest = load_manifest(REPO / "models")
    expected = {f"edgeface/_data/models/{m.file}" for m in manifest.values()} | {"edgeface/_data/models/manifest.json"}
    assert expected <= _data_files(from_sdist)
    assert _data_files(direct) == _data_files(from_sdist)
    faces = {p.relative_to(REPO / "tests" / "fixtures").as_posix() for p in (REPO / "tests/fixtures/faces").rglob("*.jpg")}
    assert {f"edgeface/_data/demo_faces/{f}" for f in faces} | {"edgeface/_data/demo_faces/SOURCES.csv"} \
        <= _data_files(direct)

    # A fresh venv that reuses this one's installed dependencies (no downloads) but has its own edgeface.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_edgeface_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                           str(from_sdist)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEFACE_MODELS_DIR", "PYTHONPATH", "EDGEFACE_CONFIG")}
    env["TQDM_DISABLE"] = "1"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def edgeface(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "edgeface"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([str(py), "-c", "import edgeface.models as m; print(m.__file__); "
                            "print(m.default_models_dir()); print(m.demo_faces_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    models = edgeface("models")
    assert models.returncode == 0, models.stdout + models.stderr
    listed = {line.split()[0]: line.split()[-1] for line in models.stdout.splitlines()}
    assert listed == {name: "ok" for name in manifest}
    demo = edgeface("demo", "--broker", "127.0.0.1:1")
    assert demo.returncode == 0, demo.stderr[-3000:]
    # the same events, in the same order, as the demo run from this checkout
    from edgeface.daemon.demo import run_demo

    here = StringIO()
    assert run_demo(out=here, mqtt_port=1, state_dir=tmp_path / "state") == 0
    assert _events(demo.stdout) == _events(here.getvalue())
    assert {"granted", "unknown"} <= {r for r, _ in _events(demo.stdout)}


def test_models_dir_prefers_the_installed_copy_then_the_checkout(monkeypatch, tmp_path):
    import edgeface.models as m

    monkeypatch.delenv("EDGEFACE_MODELS_DIR", raising=False)
    assert m.default_models_dir() in (m.PACKAGE_DATA / "models", REPO / "models")
    assert (m.default_models_dir() / "manifest.json").is_file()
    assert (m.demo_faces_dir() / "barack_obama").is_dir()
    monkeypatch.setenv("EDGEFACE_MODELS_DIR", str(tmp_path))
    assert m.default_models_dir() == tmp_path


# ------------------------------------------------------------------------------------------- Pi pieces
def test_pi_extra_never_asks_pip_for_lgpio_on_python_313():
    """lgpio has no CPython 3.13 wheel (Pi OS trixie): there apt's python3-lgpio is the way."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pi"]
    reqs = [Requirement(r) for r in extra]

    def wanted(version: str) -> set[str]:
        env = {"python_version": version, "python_full_version": version + ".0", "platform_machine": "aarch64",
               "sys_platform": "linux", "platform_system": "Linux"}
        return {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}

    assert "lgpio" in wanted("3.11")
    assert "lgpio" not in wanted("3.13")


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((REPO / "systemd" / "edgeface.service").read_text())
    return parser


def test_unit_runs_in_its_writable_state_directory():
    """Under ProtectSystem=strict only /var/lib/edgeface is writable; lgpio makes its pipes in the cwd."""
    svc = _unit()["Service"]
    assert svc["ProtectSystem"] == "strict"
    state = "/var/lib/" + svc["StateDirectory"]
    assert svc.get("WorkingDirectory") == state
    assert state in svc["ReadWritePaths"].split()


def test_installer_makes_the_state_dir_before_anyone_enrolls_and_keeps_the_system_numpy():
    script = (REPO / "tools" / "install-pi.sh").read_text()
    assert re.search(r"^STATE=/var/lib/edgeface$", script, re.M)
    make_dir = script.index('install -d -m 0700 -o edgeface -g edgeface "$STATE"')
    assert script.index("useradd") < make_dir < script.index('pip install "${PIP_SOURCE[@]}"')
    assert 'echo "numpy==$SYS_NUMPY"' in script and '-c "$PREFIX/constraints.txt"' in script
    readme = (REPO / "README.md").read_text()
    pi = readme[readme.index("## On a Raspberry Pi"):]
    assert pi.index("tools/install-pi.sh") < pi.index("sudo -u edgeface") < pi.index("systemctl enable --now")


# ------------------------------------------------------------------------------------------- picamera2
FAKE_PICAMERA2 = '''raise ValueError("numpy.dtype size changed, may indicate binary incompatibility. Expected 96 from C "
                 "header, got 88 from PyObject")
'''


@pytest.fixture
def mismatched_picamera2(tmp_path, monkeypatch) -> Path:
    """A picamera2 that fails the way Pi OS's does when a pip numpy 2 shadows the apt numpy 1.x."""
    pkg = tmp_path / "site" / "picamera2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_PICAMERA2)
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    return pkg.parent


def test_picamera2_built_for_another_numpy_gives_a_clear_error(mismatched_picamera2):
    import numpy as np

    from edgeface.config import CameraConfig
    from edgeface.errors import CameraError
    from edgeface.frames import open_source

    with pytest.raises(CameraError) as err:
        open_source(CameraConfig(source="picamera"))
    msg = str(err.value)
    assert f"numpy {np.__version__}" in msg and "numpy.dtype size changed" in msg
    assert "tools/install-pi.sh" in msg and "uninstall numpy" in msg
    assert "\n" not in msg


def test_edgeface_run_with_that_picamera2_is_one_line(mismatched_picamera2, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ncamera:\n  source: picamera\ndoor:\n  pin_factory: mock\n"
                   "mqtt:\n  port: 1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mismatched_picamera2), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(cfg), "run"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: camera.source 'picamera': picamera2 cannot load "
                                                            "with numpy")


def test_missing_picamera2_still_says_how_to_install_it():
    from edgeface.config import CameraConfig
    from edgeface.errors import CameraError
    from edgeface.frames import open_source

    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed here")
    with pytest.raises(CameraError, match="sudo apt install python3-picamera2"):
        open_source(CameraConfig(source="picamera"))
