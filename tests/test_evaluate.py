"""`edgeface eval` on real photos: the report's numbers must be consistent with each other and with the data set
(counts add up, rates are rates, TAR grows with FAR, photos without a face are counted, not dropped)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeface.cli import main
from edgeface.evaluation.dataset import identity_split
from edgeface.evaluation.metrics import threshold_at_far
from edgeface.models import load_manifest

from conftest import FIXTURES, shared_path

MOBILEFACENET = ("weights", "mobilefacenet", "mobilefacenet.tflite")


def _embedder_arg() -> str:
    """The shipped default embedder when it is committed; otherwise MobileFaceNet from ../shared."""
    if "facenet_int8" in load_manifest():
        return "facenet_int8"
    return f"{shared_path(*MOBILEFACENET)}:arcface112:arcface"


@pytest.fixture(scope="module")
def dataset_with_a_faceless_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed photos, plus a mountain photo filed under paul_allen: a photo in which no face can be found."""
    root = tmp_path_factory.mktemp("evalset") / "faces"
    shutil.copytree(FIXTURES / "faces", root)
    shutil.copy(FIXTURES / "nonfaces" / "pilatus_mountain.jpg", root / "paul_allen" / "zz_no_face.jpg")
    return root


@pytest.fixture(scope="module")
def eval_report(dataset_with_a_faceless_photo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    status = main(["eval", str(dataset_with_a_faceless_photo), "--model", _embedder_arg(), "--draws", "10",
                   "--report", str(out / "report.md"), "--cache-dir", str(out / "cache"), "--quiet"])
    assert status == 0
    return json.loads((out / "report.json").read_text()), out


def _counts(root: Path) -> list[int]:
    return [len(list(p.glob("*.jpg"))) for p in sorted(root.iterdir()) if p.is_dir()]


def test_pair_counts_add_up_and_the_faceless_photo_is_counted(eval_report, dataset_with_a_faceless_photo):
    report, _ = eval_report
    per_person = _counts(dataset_with_a_faceless_photo)
    n = sum(per_person)
    assert report["n_photos"] == n == 27 and report["n_persons"] == 7
    (m,) = report["models"]
    v = m["verification"]
    assert v["n_genuine"] == sum(c * (c - 1) // 2 for c in per_person)
    assert v["n_genuine"] + v["n_impostor"] == n * (n - 1) // 2
    # The mountain has no face: its 5 genuine pairs (paul_allen has 5 real photos) and 21 impostor pairs are
    # kept as rejections, not dropped.
    assert m["photos_no_face"] >= 1
    assert v["n_genuine_no_face"] >= 5
    assert v["n_impostor_no_face"] >= n - 6
    assert v["n_genuine_no_face"] + v["n_impostor_no_face"] <= m["photos_no_face"] * (n - 1)


def test_rates_are_rates_and_tar_grows_with_far(eval_report):
    report, _ = eval_report
    (m,) = report["models"]
    v = m["verification"]
    measured = [a for a in sorted(v["at_far"], key=lambda a: a["far_target"]) if a["tar"] is not None]
    assert measured, "at least FAR 1e-2 must be measurable with ~300 impostor pairs"
    for a in v["at_far"]:
        if v["n_impostor"] * a["far_target"] < 1:
            assert a["tar"] is None and a["threshold"] is None  # reported as n/a, not invented
        else:
            assert 0.0 <= a["far"] <= a["far_target"] and 0.0 <= a["tar"] <= 1.0
    tars = [a["tar"] for a in measured]
    assert tars == sorted(tars)
    roc_far, roc_tar = np.array(v["roc"]["far"]), np.array(v["roc"]["tar"])
    assert np.all(np.diff(roc_far) >= 0) and np.all(np.diff(roc_tar) >= 0)
    assert roc_tar.max() <= 1 - v["n_genuine_no_face"] / v["n_genuine"] + 1e-12  # a faceless pair is never accepted
    assert 0.0 <= v["eer"] <= 0.5
    # Real faces, a good embedder: apart from the genuine pairs lost to the faceless photo (5 of 47, a floor
    # under the false-reject rate), the 7 people are told apart well (measured: EER = that floor + <1%).
    assert v["eer"] < v["n_genuine_no_face"] / v["n_genuine"] + 0.05


def test_identification_counts_cover_every_photo_in_every_draw(eval_report):
    report, _ = eval_report
    (m,) = report["models"]
    o = m["identification"]
    c, s = o["counts"], o["settings"]
    assert s["draws"] == 10 and s["k"] == 3  # 7 people: a gallery of half of them leaves strangers
    enrolled_photos = s["draws"] * s["k"] * s["enroll"]
    assert c["probe"] + c["stranger"] + enrolled_photos == s["draws"] * report["n_photos"]
    assert c["probe_no_face"] + c["stranger_no_face"] == s["draws"] * m["photos_no_face"]
    for r in list(o["fixed"].values()) + o["at_far"]:
        if r["threshold"] is None:
            continue
        for key in ("correct_accept", "wrong_person_accept", "stranger_accept"):
            assert 0.0 <= r[key] <= 1.0
        assert r["correct_accept"] + r["wrong_person_accept"] <= 1.0 + 1e-12
        # A faceless probe can never be accepted.
        assert r["correct_accept"] + r["wrong_person_accept"] <= 1 - c["probe_no_face"] / c["probe"] + 1e-12
    a = o["at_far"][0]  # stranger FAR 1e-2: measurable with >= 100 stranger photos over the draws
    assert c["stranger"] >= 100 and a["stranger_accept"] <= a["far_target"]


def test_markdown_and_plots_are_written(eval_report):
    _, out = eval_report
    md = (out / "report.md").read_text()
    assert "## Verification (1:1)" in md and "## Open-set identification (1:N)" in md and "n/a" in md
    pngs = sorted((out / "img").glob("*.png"))
    assert len(pngs) == 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_open_set_study_on_the_tuning_half_is_seeded(tmp_path):
    names = sorted(p.name for p in (FIXTURES / "faces").iterdir())
    tune = [n for n in names if identity_split(n) == "tune"]
    assert len(tune) >= 4
    runs = []
    for name in ("a", "b"):
        status = main(["eval", str(FIXTURES / "faces"), "--open-set", "--split", "tune", "--model", _embedder_arg(),
                       "--k", "2", "--enroll", "1", "--draws", "4", "--seed", "7", "--report", str(tmp_path / f"{name}.md"),
                       "--cache-dir", str(tmp_path / "cache"), "--quiet"])
        assert status == 0
        runs.append(json.loads((tmp_path / f"{name}.json").read_text()))
    a, b = runs
    assert a["results"][0]["report"]["at_far"] == b["results"][0]["report"]["at_far"]
    r = a["results"][0]["report"]
    assert r["n_persons"] == len(tune) and r["settings"]["k"] == 2
    assert "Tuning half (--split tune)" in (tmp_path / "a.md").read_text()


def test_bad_model_argument_is_a_one_line_error(tmp_path, capsys):
    status = main(["eval", str(FIXTURES / "faces"), "--model", "a:b", "--report", str(tmp_path / "r.md")])
    assert status != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --model a:b") and err.count("\n") == 1
    assert not (tmp_path / "r.md").exists()


def test_not_a_folder_is_an_error(tmp_path, capsys):
    status = main(["eval", str(tmp_path / "missing"), "--report", str(tmp_path / "r.md")])
    assert status != 0
    assert "is not a folder" in capsys.readouterr().err


def test_threshold_at_far_needs_enough_impostors():
    impostor = np.arange(1000, dtype=np.float64) / 1000.0
    t = threshold_at_far(impostor, 1e-2)
    assert np.mean(impostor <= t) == pytest.approx(0.01)
    assert threshold_at_far(impostor, 1e-4) is None  # 1000 trials cannot show a 1-in-10,000 rate
    with_failures = np.concatenate([impostor, np.full(1000, math.inf)])
    assert np.mean(with_failures <= threshold_at_far(with_failures, 1e-2)) == pytest.approx(0.01)


def test_exclusion_list_leaves_out_persons_and_photos(tmp_path):
    excl = tmp_path / "exclude.txt"
    excl.write_text("# label errors\nelon_musk   # one photo only\nbarack_obama/barack_obama_04.jpg\n")
    status = main(["eval", str(FIXTURES / "faces"), "--model", _embedder_arg(), "--draws", "2", "--exclude", str(excl),
                   "--report", str(tmp_path / "r.md"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_persons"] == 6 and report["n_photos"] == 26 - 1 - 1
    assert report["excluded"] == ["barack_obama/barack_obama_04.jpg", "elon_musk"]
    assert "`elon_musk`" in (tmp_path / "r.md").read_text()


def _peer_python() -> str | None:
    import os
    for candidate in (os.environ.get("EDGEFACE_PEER_PYTHON"), "/work/bench-venv/bin/python"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.slow
def test_face_recognition_peer_runs_on_the_same_photos_and_counts_its_misses(dataset_with_a_faceless_photo, tmp_path):
    peer = _peer_python()
    if peer is None:
        pytest.skip("needs the face_recognition venv (bench/setup_peer_env.sh; set EDGEFACE_PEER_PYTHON)")
    status = main(["eval", str(dataset_with_a_faceless_photo), "--model", "face_recognition", "--peer-python", peer,
                   "--draws", "3", "--report", str(tmp_path / "r.md"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status == 0
    (m,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert m["metric"] == "euclidean" and m["verification"]["default_threshold"] == 0.6  # its documented tolerance
    assert m["photos_no_face"] >= 1  # the mountain, at least
    assert m["verification"]["n_genuine_no_face"] >= 5


def test_model_choice_detector_flags() -> None:
    from edgeface.errors import ConfigError
    from edgeface.evaluation.embedding import ModelChoice

    short = ModelChoice.parse("facenet_int8+short+flip")
    assert (short.detector, short.flip, short.label) == ("short", True, "facenet_int8+short+flip")
    assert ModelChoice.parse("facenet_int8+full").detector == "full"
    assert ModelChoice.parse("facenet_int8").detector is None
    with pytest.raises(ConfigError, match="contradict"):
        ModelChoice.parse("facenet_int8+full+short")
    two = ModelChoice.parse("sface_int8+mesh2+flip")
    assert (two.mesh2, two.flip, two.label) == (True, True, "sface_int8+mesh2+flip")
    assert ModelChoice.parse("sface_int8").mesh2 is None
    with pytest.raises(ConfigError, match="contradict"):
        ModelChoice.parse("sface_int8+mesh2-lm")


@pytest.mark.parametrize("template,mode", [("mean", "centroid"), ("best", "best"), ("blend", "blend")])
def test_open_set_scores_are_what_the_gallery_answers(tmp_path, template, mode) -> None:
    """The study's per-probe score for each template equals the real Gallery's match distance in the matching mode,
    with the same people enrolled from the same photos: the benchmark measures the matcher the door runs."""
    from edgeface.evaluation.dataset import Dataset
    from edgeface.evaluation.embedding import EmbeddedSet
    from edgeface.evaluation.openset import OpenSetSettings, _draw_gallery, open_set
    from edgeface.gallery import EnrollItem, Gallery

    rng = np.random.default_rng(3)
    persons = [f"p{i}" for i in range(8)]
    labels = np.repeat(np.arange(8), 5)
    centres = rng.normal(size=(8, 128))
    emb = centres[labels] + 0.9 * rng.normal(size=(40, 128))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ds = Dataset(tmp_path, persons, [tmp_path / persons[lab] / f"{i}.jpg" for i, lab in enumerate(labels)], labels)
    es = EmbeddedSet("synthetic", "cosine", emb, np.ones(40, np.int32))
    settings = OpenSetSettings(k=4, enroll=3, draws=1, seed=5, template=template)
    result = open_set(es, ds, persons, settings)
    # The same gallery, drawn again with the same seed, in a real SQLite gallery.
    chosen, enrolled, _, _ = _draw_gallery(np.random.default_rng([5, 0]), np.arange(8),
                                           {lab: np.flatnonzero(labels == lab) for lab in range(8)}, es.found, 4, 3)
    with Gallery.open(tmp_path / "g.db", model_id="synthetic", max_distance=2.0, match_mode=mode) as g:
        for lab in chosen:
            g.enroll(persons[lab], [EnrollItem(f"{persons[lab]}/{i}", f"{lab}-{i}", emb[i], 0.9)
                                    for i in enrolled[int(lab)]])
        taken = {int(i) for v in enrolled.values() for i in v}
        probes = [i for lab in chosen for i in np.flatnonzero(labels == lab) if int(i) not in taken]
        expected = [g.match(emb[i]).distance for i in probes]
    np.testing.assert_allclose(result["_genuine"], expected, atol=1e-5)


def test_recommendation_names_the_best_setting_at_no_extra_cost_per_face() -> None:
    """Flip TTA wins on accuracy but doubles the embedding work: the report must also name the best setting that a
    Pi's latency budget allows without re-measuring (no more detect+align+embed time than the configured one)."""
    from edgeface.evaluation.openset import SAME_COST, recommend

    def row(name: str, ms: float, correct: float, deployable: bool = True) -> dict:
        at = {"far_target": 1e-3, "threshold": 0.5, "correct_accept": correct, "wrong_person_accept": 0.0,
              "stranger_accept": 0.001}
        return {"variant": name, "labels": [name], "template": "blend", "deployable": deployable, "k": 100,
                "enroll": 3, "ms": {"ms_face_total": ms}, "tune": {"at_far": [at]},
                "report": {"at_far": [at], "fixed": {}}}

    study = {"results": [row("sface_int8", 6.0, 0.890), row("sface_int8+flip", 12.4, 0.905),
                         row("sface_int8 best-of-E", 6.0, 0.880), row("sface_int8+mesh2", 7.6, 0.898),
                         row("sface_int8 ⊕ facenet_int8", 16.0, 0.910, deployable=False)]}
    best = recommend(study, k=100, enroll=3, baseline="sface_int8")
    assert best["variant"] == "sface_int8+flip" and abs(best["cost_vs_baseline"] - 12.4 / 6.0) < 1e-9
    same = recommend(study, k=100, enroll=3, baseline="sface_int8", max_cost=SAME_COST)
    assert same["variant"] == "sface_int8" and same["cost_vs_baseline"] == 1.0
    assert recommend(study, k=100, enroll=3, baseline="sface_int8", max_cost=1.3)["variant"] == "sface_int8+mesh2"


# ------------------------------------------------------------------------------------- the LFW protocol (--pairs)
@pytest.fixture(scope="module")
def lfw_style_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The committed photos renamed the LFW way (<name>/<name>_0001.jpg) and a generated pairs file in LFW's layout:
    header '10 2', then per fold 2 same-person pairs followed by 2 different-person pairs (seeded). Fold 0's first
    pair compares paul_allen with a mountain photo filed as his sixth: no face, so that genuine pair is rejected."""
    root = tmp_path_factory.mktemp("lfw") / "faces"
    photos: dict[str, int] = {}
    for person in sorted(p for p in (FIXTURES / "faces").iterdir() if p.is_dir()):
        (root / person.name).mkdir(parents=True)
        for i, src in enumerate(sorted(person.glob("*.jpg")), 1):
            shutil.copy(src, root / person.name / f"{person.name}_{i:04d}.jpg")
        photos[person.name] = i
    shutil.copy(FIXTURES / "nonfaces" / "pilatus_mountain.jpg", root / "paul_allen" / "paul_allen_0006.jpg")
    rng = np.random.default_rng(3)
    names = sorted(photos)
    same = [(n, i, j) for n in names for i in range(1, photos[n] + 1) for j in range(i + 1, photos[n] + 1)]
    lines = ["10\t2"]
    for fold in range(10):
        for k in rng.choice(len(same), 2, replace=False):
            n, i, j = same[k]
            lines.append(f"{n}\t{i}\t{j}")
        if fold == 0:
            lines[1] = "paul_allen\t1\t6"
        for _ in range(2):
            a, b = rng.choice(names, 2, replace=False)
            lines.append(f"{a}\t{rng.integers(1, photos[a] + 1)}\t{b}\t{rng.integers(1, photos[b] + 1)}")
    pairs = root.parent / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return root, pairs


def test_pairs_file_gives_ten_fold_accuracy_with_its_std_printed_and_written(lfw_style_set, tmp_path, capsys):
    root, pairs = lfw_style_set
    out = tmp_path / "lfw.json"
    status = main(["eval", str(root), "--pairs", str(pairs), "--model", _embedder_arg(), "--draws", "2",
                   "--accuracy-at", "0.4", "--report", str(tmp_path / "lfw.md"), "--json", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    v = report["models"][0]["verification"]
    kf = v["k_fold"]
    assert kf["folds"] == 10 and [f["pairs"] for f in kf["per_fold"]] == [4] * 10
    accs = np.array([f["accuracy"] for f in kf["per_fold"]])
    assert kf["accuracy_mean"] == pytest.approx(accs.mean(), abs=1e-6)
    assert kf["accuracy_std"] == pytest.approx(accs.std(), abs=1e-6)
    assert kf["per_fold"][0]["accuracy"] <= 0.75 and kf["accuracy_std"] > 0  # the faceless pair counts as wrong
    assert f"10-fold accuracy {100 * kf['accuracy_mean']:.2f}% ± {100 * kf['accuracy_std']:.2f}%" in printed
    md = (tmp_path / "lfw.md").read_text()
    assert "## 10-fold accuracy (LFW protocol)" in md
    assert f"{100 * kf['accuracy_mean']:.2f}% ± {100 * kf['accuracy_std']:.2f}%" in md
    # Every pair's distance, in the order of the pairs listing; accuracy at any threshold follows from them.
    dist = np.array([np.inf if d is None else d for d in v["pair_distances"]])
    same = np.array([p["same"] for p in report["pairs"]])
    folds = np.array([p["fold"] for p in report["pairs"]])
    assert len(dist) == len(same) == 40 and same.sum() == 20
    assert v["accuracy_at"][0]["threshold"] == 0.4
    assert v["accuracy_at"][0]["accuracy"] == pytest.approx(np.mean((dist <= 0.4) == same), abs=1e-6)
    # Each fold's threshold is a best-accuracy threshold of the OTHER nine folds (no threshold does better there).
    candidates = np.unique(dist[np.isfinite(dist)])
    for f in kf["per_fold"]:
        train = folds != f["fold"]
        best = max(np.mean((dist[train] <= c) == same[train]) for c in candidates)
        assert np.mean((dist[train] <= f["threshold"]) == same[train]) == pytest.approx(best)
    # Real, clean photos and a good embedder: most pairs are decided right (not fitted: 38 of 40 and up).
    assert kf["accuracy_mean"] >= 0.9


def test_progress_in_a_log_is_a_few_plain_lines(tmp_path, capsys):
    # capsys's stderr is not a terminal, like a log file or journald: no bar redrawn with carriage returns.
    status = main(["eval", str(FIXTURES / "faces"), "--model", _embedder_arg(), "--draws", "2", "--no-cache",
                   "--report", str(tmp_path / "r.md")])
    assert status == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("embed ")]
    assert 2 <= len(lines) <= 11 + 4  # a line per 10% of the 26 photos (plus one per 10 s on a slow machine)
    assert lines[-1].startswith(f"embed {_embedder_arg()}: 26/26 photos (100%")


def test_embedding_cache_is_keyed_by_the_face_path_code(tmp_path, monkeypatch):
    from edgeface.evaluation import embedding
    from edgeface.evaluation.dataset import load_folder_dataset

    root = tmp_path / "faces"
    for person in ("barack_obama", "kit_harington"):
        shutil.copytree(FIXTURES / "faces" / person, root / person)
    ds = load_folder_dataset(root)
    choice = embedding.ModelChoice.parse(_embedder_arg())
    cache = tmp_path / "cache"
    first = embedding.embed_dataset(ds, choice, cache_dir=cache)
    assert not first.from_cache and embedding.embed_dataset(ds, choice, cache_dir=cache).from_cache
    # The same code in another place hashes the same; one changed byte of the face path is another pipeline.
    sources = []
    for src in embedding.FACE_PATH_SOURCES:
        sources.append(tmp_path / "src" / src.name)
        sources[-1].parent.mkdir(exist_ok=True)
        shutil.copy(src, sources[-1])
    monkeypatch.setattr(embedding, "FACE_PATH_SOURCES", tuple(sources))
    assert embedding.embed_dataset(ds, choice, cache_dir=cache).from_cache
    align = tmp_path / "src" / "align.py"
    align.write_text(align.read_text() + "\n# changed\n")
    again = embedding.embed_dataset(ds, choice, cache_dir=cache)
    assert not again.from_cache
    np.testing.assert_array_equal(again.emb, first.emb)  # the comment changed no number, but it was not trusted


def test_the_pairs_mode_open_set_protocol_is_named(eval_report):
    report, out = eval_report
    md = (out / "report.md").read_text()
    assert "## Open-set identification (1:N), all-identities protocol" in md
    assert "cannot be compared with that study's" in md
    assert all(m["identification"]["protocol"] == "all identities" for m in report["models"])


def test_open_set_study_can_run_on_all_identities(tmp_path):
    names = sorted(p.name for p in (FIXTURES / "faces").iterdir())
    status = main(["eval", str(FIXTURES / "faces"), "--open-set", "--split", "all", "--model", _embedder_arg(),
                   "--k", "3", "--enroll", "1", "--draws", "3", "--report", str(tmp_path / "all.md"),
                   "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status == 0
    study = json.loads((tmp_path / "all.json").read_text())
    assert study["halves"]["report"]["persons"] == study["halves"]["tune"]["persons"] == len(names)
    assert study["results"][0]["report"]["n_persons"] == len(names)
    assert "## All identities (--split all" in (tmp_path / "all.md").read_text()
    # Cohort normalisation needs people outside the scored ones: refused in one line, not measured on itself.
    status = main(["eval", str(FIXTURES / "faces"), "--open-set", "--split", "all", "--ablation", "--model",
                   _embedder_arg(), "--k", "3", "--enroll", "1", "--draws", "2", "--report", str(tmp_path / "x.md"),
                   "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status != 0 and not (tmp_path / "x.md").exists()
