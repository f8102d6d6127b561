"""`edgeface door release`: drive the relay line the daemon drove back to its released level.

Why its own module: systemd runs this as ExecStopPost after every exit of the service, a crash included, and
on a Pi the GPIO line keeps its last level when the process dies. Which line: the daemon records the pin and
polarity it claimed in `<state_dir>/relay-line.json` (edgeface.door.LINE_RECORD_NAME) before the relay can
move, and that record comes first; the config's door section is the fallback (no record yet), and a config
that disagrees with the record is reported. Nothing is guessed: a config that does not parse, or gives a
value the daemon itself would refuse, is no source at all, and with no record either the command fails
(exit 2, one line) instead of driving some other pin.

The state directory is found without the config when it has to be: the config's `state_dir` when the file
parses, else `$STATE_DIRECTORY` (systemd sets it for every command of a unit with StateDirectory=, the
ExecStopPost one included), else the default /var/lib/edgeface; `--state-dir` names it outright.
It imports only click, PyYAML and gpiozero (no pydantic, numpy, OpenCV or LiteRT:
`tests/test_faults_process.py` checks the imports).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import click

from edgeface.door import LINE_RECORD_NAME, PIN_FACTORIES, RelayLine, read_line_record
from edgeface.errors import ConfigError

#: The config defaults (edgeface.config.DoorConfig, EdgefaceConfig.state_dir) for a key the file does not have.
DEFAULT_RELAY_PIN = 17
DEFAULT_ACTIVE_HIGH = True
DEFAULT_DOOR_ID = "front"
DEFAULT_STATE_DIR = "/var/lib/edgeface"
MAX_BCM_PIN = 53


@dataclass
class ConfigDoor:
    """What the config file says about the relay line: `line` when the file gives a usable one, else `problem`."""

    line: Optional[RelayLine] = None
    state_dir: Optional[str] = None
    problem: str = ""
    notes: list[str] = field(default_factory=list)


def read_config_door(path: Optional[Path]) -> ConfigDoor:
    """The relay line a config file gives, with the same types the daemon's config accepts (strict: a YAML
    integer pin 0-53, a YAML boolean polarity; edgeface.config.DoorConfig). A file that does not parse, or a
    door value the daemon would refuse, gives no line (`problem` says why); a missing key is its default."""
    import yaml

    if path is None:
        return ConfigDoor(line=RelayLine(DEFAULT_RELAY_PIN, DEFAULT_ACTIVE_HIGH, None, DEFAULT_DOOR_ID),
                          notes=["no config file: the config defaults apply"])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ConfigDoor(problem=f"config file not found: {path}")
    except (OSError, UnicodeDecodeError) as exc:
        return ConfigDoor(problem=f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return ConfigDoor(problem=f"{where}: not valid YAML: {getattr(exc, 'problem', None) or 'parse error'}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return ConfigDoor(problem=f"{path}: expected a mapping of sections at the top level")
    state_dir = data.get("state_dir") if isinstance(data.get("state_dir"), str) else None
    door = data.get("door", {})
    door = {} if door is None else door
    if not isinstance(door, dict):
        return ConfigDoor(state_dir=state_dir, problem=f"{path}: door = {door!r}: expected a mapping")
    notes = []
    pin = door.get("relay_pin", DEFAULT_RELAY_PIN)
    if "relay_pin" not in door:
        notes.append(f"no door.relay_pin in {path}: the default pin {DEFAULT_RELAY_PIN} applies")
    high = door.get("active_high", DEFAULT_ACTIVE_HIGH)
    factory = door.get("pin_factory")
    door_id = door.get("door_id", DEFAULT_DOOR_ID)
    if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin <= MAX_BCM_PIN:
        problem = f"{path}: door.relay_pin = {pin!r}: expected an integer BCM pin 0-{MAX_BCM_PIN}"
    elif not isinstance(high, bool):
        problem = f"{path}: door.active_high = {high!r}: expected true or false"
    elif factory is not None and factory not in PIN_FACTORIES:
        problem = f"{path}: door.pin_factory = {factory!r}: expected one of {', '.join(PIN_FACTORIES)}"
    else:
        return ConfigDoor(line=RelayLine(pin, high, factory, str(door_id)), state_dir=state_dir, notes=notes)
    return ConfigDoor(state_dir=state_dir, problem=problem)


def state_dir_candidates(state_dir: Optional[str], config_state_dir: Optional[str]) -> list[Path]:
    """Where the daemon's line record may be, in order: --state-dir, the config's state_dir, $STATE_DIRECTORY
    (systemd; a ':'-separated list), the default."""
    names = [state_dir, config_state_dir, *(os.environ.get("STATE_DIRECTORY") or "").split(":"), DEFAULT_STATE_DIR]
    out: list[Path] = []
    for name in names:
        if name:
            p = Path(name).expanduser()
            if p not in out:
                out.append(p)
    return out


def find_line_record(dirs: list[Path]) -> tuple[Optional[RelayLine], Optional[Path], list[str]]:
    """The first readable line record in `dirs` (and its path); a damaged one is skipped with a note."""
    notes = []
    for d in dirs:
        path = d / LINE_RECORD_NAME
        try:
            return read_line_record(path), path, notes
        except FileNotFoundError:
            continue
        except ConfigError as exc:
            notes.append(f"ignoring a damaged relay line record: {exc}")
        except OSError as exc:
            notes.append(f"cannot read {path}: {exc.strerror or exc}")
    return None, None, notes


def release_relay(relay_pin: int, *, active_high: bool, pin_factory: Optional[str]) -> None:
    """Build the relay output released (gpiozero initial_value=False, active_high respected), then free it."""
    from edgeface.door import build_output, make_pin_factory

    device = build_output(relay_pin, active_high=active_high, pin_factory=make_pin_factory(pin_factory))
    device.off()
    device.close()


def choose_line(path: Optional[Path], *, state_dir: Optional[str] = None) -> tuple[RelayLine, list[str]]:
    """The line to release and the warnings to show: the daemon's record first, else the config's door section,
    else ConfigError (one line: what was looked at and why neither gives a line)."""
    cfg = read_config_door(path)
    dirs = state_dir_candidates(state_dir, cfg.state_dir)
    recorded, record_path, notes = find_line_record(dirs)
    if recorded is not None:
        if cfg.problem:
            notes.append(f"{cfg.problem}; releasing the line the daemon recorded in {record_path}")
        elif cfg.line is not None and (cfg.line.relay_pin, cfg.line.active_high) != (recorded.relay_pin,
                                                                                      recorded.active_high):
            notes.append(f"the config ({path or 'defaults'}) gives {cfg.line.describe()}, but the daemon last drove "
                         f"{recorded.describe()} ({record_path}): releasing {recorded.describe()}")
        return recorded, notes
    if cfg.line is not None:
        looked = ", ".join(str(d) for d in dirs)
        return cfg.line, [*notes, *cfg.notes, f"no relay line record ({LINE_RECORD_NAME} in {looked}): "
                                              "using the config's door section"]
    raise ConfigError(f"cannot tell which relay line to release: no record of the line the daemon drove "
                      f"({LINE_RECORD_NAME} in {', '.join(str(d) for d in dirs)}) and {cfg.problem} "
                      "(give it: edgeface door release --pin N --active-high|--active-low)")


@click.group("door")
def door_group() -> None:
    """Door relay utilities."""


@door_group.command("release")
@click.option("--pin", "pin", type=click.IntRange(0, MAX_BCM_PIN), default=None,
              help="Relay BCM pin (default: the line the daemon recorded, else door.relay_pin).")
@click.option("--active-high/--active-low", "active_high", default=None,
              help="Relay polarity (default: the recorded one, else door.active_high).")
@click.option("--pin-factory", "pin_factory", type=click.Choice(list(PIN_FACTORIES)), default=None,
              help="gpiozero pin factory (default: the recorded one, else door.pin_factory).")
@click.option("--state-dir", "state_dir", default=None, metavar="DIR",
              help="Where the daemon recorded its relay line (default: the config's state_dir, $STATE_DIRECTORY, "
                   f"{DEFAULT_STATE_DIR}).")
@click.pass_obj
def release_cmd(obj: Any, pin: Optional[int], active_high: Optional[bool], pin_factory: Optional[str],
                state_dir: Optional[str]) -> None:
    """Drive the relay line to its released level (systemd ExecStopPost; safe at any time).

    Releases the line the daemon recorded when it claimed it, else the config's door section; a config that is
    broken elsewhere still releases it. With --pin, that pin (polarity from the options, the record of the
    same pin, the config, or active high)."""
    path = obj.resolved_config_path() if obj is not None else None
    notes: list[str] = []
    if pin is None:
        line, notes = choose_line(path, state_dir=state_dir)
    else:
        try:
            line, _ = choose_line(path, state_dir=state_dir)
        except ConfigError:
            line = RelayLine(pin, DEFAULT_ACTIVE_HIGH)
        if line.relay_pin != pin:
            line = RelayLine(pin, DEFAULT_ACTIVE_HIGH, line.pin_factory, line.door_id)
    line = RelayLine(line.relay_pin, line.active_high if active_high is None else active_high,
                     pin_factory or line.pin_factory, line.door_id)
    release_relay(line.relay_pin, active_high=line.active_high, pin_factory=line.pin_factory)
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"door {line.door_id}: relay on pin {line.relay_pin} released "
               f"({'active high' if line.active_high else 'active low'})")
