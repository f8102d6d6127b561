"""Home Assistant MQTT discovery: one device-level config message for the door.

Published retained on `<ha_prefix>/device/<node_id>/config` (HA 2024.11+ device discovery), again on
every reconnect and whenever HA announces `online` on `<ha_prefix>/status`. The remote-unlock lock
entity exists ONLY when mqtt.remote_unlock is true; otherwise an empty retained config removes it.
"""
from __future__ import annotations

import json
from typing import Any

from . import __version__
from .config import EdgefaceConfig
from .mqtt import Topics

#: Keys HA requires per platform (a discovery message without them is rejected by HA).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "event": ("event_types", "state_topic"),
    "binary_sensor": ("state_topic",),
    "sensor": ("state_topic",),
    "lock": ("command_topic",),
    "button": ("command_topic",),
}


def node_id(cfg: EdgefaceConfig) -> str:
    return f"edgeface_{cfg.door.door_id}"


def discovery_topic(cfg: EdgefaceConfig) -> str:
    return f"{cfg.mqtt.ha_prefix}/device/{node_id(cfg)}/config"


def device_discovery(cfg: EdgefaceConfig) -> dict[str, Any]:
    """The device-level discovery payload (abbreviated keys as HA documents them: dev, o, cmps, p)."""
    t = Topics(cfg.mqtt.topic_prefix, cfg.door.door_id, cfg.mqtt.ha_prefix)
    nid = node_id(cfg)
    door = cfg.door.door_id
    cmps: dict[str, dict[str, Any]] = {
        f"{nid}_access": {
            "p": "event", "name": "Access", "unique_id": f"{nid}_access", "state_topic": t.event,
            "event_types": ["granted", "denied", "unknown"],
            "icon": "mdi:face-recognition",
        },
        f"{nid}_last_person": {
            "p": "sensor", "name": "Last person", "unique_id": f"{nid}_last_person", "state_topic": t.last_person,
            "icon": "mdi:account",
        },
        f"{nid}_camera": {
            "p": "sensor", "name": "Camera", "unique_id": f"{nid}_camera", "state_topic": t.camera,
            "device_class": "enum", "options": ["ok", "reconnecting", "frozen", "stopped"],
            "entity_category": "diagnostic", "icon": "mdi:cctv",
        },
        f"{nid}_relay": {
            "p": "binary_sensor", "name": "Relay", "unique_id": f"{nid}_relay", "state_topic": t.relay,
            "payload_on": "unlocked", "payload_off": "locked", "device_class": "lock",
        },
    }
    if cfg.door.contact_pin is not None:
        cmps[f"{nid}_door"] = {
            "p": "binary_sensor", "name": "Door", "unique_id": f"{nid}_door", "state_topic": t.contact,
            "payload_on": "open", "payload_off": "closed", "device_class": "door",
        }
    if cfg.mqtt.remote_unlock:
        cmps[f"{nid}_lock"] = {
            "p": "lock", "name": "Remote unlock", "unique_id": f"{nid}_lock", "command_topic": t.unlock_command,
            "state_topic": t.relay, "state_locked": "locked", "state_unlocked": "unlocked",
            # The command must be a signed JSON {nonce, ts, sig} (docs/mqtt.md); HA's plain
            # "UNLOCK" is refused and audited. Use a script that signs, e.g. `edgeface door sign-unlock`.
            "payload_unlock": "UNLOCK", "optimistic": False, "retain": False,
        }
    else:
        # Removes a lock left from an earlier config where remote unlock was on.
        cmps[f"{nid}_lock"] = {"p": "lock"}
    return {
        "dev": {"identifiers": [nid], "name": f"edgeface {door}", "manufacturer": "edgeface",
                "model": "face-recognition door", "sw_version": __version__},
        "o": {"name": "edgeface", "sw_version": __version__, "support_url": "https://github.com/edgeface/edgeface"},
        "availability": [{"topic": t.availability, "payload_available": "online", "payload_not_available": "offline"}],
        "qos": 1,
        "cmps": cmps,
    }


def discovery_messages(cfg: EdgefaceConfig) -> list[tuple[str, str]]:
    """(topic, payload) pairs to publish retained."""
    return [(discovery_topic(cfg), json.dumps(device_discovery(cfg), separators=(",", ":")))]


def validate_discovery(payload: dict[str, Any]) -> list[str]:
    """Problems HA would reject the payload for (empty = valid). Used by the tests and `edgeface run`."""
    problems = []
    dev = payload.get("dev") or payload.get("device")
    if not isinstance(dev, dict) or not (dev.get("identifiers") or dev.get("ids") or dev.get("connections")):
        problems.append("device: needs identifiers (or connections)")
    origin = payload.get("o") or payload.get("origin")
    if not isinstance(origin, dict) or not origin.get("name"):
        problems.append("origin: needs name")
    cmps = payload.get("cmps") or payload.get("components")
    if not isinstance(cmps, dict) or not cmps:
        problems.append("cmps: needs at least one component")
        return problems
    for key, comp in cmps.items():
        platform = comp.get("p") or comp.get("platform")
        if platform not in REQUIRED_KEYS:
            problems.append(f"{key}: unknown platform {platform!r}")
            continue
        if set(comp) <= {"p", "platform"}:
            continue  # a removal entry
        if "unique_id" not in comp and "uniq_id" not in comp:
            problems.append(f"{key}: device discovery components need unique_id")
        for req in REQUIRED_KEYS[platform]:
            if not comp.get(req):
                problems.append(f"{key} ({platform}): missing {req}")
        if platform == "event" and not (isinstance(comp.get("event_types"), list) and comp["event_types"]):
            problems.append(f"{key} (event): event_types must be a non-empty list")
    return problems
