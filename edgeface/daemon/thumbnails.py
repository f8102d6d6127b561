"""Decision thumbnails: a small face JPEG and the face's embedding for each access decision, in their own SQLite file.

Why a separate file (state_dir/thumbnails.db, WAL): the web app reads it to show who was at the door and to label
or correct a decision ("this is alice", "not bob"), while the daemon only ever appends. A failure here is logged
and never reaches the door: the decision is already made and recorded when its thumbnail is saved.
Bounded by age and count (web.thumbnail_retention_days / thumbnail_max); a person's rows go when they are removed.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np

from edgeface.security import create_private_file

log = logging.getLogger(__name__)

#: Longest side of a stored thumbnail (pixels): enough to recognise a face on a phone, ~5-10 kB as JPEG.
THUMB_SIDE = 160

SCHEMA = """
CREATE TABLE IF NOT EXISTS thumbnails (
    event_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    result TEXT NOT NULL,
    person_id INTEGER,
    person_name TEXT,
    jpeg BLOB NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS thumbnails_ts ON thumbnails(ts);
CREATE INDEX IF NOT EXISTS thumbnails_person ON thumbnails(person_id);
"""


@dataclass(frozen=True)
class Thumbnail:
    event_id: str
    ts: float
    result: str
    person_id: Optional[int]
    person_name: Optional[str]
    jpeg: bytes
    embedding: Optional[np.ndarray]


def face_thumbnail(rgb: np.ndarray, box: Any, side: int = THUMB_SIDE) -> bytes:
    """JPEG of the face box with a 30 % margin, scaled to at most `side` pixels."""
    h, w = rgb.shape[:2]
    x, y, bw, bh = (float(v) for v in box)
    m = 0.3 * max(bw, bh)
    x0, y0 = max(0, int(x - m)), max(0, int(y - m))
    x1, y1 = min(w, int(x + bw + m)), min(h, int(y + bh + m))
    crop = rgb[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else rgb
    scale = side / max(crop.shape[:2])
    if scale < 1:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("thumbnail: JPEG encoding failed")
    return buf.tobytes()


class ThumbnailStore:
    """Append (daemon), read and delete (web app); several processes may open the same file."""

    ROTATE_EVERY = 100

    def __init__(self, path: Union[str, os.PathLike[str]], *, retention_days: int = 30, max_rows: int = 5000,
                 clock: Any = time.time) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_rows = max_rows
        self._clock = clock
        self._lock = threading.Lock()
        self._since_rotate = 0
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private_file(self.path)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a lost thumbnail after power loss costs nothing
        self._db.executescript(SCHEMA)
        self.rotate()

    def save(self, event_id: str, *, result: str, person_id: Optional[int], person_name: Optional[str],
             jpeg: bytes, embedding: Optional[np.ndarray], ts: Optional[float] = None) -> None:
        blob = None if embedding is None else np.asarray(embedding, "<f4").ravel().tobytes()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO thumbnails VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (event_id, self._clock() if ts is None else ts, result, person_id, person_name,
                              jpeg, blob))
            self._since_rotate += 1
            due = self._since_rotate >= self.ROTATE_EVERY
        if due:
            self.rotate()

    def get(self, event_id: str) -> Optional[Thumbnail]:
        with self._lock:
            r = self._db.execute("SELECT event_id, ts, result, person_id, person_name, jpeg, embedding FROM thumbnails "
                                 "WHERE event_id = ?", (event_id,)).fetchone()
        if r is None:
            return None
        emb = None if r[6] is None else np.frombuffer(r[6], "<f4").copy()
        return Thumbnail(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), emb)

    def latest_of(self, person_id: int) -> Optional[Thumbnail]:
        """The person's most recent decision thumbnail (for a face chip), or None."""
        with self._lock:
            r = self._db.execute("SELECT event_id FROM thumbnails WHERE person_id = ? AND result != 'enrolled' "
                                 "ORDER BY ts DESC LIMIT 1", (person_id,)).fetchone()
        return None if r is None else self.get(r[0])

    def event_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT event_id FROM thumbnails")}

    def delete_person(self, person_id: int) -> int:
        """Every thumbnail of decisions about this person (granted, denied, or labelled later)."""
        with self._lock:
            n = self._db.execute("DELETE FROM thumbnails WHERE person_id = ?", (person_id,)).rowcount
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(n)

    def relabel(self, event_id: str, person_id: Optional[int], person_name: Optional[str], result: str) -> None:
        """After the owner's label or correction: whose face it is now, and `labelled` / `corrected`."""
        with self._lock:
            self._db.execute("UPDATE thumbnails SET person_id = ?, person_name = ?, result = ? WHERE event_id = ?",
                             (person_id, person_name, result, event_id))

    def states(self) -> dict[str, tuple[str, Optional[str]]]:
        """event id -> (result, person name) of every stored decision thumbnail."""
        with self._lock:
            return {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT event_id, result, person_name FROM thumbnails")}

    def rotate(self) -> int:
        with self._lock:
            self._since_rotate = 0
            cutoff = self._clock() - self.retention_days * 86400.0
            n = self._db.execute("DELETE FROM thumbnails WHERE ts < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM thumbnails WHERE rowid NOT IN (SELECT rowid FROM thumbnails "
                                  "ORDER BY ts DESC LIMIT ?)", (self.max_rows,)).rowcount
        return int(n)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM thumbnails").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DecisionThumbnails:
    """The daemon's one hook: remember the last analysed face, save it when a decision is reported."""

    def __init__(self, store: ThumbnailStore) -> None:
        self.store = store
        self._face: Optional[tuple[np.ndarray, Any, np.ndarray]] = None

    def saw(self, rgb: np.ndarray, box: Any, embedding: Any) -> None:
        self._face = (rgb, box, embedding)

    def decided(self, event_id: str, result: str, person_id: Optional[int], person_name: Optional[str],
                ts: float) -> None:
        face, self._face = self._face, None
        if face is None:
            return
        try:
            self.store.save(event_id, result=result, person_id=person_id, person_name=person_name,
                            jpeg=face_thumbnail(face[0], face[1]), embedding=face[2], ts=ts)
        except Exception:  # noqa: BLE001  (a thumbnail is never worth a failed decision)
            log.exception("decision thumbnail not saved")

    def close(self) -> None:
        self.store.close()


def erase_person_thumbnails(cfg: Any, person_id: int) -> int:
    """`edgeface people remove`: the person's decision thumbnails go with them (0 when there is no file yet)."""
    from edgeface.daemon.app import state_path

    path = state_path(cfg, "thumbnails.db")
    if not path.exists():
        return 0
    store = ThumbnailStore(path, retention_days=cfg.web.thumbnail_retention_days, max_rows=cfg.web.thumbnail_max)
    try:
        return store.delete_person(person_id)
    finally:
        store.close()
