"""The access list on disk: people and their face embeddings in one SQLite file (`Gallery`), and `open_gallery`,
the one way the daemon, the CLI and the demo open it from a config.

Why SQLite: one file, transactions (an enrollment is all-or-nothing), WAL so the CLI can edit the gallery
while the daemon reads it, and `PRAGMA data_version` so the daemon notices another process's commit with
one cheap query per match and reloads its index (no restart after `edgeface people disable bob`).

Embeddings are only ever compared with embeddings of the same model: the gallery records its model id and
refuses to open with another one (re-enroll, or `reembed` from kept face chips when keep_crops is on).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError, GalleryError, NoFaceError
from edgeface.gallery.index import (MATCH_MODES, MAX_COSINE_DISTANCE, _Index, _unit, embedding_checksum,
                                    resolve_max_distance, stored_vector_problem)
from edgeface.gallery.records import (Chip, EnrollItem, EnrollReport, Person, _encode_png, _face_json,
                                      person_checksum, validate_name, validate_schedule)
from edgeface.gallery.schema import APPLICATION_ID, SCHEMA_VERSION, check_header, connect_read_only, create_file, migrate
from edgeface.types import Match


def embedder_identity(cfg: Any) -> tuple[str, int]:
    """(model_id, embedding_dim) of the configured embedder (and head) without loading it (people commands need no
    model)."""
    model_id, dim = _backbone_identity(cfg)
    if not cfg.embedder.head:
        return model_id, dim
    from edgeface.vision.head import resolve_head

    head = resolve_head(cfg.embedder.head, cfg.models_dir)[1]
    if head.backbone != model_id:
        raise ConfigError(f"embedder.head {cfg.embedder.head!r} was trained on {head.backbone} embeddings, "
                          f"embedder.model is {model_id}")
    return f"{model_id}+{head.head_id}", head.output_dim


def _backbone_identity(cfg: Any) -> tuple[str, int]:
    from edgeface.models import MANIFEST_NAME, default_models_dir, load_manifest
    from edgeface.vision.embed import EmbedderSpec

    model = str(cfg.embedder.model)
    if cfg.embedder.preprocessing and cfg.embedder.template:  # same rule as FaceAnalyzer.from_config
        return model.rsplit("/", 1)[-1].removesuffix(".tflite"), 128
    mdir = Path(cfg.models_dir) if cfg.models_dir else default_models_dir()
    manifest = load_manifest(mdir) if (mdir / MANIFEST_NAME).is_file() else {}
    info = manifest.get(model) or next((m for m in manifest.values() if m.file == Path(model).name), None)
    if info is None:
        raise ConfigError(f"embedder.model {model!r} is not in {mdir / MANIFEST_NAME}: set embedder.preprocessing "
                          "and embedder.template for your own model")
    spec = EmbedderSpec.from_manifest(info)
    return spec.model_id, spec.embedding_dim


def analyzer_model(analyzer: Any) -> tuple[str, int]:
    """(model_id, embedding_dim) of a loaded analyzer's embedder."""
    spec = getattr(analyzer.embedder, "spec", None)
    return str(analyzer.embedder.model_id), int(spec.embedding_dim) if spec is not None else 128


def gallery_path(cfg: Any) -> Path:
    """gallery.path; a relative one is relative to state_dir (the daemon, the CLI and the demo open the same file)."""
    p = Path(cfg.gallery.path).expanduser()
    return p if p.is_absolute() else Path(cfg.state_dir).expanduser() / p


