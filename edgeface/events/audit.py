"""Audit log: every decision, door event and remote command in SQLite, bounded by age and row count."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from edgeface.errors import EdgefaceError
from edgeface.security import create_private_file

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    result TEXT,
    person_id INTEGER,
    person_name TEXT,
    distance REAL,
    event_id TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
"""


#: Rows anyone on the broker can produce at will (refused remote-unlock commands): their own retention class, so
#: however many there are they never push grants, denials, relay changes or door events out of the log.
NOISE_SQL = "((kind = 'remote_unlock' AND result = 'refused') OR (kind = 'door' AND result = 'remote_unlock_refused'))"


class AuditError(EdgefaceError, OSError):
    """The audit database cannot be opened."""


class AuditLog:
    """Append-only log; rotate() deletes rows older than retention_days and beyond max_rows (oldest first).

    max_rows applies to each retention class on its own: the records (access decisions, relay, door, camera,
    daemon, accepted commands) and the noise (NOISE_SQL: refused commands, `max_noise_rows`, default max_rows)."""

    ROTATE_EVERY = 500  # inserts between automatic rotations

    def __init__(self, path: Union[str, os.PathLike[str]], *, retention_days: int = 90, max_rows: int = 1_000_000,
                 max_noise_rows: Optional[int] = None, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.max_noise_rows = max_rows if max_noise_rows is None else max_noise_rows
        self._clock = clock
        self._lock = threading.Lock()
        self._since_rotate = 0
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private_file(self.path)  # 0600 before SQLite opens it; -wal/-shm inherit the mode
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss (grants wait for it)
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise AuditError(f"audit.path {self.path}: cannot open the audit database: {exc}") from exc
        self._closed = False
        self.rotate()

    def record(self, kind: str, *, result: Optional[str] = None, person_id: Optional[int] = None,
               person_name: Optional[str] = None, distance: Optional[float] = None, event_id: Optional[str] = None,
               ts: Optional[float] = None, strict: bool = False, **detail: Any) -> None:
        """Write one row (committed, synchronous=FULL). Never raises unless strict: an audit failure is logged and
        the door keeps working; strict=True (before a grant) raises AuditError so the caller can refuse to open."""
        try:
            with self._lock:
                if self._closed:
                    if strict:
                        raise AuditError(f"audit.path {self.path}: the audit log is closed")
                    return
                self._db.execute(
                    "INSERT INTO audit(ts, kind, result, person_id, person_name, distance, event_id, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (self._clock() if ts is None else ts, kind, result, person_id, person_name, distance, event_id,
                     json.dumps(detail, default=str, sort_keys=True)))
                self._since_rotate += 1
                due = self._since_rotate >= self.ROTATE_EVERY
        except (sqlite3.Error, ValueError) as exc:  # ValueError: text SQLite cannot store (a lone surrogate)
            if strict:
                raise AuditError(f"audit.path {self.path}: cannot write: {exc}") from None
            log.exception("audit write failed")
            return
        if due:
            try:
                self.rotate()
            except sqlite3.Error:
                log.exception("audit rotation failed")

    def rotate(self) -> int:
        """Apply retention_days and max_rows now; returns the number of rows deleted."""
        with self._lock:
            if self._closed:
                return 0
            self._since_rotate = 0
            cutoff = self._clock() - self.retention_days * 86400.0
            n = self._db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount
            for where, keep in ((f"NOT {NOISE_SQL}", self.max_rows), (NOISE_SQL, self.max_noise_rows)):
                n += self._db.execute(f"DELETE FROM audit WHERE {where} AND id <= (SELECT id FROM audit WHERE {where} "
                                      "ORDER BY id DESC LIMIT 1 OFFSET ?)", (keep,)).rowcount
        if n:
            log.info("audit log rotated: %d old rows deleted", n)
        return n

    def rows(self, kind: Optional[str] = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                "SELECT id, ts, kind, result, person_id, person_name, distance, event_id, detail FROM audit "
                + ("WHERE kind = ? " if kind else "") + "ORDER BY id LIMIT ?",
                ((kind, limit) if kind else (limit,)))
            out = []
            for r in cur.fetchall():
                out.append({"id": r[0], "ts": r[1], "kind": r[2], "result": r[3], "person_id": r[4],
                            "person_name": r[5], "distance": r[6], "event_id": r[7], "detail": json.loads(r[8])})
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
