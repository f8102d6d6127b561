"""After a crash, `edgeface door release` (systemd's ExecStopPost) releases exactly the line the daemon drove.

What a user relies on: the daemon SIGKILLed in the middle of an unlock pulse leaves the relay energised (a Pi's
GPIO line keeps its level); the release that follows must drive that same line back to its released level,
whatever the config file has become since (unreadable, broken, missing, or naming another pin), and never
drive another line. The daemon records the line it claimed in `<state_dir>/relay-line.json`; the release
finds the state dir through the config or, as under systemd, $STATE_DIRECTORY. Real `edgeface run`
subprocesses on a folder camera, real SIGKILL; the GPIO lines are gpiozero mock pins whose every driven level
is journalled to a file (tests/pin_journal/sitecustomize.py), so what each process left on each line is seen
after it died.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import relay_rows
import yaml

from edgeface.testing import wait_until

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "fixtures" / "faces" / "barack_obama" / "barack_obama_04.jpg"
JOURNAL_SITE = REPO / "tests" / "pin_journal"

#: Every spelling of the relay line the daemon's config accepts: YAML integers and YAML booleans (strict).
PIN_SPELLINGS = ["27", "0x1b", "+27"]
POLARITY_SPELLINGS = ["true", "false", "yes", "no", "on", "off"]
#: The same words in other letter cases (YAML 1.1 booleans too): checked by the reader agreement test only.
POLARITY_CASES = ["True", "FALSE", "Yes", "OFF", "On", "NO"]
#: Spellings the daemon's config refuses: `door release` must refuse them too (no record = no line).
REFUSED = {"relay_pin": ["'27'", '"27"', "27.0", "true", "-1", "54", "null", "[27]"],
           "active_high": ["'false'", "0", "1", "'yes'", "y", "null", "2"]}


def _env(journal: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "GPIOZERO_PIN_FACTORY")}
    return {**env, "PYTHONPATH": f"{JOURNAL_SITE}{os.pathsep}{REPO}", "EDGEFACE_PIN_JOURNAL": str(journal), **extra}


def _journal(journal: Path) -> list[tuple[int, str, int]]:
    if not journal.exists():
        return []
    return [(int(pid), pin, int(level)) for pid, pin, level in
            (line.split() for line in journal.read_text().splitlines())]


def _driven_by(journal: Path, pid: int) -> dict[str, int]:
    """The last level `pid` drove on each line it touched."""
    out: dict[str, int] = {}
    for p, pin, level in _journal(journal):
        if p == pid:
            out[pin] = level
    return out


def _door_text(pin: str, polarity: str, factory: str = "mock") -> str:
    return f"door:\n  door_id: front\n  relay_pin: {pin}\n  active_high: {polarity}\n  pulse_s: 30.0\n" \
           f"  pin_factory: {factory}\n"


def _config_text(state: Path, cam: Path, door: str) -> str:
    rest = yaml.safe_dump({
        "state_dir": str(state), "camera": {"source": str(cam), "loop": True, "max_fps": 20},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 1, "window_frames": 1, "window_s": 5.0, "cooldown_s": 3600.0},
        "mqtt": {"enabled": False}, "audit": {"path": "audit.db"}})
    return rest + door


def _release(config: Path, journal: Path, **env: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `edgeface door release` as systemd would; (result, its pid)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "door", "release"],
                            env=_env(journal, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _make_unreadable(config: Path) -> None:
    """chmod 000; root reads through that, so there the config becomes a directory (reading it fails too)."""
    if os.geteuid() == 0:
        config.unlink()
        config.mkdir()
    else:
        config.chmod(0)


# Each daemon run covers one pin spelling and one polarity spelling; together every accepted spelling.
RUNS = [(PIN_SPELLINGS[i % len(PIN_SPELLINGS)], polarity) for i, polarity in enumerate(POLARITY_SPELLINGS)]


@pytest.mark.slow
@pytest.mark.parametrize("pin_text,polarity_text", RUNS, ids=[f"{p}-{a}" for p, a in RUNS])
def test_release_after_sigkill_mid_pulse_releases_the_line_the_daemon_drove(tmp_path, obama_gallery_file,
                                                                            pin_text, polarity_text):
    active_high = yaml.safe_load(f"x: {polarity_text}")["x"]
    pin = yaml.safe_load(f"x: {pin_text}")["x"]
    assert pin == 27 and isinstance(active_high, bool)
    line, active, released = f"GPIO{pin}", int(active_high), int(not active_high)
    state, cam, journal = tmp_path / "state", tmp_path / "cam", tmp_path / "pins.journal"
    cam.mkdir()
    shutil.copyfile(PROBE, cam / PROBE.name)
    state.mkdir(mode=0o700)
    shutil.copyfile(obama_gallery_file, state / "gallery.db")
    config = tmp_path / "config.yaml"
    original = _config_text(state, cam, _door_text(pin_text, polarity_text))
    config.write_text(original)

    daemon = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "run"],
                              env=_env(journal), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: "unlocked" in relay_rows(state / "audit.db") or daemon.poll() is not None, 90)
        assert daemon.poll() is None, daemon.stderr.read()[-2000:]
        daemon.send_signal(signal.SIGKILL)  # in the middle of a 30 s pulse
        daemon.wait(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate()
    # what the crash left: the daemon drove only the relay line, and left it energised
    assert _driven_by(journal, daemon.pid) == {line: active}

    broken = ("# relay_pin: 4 was the old wiring, relay_pin: 5 the one before\n" + original
              + "camera:\n  source: [unclosed\n")
    rewired = original.replace(f"relay_pin: {pin_text}", "relay_pin: 22")
    cases = {  # config as the release finds it -> environment (systemd's $STATE_DIRECTORY when it cannot say)
        "as_written": ({}, lambda: config.write_text(original)),
        "rewired_since": ({}, lambda: config.write_text(rewired)),
        "broken_yaml": ({"STATE_DIRECTORY": str(state)}, lambda: config.write_text(broken)),
        "unreadable": ({"STATE_DIRECTORY": str(state)}, lambda: _make_unreadable(config)),
        "missing": ({"STATE_DIRECTORY": str(state)}, lambda: shutil.rmtree(config) if config.is_dir()
                    else config.unlink()),
    }
    for case, (env, prepare) in cases.items():
        prepare()
        done, pid = _release(config, journal, **env)
        assert done.returncode == 0, (case, done.stderr)
        assert _driven_by(journal, pid) == {line: released}, (case, _journal(journal)[-4:], done.stderr)
        assert f"relay on pin {pin} released ({'active high' if active_high else 'active low'})" in done.stdout
        if case == "rewired_since":
            assert "but the daemon last drove pin 27" in done.stderr, done.stderr
    pins = {p for _pid, p, _level in _journal(journal)}
    assert pins == {line}, pins  # no process ever drove another line
    assert stat.S_IMODE((state / "relay-line.json").stat().st_mode) == 0o600  # the record the releases used


def test_every_relay_spelling_the_config_accepts_release_reads_the_same(tmp_path):
    """The daemon's config (pydantic) and the release's reader (no pydantic) agree on every spelling: the same
    pin and polarity, or both refuse."""
    from edgeface.config import load_config
    from edgeface.daemon.release import read_config_door
    from edgeface.errors import ConfigError

    config = tmp_path / "config.yaml"
    spellings = [(p, a) for p in PIN_SPELLINGS for a in POLARITY_SPELLINGS + POLARITY_CASES]
    spellings += [(p, "true") for p in REFUSED["relay_pin"]] + [("27", a) for a in REFUSED["active_high"]]
    for pin_text, polarity_text in spellings:
        config.write_text(_door_text(pin_text, polarity_text))
        try:
            door = load_config(config).door
            daemon = (door.relay_pin, door.active_high)
        except ConfigError:
            daemon = None
        line = read_config_door(config).line
        release = (line.relay_pin, line.active_high) if line else None
        assert daemon == release, (pin_text, polarity_text, daemon, release)
        refused = pin_text in REFUSED["relay_pin"] or polarity_text in REFUSED["active_high"]
        assert (daemon is None) == refused, (pin_text, polarity_text, daemon)


@pytest.mark.parametrize("door", ["relay_pin: '27'\n  active_high: false", "relay_pin: 27\n  active_high: 'false'",
                                  "relay_pin: 27\n  active_high: 0"], ids=["quoted_pin", "quoted_bool", "zero"])
def test_a_spelling_the_release_cannot_read_is_refused_by_the_daemon_too(tmp_path, door):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ndoor:\n  {door}\n  pin_factory: mock\n")
    env = _env(tmp_path / "pins.journal")
    check = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(config), "check-config"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "unquoted" in check.stderr
    done, pid = _release(config, tmp_path / "pins.journal")  # no record yet: nothing to release but a guess
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _driven_by(tmp_path / "pins.journal", pid) == {}


def test_broken_yaml_and_no_record_fails_in_one_line_and_drives_no_line(tmp_path):
    """A guess (a `relay_pin:` in a comment, a line scan) could energise another pin: it fails loudly instead."""
    config = tmp_path / "config.yaml"
    journal = tmp_path / "pins.journal"
    config.write_text("# relay_pin: 4 was the old wiring\nstate_dir: " + str(tmp_path / "state") + "\n"
                      + _door_text("27", "false") + "camera:\n  source: [unclosed\n")
    done, pid = _release(config, journal, STATE_DIRECTORY=str(tmp_path / "state"))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot tell which relay line to release"), lines
    assert "not valid YAML" in lines[0] and "--pin N" in lines[0]
    assert _driven_by(journal, pid) == {}


def test_release_with_a_valid_config_without_a_door_section_uses_the_door_defaults(tmp_path):
    config = tmp_path / "config.yaml"
    journal = tmp_path / "pins.journal"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmqtt:\n  enabled: false\n")
    done, pid = _release(config, journal, GPIOZERO_PIN_FACTORY="mock")
    assert done.returncode == 0, done.stderr
    assert "not valid YAML" not in done.stderr, done.stderr
    assert "relay on pin 17 released (active high)" in done.stdout
    assert _driven_by(journal, pid) == {"GPIO17": 0}


def test_the_daemon_records_the_line_it_drives_and_release_prefers_it(tmp_path):
    """In-process: the recorded line is what the Door claimed; a hand-made record of another pin wins over the
    config (the config is only the fallback) and the mismatch is reported."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import DoorConfig
    from edgeface.door import LINE_RECORD_NAME, Door, read_line_record

    factory = MockFactory()
    try:
        with Door.from_config(DoorConfig(relay_pin=23, active_high=False, pin_factory="mock", door_id="back"),
                              pin_factory=factory, state_dir=tmp_path):
            pass
    finally:
        factory.close()
    recorded = read_line_record(tmp_path / LINE_RECORD_NAME)
    assert (recorded.relay_pin, recorded.active_high, recorded.pin_factory, recorded.door_id) == \
           (23, False, "mock", "back")
    assert stat.S_IMODE((tmp_path / LINE_RECORD_NAME).stat().st_mode) == 0o600


def _off_a_pi() -> bool:
    import importlib.util

    return not Path("/proc/device-tree/model").exists() and importlib.util.find_spec("lgpio") is None


@pytest.mark.skipif(not _off_a_pi(), reason="checks the error off a Pi (no lgpio, no Pi board)")
@pytest.mark.parametrize("command", [["door", "release"], ["run"]])
def test_off_a_pi_the_gpio_error_is_one_line_without_gpiozero_warnings(tmp_path, command):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ncamera:\n  source: demo\nmqtt:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"}
    done = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(config), *command],
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: door.relay_pin = 17: cannot drive the pin") and "door.pin_factory: mock" \
        in lines[0], lines
