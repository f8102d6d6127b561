"""The access list: people and their face embeddings in one SQLite file, and the in-memory 1:N index over it.

Why SQLite: one file, transactions (an enrollment is all-or-nothing), WAL so the CLI can edit the gallery
while the daemon reads it, and `PRAGMA data_version` so the daemon notices another process's commit with
one cheap query per match and reloads its index (no restart after `edgeface people disable bob`).

Embeddings are only ever compared with embeddings of the same model: the gallery records its model id and
refuses to open with another one (re-enroll, or `reembed` from kept face chips when keep_crops is on).

Portable export format (see docs/gallery.md): one UTF-8 JSON document, vectors as base64 little-endian float32.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.errors import GalleryError, NoFaceError
from edgeface.types import Face, Match
from edgeface.security import SQLITE_SUFFIXES, write_private_atomic

#: PRAGMA application_id of an edgeface gallery ("EDGF"): tells our file from any other SQLite database.
APPLICATION_ID = 0x45444746
#: Current schema; a file with a higher user_version was written by a newer edgeface.
SCHEMA_VERSION = 2
#: A stored vector is unit length; float32 rounding stays far below this. A larger error means damage.
NORM_TOLERANCE = 1e-3
#: Used only when neither the config nor the model's manifest entry gives a threshold (see docs/gallery.md).
FALLBACK_MAX_DISTANCE = 0.40
#: Largest cosine distance (opposite vectors): reported when the gallery is empty.
MAX_COSINE_DISTANCE = 2.0
#: Export file format tag and version.
EXPORT_FORMAT = "edgeface-gallery"
EXPORT_VERSION = 1
NAME_MAX = 64

# Each entry migrates user_version i -> i + 1. Never edit a released entry; append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE people (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        external_id TEXT UNIQUE,
        enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        schedule TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE embeddings (
        id INTEGER PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
        model_id TEXT NOT NULL,
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL,
        image_sha256 TEXT NOT NULL,
        quality REAL NOT NULL,
        created REAL NOT NULL,
        UNIQUE (model_id, image_sha256)
    );
    CREATE INDEX embeddings_person ON embeddings(person_id);
    CREATE TABLE crops (
        embedding_id INTEGER PRIMARY KEY REFERENCES embeddings(id) ON DELETE CASCADE,
        image BLOB NOT NULL,
        face TEXT NOT NULL
    );
    """,
    # 1 -> 2: a sha256 per embedding (see embedding_checksum); Gallery._migrate fills it for existing rows once,
    # after checking each stored vector (finite, unit length, dimension).
    """
    ALTER TABLE embeddings ADD COLUMN checksum TEXT;
    """,
]

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


# ----------------------------------------------------------------------------------------------- records


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
    #: Why the stored schedule cannot be read (damaged or hand-edited row), else None. Such a person is denied.
    schedule_error: Optional[str] = None

    def as_dict(self) -> dict:
        d = {"id": self.id, "name": self.name, "external_id": self.external_id, "enabled": self.enabled,
             "schedule": self.schedule, "embeddings": self.n_embeddings,
             "created": _iso(self.created), "updated": _iso(self.updated)}
        if self.schedule_error is not None:
            d["schedule_error"] = self.schedule_error
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


# ----------------------------------------------------------------------------------------------- helpers


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


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


