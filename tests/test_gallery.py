"""Gallery store and matcher: real SQLite files in tmp_path, clustered unit vectors standing in for faces.

Accuracy on real photos lives in test_enroll.py; here we check storage behaviour a user relies on."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import datetime as dt

import numpy as np
import pytest

from edgeface.errors import GalleryError, NoFaceError
from edgeface.gallery import (Chip, EnrollItem, Gallery, SCHEMA_VERSION, Schedule, default_max_distance,
                              validate_name, validate_schedule)
from edgeface.types import Face

DIM = 128


def cluster(seed: int, n: int, spread: float = 0.15) -> np.ndarray:
    """n unit vectors around one random centre (cosine distance to the centre ~ spread^2/2 * DIM / DIM)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    centre /= np.linalg.norm(centre)
    pts = centre + spread * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    return (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)


def items(tag: str, vecs: np.ndarray) -> list[EnrollItem]:
    return [EnrollItem(f"{tag}_{i}.jpg", f"{tag}-{i}", v, 0.9) for i, v in enumerate(vecs)]


def open_g(path, **kw) -> Gallery:
    kw.setdefault("model_id", "test_model")
    kw.setdefault("max_distance", 0.4)
    return Gallery.open(path, **kw)


@pytest.fixture
def people():
    return {name: cluster(seed, 6) for seed, name in enumerate(["alice", "bob", "carol", "dave"])}


@pytest.fixture
def gallery(tmp_path, people):
    g = open_g(tmp_path / "g.db")
    for name, vecs in people.items():
        g.enroll(name, items(name, vecs[:3]))
    yield g
    g.close()


def test_match_known_and_unknown(gallery, people):
    for name, vecs in people.items():
        for v in vecs[3:]:
            m = gallery.match(v)
            assert m.name == name and m.known and m.distance <= 0.4
    stranger = cluster(99, 1)[0]
    m = gallery.match(stranger)
    assert m.person_id is None and m.name is None
    assert m.candidate_name in people and m.distance > 0.4 and m.threshold == 0.4


def test_topk_mean_mode(tmp_path, people):
    with open_g(tmp_path / "g.db", match_mode="topk_mean", top_k=2) as g:
        for name, vecs in people.items():
            g.enroll(name, items(name, vecs[:3]))
        best = open_g(tmp_path / "g.db")
        for name, vecs in people.items():
            mk, mb = g.match(vecs[4]), best.match(vecs[4])
            assert mk.name == name and mk.distance >= mb.distance - 1e-6
        best.close()


def test_empty_gallery_is_unknown(tmp_path):
    with open_g(tmp_path / "g.db") as g:
        m = g.match(cluster(1, 1)[0])
        assert m.person_id is None and m.candidate_id is None and m.distance == 2.0


def test_verify(gallery, people):
    assert gallery.verify(people["bob"][4], "bob").name == "bob"
    m = gallery.verify(people["alice"][4], "bob")
    assert m.person_id is None and m.candidate_name == "bob" and m.distance > 0.4
    with pytest.raises(GalleryError, match="no person named 'zoe'"):
        gallery.verify(people["bob"][4], "zoe")


@pytest.mark.parametrize("mode", ["best", "topk_mean", "centroid", "blend"])
def test_verify_scores_a_person_as_match_does(tmp_path, people, mode):
    with open_g(tmp_path / "g.db", match_mode=mode, top_k=2) as g:
        for name, vecs in people.items():
            g.enroll(name, items(name, vecs[:3]))
        probe = people["carol"][5]
        assert g.match(probe).name == "carol"
        assert abs(g.verify(probe, "carol").distance - g.match(probe).distance) < 1e-6


def test_disable_enable_remove_take_effect_on_next_match(gallery, people):
    probe = people["bob"][5]
    assert gallery.match(probe).name == "bob"
    gallery.disable("bob")
    m = gallery.match(probe)
    assert m.name != "bob" and m.person_id is None
    assert gallery.verify(probe, "bob").person_id is None  # a disabled person never verifies
    gallery.enable("bob")
    assert gallery.match(probe).name == "bob"
    assert gallery.remove("bob") == 3
    assert gallery.match(probe).name is None
    assert "bob" not in [p.name for p in gallery.people()]
    (n,), = gallery._query("SELECT count(*) FROM embeddings")
    assert n == 9  # bob's embeddings are erased, not only hidden


