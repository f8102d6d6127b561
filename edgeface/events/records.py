"""Event records published over MQTT and written to the audit log, with their JSON form.

Every event has a uuid4 `event_id` (subscribers de-duplicate on it: MQTT QoS 1 is at-least-once)
and an ISO-8601 timestamp with its zone.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from edgeface.types import Decision

#: Access results and the door events that are never dropped from a full outbox before `unknown`.
CRITICAL_KINDS = frozenset({"granted", "denied", "door_forced_open", "door_held_open", "remote_unlock"})
#: Every `event_type` of a door event (Home Assistant's Door event entity lists them all: an unlisted type is
#: dropped by HA with a warning).
DOOR_EVENT_TYPES = ("door_opened", "door_closed", "door_forced_open", "door_held_open", "remote_unlock",
                    "remote_unlock_refused", "remote_lock", "fleet_stale", "fleet_ok")


def new_event_id() -> str:
    return str(uuid.uuid4())


def iso_time(ts: float, tz: Optional[dt.tzinfo] = None) -> str:
    """ISO-8601 with the zone offset, milliseconds (local zone of the machine when tz is None)."""
    return dt.datetime.fromtimestamp(ts, tz or dt.datetime.now().astimezone().tzinfo).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AccessEvent:
    """One access decision: published on <prefix>/<door_id>/event (QoS 1, not retained)."""

    event_id: str
    timestamp: str
    door_id: str
    result: str  # granted | denied | unknown
    person_id: Optional[int]
    person_name: Optional[str]
    distance: Optional[float]
    score: Optional[float]  # 1 - distance/2 in [0, 1]: higher is more similar (for dashboards)
    threshold: Optional[float]
    model_id: str
    frames_used: int
    reason: str
    face_box: Optional[list[float]] = None
    kind: str = "access"

    @property
    def event_type(self) -> str:
        return self.result

    @classmethod
    def from_decision(cls, d: Decision, *, door_id: str, model_id: str, tz: Optional[dt.tzinfo] = None) -> "AccessEvent":
        if d.result is None:
            raise ValueError("a 'none' decision is not an event")
        dist = None if d.distance is None else round(float(d.distance), 4)
        return cls(event_id=new_event_id(), timestamp=iso_time(d.timestamp, tz), door_id=door_id, result=d.result,
                   person_id=d.person_id, person_name=d.person_name, distance=dist,
                   score=None if dist is None else round(max(0.0, 1.0 - dist / 2.0), 4),
                   threshold=None if d.threshold is None else round(float(d.threshold), 4), model_id=model_id,
                   frames_used=d.frames_used, reason=d.reason,
                   face_box=None if d.box is None else [round(float(v), 1) for v in d.box])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["event_type"] = self.result  # what Home Assistant's event entity reads
        return out


@dataclass(frozen=True)
class DoorEvent:
    """A door contact / relay / remote-command event: published on <prefix>/<door_id>/door_event."""

    event_id: str
    timestamp: str
    door_id: str
    event_type: str  # door_opened | door_closed | door_held_open | door_forced_open | remote_unlock | ...
    detail: dict[str, Any] = field(default_factory=dict)
    kind: str = "door"

    @classmethod
    def now(cls, door_id: str, event_type: str, detail: Optional[dict[str, Any]] = None, *, ts: float,
            tz: Optional[dt.tzinfo] = None) -> "DoorEvent":
        return cls(new_event_id(), iso_time(ts, tz), door_id, event_type, dict(detail or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_json(event: "AccessEvent | DoorEvent") -> str:
    return json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True)
