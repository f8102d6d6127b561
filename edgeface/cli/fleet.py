"""`edgeface fleet ...`: the admin side of the shared access list (docs/fleet.md).

keygen makes the admin key pair (the private key stays on the admin host; doors get the .pub); enroll, disable,
enable, schedule and delete publish signed changes; heartbeat keeps the doors from going stale; status shows which doors
hold the broker's list and which are behind. Broker settings come from the config's `mqtt:` section.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Optional

import click

from edgeface.cli import CliContext, pass_ctx
from edgeface.errors import ConfigError

_KEY_OPTION = click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                           help="The fleet admin's private key (from `edgeface fleet keygen`); never put it on a door.")
_NODE_OPTION = click.option("--node", default=None, help="This admin's name in versions (tie-break between admins); "
                                                         "default: the host name.")


def _admin(obj: CliContext, key_path: Path, node: Optional[str]):
    from edgeface.fleet.admin import FleetAdmin
    from edgeface.fleet.signing import Signer

    signer = Signer.load(key_path)
    admin = FleetAdmin(obj.config.mqtt, signer, node=node or _host_node())
    try:
        admin.start()
    except OSError as exc:
        raise ConfigError(f"fleet: cannot reach the broker {obj.config.mqtt.host}:{obj.config.mqtt.port} "
                          f"({exc.strerror or exc})") from None
    admin.load()
    return admin


def _host_node() -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "admin"


@click.group("fleet")
def fleet_group() -> None:
    """One access list for many doors, synced through the MQTT broker."""


@fleet_group.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for fleet_admin.key (0600) and fleet_admin.pub.")
def keygen_cmd(out_dir: Path) -> None:
    """Make the fleet admin's Ed25519 key pair."""
    from edgeface.fleet.signing import generate_keypair

    kid = generate_keypair(out_dir / "fleet_admin.key", out_dir / "fleet_admin.pub")
    click.echo(f"key {kid}: {out_dir / 'fleet_admin.key'} (keep on the admin host), "
               f"{out_dir / 'fleet_admin.pub'} (copy to every door's fleet.public_key)")


@fleet_group.command("enroll")
@click.argument("name")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_KEY_OPTION
@_NODE_OPTION
@pass_ctx
def enroll_cmd(obj: CliContext, name: str, images: tuple[Path, ...], key_path: Path, node: Optional[str]) -> None:
    """Enroll NAME from IMAGES on every door (embedded here with the configured model)."""
    import numpy as np

    from edgeface.cli.people import make_analyzer
    from edgeface.enroll import enroll_images
    from edgeface.gallery import validate_name

    validate_name(name)
    analyzer = make_analyzer(obj.config)
    try:
        items = enroll_images(analyzer, list(images))
        model_id = str(analyzer.embedder.model_id)
    finally:
        analyzer.close()
    for item in items:
        if not item.accepted:
            click.echo(f"skipped {item.source}: {item.reason}", err=True)
    vecs = [i.embedding for i in items if i.accepted]
    if not vecs:
        raise ConfigError(f"fleet enroll {name!r}: no usable face in {len(images)} image(s); nothing published")
    admin = _admin(obj, key_path, node)
    try:
        change = admin.put(name, np.stack(vecs), model_id=model_id)
    finally:
        admin.close()
    click.echo(f"{name}: {len(vecs)} embedding(s) of {model_id}, person {change.person_key}, version {change.version}")


def _set(obj: CliContext, who: str, key_path: Path, node: Optional[str], enabled: Optional[bool]) -> None:
    admin = _admin(obj, key_path, node)
    try:
        change = admin.delete(who) if enabled is None else admin.set_enabled(who, enabled)
    finally:
        admin.close()
    what = "deleted" if enabled is None else "enabled" if enabled else "disabled"
    click.echo(f"{who}: {what} on every door, version {change.version}")


@fleet_group.command("disable")
@click.argument("who", metavar="NAME_OR_KEY")
@_KEY_OPTION
@_NODE_OPTION
@pass_ctx
def disable_cmd(obj: CliContext, who: str, key_path: Path, node: Optional[str]) -> None:
    """Revoke: every door refuses this person from the moment it hears the change."""
    _set(obj, who, key_path, node, False)