def test_change_in_another_connection_reaches_the_daemon(tmp_path, people):
    """The daemon's open gallery notices a CLI edit from another connection on its next match."""
    path = tmp_path / "g.db"
    daemon = open_g(path)
    cli = open_g(path)
    cli.enroll("alice", items("alice", people["alice"][:3]))
    probe = people["alice"][4]
    assert daemon.match(probe).name == "alice"
    cli.disable("alice")
    assert daemon.match(probe).person_id is None
    cli.enable("alice")
    cli.rename("alice", "Alice Smith")
    assert daemon.match(probe).name == "Alice Smith"
    cli.enroll("bob", items("bob", people["bob"][:3]))
    assert daemon.match(people["bob"][4]).name == "bob"
    cli.remove("bob")
    assert daemon.match(people["bob"][4]).person_id is None
    daemon.close()
    cli.close()


def test_people_listing_and_rename(gallery):
    names = [p.name for p in gallery.people()]
    assert names == sorted(names) == ["alice", "bob", "carol", "dave"]
    gallery.rename("carol", "Carol O'Neil")
    p = gallery.person("Carol O'Neil")
    assert p.enabled and p.n_embeddings == 3
    with pytest.raises(GalleryError, match="already exists"):
        gallery.rename("alice", "bob")
    with pytest.raises(GalleryError, match="no person named"):
        gallery.disable("nobody")


def test_duplicate_images_are_skipped_and_same_image_for_other_person_warns(gallery, people):
    r = gallery.enroll("alice", items("alice", people["alice"][:4]))
    assert r.duplicates == ["alice_0.jpg", "alice_1.jpg", "alice_2.jpg"] and r.added == ["alice_3.jpg"]
    assert not r.created
    r = gallery.enroll("erin", items("alice", people["alice"][4:5]) + items("erin", cluster(50, 2)))
    assert "alice_4.jpg" not in r.added


def test_probable_duplicate_identity_warns(gallery, people):
    r = gallery.enroll("bob2", [EnrollItem(f"b{i}.jpg", f"b2-{i}", v, 0.9) for i, v in enumerate(people["bob"][3:])])
    assert r.created and any("'bob'" in w and "same person twice" in w for w in r.warnings)
    r = gallery.enroll("frank", items("frank", cluster(77, 3)))
    assert r.warnings == []


def test_enroll_is_all_or_nothing(gallery, people):
    before = gallery.stats()
    bad = [EnrollItem("x.jpg", "x", None, 0.0, reason="no face found")]
    with pytest.raises(NoFaceError, match="no usable face to enroll 'zoe'.*x.jpg: no face found"):
        gallery.enroll("zoe", bad)
    # a batch where the second person fails writes nothing for the first either
    with pytest.raises(NoFaceError):
        gallery.enroll_many([("yann", items("yann", cluster(60, 3))), ("zoe", bad)])
    # an embedding of the wrong size in the middle of a batch rolls back the whole batch
    broken = items("wendy", cluster(61, 3))
    broken[1] = EnrollItem("w.jpg", "w-bad", np.ones(64, np.float32), 0.9)
    with pytest.raises(GalleryError, match="64 values"):
        gallery.enroll("wendy", broken)
    assert gallery.stats()["people"] == before["people"] and gallery.stats()["embeddings"] == before["embeddings"]


@pytest.mark.parametrize("name", ["", " bob", "bob ", "a/b", "a\\b", "tab\there", "nul\x00", "bell\x07", "x" * 65,
                                  "line\nbreak", ".."])
def test_odd_names_are_refused(gallery, name):
    with pytest.raises(GalleryError, match="invalid person name"):
        gallery.enroll(name, items("odd", cluster(70, 1)))
    assert gallery.stats()["people"] == 4


