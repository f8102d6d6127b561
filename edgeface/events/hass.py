"""Home Assistant MQTT discovery: one device-level config message for the door.

Published retained on `<ha_prefix>/device/<node_id>/config` (HA 2024.11+ device discovery), again on
every reconnect and whenever HA announces `online` on `<ha_prefix>/status`. `node_id` (and so every
unique_id) contains the topic prefix, so two daemons with one door_id do not clash. Every component
carries `qos: 1` (HA ignores a device-level qos). A component that is not wanted (no contact pin,
remote unlock off, access switch off) gets an empty entry, which removes one left from an earlier
config; `mqtt.ha_discovery: false` publishes an empty retained config, which removes the whole device.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Sequence

from edgeface import __version__
from edgeface.config import EdgefaceConfig
from edgeface.events.records import DOOR_EVENT_TYPES
from edgeface.events.mqtt import Topics
from edgeface.events.totp import HA_CODE_FORMAT, HA_COMMAND_TEMPLATE

#: Keys HA requires per platform (a discovery message without them is rejected by HA).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "event": ("event_types", "state_topic"),
    "binary_sensor": ("state_topic",),
    "sensor": ("state_topic",),
    "lock": ("command_topic",),
    "button": ("command_topic",),
    "switch": ("command_topic",),
    "image": ("image_topic",),
}
QOS = 1


def node_id(cfg: EdgefaceConfig) -> str:
    """`<prefix>_<door>` (`edgeface_front` by default); a prefix with characters HA does not allow in a node id
    (e.g. `/`) is cleaned and gets a short hash, so `a/b` and `a_b` stay apart."""
    prefix = cfg.mqtt.topic_prefix
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)
    if clean != prefix:
        clean += "_" + hashlib.sha1(prefix.encode()).hexdigest()[:6]
    return f"{clean}_{cfg.door.door_id}"


def discovery_topic(cfg: EdgefaceConfig) -> str:
    return f"{cfg.mqtt.ha_prefix}/device/{node_id(cfg)}/config"


def device_discovery(cfg: EdgefaceConfig, *, people: Sequence[tuple[int, str]] = (),
                     removed_people: Sequence[int] = ()) -> dict[str, Any]:
    """The device-level discovery payload (abbreviated keys as HA documents them: dev, o, cmps, p). `people`
    ((id, name) of the enrolled) get a presence sensor each when mqtt.ha_presence is on; `removed_people` ids (and
    everyone when it is off) get removal entries."""
    t = Topics(cfg.mqtt.topic_prefix, cfg.door.door_id, cfg.mqtt.ha_prefix)
    nid = node_id(cfg)
    door = cfg.door.door_id

    def comp(key: str, platform: str, name: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return f"{nid}_{key}", {"p": platform, "name": name, "unique_id": f"{nid}_{key}", "qos": QOS, **fields}

    def removed(key: str, platform: str) -> tuple[str, dict[str, Any]]:
        return f"{nid}_{key}", {"p": platform}

    cmps = dict([
        comp("access", "event", "Access", state_topic=t.event, event_types=["granted", "denied", "unknown"],
             icon="mdi:face-recognition"),
        comp("door_event", "event", "Door event", state_topic=t.door_event, event_types=list(DOOR_EVENT_TYPES),
             icon="mdi:door-closed-lock"),
        # state and attributes from ONE retained JSON message: one state change per decision
        comp("last_person", "sensor", "Last person", state_topic=t.last_decision,
             value_template="{{ value_json.name }}", json_attributes_topic=t.last_decision, icon="mdi:account"),
        comp("people", "sensor", "People", state_topic=t.gallery, value_template="{{ value_json.people }}",
             unit_of_measurement="people", state_class="measurement", entity_category="diagnostic",
             icon="mdi:account-group"),
        comp("people_enabled", "sensor", "People enabled", state_topic=t.gallery,
             value_template="{{ value_json.enabled }}", unit_of_measurement="people", state_class="measurement",
             entity_category="diagnostic", icon="mdi:account-check"),
        comp("camera", "sensor", "Camera", state_topic=t.camera, device_class="enum",
             options=["ok", "reconnecting", "frozen", "stopped"], entity_category="diagnostic", icon="mdi:cctv"),
        comp("outbox", "sensor", "Outbox", state_topic=t.outbox, value_template="{{ value_json.waiting }}",
             json_attributes_topic=t.outbox, unit_of_measurement="events", state_class="measurement",
             entity_category="diagnostic", icon="mdi:tray-full"),
        comp("relay", "binary_sensor", "Relay", state_topic=t.relay, payload_on="unlocked", payload_off="locked",
             device_class="lock"),
    ])
    key, value = (comp("door", "binary_sensor", "Door", state_topic=t.contact, payload_on="open",
                       payload_off="closed", device_class="door")
                  if cfg.door.contact_pin is not None else removed("door", "binary_sensor"))
    cmps[key] = value
    if cfg.mqtt.remote_unlock and cfg.mqtt.remote_unlock_totp:
        # HA asks for the code (code_format) and sends it in the command; edgeface checks it as a one-time
        # TOTP code (edgeface.events.totp). LOCK ends an unlock pulse. The state is the relay itself.
        key, value = comp("lock", "lock", "Remote unlock", command_topic=t.unlock_command,
                          command_template=HA_COMMAND_TEMPLATE, code_format=HA_CODE_FORMAT,
                          payload_lock="LOCK", payload_unlock="UNLOCK", state_topic=t.relay,
                          state_locked="locked", state_unlocked="unlocked", optimistic=False, retain=False)
    else:
        # No lock HA could use (remote unlock off, or signed commands only, which HA cannot make).
        key, value = removed("lock", "lock")
    cmps[key] = value
    if cfg.mqtt.remote_unlock:
        # a refused unlock leaves HA's lock locked with no word why: this sensor says it (docs/mqtt.md)
        for key, value in (
            comp("unlock_refused", "sensor", "Last refused unlock", state_topic=t.unlock_refusal,
                 value_template="{{ value_json.reason }}", json_attributes_topic=t.unlock_refusal,
                 entity_category="diagnostic", icon="mdi:lock-alert"),
            comp("unlock_locked_out_until", "sensor", "Unlock codes locked out until", state_topic=t.unlock_refusal,
                 value_template="{{ value_json.locked_out_until or 'None' }}", device_class="timestamp",
                 entity_category="diagnostic", icon="mdi:lock-clock")):
            cmps[key] = value
    else:
        for key, value in (removed("unlock_refused", "sensor"), removed("unlock_locked_out_until", "sensor")):
            cmps[key] = value
    key, value = (comp("doorbell", "event", "Doorbell", state_topic=t.doorbell, event_types=["ring"],
                       device_class="doorbell", icon="mdi:doorbell")
                  if cfg.mqtt.ha_doorbell else removed("doorbell", "event"))
    cmps[key] = value
    key, value = (comp("face_image", "image", "Last face", image_topic=t.face_image, content_type="image/jpeg")
                  if cfg.mqtt.ha_face_image else removed("face_image", "image"))
    cmps[key] = value
    for pid, pname in people:
        key, value = (comp(f"presence_{pid}", "sensor", f"{pname} arrived", state_topic=t.presence(pid),
                           device_class="timestamp", icon="mdi:account-arrow-right")
                      if cfg.mqtt.ha_presence else removed(f"presence_{pid}", "sensor"))
        cmps[key] = value
    for pid in removed_people:
        key, value = removed(f"presence_{pid}", "sensor")
        cmps[key] = value
    if cfg.mqtt.access_switch:
        key, value = comp("access_enabled", "switch", "Access enabled", command_topic=t.access_command,
                          state_topic=t.access, payload_on="ON", payload_off="OFF", optimistic=False,
                          retain=False, entity_category="config", icon="mdi:shield-account")
    else:
        key, value = removed("access_enabled", "switch")
    cmps[key] = value
    if cfg.fleet.enabled:  # the fleet's staleness alarm (edgeface.fleet.door)
        key, value = comp("fleet_stale", "binary_sensor", "Fleet stale",
                          state_topic=f"{cfg.mqtt.topic_prefix}/{door}/fleet_stale", payload_on="ON",
                          payload_off="OFF", device_class="problem", entity_category="diagnostic",
                          icon="mdi:account-sync")
    else:
        key, value = removed("fleet_stale", "binary_sensor")
    cmps[key] = value
    name = f"edgeface {door}" if cfg.mqtt.topic_prefix == "edgeface" else f"edgeface {door} ({cfg.mqtt.topic_prefix})"
    return {
        "dev": {"identifiers": [nid], "name": name, "manufacturer": "edgeface",
                "model": "face-recognition door", "sw_version": __version__,
                **({"cu": cfg.mqtt.configuration_url} if cfg.mqtt.configuration_url else {})},
        "o": {"name": "edgeface", "sw_version": __version__, "support_url": "https://github.com/edgeface/edgeface"},
        "availability": [{"topic": t.availability, "payload_available": "online", "payload_not_available": "offline"}],
        "qos": QOS,
        "cmps": cmps,
    }


def discovery_messages(cfg: EdgefaceConfig, *, people: Sequence[tuple[int, str]] = (),
                       removed_people: Sequence[int] = ()) -> list[tuple[str, str]]:
    """(topic, payload) pairs to publish retained; with ha_discovery off, the empty payload that removes the
    device (and clears the retained config on the broker)."""
    if not cfg.mqtt.ha_discovery:
        return [(discovery_topic(cfg), "")]
    payload = device_discovery(cfg, people=people, removed_people=removed_people)
    return [(discovery_topic(cfg), json.dumps(payload, separators=(",", ":")))]


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
        if comp.get("qos") not in (0, 1, 2):
            problems.append(f"{key}: needs qos (HA ignores a device-level qos and subscribes with 0)")
        for req in REQUIRED_KEYS[platform]:
            if not comp.get(req):
                problems.append(f"{key} ({platform}): missing {req}")
        if platform == "event" and not (isinstance(comp.get("event_types"), list) and comp["event_types"]):
            problems.append(f"{key} (event): event_types must be a non-empty list")
    return problems