@fleet_group.command("enable")
@click.argument("who", metavar="NAME_OR_KEY")
@_KEY_OPTION
@_NODE_OPTION
@pass_ctx
def enable_cmd(obj: CliContext, who: str, key_path: Path, node: Optional[str]) -> None:
    """Let a disabled person in again."""
    _set(obj, who, key_path, node, True)


@fleet_group.command("delete")
@click.argument("who", metavar="NAME_OR_KEY")
@_KEY_OPTION
@_NODE_OPTION
@pass_ctx
def delete_cmd(obj: CliContext, who: str, key_path: Path, node: Optional[str]) -> None:
    """Erase a person from every door (a signed, retained tombstone)."""
    _set(obj, who, key_path, node, None)


@fleet_group.command("schedule")
@click.argument("who", metavar="NAME_OR_KEY")
@click.option("--days", default=None, help="Comma-separated days, e.g. mon,tue,wed,thu,fri (default: every day).")
@click.option("--window", "windows", multiple=True, metavar="HH:MM-HH:MM",
              help="Allowed time window (repeatable), in each door's policy.timezone; default all day.")
@click.option("--always", is_flag=True, help="Remove the schedule: the person may enter at any time.")
@_KEY_OPTION
@_NODE_OPTION
@pass_ctx
def schedule_cmd(obj: CliContext, who: str, days: Optional[str], windows: tuple[str, ...], always: bool,
                 key_path: Path, node: Optional[str]) -> None:
    """Set when a person may enter, on every door."""
    from edgeface.cli.people import schedule_from_options

    schedule = schedule_from_options(days, windows, always)
    admin = _admin(obj, key_path, node)
    try:
        change = admin.set_schedule(who, schedule)
    finally:
        admin.close()
    click.echo(f"{who}: schedule {json.dumps(change.schedule) if change.schedule else 'any time'} on every door, "
               f"version {change.version}")


@fleet_group.command("heartbeat")
@_KEY_OPTION
@_NODE_OPTION
@click.option("--every", type=click.FloatRange(0.5, 86400), default=None,
              help="Keep publishing every this many seconds (run as a service); default: once.")
@pass_ctx
def heartbeat_cmd(obj: CliContext, key_path: Path, node: Optional[str], every: Optional[float]) -> None:
    """Publish the signed heartbeat that keeps the doors from raising the staleness alarm."""
    admin = _admin(obj, key_path, node)
    try:
        while True:
            admin.heartbeat()
            if every is None:
                break
            time.sleep(every)
    finally:
        admin.close()
    click.echo("heartbeat published")


@fleet_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@pass_ctx
def status_cmd(obj: CliContext, as_json: bool) -> int:
    """The broker's list and each door's applied one: which doors are behind (exit 1 when any is)."""
    from edgeface.fleet.admin import FleetAdmin
    from edgeface.fleet.door import under_state_dir
    from edgeface.fleet.signing import Verifier

    cfg = obj.config
    pub = under_state_dir(cfg, cfg.fleet.public_key)
    verifier = Verifier.load(pub) if pub.is_file() else None
    admin = FleetAdmin(cfg.mqtt, None, node="status", verifier=verifier)
    try:
        admin.start()
    except OSError as exc:
        raise ConfigError(f"fleet: cannot reach the broker {cfg.mqtt.host}:{cfg.mqtt.port} "
                          f"({exc.strerror or exc})") from None
    admin.load()
    admin.close()
    rows = admin.status()
    people = [p for p in admin.people.values() if not p.deleted]
    if as_json:
        click.echo(json.dumps({"people": len(people), "disabled": sum(not p.enabled for p in people),
                               "digest": admin.expected_digest(), "doors": rows}, sort_keys=True))
    else:
        click.echo(f"broker: {len(people)} people ({sum(not p.enabled for p in people)} disabled), list "
                   f"{admin.expected_digest()}{'' if verifier else ' (signatures not checked: no fleet.public_key)'}")
        for r in rows:
            state = "in sync" if r["in_sync"] else "BEHIND"
            click.echo(f"{r['door_id']:<20} {state:<8} {r['people']} people, newest {r['max_version']}"
                       f"{', STALE' if r['stale'] else ''}{', rejected ' + str(r['rejected']) if r['rejected'] else ''}")
    if any(not r["in_sync"] for r in rows):
        return 1
    return 0


def register(group: click.Group) -> None:
    group.add_command(fleet_group)


__all__ = ["register"]