def test_valid_names_accepted():
    for name in ["Zoë Ångström", "José-María O'Brien", "李小龍", "x" * 64, "Anne Marie 2"]:
        assert validate_name(name) == name


def test_export_import_gives_identical_answers(tmp_path, gallery, people):
    gallery.disable("dave")
    gallery.set_schedule("carol", {"days": ["mon", "tue"], "windows": [["08:00", "18:00"]]})
    out = tmp_path / "export.json"
    assert gallery.export(out) == 4
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc["format"] == "edgeface-gallery" and doc["model_id"] == "test_model"
    with open_g(tmp_path / "copy.db") as copy:
        assert copy.import_(out) == 4
        probes = np.concatenate([v[3:] for v in people.values()] + [cluster(90 + i, 1) for i in range(5)])
        def answer(m):
            return (m.name, m.distance, m.threshold, m.candidate_name)

        for v in probes:
            assert answer(copy.match(v)) == answer(gallery.match(v))
        assert [(p.name, p.enabled, p.schedule, p.n_embeddings) for p in copy.people()] == \
               [(p.name, p.enabled, p.schedule, p.n_embeddings) for p in gallery.people()]
        with pytest.raises(GalleryError, match="already exists"):
            copy.import_(out)
        assert copy.stats()["embeddings"] == 12
    with open_g(tmp_path / "other.db", model_id="another_model") as other:
        with pytest.raises(GalleryError, match="another_model"):
            other.import_(out)
        assert other.stats()["people"] == 0


def test_import_of_garbage_is_one_line_error(tmp_path, gallery):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GalleryError, match="not an edgeface gallery export"):
        gallery.import_(bad)
    bad.write_text(json.dumps({"format": "edgeface-gallery", "version": 1, "model_id": "test_model",
                               "embedding_dim": 128, "people": [{"name": "ok", "embeddings": []},
                                                                {"name": "broken", "embeddings": [{"vector": "!!"}]}]}))
    with pytest.raises(GalleryError, match="malformed entry"):
        gallery.import_(bad)
    assert "ok" not in [p.name for p in gallery.people()]


def test_file_permissions(tmp_path):
    path = tmp_path / "state" / "sub" / "g.db"
    old_umask = os.umask(0o022)  # a typical umask would give 0644 files
    try:
        with open_g(path) as g:
            g.add_person("alice")
            wal = path.with_name(path.name + "-wal")
            assert wal.exists() and stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"this is not a database at all" * 50)
    with pytest.raises(GalleryError, match=f"gallery {path} is not an SQLite database"):
        open_g(path)
    assert path.read_bytes().startswith(b"this is not")  # untouched


def test_truncated_database_is_refused(tmp_path, people):
    path = tmp_path / "g.db"
    with open_g(path) as g:
        for name, vecs in people.items():
            g.enroll(name, items(name, vecs))
        g._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    with pytest.raises(GalleryError, match=str(path)) as exc:
        g2 = open_g(path)
        g2.people()
    assert "\n" not in str(exc.value)


