"""A door's fleet state (SQLite beside the gallery): the version applied per person, with the signed change it
came in, and the last admin heartbeat. The gallery is written first and this file second, so a crash between
the two only makes the door apply the same change again (idempotent), never skip one."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Optional

from edgeface.errors import GalleryError
from edgeface.security import ensure_private_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (person_key TEXT PRIMARY KEY, version TEXT NOT NULL,
                                    deleted INTEGER NOT NULL, envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class FleetState:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            ensure_private_dir(self.path.parent)
            self._conn = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript(SCHEMA)
            rows = self._conn.execute("SELECT person_key, version, deleted FROM applied").fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise GalleryError(f"fleet state {self.path}: cannot open ({exc}); move it away to resync from the "
                               "broker") from None
        self._lock = threading.Lock()
        #: person key -> (version text, deleted)
        self.versions: dict[str, tuple[str, bool]] = {k: (v, bool(d)) for k, v, d in rows}

    def record(self, rows: list[tuple[str, str, bool, bytes]]) -> None:
        """(key, version, deleted, envelope) rows in one transaction."""
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO applied VALUES (?, ?, ?, ?)",
                                       [(k, v, 1 if d else 0, e) for k, v, d, e in rows])
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                self._conn.execute("ROLLBACK")
                raise
            for k, v, d, _e in rows:
                self.versions[k] = (v, d)

    def envelope(self, key: str) -> Optional[bytes]:
        with self._lock:
            row = self._conn.execute("SELECT envelope FROM applied WHERE person_key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def meta(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
