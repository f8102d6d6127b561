"""Damaged people rows must never let in someone the access list keeps out.

The rule fields of a person (enabled, schedule, name, external id) decide a grant as much as the embeddings do. The
experiment: a small real gallery (one enabled person, one disabled, one outside their schedule), every single bit of
its people rows flipped in the file on disk (one flip at a time, SQLite not involved, like a failing SD card), the
file opened as the daemon opens it each time and every enrolled face shown to the daemon's policy. A flip may lock someone
out or make the gallery unreadable; it must never grant the disabled or the out-of-schedule person. Before the rows
had a checksum, a flip of `enabled` (0 -> 1) and one of a window's end ("12:00" -> "13:00") each opened the door.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import NoAnalyzer

from edgeface.config import PolicyConfig
from edgeface.decide import PersonRule, Policy, person_rule
from edgeface.errors import GalleryError
from edgeface.gallery import EnrollItem, Gallery

DIM = 128
#: Sunday 2026-11-29 12:30 UTC: bob is disabled, carol may enter 08:00-12:00 only.
NOW = dt.datetime(2026, 11, 29, 12, 30, tzinfo=dt.timezone.utc).timestamp()
CAROL_SCHEDULE = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "windows": [["08:00", "12:00"]]}


def _faces() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for name in ("alice", "bob", "carol"):
        centre = rng.normal(size=DIM)
        pts = centre / np.linalg.norm(centre) + 0.1 * rng.normal(size=(2, DIM)) / np.sqrt(DIM)
        out[name] = (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)
    return out


def _open(path: Path) -> Gallery:
    return Gallery.open(path, model_id="test_model", max_distance=0.4, create=False)


def _build(path: Path, faces: dict[str, np.ndarray]) -> None:
    with Gallery.open(path, model_id="test_model", max_distance=0.4) as g:
        for name, vecs in faces.items():
            g.enroll(name, [EnrollItem(f"{name}{i}.jpg", f"{name}-{i}", v, 0.9) for i, v in enumerate(vecs)],
                     external_id=None)
        g.disable("bob")
        g.set_schedule("carol", CAROL_SCHEDULE)
        g._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file, as after a clean stop


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at `at`: (value, bytes used)."""
    value = 0
    for i in range(9):
        b = data[at + i]
        if i == 8:
            return (value << 8) | b, 9
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, i + 1
    raise AssertionError("unreachable")


def people_row_bytes(path: Path) -> list[tuple[int, int]]:
    """(start, end) file offsets of every people row (cell: payload size, rowid, record) in the table's leaf page."""
    with sqlite3.connect(path) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'people'").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    page = (root - 1) * page_size
    assert data[page] == 13, "a small gallery's people table is one leaf page"
    n_cells = int.from_bytes(data[page + 3:page + 5], "big")
    spans = []
    for k in range(n_cells):
        cell = page + int.from_bytes(data[page + 8 + 2 * k:page + 10 + 2 * k], "big")
        size, a = _varint(data, cell)
        _rowid, b = _varint(data, cell + a)
        spans.append((cell, cell + a + b + size))
    return spans


def _grants(path: Path, faces: dict[str, np.ndarray]) -> dict[str, bool]:
    """Which faces the daemon's policy would let in with this gallery (its rules built as the daemon builds them)."""
    try:
        g = _open(path)
    except GalleryError:
        return {name: False for name in faces}  # refused: the daemon does not start, nobody enters
    try:
        try:
            rules = {p.id: person_rule(p) for p in g.people()}
        except Exception:  # noqa: BLE001  (the daemon denies everyone when the list cannot be read)
            rules = {}
        out = {}
        for name, vecs in faces.items():
            policy = Policy(PolicyConfig(min_frames=1, window_frames=1, timezone="UTC"),
                            rules=lambda pid: rules.get(pid, PersonRule(enabled=False, error="not in the list")))
            try:
                match = g.match(vecs[0])
            except GalleryError:
                out[name] = False
                continue
            out[name] = policy.observe(NOW, match, face_size=200).action == "grant"
        return out
    finally:
        g.close()