def open_gallery(cfg: Any, *, model: Optional[tuple[str, int]] = None, create: bool = False,
                 allow_model_change: bool = False, read_only: bool = False) -> "Gallery":
    """The gallery a config names: gallery_path(cfg), its match mode, top-k, keep_crops and threshold
    (resolve_max_distance). `model` is (model_id, dim) of the embedder in use (analyzer_model), else the configured
    one (embedder_identity). `create=False`: a missing file is an error (commands that only read or edit people);
    `read_only`: writes nothing (people list, identify, ...: a read-only state folder is fine)."""
    model_id, dim = model or embedder_identity(cfg)
    g = cfg.gallery
    return Gallery.open(gallery_path(cfg), model_id=model_id, embedding_dim=dim,
                        max_distance=resolve_max_distance(g, cfg.embedder, cfg.models_dir), create=create,
                        keep_crops=g.keep_crops, match_mode=g.match_mode, top_k=g.top_k,
                        allow_model_change=allow_model_change, read_only=read_only)


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
        folder or file system does not stop a command that only reads (see schema.connect_read_only)."""
        if not (0 < float(max_distance) <= MAX_COSINE_DISTANCE):
            raise GalleryError(f"max_distance {max_distance!r} is out of range; expected 0 < d <= 2 (cosine distance)")
        path = Path(path)
        exists = path.exists()
        if exists:
            check_header(path)
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
            conn = (connect_read_only(path) if read_only else
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
        """A new gallery appears complete or not at all (see schema.create_file)."""

        def write_schema(conn: sqlite3.Connection, tmp: Path) -> None:
            cls(conn, tmp, **kw)._prepare(False)

        create_file(path, write_schema)

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
            migrate(c, model_id=self.model_id, embedding_dim=self.embedding_dim, damaged=self._damaged)
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

    def _damaged(self, eid: int, name: Optional[str], why: str) -> str:
        who = repr(name) if name is not None else "no person"
        fix = f"remove {name!r} (edgeface people remove) and enroll again" if name is not None else "re-enroll"
        return f"gallery {self.path}: embedding {eid} of {who} is damaged ({why}); restore a backup, or {fix}"

    def _checked_vector(self, eid: int, pid: int, name: Optional[str], model: str, blob: Any,
                        checksum: Optional[str]) -> np.ndarray:
        """The stored vector of one row, or GalleryError naming the file and row: a damaged vector must never
        take part in a match (a NaN became distance 0.0, i.e. everyone matched)."""
        why = stored_vector_problem(blob, self.embedding_dim, checksum, pid, model)
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
        rows = self._query("SELECT id, name, external_id, enabled, schedule, created, updated, checksum FROM people "
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
        row = self._person_row(person)
        pid, name = row[0], row[1]
        enabled = row[3] == 1 and row[7] == person_checksum(*row[:5])  # a damaged row never verifies
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
                       schedule: Optional[dict], *, enabled: bool = True, created: Optional[float] = None,
                       updated: Optional[float] = None) -> int:
        now = time.time()
        try:
            cur = c.execute("INSERT INTO people(name, external_id, enabled, schedule, created, updated) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (name, external_id, 1 if enabled else 0, json.dumps(schedule) if schedule else None,
                             now if created is None else created, now if updated is None else updated))
        except sqlite3.IntegrityError:
            which = "name" if c.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() else "external id"
            value = name if which == "name" else external_id
            raise GalleryError(f"a person with {which} {value!r} already exists in gallery {self.path}") from None
        self._seal(c, int(cur.lastrowid))
        return int(cur.lastrowid)

    @staticmethod
    def _seal(c: sqlite3.Connection, person_id: int) -> None:
        """Record the checksum of the row as written (inside the writing transaction): every write of a rule field
        goes through here, so only a change made outside edgeface leaves a row that does not match."""
        row = c.execute("SELECT id, name, external_id, enabled, schedule FROM people WHERE id = ?",
                        (person_id,)).fetchone()
        c.execute("UPDATE people SET checksum = ? WHERE id = ?", (person_checksum(*row), person_id))

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
                           "(SELECT count(*) FROM embeddings e WHERE e.person_id = p.id AND e.model_id = ?), "
                           "p.checksum FROM people p ORDER BY p.name", (self.model_id,))
        return [self._person(r) for r in rows]

    def person(self, name: str) -> Person:
        pid = self._person_row(name)[0]
        return next(p for p in self.people() if p.id == pid)

    @staticmethod
    def _person(r: tuple) -> Person:
        """One row; a rule that cannot be trusted (a schedule that cannot be read, a row that does not match its
        checksum) is reported in rule_error, so one bad row does not make people() fail: the daemon denies that
        person only."""
        schedule, error = None, None
        if r[4]:
            try:
                schedule = validate_schedule(r[4] if isinstance(r[4], str) else str(r[4]))
            except GalleryError as exc:
                error = f"schedule unreadable ({exc})"
        if error is None and r[8] != person_checksum(*r[:5]):
            error = (f"people row {r[0]} does not match its checksum ({'damaged' if r[8] else 'no checksum'}, or "
                     "changed outside edgeface); restore a backup, or set the rule again (edgeface people ...)")
        try:
            created, updated = float(r[5]), float(r[6])
        except (TypeError, ValueError):
            created, updated, error = 0.0, 0.0, error or f"people row {r[0]} is damaged (unreadable timestamps)"
        return Person(int(r[0]), r[1], r[2], bool(r[3]), schedule, created, updated, int(r[7]), error)

    def _update(self, name: str, sql: str, args: Sequence[Any]) -> None:
        pid = self._person_row(name)[0]
        with self._write() as c:
            c.execute(sql, (*args, time.time(), pid))
            self._seal(c, pid)

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

    def remove_nearest_embedding(self, person_id: int, embedding: np.ndarray) -> tuple[int, float]:
        """A wrong grant corrected: remove the person's embedding (this gallery's model) nearest to `embedding`.
        Returns (embedding id removed, its cosine distance); GalleryError when the person has none."""
        rows = self._query("SELECT id, vector FROM embeddings WHERE person_id = ? AND model_id = ?",
                           (person_id, self.model_id))
        if not rows:
            raise GalleryError(f"person {person_id} has no embeddings of model {self.model_id} to remove")
        q = np.asarray(embedding, np.float32).ravel()
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        dists = [1.0 - float(np.frombuffer(blob, "<f4") @ q) for _eid, blob in rows]
        best = int(np.argmin(dists))
        eid = int(rows[best][0])
        with self._write() as c:
            c.execute("DELETE FROM crops WHERE embedding_id = ?", (eid,))
            c.execute("DELETE FROM embeddings WHERE id = ?", (eid,))
        return eid, dists[best]

    # ------------------------------------------------------------------ export / import / model change (portable.py)

    def export(self, path: str | os.PathLike[str]) -> int:
        """Write the whole gallery as a portable JSON file (0600, atomic). Returns the number of people."""
        from edgeface.gallery.portable import export_gallery

        return export_gallery(self, path)

    def import_(self, path: str | os.PathLike[str], *, merge: bool = False) -> int:
        """Load an export file in one transaction (existing names are an error unless merge). Returns people."""
        from edgeface.gallery.portable import import_gallery

        return import_gallery(self, path, merge=merge)

    def reembed(self, embedder: Any) -> int:
        """Re-embed every kept face chip with `embedder` (its model becomes the gallery's); see portable.py."""
        from edgeface.gallery.portable import reembed_gallery

        return reembed_gallery(self, embedder)

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

    # ------------------------------------------------------------------ fleet sync (edgeface.fleet; fleet_rows.py)

    def fleet_put(self, person_key: str, *, name: str, enabled: bool, schedule: Optional[dict],
                  embeddings: Any, image_hashes: Sequence[str]) -> None:
        """Create or replace the fleet person `person_key` (embeddings of this gallery's model)."""
        self.fleet_apply([(person_key, {"name": name, "enabled": enabled, "schedule": schedule,
                                        "embeddings": embeddings, "image_hashes": image_hashes})])

    def fleet_delete(self, person_key: str) -> None:
        """Erase the fleet person `person_key` (a tombstone); nothing happens when this gallery does not hold them."""
        self.fleet_apply([(person_key, None)])

    def fleet_apply(self, changes: Sequence[tuple[str, Optional[dict]]]) -> None:
        """Several fleet changes in ONE transaction (a door catching up on thousands): (person_key, record) puts
        a person (record keys as fleet_put's arguments), (person_key, None) erases one. All or nothing."""
        from edgeface.gallery.fleet_rows import apply_fleet_changes
        apply_fleet_changes(self, changes)

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


__all__ = ["Gallery", "open_gallery", "gallery_path", "embedder_identity", "analyzer_model"]
