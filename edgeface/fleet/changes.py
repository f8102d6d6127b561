"""What travels on the broker: signed person changes, signed heartbeats, door reports, and their topics."""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgeface.fleet.hlc import HLC

PERSON_KIND = "person"
HEARTBEAT_KIND = "heartbeat"
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Rejected(ValueError):
    """A message a door refuses (unsigned, another key, malformed, replayed, older): the reason is the text."""


def valid_person_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise Rejected(f"person key {key!r}: expected 1-64 letters, digits, '_' or '-'")
    return key


class Topics:
    """`<prefix>/fleet/...`: people/<key> (retained signed change), heartbeat (retained signed), doors/<id>/applied
    (retained door report)."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}/fleet"
        self.people = f"{self.base}/people/+"
        self.heartbeat = f"{self.base}/heartbeat"
        self.doors = f"{self.base}/doors/+/applied"

    def person(self, key: str) -> str:
        return f"{self.base}/people/{key}"

    def applied(self, door_id: str) -> str:
        return f"{self.base}/doors/{door_id}/applied"

    def person_key(self, topic: str) -> Optional[str]:
        head = f"{self.base}/people/"
        return topic[len(head):] if topic.startswith(head) and "/" not in topic[len(head):] else None

    def door_id(self, topic: str) -> Optional[str]:
        parts = topic[len(self.base) + 1:].split("/")
        return parts[1] if len(parts) == 3 and parts[0] == "doors" and parts[2] == "applied" else None


@dataclass(frozen=True)
class PersonChange:
    """One person's whole record at one version; `deleted` makes it a tombstone (no name, no embeddings)."""

    person_key: str
    version: HLC
    name: str = ""
    enabled: bool = True
    schedule: Optional[dict] = None
    model_id: str = ""
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False, compare=False)
    deleted: bool = False

    def body(self) -> dict[str, Any]:
        if self.deleted:
            return {"person_key": self.person_key, "version": str(self.version), "deleted": True}
        vecs = np.ascontiguousarray(self.embeddings, dtype="<f4")
        return {"person_key": self.person_key, "version": str(self.version), "deleted": False, "name": self.name,
                "enabled": bool(self.enabled), "schedule": self.schedule, "model_id": self.model_id,
                "dim": int(vecs.shape[1]) if vecs.ndim == 2 and vecs.size else 0,
                "embeddings": base64.b64encode(vecs.tobytes()).decode()}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "PersonChange":
        """Parse a verified body; Rejected names the field that is wrong."""
        key = valid_person_key(body.get("person_key"))
        try:
            version = HLC.parse(body.get("version"))
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        if body.get("deleted") is True:
            return cls(key, version, deleted=True)
        name, model_id, dim = body.get("name"), body.get("model_id"), body.get("dim")
        if not isinstance(name, str) or not name:
            raise Rejected(f"person {key}: name {name!r} is not a non-empty string")
        if not isinstance(body.get("enabled"), bool):
            raise Rejected(f"person {key}: enabled {body.get('enabled')!r} is not true/false")
        if not isinstance(model_id, str) or not isinstance(dim, int) or not 0 <= dim <= 4096:
            raise Rejected(f"person {key}: model_id/dim {model_id!r}/{dim!r} are not a model name and a dimension")
        schedule = body.get("schedule")
        if schedule is not None and not isinstance(schedule, dict):
            raise Rejected(f"person {key}: schedule {schedule!r} is not an object or null")
        try:
            raw = base64.b64decode(body.get("embeddings") or "", validate=True)
        except (ValueError, TypeError):
            raise Rejected(f"person {key}: embeddings are not base64") from None
        if dim == 0 and raw or dim and len(raw) % (4 * dim):
            raise Rejected(f"person {key}: {len(raw)} embedding bytes are not whole {dim}-D float32 vectors")
        vecs = np.frombuffer(raw, "<f4").reshape(-1, dim) if dim else np.zeros((0, 0), np.float32)
        if vecs.size and not np.isfinite(vecs).all():
            raise Rejected(f"person {key}: embeddings hold NaN or infinity")
        return cls(key, version, name, body["enabled"], schedule, model_id, vecs.astype(np.float32), False)

    def image_hashes(self) -> list[str]:
        """Stable per-vector ids for the gallery's (model, image) uniqueness: a hash of person key and vector."""
        return [hashlib.sha256(self.person_key.encode() + b"|" + v.astype("<f4").tobytes()).hexdigest()
                for v in self.embeddings]


@dataclass(frozen=True)
class Heartbeat:
    """The admin's periodic signed 'the fleet is alive' (retained, so a door that reconnects hears it at once)."""

    version: HLC
    people: int = 0

    def body(self) -> dict[str, Any]:
        return {"version": str(self.version), "people": int(self.people)}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Heartbeat":
        try:
            return cls(HLC.parse(body.get("version")), int(body.get("people", 0)))
        except (ValueError, TypeError) as exc:
            raise Rejected(f"heartbeat: {exc}") from None


def digest(versions: dict[str, str]) -> str:
    """One hash of a whole access list (person key -> version): equal on two doors = they hold the same list."""
    h = hashlib.sha256()
    for key in sorted(versions):
        h.update(f"{key}={versions[key]}\n".encode())
    return h.hexdigest()[:16]
