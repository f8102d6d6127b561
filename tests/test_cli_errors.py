"""What a Pi owner sees when a command cannot do what was asked: one line that names the file or the cause,
and an exit status a script can test (real photos, real SQLite files, a real unprivileged process)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, run_cli as run

FACES = FIXTURES / "faces"
OBAMA = sorted((FACES / "barack_obama").glob("*.jpg"))
NOBODY = 65534


def write_config(path: Path, **doc) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path



def edgeface_cli(*args: str, timeout: float = 120, as_nobody: bool = False, cwd: Path | None = None,
                 ) -> subprocess.CompletedProcess:
    """`python -m edgeface ARGS` in its own process (as_nobody: as uid 65534, without any capability)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    prefix = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if as_nobody else []
    return subprocess.run([*prefix, sys.executable, "-m", "edgeface", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# ----------------------------------------------------------------------------------------- OSError
def test_permission_error_is_one_line_naming_the_path():
    """Enrolling as a user who cannot read the state dir (the README's `sudo -u edgeface` forgotten)."""
    with tempfile.TemporaryDirectory(prefix="edgeface-perm-") as tmp:  # pytest's tmp_path is private to its owner
        _check_permission_error(Path(tmp))


def _check_permission_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "gallery.db").write_bytes(b"")
    state.chmod(0o700)
    tmp_path.chmod(0o755)
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(state))
    cfg.chmod(0o644)
    as_nobody = os.geteuid() == 0  # root reads everything: run the command as nobody instead
    if as_nobody:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and util-linux's setpriv is not there to drop to nobody")
        probe = subprocess.run([shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                sys.executable, "-c", "import edgeface"], capture_output=True, timeout=60, cwd="/")
        if probe.returncode != 0:
            pytest.skip(f"uid {NOBODY} cannot run {sys.executable} with edgeface: {probe.stderr[-200:]!r}")
    proc = edgeface_cli("--config", str(cfg), "enroll", "barack", str(OBAMA[0]), as_nobody=as_nobody, cwd=Path("/"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: permission denied: {state / 'gallery.db'} (check its owner and mode)"], proc.stderr


def test_other_os_errors_are_one_line_too(capsys, tmp_path):
    """--annotate into a folder below a file: NotADirectoryError, whoever runs it."""
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"))
    assert run(capsys, cfg, "enroll", "barack", OBAMA[0])[0] == 0
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    rc, out, err = run(capsys, cfg, "identify", "--annotate", blocker / "annotated", OBAMA[1])
    assert rc == 1
    assert err.strip().splitlines() == [f"error: not a directory: {blocker / 'annotated'}"]


# ----------------------------------------------------------------------------------------- enroll
def test_enroll_that_adds_nothing_to_an_existing_person_fails(capsys, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"))
    rc, _, err = run(capsys, cfg, "enroll", "barack", OBAMA[0], OBAMA[1])
    assert rc == 0, err
    rc, _, err = run(capsys, cfg, "enroll", "barack", OBAMA[0], OBAMA[1])  # the same photos again
    assert rc == 3
    assert "error: nothing added for 'barack'" in err
    rc, _, err = run(capsys, cfg, "enroll", "barack", FIXTURES / "nonfaces" / "pilatus_mountain.jpg")
    assert rc == 3
    assert "rejected" in err and "nothing added for 'barack'" in err
    rc, out, _ = run(capsys, cfg, "people", "show", "barack", "--json")
    assert rc == 0 and json.loads("\n".join(out))["embeddings"] == 2  # nothing was lost or added either


def test_enroll_folder_names_the_person_that_got_nothing(capsys, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"))
    assert run(capsys, cfg, "enroll", "barack_obama", OBAMA[0])[0] == 0
    people = tmp_path / "people"
    for name, photos in (("barack_obama", OBAMA[:1]), ("paul_allen", sorted((FACES / "paul_allen").glob("*.jpg"))[:2])):
        (people / name).mkdir(parents=True)
        for p in photos:
            shutil.copy(p, people / name / p.name)
    rc, _, err = run(capsys, cfg, "enroll", "--folder", people)
    assert rc == 3
    assert "nothing added for 'barack_obama'" in err and "the 1 other(s) were enrolled" in err


def test_enroll_camera_without_a_camera_ends_with_an_error(tmp_path):
    """camera.source names a device that is not there: the command must end, not retry for ever."""
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"),
                       camera={"source": "97", "reconnect_min_s": 0.2, "reconnect_max_s": 0.5})
    proc = edgeface_cli("--config", str(cfg), "enroll", "somebody", "--camera", timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: enroll --camera: camera.source '97' gave no usable frame (reconnecting:"), last
    assert last.endswith("nothing was written")
    assert not (tmp_path / "state" / "gallery.db").exists()


def test_enroll_camera_on_a_folder_without_faces_says_so(capsys, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(FIXTURES / "nonfaces" / "pilatus_mountain.jpg", frames / "a.jpg")
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"), camera={"source": str(frames)})
    rc, _, err = run(capsys, cfg, "enroll", "somebody", "--camera")
    assert rc == 1
    assert "gave no usable frame" in err and "nothing was written" in err


# ----------------------------------------------------------------------------------------- identify
def test_identify_against_an_empty_gallery_warns(capsys, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"))
    assert run(capsys, cfg, "enroll", "barack", OBAMA[0])[0] == 0
    rc, out, err = run(capsys, cfg, "identify", OBAMA[1])
    assert rc == 0 and out[0].split(",")[1] == "barack"
    assert "warning" not in err
    assert run(capsys, cfg, "people", "disable", "barack")[0] == 0
    rc, out, err = run(capsys, cfg, "identify", OBAMA[1])
    assert rc == 0 and out[0].split(",")[1] == "unknown"
    assert f"warning: gallery {tmp_path / 'state' / 'gallery.db'} has nobody enabled" in err
    assert "(1 people in it): every face will be 'unknown'" in err


# ----------------------------------------------------------------------------------------- export
def test_gallery_export_refuses_to_overwrite_without_force(capsys, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", state_dir=str(tmp_path / "state"))
    assert run(capsys, cfg, "enroll", "barack", OBAMA[0])[0] == 0
    backup = tmp_path / "backup.json"
    backup.write_text("my only backup")
    rc, _, err = run(capsys, cfg, "gallery", "export", backup)
    assert rc == 1
    assert err.strip() == f"error: export file {backup} exists; give --force to replace it"
    assert backup.read_text() == "my only backup"
    rc, _, err = run(capsys, cfg, "gallery", "export", backup, "--force")
    assert rc == 0, err
    assert json.loads(backup.read_text())["people"][0]["name"] == "barack"
