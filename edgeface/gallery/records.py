"""The gallery's records: a person and their access rule (name, enabled, schedule), enrollment inputs and reports,
and the face chips kept for re-embedding. Pure data and validation; the SQLite file is store.py's."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgeface.errors import GalleryError
from edgeface.types import Face

NAME_MAX = 64
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


@dataclass(frozen=True)
class Person:
    """One enrolled person as listed by `people()`; `schedule` is None (any time) or {"days", "windows"}."""

    id: int
    name: str
    external_id: Optional[str]
    enabled: bool
    schedule: Optional[dict]
    created: float
    updated: float
    n_embeddings: int
    #: Why this person's stored rule cannot be trusted (a schedule that cannot be read, a row that does not match its
    #: checksum: damaged, or edited outside edgeface), else None. Such a person is denied.
    rule_error: Optional[str] = None

    def as_dict(self) -> dict:
        d = {"id": self.id, "name": self.name, "external_id": self.external_id, "enabled": self.enabled,
             "schedule": self.schedule, "embeddings": self.n_embeddings,
             "created": _iso(self.created), "updated": _iso(self.updated)}
        if self.rule_error is not None:
            d["rule_error"] = self.rule_error
        return d


@dataclass(frozen=True)
class Chip:
    """A loose face region kept for re-embedding: an RGB image around the face and the face in its pixels.

    Loose (not the aligned crop) so a later model with another alignment template can still be fed."""

    image: np.ndarray = field(repr=False)
    face: Face


@dataclass(frozen=True)
class EnrollItem:
    """One enrollment input after the quality gate: accepted (embedding set, reason None) or rejected."""

    source: str
    image_sha256: str
    embedding: Optional[np.ndarray] = field(default=None, repr=False)
    quality: float = 0.0
    reason: Optional[str] = None
    chip: Optional[Chip] = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.reason is None and self.embedding is not None


@dataclass
class EnrollReport:
    """What one person's enrollment did: added sources, rejected (source, reason), skipped duplicates, warnings."""

    name: str
    person_id: int
    created: bool
    added: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "person_id": self.person_id, "created": self.created, "added": self.added,
                "rejected": [{"source": s, "reason": r} for s, r in self.rejected],
                "duplicates": self.duplicates, "warnings": self.warnings}


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def person_checksum(person_id: Any, name: Any, external_id: Any, enabled: Any, schedule: Any) -> Optional[str]:
    """sha256 over the fields of a people row that decide a grant, exactly as stored (id, name, external id, enabled,
    schedule text); None when a value has a type edgeface never stores (a damaged row). Like embedding_checksum it
    detects corruption and edits made outside edgeface, not someone who can rewrite the whole file."""
    if not (isinstance(person_id, int) and isinstance(name, str) and isinstance(enabled, int)
            and isinstance(external_id, (str, type(None))) and isinstance(schedule, (str, type(None)))):
        return None
    fields = json.dumps([person_id, name, external_id, enabled, schedule], ensure_ascii=False)
    return hashlib.sha256(b"people|" + fields.encode("utf-8", "surrogatepass")).hexdigest()


def validate_name(name: Any) -> str:
    """A display name: 1-64 printable characters, no control characters or path separators, no outer spaces."""
    if not isinstance(name, str):
        raise GalleryError(f"invalid person name {name!r}: expected a string")
    shown = repr(name)
    if not name or len(name) > NAME_MAX:
        raise GalleryError(f"invalid person name {shown}: expected 1-{NAME_MAX} characters, got {len(name)}")
    if name != name.strip():
        raise GalleryError(f"invalid person name {shown}: leading or trailing whitespace")
    for ch in name:
        if ch in "/\\" or ch == "\x00":
            raise GalleryError(f"invalid person name {shown}: path separators are not allowed")
        if unicodedata.category(ch)[0] in ("C", "Z") and ch != " ":
            raise GalleryError(f"invalid person name {shown}: control or non-printable character U+{ord(ch):04X}")
    if name in (".", ".."):
        raise GalleryError(f"invalid person name {shown}")
    return unicodedata.normalize("NFC", name)


