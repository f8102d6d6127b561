"""Corrupt state must never open the door: damaged embeddings, unreadable schedules, loose permissions.

What a user relies on: a gallery whose stored vectors were damaged on disk (a NaN, a few overwritten bytes,
a vector replaced by somebody else's) is refused with one line naming the file and the row, instead of
matching every stranger; a person whose schedule cannot be read is denied (and it is logged) while the
others keep their own rules. Real SQLite files written byte by byte, the real daemon policy.
"""
from __future__ import annotations

import logging
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import NoAnalyzer

from edgeface.decide import PersonRule
from edgeface.errors import GalleryError
from edgeface.gallery import EnrollItem, Gallery, SCHEMA_VERSION

DIM = 128


def _unit_vectors(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    pts = centre / np.linalg.norm(centre) + 0.15 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    return (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)


def _gallery(path, **kw) -> Gallery:
    return Gallery.open(path, model_id="test_model", max_distance=0.4, **kw)


def _enrolled(path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    people = {"alice": _unit_vectors(1, 3), "bob": _unit_vectors(2, 3)}
    with _gallery(path) as g:
        for name, vecs in people.items():
            g.enroll(name, [EnrollItem(f"{name}{i}.jpg", f"{name}-{i}", v, 0.9) for i, v in enumerate(vecs)])
        g._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file, as after a clean stop
    stranger = _unit_vectors(99, 1)[0]
    return people, stranger


def _overwrite_in_file(path, old: bytes, new: bytes) -> None:
    """Damage the file on disk the way a failing SD card does: bytes replaced in place, SQLite not involved."""
    data = path.read_bytes()
    at = data.find(old)
    assert at > 0 and data.count(old) == 1, "the vector must be in the file exactly once"
    path.write_bytes(data[:at] + new + data[at + len(new):])


def _integrity(path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.parametrize("damage", ["nan", "few_bytes", "other_vector"])
def test_damaged_embedding_refuses_to_open_naming_file_and_row(tmp_path, damage):
    path = tmp_path / "gallery.db"
    people, stranger = _enrolled(path)
    victim = people["alice"][1].astype("<f4").tobytes()
    if damage == "nan":
        new = struct.pack("<f", float("nan"))
    elif damage == "few_bytes":  # still finite and nearly unit length: only the checksum can tell
        new = bytes([victim[0] ^ 0x01, victim[1] ^ 0x01, victim[2]])
    else:  # a stranger's (finite, unit) vector written over alice's
        new = stranger.astype("<f4").tobytes()
    _overwrite_in_file(path, victim, new)
    assert _integrity(path) == "ok"  # SQLite cannot see this kind of damage
    with pytest.raises(GalleryError) as exc:
        with _gallery(path) as g:
            g.match(stranger)  # before the fix: alice at distance 0.0 (NaN) or 0.0 (other vector)
    msg = str(exc.value)
    assert str(path) in msg and "embedding 2" in msg and "'alice'" in msg and "\n" not in msg, msg


def test_damage_written_while_the_daemon_runs_is_never_a_match(tmp_path):
    path = tmp_path / "gallery.db"
    people, stranger = _enrolled(path)
    with _gallery(path) as g:
        assert not g.match(stranger).known
        with sqlite3.connect(path) as other:  # another process (or bit rot) changes one vector
            bad = people["bob"][0].copy()
            bad[5] = np.nan
            other.execute("UPDATE embeddings SET vector = ? WHERE id = 4", (bad.astype("<f4").tobytes(),))
        with pytest.raises(GalleryError, match="embedding 4 of 'bob'"):
            g.match(stranger)
        with pytest.raises(GalleryError, match="embedding 4 of 'bob'"):
            g.verify(stranger, "bob")


def test_old_gallery_is_migrated_with_checksums_and_stays_usable(tmp_path):
    path = tmp_path / "gallery.db"
    people, stranger = _enrolled(path)
    with sqlite3.connect(path) as db:  # what an edgeface with schema 1 wrote: no checksum columns
        db.execute("ALTER TABLE embeddings DROP COLUMN checksum")
        db.execute("ALTER TABLE people DROP COLUMN checksum")
        db.execute("PRAGMA user_version = 1")
    with _gallery(path) as g:
        assert g.match(people["alice"][0]).name == "alice" and not g.match(stranger).known
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM embeddings WHERE checksum IS NULL").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM people WHERE checksum IS NULL").fetchone()[0] == 0


def test_old_gallery_with_a_nan_is_refused_by_the_migration(tmp_path):
    path = tmp_path / "gallery.db"
    people, stranger = _enrolled(path)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE embeddings DROP COLUMN checksum")
        db.execute("ALTER TABLE people DROP COLUMN checksum")
        db.execute("PRAGMA user_version = 1")
        bad = people["alice"][2].copy()
        bad[0] = np.nan
        db.execute("UPDATE embeddings SET vector = ? WHERE id = 3", (bad.astype("<f4").tobytes(),))
    with pytest.raises(GalleryError, match=r"embedding 3 of 'alice'.*NaN"):
        _gallery(path)
    with sqlite3.connect(path) as db:  # the migration was rolled back: the file is as it was
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


# ----------------------------------------------------------------------------------------------- schedules


def test_one_malformed_schedule_denies_that_person_only_and_is_logged(tmp_path, caplog):
    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon

    path = tmp_path / "gallery.db"
    _enrolled(path)
    with _gallery(path) as g:
        g.set_schedule("bob", {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                               "windows": [["00:00", "24:00"]]})
    with sqlite3.connect(path) as db:  # a hand edit or a damaged row: not JSON any more
        db.execute("UPDATE people SET schedule = '{\"days\": [\"mon\"' WHERE name = 'alice'")
    g = _gallery(path)
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False},
                        "door": {"pin_factory": "mock"},
                        "camera": {"source": str(Path(__file__).parent / "fixtures" / "faces" / "paul_allen")}})
    from gpiozero.pins.mock import MockFactory

    with caplog.at_level(logging.ERROR, logger="edgeface.daemon.pipeline"):
        with Daemon(cfg, analyzer=NoAnalyzer(), gallery=g, pin_factory=MockFactory()) as d:
            ids = {p.name: p.id for p in g.people()}
            alice, bob = d.rules.rule(ids["alice"]), d.rules.rule(ids["bob"])
            unknown_id = d.rules.rule(12345)
    g.close()
    assert alice.enabled is False and "schedule" in (alice.error or "")
    assert bob.enabled is True and bob.schedule is not None and bob.error is None
    assert unknown_id.enabled is False  # a person the rules do not know is no person to let in
    assert any("alice" in r.getMessage() and "schedule" in r.getMessage() and "denied" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_policy_denies_a_person_whose_rule_is_unreadable():
    from edgeface.config import PolicyConfig
    from edgeface.decide import Policy
    from edgeface.types import Match

    pol = Policy(PolicyConfig(min_frames=1, window_frames=1),
                 rules=lambda pid: PersonRule(enabled=False, error="schedule unreadable"))
    d = pol.observe(1000.0, Match(7, "alice", 0.1, 0.4, 7, "alice"), face_size=200)
    assert d.action == "deny" and "schedule unreadable" in d.reason


# ----------------------------------------------------------------------------------------------- permissions


def _mode(p: Path) -> int:
    import stat

    return stat.S_IMODE(p.stat().st_mode)


def test_loose_state_dir_and_gallery_are_tightened_with_a_log_line(tmp_path, caplog):
    import os

    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon

    state = tmp_path / "state"
    state.mkdir()
    _enrolled(state / "gallery.db")
    os.chmod(state, 0o755)  # what an older install or a hand-made directory left
    os.chmod(state / "gallery.db", 0o644)
    cfg = parse_config({"state_dir": str(state), "mqtt": {"enabled": False}, "gallery": {"path": "gallery.db"},
                        "embedder": {"model": "test_model"}, "door": {"pin_factory": "mock"},
                        "camera": {"source": str(Path(__file__).parent / "fixtures" / "faces" / "paul_allen")}})
    with caplog.at_level(logging.INFO):
        with Daemon(cfg, analyzer=NoAnalyzer(), pin_factory=MockFactory()):
            pass
    assert _mode(state) == 0o700 and _mode(state / "gallery.db") == 0o600
    lines = [r.getMessage() for r in caplog.records]
    assert any("tightened" in m and str(state) in m and "0755" in m for m in lines), lines
    assert any("tightened" in m and "gallery.db" in m and "0644" in m for m in lines), lines


def test_empty_gallery_file_is_refused_not_recreated(tmp_path):
    path = tmp_path / "gallery.db"
    _enrolled(path)
    path.write_bytes(b"")  # truncated by a full disk or a bad copy: the people are gone, not "no people"
    with pytest.raises(GalleryError, match=rf"gallery {path} is empty \(0 bytes\)"):
        _gallery(path)
    assert path.stat().st_size == 0  # left for the operator to look at


def test_edgeface_run_refuses_to_start_on_a_damaged_gallery_with_one_line(tmp_path, analyzer):
    """The daemon never starts matching on a damaged gallery: `edgeface run` exits with one error line naming the
    file and the row, and the relay is never driven."""
    import subprocess
    import sys

    import yaml

    from edgeface.enroll import enroll_images
    from edgeface.config import parse_config
    from edgeface.gallery import resolve_max_distance

    faces = Path(__file__).parent / "fixtures" / "faces"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = parse_config({})
    path = state / "gallery.db"
    with Gallery.open(path, model_id=analyzer.embedder.model_id, embedding_dim=analyzer.embedder.spec.embedding_dim,
                      max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir)) as g:
        g.enroll("paul_allen", enroll_images(analyzer, sorted((faces / "paul_allen").glob("*.jpg"))[:2]))
        g._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        blob = g._conn.execute("SELECT vector FROM embeddings WHERE id = 1").fetchone()[0]
    _overwrite_in_file(path, blob[:8], struct.pack("<ff", float("nan"), 0.5))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "camera": {"source": str(faces / "paul_allen")},
                                      "door": {"pin_factory": "mock"}, "mqtt": {"enabled": False}}))
    done = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(config), "run"], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "embedding 1 of 'paul_allen' is damaged" in errors[0], \
        done.stderr[-2000:]
    assert "NaN" in errors[0]
    assert not (state / "audit.db").exists() or "granted" not in (state / "audit.db").read_bytes().decode("latin-1")