def validate_schedule(schedule: Any) -> Optional[dict]:
    """Access schedule: None (always) or {"days": ["mon", ...], "windows": [["08:00", "18:00"], ...]} (local time)."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        try:
            schedule = json.loads(schedule)
        except json.JSONDecodeError as exc:
            raise GalleryError(f"invalid schedule {schedule!r}: not JSON ({exc.msg})") from None
    if not isinstance(schedule, dict) or set(schedule) - {"days", "windows"}:
        raise GalleryError(f"invalid schedule {schedule!r}: expected {{'days': [...], 'windows': [[start, end]]}}")
    days = schedule.get("days", list(_WEEKDAYS))
    if not isinstance(days, list) or not days or any(d not in _WEEKDAYS for d in days):
        raise GalleryError(f"invalid schedule days {days!r}: expected a non-empty list of {', '.join(_WEEKDAYS)}")
    windows = schedule.get("windows", [["00:00", "24:00"]])
    if not isinstance(windows, list) or not windows:
        raise GalleryError(f"invalid schedule windows {windows!r}: expected a list of [\"HH:MM\", \"HH:MM\"]")
    for w in windows:
        if (not isinstance(w, (list, tuple)) or len(w) != 2 or not all(isinstance(t, str) and _TIME_RE.match(t)
                                                                        for t in w) or w[0] >= w[1]):
            raise GalleryError(f"invalid schedule window {w!r}: expected [\"HH:MM\", \"HH:MM\"] with start < end")
    return {"days": [d for d in _WEEKDAYS if d in days], "windows": [list(w) for w in windows]}


def schedule_allows(schedule: Optional[dict], when: _dt.datetime) -> bool:
    """True if `when` (already in the schedule's local time zone) is inside the schedule; None allows always."""
    if schedule is None:
        return True
    if _WEEKDAYS[when.weekday()] not in schedule["days"]:
        return False
    hm = f"{when.hour:02d}:{when.minute:02d}"
    return any(start <= hm < end for start, end in schedule["windows"])


def default_max_distance(model: str, models_dir: Optional[str | os.PathLike[str]] = None,
                         match_mode: Optional[str] = None) -> float:
    """The embedder's calibrated threshold: manifest "default_max_distance_by_mode"[match_mode] (per-person scores
    differ by match mode, so each has its own operating point), else "default_max_distance", else
    FALLBACK_MAX_DISTANCE."""
    from edgeface.models import MANIFEST_NAME, default_models_dir, load_manifest

    mdir = Path(models_dir) if models_dir else default_models_dir()
    if not (mdir / MANIFEST_NAME).is_file():
        return FALLBACK_MAX_DISTANCE
    manifest = load_manifest(mdir)
    key = str(model)
    info = manifest.get(key) or next((m for m in manifest.values() if m.file == Path(key).name), None)
    value = info.extra.get("default_max_distance") if info is not None else None
    by_mode = info.extra.get("default_max_distance_by_mode") if info is not None else None
    if match_mode and isinstance(by_mode, dict) and match_mode in by_mode:
        value = by_mode[match_mode]
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 2 else FALLBACK_MAX_DISTANCE


def resolve_max_distance(gallery_cfg: Any, embedder_cfg: Any, models_dir: Optional[str] = None) -> float:
    """gallery.max_distance when set, else the embedder model's manifest default."""
    if getattr(gallery_cfg, "max_distance", None) is not None:
        return float(gallery_cfg.max_distance)
    if getattr(embedder_cfg, "head", None):  # a head has its own distance scale, calibrated when it was trained
        from edgeface.vision.head import head_threshold
        value = head_threshold(embedder_cfg.head, models_dir)
        return float(value) if value is not None else FALLBACK_MAX_DISTANCE
    return default_max_distance(embedder_cfg.model, models_dir, getattr(gallery_cfg, "match_mode", None))


def _unit(vec: Any, dim: int, what: str = "embedding") -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise GalleryError(f"{what} has {v.shape[0]} values, the gallery stores {dim}-D embeddings")
    if not np.isfinite(v).all():
        raise GalleryError(f"{what} has NaN or infinite values")
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise GalleryError(f"{what} is all zeros")
    if abs(n - 1.0) < 1e-5:
        return v  # already unit: keep the exact bits (export -> import round-trips bit for bit)
    return (v / n).astype(np.float32)


def embedding_checksum(person_id: int, model_id: str, blob: bytes) -> str:
    """sha256 over the owner, the model and the vector bytes: a damaged byte (or a row moved to another person)
    no longer matches. Protects against corruption, not against someone who can rewrite the file."""
    h = hashlib.sha256(f"{int(person_id)}|{model_id}|".encode())
    h.update(blob)
    return h.hexdigest()


def vector_problem(blob: Any, dim: int) -> Optional[str]:
    """Why a stored vector cannot be used (None if it can): wrong size, NaN/inf values, not unit length."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) != 4 * dim:
        size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else type(blob).__name__
        return f"{size} bytes, expected {4 * dim} ({dim} float32 values)"
    v = np.frombuffer(blob, dtype="<f4")
    if not np.isfinite(v).all():
        return "NaN or infinite values"
    n = float(np.linalg.norm(v.astype(np.float64)))
    if abs(n - 1.0) > NORM_TOLERANCE:
        return f"not unit length (norm {n:.6g})"
    return None


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



# ----------------------------------------------------------------------------------------------- index


#: Per-person scores: nearest enrolled embedding, mean of the k nearest, the person's mean template, or a blend of
#: the last and the first.
MATCH_MODES = ("best", "topk_mean", "centroid", "blend")
#: blend = this x the centroid distance + the rest x the nearest-embedding distance. The centroid is robust to one odd
#: enrollment photo; the nearest term rewards a face that closely matches one particular photo (glasses, beard).
#: 0.75 was chosen on the open-set tuning half (0.25 / 0.5 / 0.75 tried over four seeds of galleries; docs/gallery.md).
BLEND_CENTROID_WEIGHT = 0.75


def blend_distances(centroid: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """The blend match mode's per-person distance from the centroid and the nearest-embedding distances."""
    return BLEND_CENTROID_WEIGHT * centroid + (1.0 - BLEND_CENTROID_WEIGHT) * nearest


class _Index:
    """All enabled people's embeddings as one (M, D) matrix, rows grouped by person (for reduceat)."""

    def __init__(self, vectors: np.ndarray, owners: np.ndarray, ids: list[int], names: list[str]) -> None:
        self.vectors = vectors            # (M, D) float32 unit rows, sorted by owner
        self.owners = owners              # (M,) int: index into ids/names
        self.ids = ids
        self.names = names
        self.starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if len(owners) else np.zeros(0, int)
        self.counts = np.diff(np.r_[self.starts, len(owners)]) if len(owners) else np.zeros(0, int)
        self._padded: Optional[np.ndarray] = None
        self._centroids: Optional[np.ndarray] = None

    def padded(self) -> np.ndarray:
        """(P, max rows per person) row numbers padded with M (an +inf distance); built on first top-k use."""
        if self._padded is None:
            width = int(self.counts.max()) if len(self.counts) else 0
            cols = np.arange(width)
            self._padded = np.where(cols[None, :] < self.counts[:, None], self.starts[:, None] + cols[None, :],
                                    len(self.owners))
        return self._padded

    def centroids(self) -> np.ndarray:
        """(P, D) one unit template per person: the normalised mean of their embeddings; built on first use."""
        if self._centroids is None:
            sums = np.add.reduceat(self.vectors, self.starts, axis=0) if len(self.owners) else self.vectors[:0]
            self._centroids = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return self._centroids

    def person_distances(self, q: np.ndarray, mode: str, k: int) -> np.ndarray:
        """Per-person distance of query q: best (min), mean of the k best embeddings, to the person's centroid, or
        the blend of centroid and best."""
        if mode == "centroid":
            return _no_nan(1.0 - self.centroids() @ q)
        d = 1.0 - self.vectors @ q
        if mode == "blend":
            return blend_distances(_no_nan(1.0 - self.centroids() @ q), _no_nan(np.minimum.reduceat(d, self.starts)))
        if mode == "best" or k == 1:
            return _no_nan(np.minimum.reduceat(d, self.starts))
        # A person with any non-finite distance gets +inf (no match), whichever k of their rows are best.
        bad = np.logical_or.reduceat(~np.isfinite(d), self.starts)
        grid = np.append(d, np.inf)[self.padded()]
        kk = min(k, grid.shape[1])
        best = np.partition(grid, kk - 1, axis=1)[:, :kk] if kk < grid.shape[1] else grid
        best = np.where(np.isposinf(best), 0.0, best)  # the padding (+inf) of people with fewer than k rows
        out = best.sum(axis=1) / np.minimum(self.counts, kk)
        out[bad] = np.inf
        return _no_nan(out)


def _no_nan(dist: np.ndarray) -> np.ndarray:
    """NaN distances become +inf: a NaN must never compare as near (max(0.0, NaN) is 0.0, argmin picks NaN)."""
    return np.where(np.isnan(dist), np.inf, dist)


# ----------------------------------------------------------------------------------------------- gallery


class Gallery:
    """An open gallery file. Thread-safe (one lock); several processes may open the same file."""

    read_only = False  # opened by Gallery.open(read_only=True): nothing is written

    def __init__(self, conn: sqlite3.Connection, path: Path, *, model_id: str, embedding_dim: int,
                 max_distance: float, keep_crops: bool, match_mode: str, top_k: int) -> None:
        self._conn = conn
        self.path = path
        self.model_id = model_id
        self.embedding_dim = embedding_dim
        self.max_distance = float(max_distance)
        self.keep_crops = keep_crops
        if match_mode not in MATCH_MODES:
            raise GalleryError(f"unknown match_mode {match_mode!r}; expected one of {', '.join(MATCH_MODES)}")
        self.match_mode = match_mode
        self.top_k = int(top_k)
        self._lock = threading.RLock()
        self._index: Optional[_Index] = None
        self._seen_version: Optional[int] = None
        self._dirty = True

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, model_id: str, embedding_dim: int = 128,
             max_distance: float, create: bool = True, keep_crops: bool = False, match_mode: str = "best",
             top_k: int = 3, allow_model_change: bool = False, read_only: bool = False) -> "Gallery":
        """Open (or create) a gallery file; refuses foreign, corrupt, newer-schema and other-model files.

        `allow_model_change=True` opens a gallery enrolled with another model so `reembed` can convert it.
        `read_only=True` (people list, identify, ...) writes nothing, not even the file mode, so a read-only state
        folder or file system does not stop a command that only reads (see _connect_read_only)."""
        if not (0 < float(max_distance) <= MAX_COSINE_DISTANCE):
            raise GalleryError(f"max_distance {max_distance!r} is out of range; expected 0 < d <= 2 (cosine distance)")
        path = Path(path)
        exists = path.exists()
        if exists:
            _check_header(path)
            from edgeface.security import make_private

            if not read_only:
                make_private(path)  # an existing 0644 gallery (older install, a copy) is tightened, with a log line
        elif not create or read_only:
            raise GalleryError(f"gallery {path} does not exist (enroll someone first: edgeface enroll NAME IMAGE...)")
        else:
            parent = path.parent
            try:
                if not parent.exists():
                    parent.mkdir(mode=0o700, parents=True)
                cls._create(path, model_id=model_id, embedding_dim=int(embedding_dim), max_distance=max_distance,
                            keep_crops=keep_crops, match_mode=match_mode, top_k=top_k)
            except OSError as exc:
                raise GalleryError(f"cannot create gallery {path}: {exc.strerror or exc}") from None
        try:
            conn = (_connect_read_only(path) if read_only else
                    sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False))
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {path}: {exc}") from None
        try:
            gallery = cls(conn, path, model_id=model_id, embedding_dim=int(embedding_dim),
                          max_distance=max_distance, keep_crops=keep_crops, match_mode=match_mode, top_k=top_k)
            gallery.read_only = read_only
            gallery._prepare(allow_model_change)
            return gallery
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise GalleryError(f"gallery {path} is not a usable SQLite database ({exc}); restore a backup or "
                               "move it away") from None
        except BaseException:
            conn.close()
            raise

    @classmethod
    def _create(cls, path: Path, **kw: Any) -> None:
        """A new gallery appears complete or not at all: the schema is written to a temporary file that is then
        linked into place. (A file created empty first and killed before its schema was written would be a
        0-byte gallery, which open() refuses as damaged.) Losing the race to another process is fine."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")

        def remove_tmp() -> None:
            for suffix in SQLITE_SUFFIXES:
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)

        remove_tmp()
        try:
            # 0600 before SQLite opens it (its -wal/-shm files get the same mode); no umask games: the umask is
            # process-wide and the daemon has other threads writing files.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = sqlite3.connect(str(tmp), timeout=10.0, isolation_level=None, check_same_thread=False)
            try:
                cls(conn, tmp, **kw)._prepare(False)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it a moment ago: it is checked like any existing file
            except OSError:  # a file system without hard links: rename, unless someone was faster
                if not path.exists():
                    os.replace(tmp, path)
        finally:
            remove_tmp()

    def _prepare(self, allow_model_change: bool) -> None:
        c = self._conn
        c.execute("PRAGMA busy_timeout = 10000")
        c.execute("PRAGMA foreign_keys = ON")
        c.execute("PRAGMA secure_delete = ON")  # removed people's vectors are overwritten, not left in free pages
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        version = c.execute("PRAGMA user_version").fetchone()[0]
        n_tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID:
            if app_id != 0 or n_tables:
                raise GalleryError(f"{self.path} is an SQLite database but not an edgeface gallery "
                                   f"(application_id {app_id:#x}, {n_tables} schema objects); use another path")
        if version > SCHEMA_VERSION:
            raise GalleryError(f"gallery {self.path} has schema version {version}, newer than this edgeface "
                               f"supports ({SCHEMA_VERSION}); upgrade edgeface")
        if self.read_only:
            if version < SCHEMA_VERSION:
                raise GalleryError(f"gallery {self.path} has schema version {version} and needs an upgrade to "
                                   f"{SCHEMA_VERSION}, which writes: run a command that changes it (or the daemon) "
                                   "once with write access to its folder")
        elif c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise GalleryError(f"gallery {self.path}: cannot switch to WAL journal mode (got {mode})")
        c.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION and not self.read_only:
            self._migrate(version)
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        stored_model, stored_dim = meta.get("model_id"), int(meta.get("embedding_dim", self.embedding_dim))
        n_other = c.execute("SELECT count(*) FROM embeddings WHERE model_id != ?", (self.model_id,)).fetchone()[0]
        if stored_model != self.model_id or n_other:
            if n_other and not allow_model_change:
                n_crops = c.execute("SELECT count(*) FROM crops").fetchone()[0]
                hint = ("run `edgeface gallery reembed` to re-embed the kept face chips" if n_crops
                        else "re-enroll everyone (edgeface enroll --folder DIR) into a new gallery file")
                raise GalleryError(f"gallery {self.path} was enrolled with model {stored_model!r} but the embedder is "
                                   f"{self.model_id!r}; embeddings of different models cannot be compared: {hint}")
            if not n_other and not self.read_only:  # read-only: the embedder's identity is used as it is
                with self._write():
                    self._set_meta("model_id", self.model_id)
                    self._set_meta("embedding_dim", str(self.embedding_dim))
        elif stored_dim != self.embedding_dim:
            raise GalleryError(f"gallery {self.path} stores {stored_dim}-D embeddings, the embedder gives "
                               f"{self.embedding_dim}-D")
        self.check_embeddings()

    def _migrate(self, version: int) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            current = c.execute("PRAGMA user_version").fetchone()[0]  # re-read under the lock (another process)
            for i in range(current, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                if i == 1:
                    self._fill_checksums()
            if current == 0:
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                now = time.time()
                c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                              [("created", _iso(now)), ("model_id", self.model_id),
                               ("embedding_dim", str(self.embedding_dim))])
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _fill_checksums(self) -> None:
        """Migration 1 -> 2: check every stored vector once and record its checksum (inside the migration's
        transaction, so a damaged vector leaves the file as it was and the gallery is refused)."""
        rows = self._conn.execute("SELECT e.id, e.person_id, p.name, e.model_id, e.dim, e.vector FROM embeddings e "
                                  "LEFT JOIN people p ON p.id = e.person_id ORDER BY e.id").fetchall()
        for eid, pid, name, model, dim, blob in rows:
            why = vector_problem(blob, int(dim))
            if why is not None:
                raise GalleryError(self._damaged(eid, name, why))
            self._conn.execute("UPDATE embeddings SET checksum = ? WHERE id = ?",
                               (embedding_checksum(pid, model, bytes(blob)), eid))

    def _damaged(self, eid: int, name: Optional[str], why: str) -> str:
        who = repr(name) if name is not None else "no person"
        fix = f"remove {name!r} (edgeface people remove) and enroll again" if name is not None else "re-enroll"
        return f"gallery {self.path}: embedding {eid} of {who} is damaged ({why}); restore a backup, or {fix}"

    def _checked_vector(self, eid: int, pid: int, name: Optional[str], model: str, blob: Any,
                        checksum: Optional[str]) -> np.ndarray:
        """The stored vector of one row, or GalleryError naming the file and row: a damaged vector must never
        take part in a match (a NaN became distance 0.0, i.e. everyone matched)."""
        why = vector_problem(blob, self.embedding_dim)
        if why is None and checksum != embedding_checksum(pid, model, bytes(blob)):
            why = "checksum mismatch" if checksum else "no checksum"
        if why is not None:
            raise GalleryError(self._damaged(eid, name, why))
        return np.frombuffer(blob, dtype="<f4")

    def check_embeddings(self) -> int:
        """Verify every stored vector of this model (finite, unit length, dimension, checksum); GalleryError on the
        first damaged one. Run on open, so the daemon refuses to start on a damaged gallery. Returns rows checked."""
        rows = self._query("SELECT e.id, e.person_id, p.name, e.model_id, e.vector, e.checksum FROM embeddings e "
                           "LEFT JOIN people p ON p.id = e.person_id WHERE e.model_id = ? ORDER BY e.id",
                           (self.model_id,))
        for r in rows:
            self._checked_vector(*r)
        return len(rows)

    # ------------------------------------------------------------------ plumbing

    class _Txn:
        def __init__(self, gallery: "Gallery") -> None:
            self.g = gallery

        def __enter__(self) -> sqlite3.Connection:
            self.g._lock.acquire()
            try:
                self.g._check_open()
                self.g._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self.g._lock.release()
                raise GalleryError(f"gallery {self.g.path}: cannot start a write ({exc})") from None
            except BaseException:
                self.g._lock.release()
                raise
            return self.g._conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                if exc_type is None:
                    try:
                        self.g._conn.execute("COMMIT")
                    except sqlite3.Error as err:
                        if self.g._conn.in_transaction:
                            self.g._conn.execute("ROLLBACK")
                        raise GalleryError(f"gallery {self.g.path}: write failed, nothing written ({err})") from None
                else:
                    if self.g._conn.in_transaction:
                        self.g._conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise GalleryError(f"gallery {self.g.path}: write failed, nothing written ({exc})") from None
            finally:
                self.g._dirty = True
                self.g._lock.release()

    def _write(self) -> "_Txn":
        """A write transaction: everything inside commits together or not at all."""
        return Gallery._Txn(self)

    def _set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _check_open(self) -> None:
        if self._conn is None:
            raise GalleryError(f"gallery {self.path} is closed")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"gallery {self.path}: {exc}") from None

    def _person_row(self, name: str) -> tuple:
        name = unicodedata.normalize("NFC", name) if isinstance(name, str) else name
        rows = self._query("SELECT id, name, external_id, enabled, schedule, created, updated FROM people "
                           "WHERE name = ?", (name,))
        if not rows:
            raise GalleryError(f"no person named {name!r} in gallery {self.path} (see: edgeface people list)")
        return rows[0]

    # ------------------------------------------------------------------ index

    def _fresh_index(self) -> _Index:
        """The index, reloaded when this or another connection changed the database since the last load."""
        with self._lock:
            self._check_open()
            try:
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if self._index is None or self._dirty or version != self._seen_version:
                    self._index = self._load_index()
                    self._seen_version = version
                    self._dirty = False
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"gallery {self.path}: cannot read the embeddings ({exc})") from None
            return self._index

    def _load_index(self) -> _Index:
        rows = self._conn.execute(
            "SELECT p.id, p.name, e.id, e.model_id, e.vector, e.checksum FROM embeddings e "
            "JOIN people p ON p.id = e.person_id WHERE p.enabled = 1 AND e.model_id = ? ORDER BY p.id, e.id",
            (self.model_id,)).fetchall()
        ids: list[int] = []
        names: list[str] = []
        owners = np.zeros(len(rows), np.int64)
        vectors = np.zeros((len(rows), self.embedding_dim), np.float32)
        for i, (pid, name, eid, model, blob, checksum) in enumerate(rows):
            if not ids or ids[-1] != pid:
                ids.append(pid)
                names.append(name)
            owners[i] = len(ids) - 1
            vectors[i] = self._checked_vector(eid, pid, name, model, blob, checksum)
        return _Index(vectors, owners, ids, names)

    # ------------------------------------------------------------------ matching

    def match(self, embedding: np.ndarray) -> Match:
        """Open-set 1:N: the nearest enabled person if within max_distance, else unknown (candidate reported)."""
        q = _unit(embedding, self.embedding_dim)
        index = self._fresh_index()
        if not index.ids:
            return Match(None, None, MAX_COSINE_DISTANCE, self.max_distance)
        dist = index.person_distances(q, self.match_mode, self.top_k)
        best = int(np.argmin(dist))  # person_distances gives +inf, never NaN, for a non-finite score
        if not np.isfinite(dist[best]):  # nothing comparable: no match (never the 0.0 that max(0, NaN) gave)
            return Match(None, None, MAX_COSINE_DISTANCE, self.max_distance)
        d = float(max(0.0, dist[best]))
        pid, name = index.ids[best], index.names[best]
        if d <= self.max_distance:
            return Match(pid, name, d, self.max_distance, pid, name)
        return Match(None, None, d, self.max_distance, pid, name)

    def verify(self, embedding: np.ndarray, person: str) -> Match:
        """1:1: is this face `person`? A disabled person never verifies (distance still reported)."""
        q = _unit(embedding, self.embedding_dim)
        pid, name, _ext, enabled, *_ = self._person_row(person)
        rows = self._query("SELECT id, model_id, vector, checksum FROM embeddings WHERE person_id = ? AND model_id = ? "
                           "ORDER BY id", (pid, self.model_id))
        if not rows:
            return Match(None, None, MAX_COSINE_DISTANCE, self.max_distance, pid, name)
        vecs = np.stack([self._checked_vector(eid, pid, name, model, blob, cs) for eid, model, blob, cs in rows])
        # The same per-person score as match(), over this one person.
        person = _Index(vecs, np.zeros(len(vecs), np.int64), [pid], [name])
        score = float(person.person_distances(q, self.match_mode, self.top_k)[0])
        if not np.isfinite(score):
            return Match(None, None, MAX_COSINE_DISTANCE, self.max_distance, pid, name)
        d = max(0.0, score)
        if enabled and d <= self.max_distance:
            return Match(pid, name, d, self.max_distance, pid, name)
        return Match(None, None, d, self.max_distance, pid, name)

    # ------------------------------------------------------------------ people

    def add_person(self, name: str, *, external_id: Optional[str] = None, schedule: Optional[dict] = None) -> int:
        name = validate_name(name)
        schedule = validate_schedule(schedule)
        with self._write() as c:
            return self._insert_person(c, name, external_id, schedule)

    def _insert_person(self, c: sqlite3.Connection, name: str, external_id: Optional[str],
                       schedule: Optional[dict]) -> int:
        now = time.time()
        try:
            cur = c.execute("INSERT INTO people(name, external_id, enabled, schedule, created, updated) "
                            "VALUES (?, ?, 1, ?, ?, ?)",
                            (name, external_id, json.dumps(schedule) if schedule else None, now, now))
        except sqlite3.IntegrityError:
            which = "name" if c.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() else "external id"
            value = name if which == "name" else external_id
            raise GalleryError(f"a person with {which} {value!r} already exists in gallery {self.path}") from None
        return int(cur.lastrowid)

    def add_embeddings(self, person_id: int, embeddings: Any, *, image_hashes: Sequence[str],
                       qualities: Sequence[float], crops: Optional[Sequence[Optional[Chip]]] = None) -> int:
        """Store embeddings of one person; rows whose image hash is already stored are skipped. Returns rows added."""
        with self._write() as c:
            return self._insert_embeddings(c, person_id, embeddings, image_hashes, qualities, crops)

    def _insert_embeddings(self, c: sqlite3.Connection, person_id: int, embeddings: Any,
                           image_hashes: Sequence[str], qualities: Sequence[float],
                           crops: Optional[Sequence[Optional[Chip]]]) -> int:
        vecs = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.embedding_dim) if len(embeddings) else \
            np.zeros((0, self.embedding_dim), np.float32)
        if not (len(vecs) == len(image_hashes) == len(qualities)) or (crops is not None and len(crops) != len(vecs)):
            raise GalleryError("add_embeddings: embeddings, image_hashes, qualities (and crops) differ in length")
        if not c.execute("SELECT 1 FROM people WHERE id = ?", (person_id,)).fetchone():
            raise GalleryError(f"no person with id {person_id} in gallery {self.path}")
        added = 0
        now = time.time()
        for i, (vec, sha, q) in enumerate(zip(vecs, image_hashes, qualities)):
            blob = _unit(vec, self.embedding_dim).astype("<f4").tobytes()
            cur = c.execute("INSERT OR IGNORE INTO embeddings(person_id, model_id, dim, vector, image_sha256, quality, "
                            "created, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (person_id, self.model_id, self.embedding_dim, blob, str(sha), float(q), now,
                             embedding_checksum(person_id, self.model_id, blob)))
            if cur.rowcount == 0:
                continue
            added += 1
            chip = crops[i] if crops is not None else None
            if self.keep_crops and chip is not None:
                c.execute("INSERT INTO crops(embedding_id, image, face) VALUES (?, ?, ?)",
                          (cur.lastrowid, _encode_png(chip.image), _face_json(chip.face)))
        if added:
            c.execute("UPDATE people SET updated = ? WHERE id = ?", (now, person_id))
        return added

    def enroll(self, name: str, results: Sequence[EnrollItem], *, external_id: Optional[str] = None,
               schedule: Optional[dict] = None) -> EnrollReport:
        """Create the person if new and add every accepted item, in ONE transaction (all or nothing)."""
        return self.enroll_many([(name, list(results))], external_id=external_id, schedule=schedule)[0]

    def enroll_many(self, batches: Sequence[tuple[str, Sequence[EnrollItem]]], *, external_id: Optional[str] = None,
                    schedule: Optional[dict] = None) -> list[EnrollReport]:
        """Several people in ONE transaction: a person with no usable face fails the whole batch (nothing written)."""
        names = [validate_name(n) for n, _ in batches]
        if len(set(names)) != len(names):
            raise GalleryError("the same name appears twice in one enrollment")
        schedule = validate_schedule(schedule)
        reports: list[EnrollReport] = []
        with self._write() as c:
            rows = c.execute("SELECT p.name, e.id, e.person_id, e.model_id, e.vector, e.checksum FROM embeddings e "
                             "JOIN people p ON p.id = e.person_id WHERE e.model_id = ?", (self.model_id,)).fetchall()
            known = ([r[0] for r in rows],
                     [self._checked_vector(eid, pid, name, model, blob, cs) for name, eid, pid, model, blob, cs in rows])
            for name, items in zip(names, (b[1] for b in batches)):
                reports.append(self._enroll_one(c, name, items, external_id if len(batches) == 1 else None, schedule,
                                                known))
        return reports

    def _enroll_one(self, c: sqlite3.Connection, name: str, items: Sequence[EnrollItem], external_id: Optional[str],
                    schedule: Optional[dict], known: tuple[list[str], list[np.ndarray]]) -> EnrollReport:
        row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        accepted = [it for it in items if it.accepted]
        rejected = [(it.source, it.reason or "no embedding") for it in items if not it.accepted]
        # duplicates: same image already stored (for anyone) or twice in this batch
        seen: set[str] = set()
        fresh: list[EnrollItem] = []
        duplicates: list[str] = []
        warnings: list[str] = []
        for it in accepted:
            owner = c.execute("SELECT p.name FROM embeddings e JOIN people p ON p.id = e.person_id "
                              "WHERE e.model_id = ? AND e.image_sha256 = ?", (self.model_id, it.image_sha256)).fetchone()
            if it.image_sha256 in seen or owner:
                duplicates.append(it.source)
                if owner and owner[0] != name:
                    warnings.append(f"{it.source}: the same image is already enrolled for {owner[0]!r}; skipped")
                continue
            seen.add(it.image_sha256)
            fresh.append(it)
        if not fresh and row is None:
            why = "; ".join(f"{s}: {r}" for s, r in rejected[:3]) + (" ..." if len(rejected) > 3 else "")
            raise NoFaceError(f"no usable face to enroll {name!r} ({len(rejected)} rejected, {len(duplicates)} "
                              f"duplicates{': ' + why if why else ''}); nothing was written")
        created = row is None
        pid = self._insert_person(c, name, external_id, schedule) if created else int(row[0])
        if fresh:
            new = np.stack([_unit(it.embedding, self.embedding_dim) for it in fresh])
            warnings.extend(self._identity_warnings(name, new, known))
            known[0].extend([name] * len(new))
            known[1].extend(new)
            self._insert_embeddings(c, pid, np.stack([it.embedding for it in fresh]),
                                    [it.image_sha256 for it in fresh], [it.quality for it in fresh],
                                    [it.chip for it in fresh])
        return EnrollReport(name, pid, created, [it.source for it in fresh], rejected, duplicates, warnings)

    def _identity_warnings(self, name: str, new: np.ndarray, known: tuple[list[str], list[np.ndarray]]) -> list[str]:
        """Warn when the new faces are already within the threshold of SOMEONE ELSE (same person twice?)."""
        others = [i for i, n in enumerate(known[0]) if n != name]
        if not others:
            return []
        vecs = np.stack([known[1][i] for i in others])
        per_stored = np.median(1.0 - new @ vecs.T, axis=0)  # each stored face vs all the new ones
        best = int(np.argmin(per_stored))
        if per_stored[best] <= self.max_distance:
            return [f"{name!r} looks like the already enrolled {known[0][others[best]]!r} (median distance "
                    f"{per_stored[best]:.3f} <= threshold {self.max_distance:.3f}): the same person twice?"]
        return []

    def people(self) -> list[Person]:
        rows = self._query("SELECT p.id, p.name, p.external_id, p.enabled, p.schedule, p.created, p.updated, "
                           "(SELECT count(*) FROM embeddings e WHERE e.person_id = p.id AND e.model_id = ?) "
                           "FROM people p ORDER BY p.name", (self.model_id,))
        return [self._person(r) for r in rows]

    def person(self, name: str) -> Person:
        pid = self._person_row(name)[0]
        return next(p for p in self.people() if p.id == pid)

    @staticmethod
    def _person(r: tuple) -> Person:
        """One row; a schedule that cannot be read is reported in schedule_error, so one bad row does not make
        people() fail (the daemon then denies that person only)."""
        schedule, error = None, None
        if r[4]:
            try:
                schedule = validate_schedule(r[4] if isinstance(r[4], str) else str(r[4]))
            except GalleryError as exc:
                error = str(exc)
        return Person(int(r[0]), r[1], r[2], bool(r[3]), schedule, float(r[5]), float(r[6]), int(r[7]), error)

    def _update(self, name: str, sql: str, args: Sequence[Any]) -> None:
        pid = self._person_row(name)[0]
        with self._write() as c:
            c.execute(sql, (*args, time.time(), pid))

    def rename(self, name: str, new_name: str) -> None:
        new_name = validate_name(new_name)
        if new_name != name and self._query("SELECT 1 FROM people WHERE name = ?", (new_name,)):
            raise GalleryError(f"cannot rename {name!r}: a person named {new_name!r} already exists")
        self._update(name, "UPDATE people SET name = ?, updated = ? WHERE id = ?", (new_name,))

    def disable(self, name: str) -> None:
        self._update(name, "UPDATE people SET enabled = 0, updated = ? WHERE id = ?", ())

    def enable(self, name: str) -> None:
        self._update(name, "UPDATE people SET enabled = 1, updated = ? WHERE id = ?", ())

    def set_schedule(self, name: str, schedule: Optional[dict]) -> None:
        schedule = validate_schedule(schedule)
        self._update(name, "UPDATE people SET schedule = ?, updated = ? WHERE id = ?",
                     (json.dumps(schedule) if schedule else None,))

    def remove(self, name: str) -> int:
        """Delete the person, their embeddings and kept chips (ON DELETE CASCADE). Returns embeddings erased."""
        pid = self._person_row(name)[0]
        with self._write() as c:
            n = c.execute("SELECT count(*) FROM embeddings WHERE person_id = ?", (pid,)).fetchone()[0]
            c.execute("DELETE FROM crops WHERE embedding_id IN (SELECT id FROM embeddings WHERE person_id = ?)", (pid,))
            c.execute("DELETE FROM embeddings WHERE person_id = ?", (pid,))
            c.execute("DELETE FROM people WHERE id = ?", (pid,))
        # erased rows must not linger in free pages or the WAL
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(n)

    # ------------------------------------------------------------------ model change

    def reembed(self, embedder: Any) -> int:
        """Re-embed every kept face chip with `embedder` (its model_id becomes the gallery's). One transaction.

        Embeddings without a kept chip cannot be converted: they are dropped and their people must re-enroll."""
        from edgeface.vision.align import align_face
        from edgeface.vision.embed import enrollment_embeddings

        spec = getattr(embedder, "spec", None)
        if spec is not None and int(spec.embedding_dim) != self.embedding_dim:
            raise GalleryError(f"reembed: {embedder.model_id} gives {spec.embedding_dim}-D embeddings, the gallery "
                               f"stores {self.embedding_dim}-D")
        rows = self._query("SELECT e.id, e.person_id, e.image_sha256, e.quality, c.image, c.face FROM embeddings e "
                           "JOIN crops c ON c.embedding_id = e.id WHERE e.model_id != ?", (embedder.model_id,))
        new_rows = []
        for eid, pid, sha, q, img, face_json in rows:
            chip = _decode_png(img)
            crop = align_face(chip, _face_from_json(face_json), embedder.template)
            new_rows.append((eid, pid, sha, q, enrollment_embeddings(embedder, crop)[0]))
        with self._write() as c:
            for eid, pid, sha, q, vec in new_rows:
                blob = _unit(vec, self.embedding_dim).astype("<f4").tobytes()
                c.execute("UPDATE embeddings SET model_id = ?, dim = ?, vector = ?, checksum = ? WHERE id = ?",
                          (embedder.model_id, self.embedding_dim, blob, embedding_checksum(pid, embedder.model_id, blob),
                           eid))
            c.execute("DELETE FROM embeddings WHERE model_id != ?", (embedder.model_id,))
            self._set_meta("model_id", embedder.model_id)
        self.model_id = embedder.model_id
        return len(new_rows)

    # ------------------------------------------------------------------ export / import

    def export(self, path: str | os.PathLike[str]) -> int:
        """Write the whole gallery as a portable JSON file (0600, atomic). Returns the number of people."""
        path = Path(path)
        people = []
        for p in self.people():
            embs = []
            rows = self._query("SELECT e.vector, e.image_sha256, e.quality, e.created, c.image, c.face, e.id, "
                               "e.checksum FROM embeddings e LEFT JOIN crops c ON c.embedding_id = e.id "
                               "WHERE e.person_id = ? AND e.model_id = ? ORDER BY e.id", (p.id, self.model_id))
            for vec, sha, q, created, img, face_json, eid, cs in rows:
                self._checked_vector(eid, p.id, p.name, self.model_id, vec, cs)  # never export a damaged vector
                e = {"vector": base64.b64encode(vec).decode("ascii"), "image_sha256": sha, "quality": q,
                     "created": created}
                if img is not None:
                    e["chip"] = {"png": base64.b64encode(img).decode("ascii"), "face": json.loads(face_json)}
                embs.append(e)
            people.append({"name": p.name, "external_id": p.external_id, "enabled": p.enabled,
                           "schedule": p.schedule, "created": p.created, "updated": p.updated, "embeddings": embs})
        doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_id": self.model_id,
               "embedding_dim": self.embedding_dim, "vector_encoding": "base64 little-endian float32",
               "exported": _iso(time.time()), "people": people}
        try:
            write_private_atomic(path, json.dumps(doc, indent=1).encode("utf-8"))
        except OSError as exc:
            raise GalleryError(f"cannot write export file {path}: {exc.strerror or exc}") from None
        return len(people)

    def import_(self, path: str | os.PathLike[str], *, merge: bool = False) -> int:
        """Load an export file into this gallery in one transaction. Existing names are an error unless merge=True
        (then new embeddings are added to the existing person). Returns the number of people imported."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GalleryError(f"import file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GalleryError(f"cannot read import file {path}: not an edgeface gallery export ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
            raise GalleryError(f"{path} is not an edgeface gallery export (missing \"format\": \"{EXPORT_FORMAT}\")")
        if doc.get("version") != EXPORT_VERSION:
            raise GalleryError(f"{path}: export version {doc.get('version')!r} is not supported (expected "
                               f"{EXPORT_VERSION})")
        if doc.get("model_id") != self.model_id or int(doc.get("embedding_dim", -1)) != self.embedding_dim:
            raise GalleryError(f"{path} holds embeddings of model {doc.get('model_id')!r} "
                               f"({doc.get('embedding_dim')}-D) but this gallery uses {self.model_id!r}: re-enroll")
        try:
            with self._write() as c:
                for p in doc["people"]:
                    name = validate_name(p["name"])
                    row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
                    if row and not merge:
                        raise GalleryError(f"cannot import {path}: {name!r} already exists in gallery {self.path} "
                                           "(use --merge to add to existing people)")
                    if row:
                        pid = int(row[0])
                    else:
                        schedule = validate_schedule(p.get("schedule"))
                        cur = c.execute("INSERT INTO people(name, external_id, enabled, schedule, created, updated) "
                                        "VALUES (?, ?, ?, ?, ?, ?)",
                                        (name, p.get("external_id"), 1 if p.get("enabled", True) else 0,
                                         json.dumps(schedule) if schedule else None,
                                         float(p.get("created", time.time())), float(p.get("updated", time.time()))))
                        pid = int(cur.lastrowid)
                    embs = p.get("embeddings", [])
                    vecs = [np.frombuffer(base64.b64decode(e["vector"], validate=True), dtype="<f4") for e in embs]
                    chips = []
                    for e in embs:
                        ch = e.get("chip")
                        chips.append(Chip(_decode_png(base64.b64decode(ch["png"])),
                                          _face_from_json(json.dumps(ch["face"]))) if ch else None)
                    if vecs:
                        self._insert_embeddings(c, pid, np.stack(vecs), [e["image_sha256"] for e in embs],
                                                [float(e.get("quality", 0.0)) for e in embs], chips)
        except (KeyError, TypeError, ValueError, base64.binascii.Error) as exc:
            raise GalleryError(f"cannot import {path}: malformed entry ({type(exc).__name__}: {exc}); "
                               "nothing was imported") from None
        return len(doc["people"])

    # ------------------------------------------------------------------ misc

    def stats(self) -> dict:
        (n_people,), = self._query("SELECT count(*) FROM people")
        (n_enabled,), = self._query("SELECT count(*) FROM people WHERE enabled = 1")
        (n_emb,), = self._query("SELECT count(*) FROM embeddings WHERE model_id = ?", (self.model_id,))
        (n_crops,), = self._query("SELECT count(*) FROM crops")
        meta = dict(self._query("SELECT key, value FROM meta"))
        return {"path": str(self.path), "schema_version": SCHEMA_VERSION, "model_id": self.model_id,
                "embedding_dim": self.embedding_dim, "people": n_people, "enabled": n_enabled, "embeddings": n_emb,
                "crops": n_crops, "keep_crops": self.keep_crops, "max_distance": self.max_distance,
                "match_mode": self.match_mode, "top_k": self.top_k, "created": meta.get("created"),
                "bytes": self.path.stat().st_size if self.path.exists() else 0}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None  # type: ignore[assignment]
                    self._index = None

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes. `mode=ro` first: it shares the daemon's WAL when the folder lets SQLite read
    or make the -shm file. In a folder nobody can write to (a read-only mount) SQLite cannot make it and refuses
    a WAL database; then, and only when no write-ahead log is waiting (no -wal file, or an empty one: every commit
    is in the main file), it is opened `immutable` (no locks: nothing can write there). A non-empty -wal that
    cannot be read is an error that says what to do."""
    from urllib.parse import quote

    uri = "file:" + quote(str(path.resolve()))
    connect = dict(uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn = sqlite3.connect(uri + "?mode=ro", **connect)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise GalleryError(f"gallery {path}: its folder is read-only and changes are still in {wal.name} (the daemon "
                           "or a write was interrupted); run the command as the daemon's user or with the folder "
                           "writable")
    return sqlite3.connect(uri + "?immutable=1", **connect)


def _check_header(path: Path) -> None:
    """A non-empty file must start with the SQLite header; otherwise it is not ours to touch."""
    if not path.is_file():
        raise GalleryError(f"gallery path {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise GalleryError(f"cannot read gallery {path}: {exc.strerror or exc}") from None
    if not head:  # never silently re-created empty: that would look like "no people" instead of "file damaged"
        raise GalleryError(f"gallery {path} is empty (0 bytes): truncated or damaged? Restore a backup, or delete the "
                           "file to start a new, empty gallery")
    if head != b"SQLite format 3\x00":
        raise GalleryError(f"gallery {path} is not an SQLite database (corrupt or another kind of file); "
                           "restore a backup or move it away")


def image_sha256(data: bytes | np.ndarray) -> str:
    """sha256 of an image file's bytes (or of a frame's pixels) used to skip duplicate enrollments."""
    if isinstance(data, np.ndarray):
        h = hashlib.sha256(str(data.shape).encode())
        h.update(np.ascontiguousarray(data).tobytes())
        return h.hexdigest()
    return hashlib.sha256(data).hexdigest()


__all__ = ["Gallery", "Person", "Chip", "EnrollItem", "EnrollReport", "validate_name", "validate_schedule",
           "schedule_allows", "default_max_distance", "resolve_max_distance", "image_sha256", "embedding_checksum",
           "vector_problem",
           "FALLBACK_MAX_DISTANCE", "SCHEMA_VERSION", "MIGRATIONS"]