def test_foreign_sqlite_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
    con.commit()
    con.close()
    with pytest.raises(GalleryError, match=f"{path} is an SQLite database but not an edgeface gallery"):
        open_g(path)
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["photos"]
    con.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "g.db"
    open_g(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(GalleryError, match="newer than this edgeface supports"):
        open_g(path)


def test_other_model_is_refused_naming_both(tmp_path, people):
    path = tmp_path / "g.db"
    with open_g(path, model_id="mobilefacenet") as g:
        g.enroll("alice", items("alice", people["alice"]))
    with pytest.raises(GalleryError, match="'mobilefacenet'.*'facenet_int8'.*re-enroll"):
        open_g(path, model_id="facenet_int8")
    # an empty gallery simply adopts the new model
    with open_g(tmp_path / "empty.db", model_id="a"):
        pass
    with open_g(tmp_path / "empty.db", model_id="b") as g:
        assert g.stats()["model_id"] == "b"


def test_keep_crops_and_reembed(tmp_path, people):
    """With keep_crops the gallery can follow a model change: reembed re-runs the new model on kept chips."""
    from edgeface.vision.align import align_face
    from edgeface.vision.embed import enrollment_embeddings

    class PixelEmbedder:
        """A real (tiny) embedder: the aligned crop's mean colour per 4x4 cell, normalised. Deterministic."""
        model_id, input_size, template = "pixels", 112, "arcface112"

        def embed(self, crops):
            c = np.asarray(crops, np.float32).reshape(len(crops), 4, 28, 4, 28, 3).mean(axis=(2, 4))
            v = np.concatenate([c.reshape(len(crops), -1), np.ones((len(crops), DIM - 48))], axis=1)
            return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    rng = np.random.default_rng(3)
    kp = np.array([[40, 50], [72, 50], [56, 70], [56, 92], [20, 60], [92, 60]], np.float32)
    face = Face((16.0, 20.0, 80.0, 90.0), 0.9, kp)
    chips = [Chip(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), face) for _ in range(2)]
    path = tmp_path / "g.db"
    with open_g(path, model_id="old", keep_crops=True) as g:
        g.enroll("alice", [EnrollItem(f"a{i}", f"h{i}", people["alice"][i], 0.9, chip=chips[i]) for i in range(2)])
        assert g.stats()["crops"] == 2
        g.export(tmp_path / "with_chips.json")
    with open_g(tmp_path / "copy.db", model_id="old", keep_crops=True) as copy:
        copy.import_(tmp_path / "with_chips.json")
        assert copy.stats()["crops"] == 2  # chips travel with the export
    with pytest.raises(GalleryError, match="edgeface gallery reembed"):
        open_g(path, model_id="pixels")
    emb = PixelEmbedder()
    with open_g(path, model_id="pixels", allow_model_change=True) as g:
        assert g.reembed(emb) == 2
    with open_g(path, model_id="pixels") as g:
        # reembed stores what enrollment stores: the crop and its mirror averaged.
        probe = enrollment_embeddings(emb, align_face(chips[1].image, face, "arcface112"))[0]
        m = g.match(probe)
        assert m.name == "alice" and m.distance < 1e-5
        assert g.remove("alice") == 2 and g.stats()["crops"] == 0


def test_close_twice_and_use_after_close(tmp_path):
    g = open_g(tmp_path / "g.db")
    g.close()
    g.close()
    with pytest.raises(GalleryError, match="closed"):
        g.people()


def test_missing_file_without_create(tmp_path):
    with pytest.raises(GalleryError, match="does not exist"):
        open_g(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_schedule_validation_and_evaluation():
    s = validate_schedule({"days": ["sat", "mon"], "windows": [["08:00", "12:00"], ["13:00", "24:00"]]})
    assert s["days"] == ["mon", "sat"]
    monday = dt.datetime(2026, 11, 23, 9, 30)
    sched = Schedule.parse(s)
    assert sched.allows(monday)
    assert not sched.allows(monday.replace(hour=12, minute=30))
    assert not sched.allows(monday + dt.timedelta(days=1))
    assert Schedule.parse(None) is None  # no schedule: any time
    for bad in [{"days": ["funday"]}, {"windows": [["18:00", "08:00"]]}, {"windows": [["8:00", "9:00"]]},
                {"hours": 3}, "not json"]:
        with pytest.raises(GalleryError, match="invalid schedule"):
            validate_schedule(bad)


def test_default_threshold_falls_back_without_manifest_entry(tmp_path):
    from edgeface.gallery import FALLBACK_MAX_DISTANCE

    assert default_max_distance("no_such_model", tmp_path) == FALLBACK_MAX_DISTANCE
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": [
        {"name": "emb", "kind": "embedder", "file": "emb.tflite", "sha256": "0" * 64, "bytes": 1,
         "input_shape": [1, 160, 160, 3], "input_dtype": "int8", "default_max_distance": 0.33}]}))
    assert default_max_distance("emb", tmp_path) == 0.33
    assert default_max_distance("emb.tflite", tmp_path) == 0.33


