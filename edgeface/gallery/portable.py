"""Moving a gallery's content: the portable export file (one UTF-8 JSON document, vectors as base64 little-endian
float32; see docs/gallery.md), its import, and re-embedding the kept face chips with another model."""
from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeface.errors import GalleryError
from edgeface.gallery.index import _unit, embedding_checksum
from edgeface.gallery.records import Chip, _decode_png, _face_from_json, _iso, validate_name, validate_schedule
from edgeface.security import write_private_atomic

if TYPE_CHECKING:
    from edgeface.gallery.store import Gallery

#: Export file format tag and version.
EXPORT_FORMAT = "edgeface-gallery"
EXPORT_VERSION = 1


def export_gallery(gallery: Gallery, path: str | os.PathLike[str]) -> int:
    """Write the whole gallery as a portable JSON file (0600, atomic). Returns the number of people."""
    path = Path(path)
    people = []
    for p in gallery.people():
        if p.rule_error is not None:  # a damaged rule must not travel to another door as a valid one
            raise GalleryError(f"cannot export gallery {gallery.path}: person {p.name!r}: {p.rule_error}")
        embs = []
        rows = gallery._query("SELECT e.vector, e.image_sha256, e.quality, e.created, c.image, c.face, e.id, "
                              "e.checksum FROM embeddings e LEFT JOIN crops c ON c.embedding_id = e.id "
                              "WHERE e.person_id = ? AND e.model_id = ? ORDER BY e.id", (p.id, gallery.model_id))
        for vec, sha, q, created, img, face_json, eid, cs in rows:
            gallery._checked_vector(eid, p.id, p.name, gallery.model_id, vec, cs)  # never export a damaged vector
            e = {"vector": base64.b64encode(vec).decode("ascii"), "image_sha256": sha, "quality": q,
                 "created": created}
            if img is not None:
                e["chip"] = {"png": base64.b64encode(img).decode("ascii"), "face": json.loads(face_json)}
            embs.append(e)
        people.append({"name": p.name, "external_id": p.external_id, "enabled": p.enabled,
                       "schedule": p.schedule, "created": p.created, "updated": p.updated, "embeddings": embs})
    doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_id": gallery.model_id,
           "embedding_dim": gallery.embedding_dim, "vector_encoding": "base64 little-endian float32",
           "exported": _iso(time.time()), "people": people}
    try:
        write_private_atomic(path, json.dumps(doc, indent=1).encode("utf-8"))
    except OSError as exc:
        raise GalleryError(f"cannot write export file {path}: {exc.strerror or exc}") from None
    return len(people)


def import_gallery(gallery: Gallery, path: str | os.PathLike[str], *, merge: bool = False) -> int:
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
    if doc.get("model_id") != gallery.model_id or int(doc.get("embedding_dim", -1)) != gallery.embedding_dim:
        raise GalleryError(f"{path} holds embeddings of model {doc.get('model_id')!r} "
                           f"({doc.get('embedding_dim')}-D) but this gallery uses {gallery.model_id!r}: re-enroll")
    try:
        with gallery._write() as c:
            for p in doc["people"]:
                name = validate_name(p["name"])
                row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
                if row and not merge:
                    raise GalleryError(f"cannot import {path}: {name!r} already exists in gallery {gallery.path} "
                                       "(use --merge to add to existing people)")
                if row:
                    pid = int(row[0])
                else:
                    pid = gallery._insert_person(c, name, p.get("external_id"), validate_schedule(p.get("schedule")),
                                                 enabled=bool(p.get("enabled", True)),
                                                 created=float(p.get("created", time.time())),
                                                 updated=float(p.get("updated", time.time())))
                embs = p.get("embeddings", [])
                vecs = [np.frombuffer(base64.b64decode(e["vector"], validate=True), dtype="<f4") for e in embs]
                chips = []
                for e in embs:
                    ch = e.get("chip")
                    chips.append(Chip(_decode_png(base64.b64decode(ch["png"])),
                                      _face_from_json(json.dumps(ch["face"]))) if ch else None)
                if vecs:
                    gallery._insert_embeddings(c, pid, np.stack(vecs), [e["image_sha256"] for e in embs],
                                               [float(e.get("quality", 0.0)) for e in embs], chips)
    except (KeyError, TypeError, ValueError, base64.binascii.Error) as exc:
        raise GalleryError(f"cannot import {path}: malformed entry ({type(exc).__name__}: {exc}); "
                           "nothing was imported") from None
    return len(doc["people"])


def reembed_gallery(gallery: Gallery, embedder: Any) -> int:
    """Re-embed every kept face chip with `embedder` (its model_id becomes the gallery's). One transaction.

    Embeddings without a kept chip cannot be converted: they are dropped and their people must re-enroll."""
    from edgeface.vision.align import align_face
    from edgeface.vision.embed import enrollment_embeddings

    spec = getattr(embedder, "spec", None)
    if spec is not None and int(spec.embedding_dim) != gallery.embedding_dim:
        raise GalleryError(f"reembed: {embedder.model_id} gives {spec.embedding_dim}-D embeddings, the gallery "
                           f"stores {gallery.embedding_dim}-D")
    rows = gallery._query("SELECT e.id, e.person_id, e.image_sha256, e.quality, c.image, c.face FROM embeddings e "
                          "JOIN crops c ON c.embedding_id = e.id WHERE e.model_id != ?", (embedder.model_id,))
    new_rows = []
    for eid, pid, sha, q, img, face_json in rows:
        chip = _decode_png(img)
        crop = align_face(chip, _face_from_json(face_json), embedder.template)
        new_rows.append((eid, pid, sha, q, enrollment_embeddings(embedder, crop)[0]))
    with gallery._write() as c:
        for eid, pid, sha, q, vec in new_rows:
            blob = _unit(vec, gallery.embedding_dim).astype("<f4").tobytes()
            c.execute("UPDATE embeddings SET model_id = ?, dim = ?, vector = ?, checksum = ? WHERE id = ?",
                      (embedder.model_id, gallery.embedding_dim, blob, embedding_checksum(pid, embedder.model_id, blob),
                       eid))
        c.execute("DELETE FROM embeddings WHERE model_id != ?", (embedder.model_id,))
        gallery._set_meta("model_id", embedder.model_id)
    gallery.model_id = embedder.model_id
    return len(new_rows)