def test_every_bit_flip_of_the_people_rows_grants_no_disabled_or_out_of_schedule_person(tmp_path):
    faces = _faces()
    clean = tmp_path / "clean.db"
    _build(clean, faces)
    assert _grants(clean, faces) == {"alice": True, "bob": False, "carol": False}
    original = clean.read_bytes()
    spans = people_row_bytes(clean)
    tried, wrong, alice_kept = 0, [], 0
    fd = os.open(clean, os.O_RDWR)
    try:
        for start, end in spans:
            for at in range(start, end):
                for bit in range(8):  # one flip at a time in the file itself, put back before the next
                    os.pwrite(fd, bytes([original[at] ^ (1 << bit)]), at)
                    got = _grants(clean, faces)
                    os.pwrite(fd, original[at:at + 1], at)
                    tried += 1
                    alice_kept += got["alice"]
                    if got["bob"] or got["carol"]:
                        wrong.append((at, bit, got))
    finally:
        os.close(fd)
    assert clean.read_bytes() == original  # opening a damaged copy wrote nothing: every flip saw the clean rest
    print(f"people rows: {len(spans)} rows, {sum(e - s for s, e in spans)} bytes, {tried} single-bit flips; "
          f"grants to the disabled or out-of-schedule person: {len(wrong)}; alice still let in after {alice_kept}")
    assert tried == 8 * sum(e - s for s, e in spans) and tried > 1000
    assert wrong == [], f"{len(wrong)} of {tried} flips granted access: {wrong[:5]}"


def test_rule_changed_outside_edgeface_denies_that_person_and_is_logged(tmp_path, caplog):
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon

    faces = _faces()
    path = tmp_path / "gallery.db"
    _build(path, faces)
    with sqlite3.connect(path) as db:  # a hand edit (or one damaged bit): bob enabled without edgeface
        db.execute("UPDATE people SET enabled = 1 WHERE name = 'bob'")
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False},
                        "door": {"pin_factory": "mock"},
                        "camera": {"source": str(Path(__file__).parent / "fixtures" / "faces" / "paul_allen")}})

    g = _open(path)
    with caplog.at_level(logging.ERROR, logger="edgeface.daemon.pipeline"):
        with Daemon(cfg, analyzer=NoAnalyzer(), gallery=g, pin_factory=MockFactory()) as d:
            ids = {p.name: p.id for p in g.people()}
            alice, bob = d.rules.rule(ids["alice"]), d.rules.rule(ids["bob"])
            verified = g.verify(faces["bob"][0], "bob").known
    g.close()
    assert alice.enabled and alice.error is None
    assert not bob.enabled and "checksum" in (bob.error or "")
    assert not verified
    assert any("'bob'" in r.getMessage() and "checksum" in r.getMessage() and "denied" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_rules_set_through_edgeface_stay_trusted(tmp_path):
    faces = _faces()
    path = tmp_path / "gallery.db"
    _build(path, faces)
    with _open(path) as g:
        g.enable("bob")
        g.rename("carol", "Carol C")
        g.set_schedule("Carol C", None)
        g.add_person("dave", external_id="badge-4")
        assert all(p.rule_error is None for p in g.people())
    assert _grants(path, faces) == {"alice": True, "bob": True, "carol": True}


def test_export_refuses_a_damaged_row(tmp_path):
    path = tmp_path / "gallery.db"
    _build(path, _faces())
    with sqlite3.connect(path) as db:
        db.execute("UPDATE people SET external_id = 'badge-9' WHERE name = 'alice'")
    with _open(path) as g, pytest.raises(GalleryError, match="alice.*checksum"):
        g.export(tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_schema_2_gallery_gets_row_checksums_and_keeps_its_rules(tmp_path):
    faces = _faces()
    path = tmp_path / "gallery.db"
    _build(path, faces)
    with sqlite3.connect(path) as db:  # what an edgeface with schema 2 wrote: people rows without a checksum
        db.execute("ALTER TABLE people DROP COLUMN checksum")
        db.execute("PRAGMA user_version = 2")
    assert _grants(path, faces) == {"alice": True, "bob": False, "carol": False}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM people WHERE checksum IS NULL").fetchone()[0] == 0
