"""Persistent, ordered outbox (SQLite, WAL): an event is written here FIRST, then sent, then deleted.

Nothing is lost while the broker is down or the daemon restarts. The outbox is bounded
(mqtt.outbox_max_events); when full, room is made by dropping the OLDEST non-critical event
(`unknown`, door open/close) first, and only if none is left the oldest critical one. Every drop is
counted (persisted, `dropped`) and logged; docs/mqtt.md describes the policy.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from edgeface.errors import EdgefaceError
from edgeface.security import create_private_file

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    critical INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(EdgefaceError, OSError):
    """The outbox database cannot be opened or written."""


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    event_id: str
    topic: str
    payload: str
    critical: bool
    created: float = 0.0  # time.time() when it was queued (events sent much later are marked `queued`)


class Outbox:
    """Thread-safe FIFO of events waiting for delivery. One connection, guarded by a lock."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, max_events: int = 100_000) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private_file(self.path)  # 0600 before SQLite opens it; -wal/-shm inherit the mode
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"mqtt.outbox_path {self.path}: cannot open the outbox database: {exc}") from exc
        self._closed = False

    def add(self, event_id: str, topic: str, payload: str, *, critical: bool = False) -> None:
        """Store one event (durably) at the end of the queue, making room per the bound policy."""
        with self._lock:
            self._check_open()
            with self._tx():
                n = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                while n >= self.max_events:
                    row = self._db.execute("SELECT seq, event_id, critical FROM outbox WHERE critical = 0 "
                                           "ORDER BY seq LIMIT 1").fetchone()
                    if row is None:
                        row = self._db.execute("SELECT seq, event_id, critical FROM outbox ORDER BY seq LIMIT 1").fetchone()
                    self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
                    self._db.execute("INSERT INTO outbox_meta(key, value) VALUES('dropped', 1) "
                                     "ON CONFLICT(key) DO UPDATE SET value = value + 1")
                    (log.error if row[2] else log.warning)(
                        "outbox full (%d events): dropped the oldest %s event %s", self.max_events,
                        "critical" if row[2] else "non-critical", row[1])
                    n -= 1
                self._db.execute("INSERT OR IGNORE INTO outbox(event_id, topic, payload, critical, created) "
                                 "VALUES (?, ?, ?, ?, ?)", (event_id, topic, payload, int(critical), time.time()))
            self._added.notify_all()

    def peek(self) -> Optional[OutboxItem]:
        """The oldest undelivered event, or None."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT seq, event_id, topic, payload, critical, created FROM outbox "
                                   "ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else OutboxItem(row[0], row[1], row[2], row[3], bool(row[4]), float(row[5]))

    def wait(self, timeout: float) -> bool:
        """Block until something may be queued (or timeout); True if the outbox is non-empty."""
        with self._lock:
            if self._closed:
                return False
            if self._count() == 0:
                self._added.wait(timeout)
            return not self._closed and self._count() > 0

    def mark_delivered(self, seq: int) -> None:
        with self._lock:
            self._check_open()
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM outbox_meta WHERE key = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._added.notify_all()
            self._db.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
