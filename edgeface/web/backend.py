"""What the web app does to the door's state files: the gallery, the audit log, the decision thumbnails.

Every call here is synchronous and runs in a worker thread (never on the event loop). The daemon reads the same
SQLite files (WAL) and notices gallery commits by itself (PRAGMA data_version), so nothing here talks to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeface.config import EdgefaceConfig
from edgeface.daemon.app import state_path
from edgeface.daemon.thumbnails import ThumbnailStore, face_thumbnail
from edgeface.errors import EdgefaceError, ImageError
from edgeface.events.audit import AuditLog
from edgeface.vision.images import decode_image

log = logging.getLogger(__name__)

RESULTS = ("granted", "denied", "unknown")


@dataclass
class PhotoResult:
    name: str
    accepted: bool
    reason: str = ""


@dataclass
class EnrollOutcome:
    person: str
    photos: list[PhotoResult] = field(default_factory=list)
    error: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return sum(p.accepted for p in self.photos)


class Backend:
    """The gallery and analyzer are opened on first use (the models load once, a few seconds on a Pi)."""

    def __init__(self, cfg: EdgefaceConfig) -> None:
        self.cfg = cfg
        self.audit = AuditLog(state_path(cfg, cfg.audit.path), retention_days=cfg.audit.retention_days,
                              max_rows=cfg.audit.max_rows)
        self.thumbs = ThumbnailStore(state_path(cfg, "thumbnails.db"), retention_days=cfg.web.thumbnail_retention_days,
                                     max_rows=cfg.web.thumbnail_max)
        self._lock = threading.RLock()
        self._analyzer: Any = None
        self._gallery: Any = None

    # ------------------------------------------------------------------ lazily opened parts
    @property
    def analyzer(self) -> Any:
        with self._lock:
            if self._analyzer is None:
                from edgeface.daemon.app import ensure_embedder
                from edgeface.vision.analyzer import FaceAnalyzer

                ensure_embedder(self.cfg)
                self._analyzer = FaceAnalyzer.from_config(self.cfg.detector, self.cfg.embedder, self.cfg.models_dir)
            return self._analyzer

    @property
    def gallery(self) -> Any:
        with self._lock:
            if self._gallery is None:
                from edgeface.gallery import analyzer_model, open_gallery

                # the daemon's gallery, opened as the daemon opens it (created if the web app comes first)
                self._gallery = open_gallery(self.cfg, model=analyzer_model(self.analyzer), create=True)
            return self._gallery

    def record(self, action: str, user: str, **detail: Any) -> None:
        """Every admin action goes to the door's audit log as kind 'web'."""
        self.audit.record("web", result=action, user=user, **detail)

    # ------------------------------------------------------------------ people
    def people(self) -> list[Any]:
        return list(self.gallery.people())

    def person(self, pid: int) -> Any:
        for p in self.people():
            if p.id == pid:
                return p
        raise EdgefaceError(f"no person with id {pid}")

    def enroll_uploads(self, name: str, uploads: list[tuple[str, bytes]], user: str) -> EnrollOutcome:
        """Quality-gate every uploaded photo (decoded through the bomb-safe decode_image) and enroll the accepted
        ones in one transaction; each rejected photo keeps the gate's reason."""
        from edgeface.enroll import assess_image
        from edgeface.gallery import EnrollItem, image_sha256

        out = EnrollOutcome(name)
        items = []
        with self._lock:
            for filename, data in uploads:
                sha = image_sha256(data)
                try:
                    rgb = decode_image(data, name=filename)
                except ImageError as exc:
                    items.append((EnrollItem(filename, sha, reason=str(exc).replace(f"{filename}: ", "")), None))
                    continue
                items.append((assess_image(self.analyzer, rgb, source=filename, sha256=sha), rgb))
            try:
                report = self.gallery.enroll(name, [it for it, _ in items])
            except EdgefaceError as exc:
                out.error = str(exc)
                out.photos = [PhotoResult(it.source, False, it.reason or "not stored") for it, _ in items]
                return out
            added = set(report.added)
            dup = set(report.duplicates)
            for it, rgb in items:
                if it.source in added:
                    out.photos.append(PhotoResult(it.source, True))
                elif it.source in dup:
                    out.photos.append(PhotoResult(it.source, False, "already enrolled (the same photo)"))
                else:
                    out.photos.append(PhotoResult(it.source, False, it.reason or "rejected"))
            out.warnings = list(report.warnings)
            first = next(((it, rgb) for it, rgb in items if it.source in added), None)
            if first is not None:
                self._save_chip(report.person_id, name, first[1], first[0])
        self.record("enroll", user, person_id=report.person_id, person_name=name, added=out.added,
                    rejected=[p.name for p in out.photos if not p.accepted])
        return out

    def _save_chip(self, pid: int, name: str, rgb: np.ndarray, item: Any) -> None:
        faces = self.analyzer.detect(rgb)
        if faces:
            face = max(faces, key=lambda f: f.size)
            self.thumbs.save(f"enroll-{pid}", result="enrolled", person_id=pid, person_name=name,
                             jpeg=face_thumbnail(rgb, face.box), embedding=None)

    def set_enabled(self, pid: int, enabled: bool, user: str) -> None:
        p = self.person(pid)
        (self.gallery.enable if enabled else self.gallery.disable)(p.name)
        self.record("enable" if enabled else "disable", user, person_id=pid, person_name=p.name)

    def set_schedule(self, pid: int, days: list[str], start: str, end: str, user: str) -> None:
        p = self.person(pid)
        schedule = None if not days and not start and not end else {
            "days": days or ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
            "windows": [[start or "00:00", end or "24:00"]]}
        self.gallery.set_schedule(p.name, schedule)
        self.record("schedule", user, person_id=pid, person_name=p.name, schedule=schedule)

    def remove(self, pid: int, user: str) -> int:
        p = self.person(pid)
        n = self.gallery.remove(p.name)
        t = self.thumbs.delete_person(pid)
        self.record("delete", user, person_id=pid, person_name=p.name, embeddings=n, thumbnails=t)
        return n

    # ------------------------------------------------------------------ access log
    def decisions(self, *, person: str = "", result: str = "", since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 100) -> list[dict]:
        """Access decisions, newest first, read straight from the audit file (read-only connection)."""
        where, args = ["kind = 'access'"], []
        if person:
            where.append("person_name = ?")
            args.append(person)
        if result in RESULTS:
            where.append("result = ?")
            args.append(result)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        path = state_path(self.cfg, self.cfg.audit.path)
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT id, ts, result, person_id, person_name, distance, event_id, detail FROM audit "
                              f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        finally:
            db.close()
        have = self.thumbs.states()
        out = []
        for r in rows:
            try:
                detail = json.loads(r[7])
            except ValueError:
                detail = {}
            out.append({"id": r[0], "ts": r[1], "result": r[2], "person_id": r[3], "person_name": r[4],
                        "distance": r[5], "event_id": r[6], "reason": detail.get("reason", ""),
                        "thumbnail": r[6] in have, "labelled": have.get(r[6], ("", None))[0] == "labelled",
                        "corrected": have.get(r[6], ("", None))[0] == "corrected",
                        "label": have.get(r[6], ("", None))[1]})
        return out

    def label(self, event_id: str, name: str, user: str) -> str:
        """"This is <name>" (an existing or a new person): that decision's face is enrolled for them."""
        from edgeface.gallery import EnrollItem

        thumb = self.thumbs.get(event_id)
        if thumb is None or thumb.embedding is None:
            raise EdgefaceError(f"decision {event_id}: no stored face (thumbnails expire after "
                                f"{self.cfg.web.thumbnail_retention_days} days)")
        item = EnrollItem(f"decision {event_id}", hashlib.sha256(thumb.jpeg).hexdigest(), thumb.embedding, 0.5)
        with self._lock:
            report = self.gallery.enroll(name, [item])
        self.thumbs.relabel(event_id, report.person_id, report.name, "labelled")
        if report.created:
            self.thumbs.save(f"enroll-{report.person_id}", result="enrolled", person_id=report.person_id,
                             person_name=report.name, jpeg=thumb.jpeg, embedding=None)
        self.record("label", user, event_id=event_id, person_id=report.person_id, person_name=report.name,
                    created=report.created, added=len(report.added))
        return report.name

    def not_person(self, event_id: str, user: str) -> str:
        """"Not <person>" on a wrong grant: remove that person's embedding nearest to the decision's face (the one
        that matched it) and record the correction."""
        thumb = self.thumbs.get(event_id)
        if thumb is None or thumb.embedding is None or thumb.person_id is None:
            raise EdgefaceError(f"decision {event_id}: no stored face of a matched person to correct")
        with self._lock:
            p = self.person(int(thumb.person_id))
            eid, dist = self.gallery.remove_nearest_embedding(p.id, thumb.embedding)
        self.thumbs.relabel(event_id, None, None, "corrected")
        self.record("not_person", user, event_id=event_id, person_id=p.id, person_name=p.name, embedding_id=eid,
                    distance=round(dist, 4))
        return p.name

    def close(self) -> None:
        for part in (self._gallery, self._analyzer, self.thumbs, self.audit):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing %s failed", type(part).__name__)


def parse_day_time(text: str, *, end: bool = False) -> Optional[float]:
    """'2026-12-06' or '2026-12-06T14:30' (local time of the Pi) -> epoch seconds; '' -> None."""
    import datetime as dt

    text = (text or "").strip()
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise EdgefaceError(f"time {text[:32]!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    if end and len(text) == 10:
        value += dt.timedelta(days=1)
    return value.timestamp()


def thumbnail_path_ok(event_id: str) -> bool:
    """Event ids are hex/uuid-like or 'enroll-<n>': anything else (dots, slashes) is refused before any lookup."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", event_id))


__all__ = ["Backend", "EnrollOutcome", "PhotoResult", "parse_day_time", "thumbnail_path_ok", "Path"]