@dataclass(frozen=True)
class Schedule:
    """When a person may enter: on `days`, inside any of the [start, end) `windows` ("HH:MM", local time of
    policy.timezone). The one schedule model: the gallery validates and stores it, the policy asks `allows`."""

    days: tuple[str, ...]
    windows: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, spec: Any) -> Optional["Schedule"]:
        """None (any time), a Schedule, or the stored form {"days": ["mon", ...], "windows": [["08:00", "18:00"]]}
        (a dict or its JSON text); GalleryError naming the bad value otherwise."""
        if spec is None or isinstance(spec, Schedule):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise GalleryError(f"invalid schedule {spec!r}: not JSON ({exc.msg})") from None
        if not isinstance(spec, dict) or set(spec) - {"days", "windows"}:
            raise GalleryError(f"invalid schedule {spec!r}: expected {{'days': [...], 'windows': [[start, end]]}}")
        days = spec.get("days", list(WEEKDAYS))
        if not isinstance(days, list) or not days or any(d not in WEEKDAYS for d in days):
            raise GalleryError(f"invalid schedule days {days!r}: expected a non-empty list of {', '.join(WEEKDAYS)}")
        windows = spec.get("windows", [["00:00", "24:00"]])
        if not isinstance(windows, list) or not windows:
            raise GalleryError(f"invalid schedule windows {windows!r}: expected a list of [\"HH:MM\", \"HH:MM\"]")
        for w in windows:
            if (not isinstance(w, (list, tuple)) or len(w) != 2 or not all(isinstance(t, str) and _TIME_RE.match(t)
                                                                            for t in w) or w[0] >= w[1]):
                raise GalleryError(f"invalid schedule window {w!r}: expected [\"HH:MM\", \"HH:MM\"] with start < end")
        return cls(tuple(d for d in WEEKDAYS if d in days), tuple((w[0], w[1]) for w in windows))

    def allows(self, local: _dt.datetime) -> bool:
        """True if `local` (already in the schedule's time zone) is on one of the days, inside one of the windows."""
        if WEEKDAYS[local.weekday()] not in self.days:
            return False
        hm = f"{local.hour:02d}:{local.minute:02d}"  # "HH:MM" strings order like times; "24:00" ends the day
        return any(start <= hm < end for start, end in self.windows)

    def as_dict(self) -> dict:
        """The stored (and exported) form."""
        return {"days": list(self.days), "windows": [list(w) for w in self.windows]}


def validate_schedule(schedule: Any) -> Optional[dict]:
    """A schedule in its stored form, checked (see Schedule.parse); None means any time."""
    parsed = Schedule.parse(schedule)
    return parsed.as_dict() if parsed is not None else None


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise GalleryError("cannot encode a face chip as PNG")
    return buf.tobytes()


def _decode_png(data: bytes) -> np.ndarray:
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise GalleryError("a kept face chip cannot be decoded (corrupt gallery?)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _face_json(face: Face) -> str:
    d = {"box": [float(v) for v in face.box], "score": float(face.score),
         "keypoints": np.asarray(face.keypoints, float).round(3).tolist()}
    if face.landmarks5 is not None:
        d["landmarks5"] = np.asarray(face.landmarks5, float).round(3).tolist()
    return json.dumps(d)


def _face_from_json(text: str) -> Face:
    d = json.loads(text)
    lm = d.get("landmarks5")
    return Face(tuple(d["box"]), float(d["score"]), np.asarray(d["keypoints"], np.float32),
                landmarks5=None if lm is None else np.asarray(lm, np.float32))



def image_sha256(data: bytes | np.ndarray) -> str:
    """sha256 of an image file's bytes (or of a frame's pixels) used to skip duplicate enrollments."""
    if isinstance(data, np.ndarray):
        h = hashlib.sha256(str(data.shape).encode())
        h.update(np.ascontiguousarray(data).tobytes())
        return h.hexdigest()
    return hashlib.sha256(data).hexdigest()
