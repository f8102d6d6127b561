"""The gallery side of fleet sync (edgeface.fleet): a fleet person is the people row whose external_id is
FLEET_ID_PREFIX + person_key; a change replaces it whole (name, enabled, schedule, embeddings) in one transaction,
so a door never matches against half a change, and every row it writes is sealed with its integrity checksum."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Optional, Sequence

from edgeface.errors import GalleryError
from edgeface.gallery.records import validate_name, validate_schedule

if TYPE_CHECKING:
    from edgeface.gallery.store import Gallery

#: external_id of a person the fleet manages: this prefix + the fleet's person key.
FLEET_ID_PREFIX = "fleet:"


def apply_fleet_changes(gallery: "Gallery", changes: Sequence[tuple[str, Optional[dict]]]) -> None:
    """(person_key, record) puts a person, (person_key, None) erases one; all in one transaction."""
    checked = []
    for key, rec in changes:
        if rec is not None:
            rec = dict(rec, name=validate_name(rec["name"]), schedule=validate_schedule(rec.get("schedule")))
        checked.append((FLEET_ID_PREFIX + key, key, rec))
    with gallery._write() as c:
        for ext, key, rec in checked:
            row = c.execute("SELECT id FROM people WHERE external_id = ?", (ext,)).fetchone()
            if row is not None:
                c.execute("DELETE FROM crops WHERE embedding_id IN (SELECT id FROM embeddings WHERE "
                          "person_id = ?)", (row[0],))
                c.execute("DELETE FROM embeddings WHERE person_id = ?", (row[0],))
            if rec is None:
                if row is not None:
                    c.execute("DELETE FROM people WHERE id = ?", (row[0],))
                continue
            clash = c.execute("SELECT external_id FROM people WHERE name = ?", (rec["name"],)).fetchone()
            if clash is not None and clash[0] != ext:
                raise GalleryError(f"fleet person {key!r}: the name {rec['name']!r} belongs to another person "
                                   f"in gallery {gallery.path} (external id {clash[0]!r})")
            pid = gallery._insert_person(c, rec["name"], ext, rec["schedule"]) if row is None else int(row[0])
            c.execute("UPDATE people SET name = ?, enabled = ?, schedule = ?, updated = ? WHERE id = ?",
                      (rec["name"], 1 if rec["enabled"] else 0,
                       json.dumps(rec["schedule"]) if rec["schedule"] else None, time.time(), pid))
            hashes = list(rec["image_hashes"])
            gallery._insert_embeddings(c, pid, rec["embeddings"], hashes, [1.0] * len(hashes), None)
            gallery._seal(c, pid)
