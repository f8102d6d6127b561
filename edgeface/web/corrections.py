"""A wrong grant corrected: the matched person's embedding nearest to the face that was let in is removed.

It uses the gallery's own query and write transaction (Gallery._query / _write) so the daemon's index notices the change like any other commit.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgeface.errors import GalleryError


def remove_nearest_embedding(gallery: Any, person_id: int, embedding: np.ndarray) -> tuple[int, float]:
    """(embedding id removed, its cosine distance to `embedding`); GalleryError when the person has none."""
    rows = gallery._query("SELECT id, vector FROM embeddings WHERE person_id = ? AND model_id = ?",
                          (person_id, gallery.model_id))
    if not rows:
        raise GalleryError(f"person {person_id} has no embeddings of model {gallery.model_id} to remove")
    q = np.asarray(embedding, np.float32).ravel()
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    dists = [1.0 - float(np.frombuffer(blob, "<f4") @ q) for _eid, blob in rows]
    best = int(np.argmin(dists))
    eid = int(rows[best][0])
    with gallery._write() as c:
        c.execute("DELETE FROM crops WHERE embedding_id = ?", (eid,))
        c.execute("DELETE FROM embeddings WHERE id = ?", (eid,))
    return eid, dists[best]
