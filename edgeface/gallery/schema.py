"""The gallery file's format: the SQLite schema, its migrations, and the checks that tell our file from any other.

A schema change appends a migration; `Gallery` applies the missing ones in one transaction when it opens a file."""
from __future__ import annotations

import datetime as _dt
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Optional

from edgeface.errors import GalleryError
from edgeface.gallery.index import embedding_checksum, vector_problem
from edgeface.gallery.records import person_checksum
from edgeface.security import SQLITE_SUFFIXES

#: PRAGMA application_id of an edgeface gallery ("EDGF"): tells our file from any other SQLite database.
APPLICATION_ID = 0x45444746
#: Current schema; a file with a higher user_version was written by a newer edgeface.
SCHEMA_VERSION = 3

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
    # 1 -> 2: a sha256 per embedding (see embedding_checksum); fill_embedding_checksums fills it for existing rows once,
    # after checking each stored vector (finite, unit length, dimension).
    """
    ALTER TABLE embeddings ADD COLUMN checksum TEXT;
    """,
    # 2 -> 3: a sha256 per people row over the fields that decide a grant (see records.person_checksum);
    # fill_people_checksums fills it for existing rows once. A row that no longer matches denies that person.
    """
    ALTER TABLE people ADD COLUMN checksum TEXT;
    """,
]



def check_header(path: Path) -> None:
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


#: (embedding id, owner's name or None, why) -> the error line naming the file and the row.
DamagedMessage = Callable[[int, Optional[str], str], str]


def migrate(c: sqlite3.Connection, *, model_id: str, embedding_dim: int, damaged: DamagedMessage) -> None:
    """Bring the file to SCHEMA_VERSION in one transaction (a migration that fails leaves the file as it was)."""
    c.execute("BEGIN IMMEDIATE")
    try:
        current = c.execute("PRAGMA user_version").fetchone()[0]  # re-read under the lock (another process)
        for i in range(current, SCHEMA_VERSION):
            for stmt in MIGRATIONS[i].split(";"):
                if stmt.strip():
                    c.execute(stmt)
            if i == 1:
                fill_embedding_checksums(c, damaged)
            if i == 2:
                fill_people_checksums(c)
        if current == 0:
            c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            created = _dt.datetime.fromtimestamp(time.time(), _dt.timezone.utc).isoformat(timespec="seconds")
            c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                          [("created", created), ("model_id", model_id), ("embedding_dim", str(embedding_dim))])
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise


def fill_embedding_checksums(c: sqlite3.Connection, damaged: DamagedMessage) -> None:
    """Migration 1 -> 2: check every stored vector once and record its checksum (inside the migration's
    transaction, so a damaged vector leaves the file as it was and the gallery is refused)."""
    rows = c.execute("SELECT e.id, e.person_id, p.name, e.model_id, e.dim, e.vector FROM embeddings e "
                     "LEFT JOIN people p ON p.id = e.person_id ORDER BY e.id").fetchall()
    for eid, pid, name, model, dim, blob in rows:
        why = vector_problem(blob, int(dim))
        if why is not None:
            raise GalleryError(damaged(eid, name, why))
        c.execute("UPDATE embeddings SET checksum = ? WHERE id = ?", (embedding_checksum(pid, model, bytes(blob)), eid))


def fill_people_checksums(c: sqlite3.Connection) -> None:
    """Migration 2 -> 3: record each people row's checksum as it is now (the rows had no protection before; from
    here on a changed bit denies that person)."""
    for row in c.execute("SELECT id, name, external_id, enabled, schedule FROM people").fetchall():
        c.execute("UPDATE people SET checksum = ? WHERE id = ?", (person_checksum(*row), row[0]))


def create_file(path: Path, write_schema: Callable[[sqlite3.Connection, Path], None]) -> None:
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
            write_schema(conn, tmp)
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


def connect_read_only(path: Path) -> sqlite3.Connection:
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