def test_default_threshold_follows_the_match_mode(tmp_path):
    """Per-person scores differ by match mode, so the manifest may calibrate each mode's operating point."""
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": [
        {"name": "emb", "kind": "embedder", "file": "emb.tflite", "sha256": "0" * 64, "bytes": 1,
         "input_shape": [1, 160, 160, 3], "input_dtype": "int8", "default_max_distance": 0.33,
         "default_max_distance_by_mode": {"centroid": 0.33, "best": 0.29}}]}))
    assert default_max_distance("emb", tmp_path, "best") == 0.29
    assert default_max_distance("emb", tmp_path, "centroid") == 0.33
    assert default_max_distance("emb", tmp_path, "topk_mean") == 0.33
    assert default_max_distance("emb", tmp_path) == 0.33


def test_matcher_agrees_with_brute_force(tmp_path):
    """Vectorised per-person best, top-k mean, centroid and blend equal a plain loop, for uneven numbers of photos per
    person (1:N match and 1:1 verify)."""
    rng = np.random.default_rng(11)
    path = tmp_path / "g.db"
    stored: dict[str, np.ndarray] = {}
    with open_g(path, max_distance=2.0) as g:
        for i in range(30):
            vecs = rng.normal(size=(1 + i % 7, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            stored[f"p{i:02d}"] = vecs
            g.enroll(f"p{i:02d}", items(f"p{i}", vecs))
        g.disable("p07")
        enabled = {n: v for n, v in stored.items() if n != "p07"}
        for mode, k in [("best", 1), ("topk_mean", 3), ("topk_mean", 10), ("centroid", 1), ("blend", 1)]:
            g.match_mode, g.top_k = mode, k
            for q in rng.normal(size=(20, DIM)).astype(np.float32):
                q /= np.linalg.norm(q)
                if mode == "centroid":
                    per = {n: float(1.0 - (v.mean(0) / np.linalg.norm(v.mean(0))) @ q) for n, v in enabled.items()}
                elif mode == "blend":  # 0.75 x centroid + 0.25 x nearest photo
                    per = {n: 0.75 * float(1.0 - (v.mean(0) / np.linalg.norm(v.mean(0))) @ q)
                           + 0.25 * float((1.0 - v @ q).min()) for n, v in enabled.items()}
                else:
                    per = {n: float(np.sort(1.0 - v @ q)[:k].mean()) for n, v in enabled.items()}
                name = min(per, key=per.get)
                m = g.match(q)
                assert m.name == name and abs(m.distance - per[name]) < 1e-5
                v = g.verify(q, name)
                assert abs(v.distance - per[name]) < 1e-5


def test_concurrent_matching_while_another_process_edits(tmp_path, people):
    """Daemon threads keep matching while the CLI connection enrolls and disables: no errors, right answers."""
    import threading

    path = tmp_path / "g.db"
    daemon = open_g(path)
    cli = open_g(path)
    cli.enroll("alice", items("alice", people["alice"][:3]))
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker():
        try:
            while not stop.is_set():
                m = daemon.match(people["alice"][4])
                assert m.name in ("alice", None)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        cli.enroll(f"extra{i}", items(f"extra{i}", cluster(200 + i, 2)))
        cli.disable("alice") if i % 2 == 0 else cli.enable("alice")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert daemon.match(people["alice"][4]).name == "alice"
    daemon.close()
    cli.close()


def test_any_name_is_either_refused_or_stored_exactly(tmp_path_factory):
    """Property: validate_name never lets a control character or separator through, and what it accepts
    round-trips through the database unchanged (NFC form)."""
    import unicodedata

    from hypothesis import given, settings, strategies as st

    path = tmp_path_factory.mktemp("names") / "g.db"
    g = open_g(path)

    @settings(max_examples=150, deadline=None)
    @given(st.text(max_size=70))
    def check(name):
        try:
            ok = validate_name(name)
        except GalleryError as exc:
            assert "\n" not in str(exc)
            return
        assert 1 <= len(ok) <= 64 and "/" not in ok and "\\" not in ok
        assert not any(unicodedata.category(c)[0] == "C" for c in ok)
        if ok not in [p.name for p in g.people()]:
            g.add_person(name)
        assert g.person(name).name == ok

    check()
    g.close()
