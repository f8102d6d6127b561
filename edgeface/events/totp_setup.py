"""What `edgeface door totp-init` needs from the config, read so that nothing else in it can stop it.

The command needs two things: the door id (the account name in the authenticator app) and where the secret goes.
It used to write the secret and then load the whole config, so an unrelated error (a bad time zone, a typo in
another section) ended it after the file was written and before the URI was printed. Now every input is
checked first: the door id alone against the config's rule for it, the output file's folder and an existing
secret; only then is the secret written and the URI printed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgeface.errors import ConfigError


@dataclass(frozen=True)
class TotpInitPlan:
    door_id: str
    secret_env: str
    out: Path
    note: Optional[str] = None  # why the config was read leniently, when it was


def _lenient(path: Optional[Path]) -> tuple[dict[str, Any], dict[str, Any], None]:
    """(door section, mqtt section, None) from a config file that may be invalid elsewhere."""
    if path is None or not Path(path).is_file():
        return {}, {}, None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the door id from it ({type(exc).__name__}); give --door-id") from None
    if not isinstance(data, dict):
        return {}, {}, None
    door, mqtt = data.get("door"), data.get("mqtt")
    return (door if isinstance(door, dict) else {}), (mqtt if isinstance(mqtt, dict) else {}), None


def plan_totp_init(config_path: Optional[Path], *, door_id: Optional[str], out: Path, force: bool) -> TotpInitPlan:
    """Every check before anything is written; raises ConfigError (one line) when the command cannot succeed."""
    from pydantic import ValidationError

    from edgeface.config import DoorConfig, MqttConfig, load_config

    note = None
    try:
        cfg = load_config(config_path)
        door_cfg, mqtt_cfg = cfg.door.model_dump(), cfg.mqtt.model_dump()
    except ConfigError as exc:
        try:
            door_cfg, mqtt_cfg, _ = _lenient(config_path)
        except ConfigError:
            if door_id is None:
                raise
            door_cfg, mqtt_cfg = {}, {}
        note = f"the config has other problems (fix them before `edgeface run`): {str(exc).splitlines()[0]}"
    chosen = door_id if door_id is not None else door_cfg.get("door_id", DoorConfig().door_id)
    try:
        chosen = DoorConfig(door_id=chosen).door_id
    except ValidationError as exc:
        where = "--door-id" if door_id is not None else f"{config_path}: door.door_id"
        raise ConfigError(f"{where} = {chosen!r}: {exc.errors()[0]['msg']}") from None
    env = mqtt_cfg.get("totp_secret_env", MqttConfig().totp_secret_env)
    try:
        env = MqttConfig(totp_secret_env=env).totp_secret_env
    except ValidationError:
        env = MqttConfig().totp_secret_env
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the secret file's path")
    if out.exists() and out.stat().st_size > 0 and not force:
        raise ConfigError(f"{out} already exists (use --force to replace it, or `edgeface door totp-uri`)")
    folder = out.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing} (run as the owner of it, e.g. with sudo)")
    return TotpInitPlan(chosen, str(env), out, note)
