"""The FaceNet converter and the shipped int8 FaceNet: what a user (or the daemon at start) sees.

Tests that need TensorFlow and the Keras weights skip with the reason when either is absent.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, REPO, shared_path
from edgeface.config import parse_config
from edgeface.errors import ModelError
from edgeface.models import default_models_dir, load_manifest, sha256_file

WEIGHTS = ("weights", "facenet", "facenet_keras.h5")


def _fixture_crops(template: str = "facenet160") -> tuple[np.ndarray, list[str]]:
    from edgeface.convert.crops import aligned_crops

    faces = aligned_crops(FIXTURES / "faces", template=template)
    return faces.crops, faces.labels


@pytest.fixture(scope="module")
def fixture_crops() -> tuple[np.ndarray, list[str]]:
    return _fixture_crops()


def _tf_or_skip() -> None:
    from edgeface.convert.tflite import tensorflow_available

    if not tensorflow_available():
        pytest.skip("needs TensorFlow (pip install 'edgeface[convert]')")


# ------------------------------------------------------------------------------------- shipped model (fresh clone)
def test_shipped_facenet_int8_matches_manifest_and_separates_people(fixture_crops) -> None:
    from edgeface.vision.embed import TFLiteEmbedder

    info = load_manifest()["facenet_int8"]
    path = default_models_dir() / info.file
    assert sha256_file(path) == info.sha256 and path.stat().st_size == info.bytes
    assert info.extra["align_template"] == "facenet160" and info.extra["preprocessing_id"] == "prewhiten"
    assert 0 < info.extra["default_max_distance"] < 1

    crops, labels = fixture_crops
    assert len(crops) >= 24  # 26 photos; BlazeFace finds a face in (almost) all of them
    with TFLiteEmbedder("facenet_int8", num_threads=2) as emb:
        assert emb.quantized
        e = emb.embed(crops)
        assert e.shape == (len(crops), 128) and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        # A batch gives the same rows as one face at a time.
        np.testing.assert_allclose(emb.embed(crops[:1])[0], e[0], atol=1e-5)
    dist = 1.0 - e @ e.T
    same = [dist[i, j] for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] == labels[j]]
    diff = [dist[i, j] for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] != labels[j]]
    # Share of (same-person pair, different-person pair) combinations ranked correctly (ROC AUC).
    # Measured 1.0 (42 same, 283 different pairs; largest same 0.32 < smallest different 0.45); margin for
    # alignment changes.
    auc = np.mean(np.asarray(same)[:, None] < np.asarray(diff)[None, :])
    assert auc >= 0.97, auc
    # At the manifest's open-set operating point (0.30, 0.1% stranger false-accept at K=100 on the open-set
    # tuning half) measured here: 37 of 42 same-person pairs (88%) match and none of the 283 different-person
    # pairs does (the nearest is 0.45). One photo per side; the daemon votes over several frames.
    thr = info.extra["default_max_distance"]
    assert np.mean(np.asarray(same) <= thr) >= 0.75
    assert np.mean(np.asarray(diff) <= thr) == 0.0


# ------------------------------------------------------------------------------------------- no TensorFlow path
def test_importing_edgeface_does_not_import_tensorflow() -> None:
    code = ("import sys, edgeface, edgeface.cli, edgeface.convert, edgeface.convert.facenet, edgeface.convert.sface, "
            "edgeface.convert.tflite, edgeface.vision.embed; "
            "sys.exit(1 if 'tensorflow' in sys.modules or 'keras' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_convert_without_tensorflow_prints_install_hint(tmp_path: Path) -> None:
    # A `tensorflow` package that fails to import, first on the path: the same as TensorFlow not being installed.
    fake = tmp_path / "shadow" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorflow')\n")
    weights = tmp_path / "facenet_keras.h5"
    weights.write_bytes(b"not used")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "edgeface", "convert", "--weights", str(weights), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    expected = "error: edgeface convert needs TensorFlow: pip install 'edgeface[convert]'"
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_convert_names_missing_weights_file(tmp_path: Path, capsys) -> None:
    from edgeface.cli import main

    missing = tmp_path / "facenet_keras.h5"
    assert main(["convert", "--weights", str(missing), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: Keras FaceNet weights not found: {missing} (see models/MODELS.md for where to get them)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- ensure_embedder_model errors
def _config(tmp_path: Path, **embedder: object):
    return parse_config({"models_dir": str(tmp_path), "embedder": {"model": "facenet_int8", **embedder}})


def _models_dir_without_file(tmp_path: Path) -> Path:
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_ensure_embedder_model_returns_existing_file() -> None:
    from edgeface.convert import ensure_embedder_model

    cfg = parse_config({"models_dir": str(REPO / "models")})
    assert ensure_embedder_model(cfg) == REPO / "models" / "sface_int8.tflite"  # the default embedder
    assert ensure_embedder_model(_config(REPO / "models")) == REPO / "models" / "facenet_int8.tflite"


def test_ensure_embedder_model_missing_file_without_weights_says_what_to_do(tmp_path: Path) -> None:
    from edgeface.convert import ensure_embedder_model

    models = _models_dir_without_file(tmp_path)
    with pytest.raises(ModelError) as err:
        ensure_embedder_model(_config(models))
    msg = str(err.value)
    assert str(models / "facenet_int8.tflite") in msg
    assert "pip install 'edgeface[convert]'" in msg and "embedder.source_weights" in msg and "copy" in msg
    assert "\n" not in msg


def test_ensure_embedder_model_names_missing_source_weights(tmp_path: Path) -> None:
    from edgeface.convert import ensure_embedder_model

    models = _models_dir_without_file(tmp_path)
    missing = tmp_path / "nowhere" / "facenet_keras.h5"
    with pytest.raises(ModelError, match="embedder.source_weights .*nowhere/facenet_keras.h5 does not exist"):
        ensure_embedder_model(_config(models, source_weights=str(missing)))
    assert not (models / "facenet_int8.tflite").exists()


def test_update_manifest_replaces_one_entry_and_keeps_the_others(tmp_path: Path) -> None:
    from edgeface.convert.tflite import update_manifest

    models = _models_dir_without_file(tmp_path)
    before = json.loads((models / "manifest.json").read_text())["models"]
    entry = {**next(m for m in before if m["name"] == "facenet_int8"), "sha256": "0" * 64}
    update_manifest(models, entry)
    after = json.loads((models / "manifest.json").read_text())["models"]
    assert [m["name"] for m in after] == [m["name"] for m in before]
    assert next(m for m in after if m["name"] == "facenet_int8")["sha256"] == "0" * 64
    assert [m for m in after if m["name"] != "facenet_int8"] == [m for m in before if m["name"] != "facenet_int8"]
    assert [p.name for p in models.iterdir()] == ["manifest.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------- with TensorFlow + weights
@pytest.mark.shared
@pytest.mark.convert
def test_rebuilt_architecture_takes_every_weight_and_matches_the_files_own_config(fixture_crops) -> None:
    weights = shared_path(*WEIGHTS)
    _tf_or_skip()
    from edgeface.convert import facenet_keras as facenet_arch
    from edgeface.convert.facenet import check_against_config
    from edgeface.vision.embed import prewhiten

    model = facenet_arch.build_facenet()
    copied = facenet_arch.load_h5_weights(model, weights)
    # 132 convolutions (21 with a bias), 112 batch norms (beta, mean, variance), 1 dense kernel.
    assert copied == {"layers": 245, "arrays": 132 + 21 + 112 * 3 + 1}
    crops, _ = fixture_crops
    check = check_against_config(model, weights, prewhiten(crops[:6]))
    assert check["cosine_min"] > 0.99999


@pytest.mark.shared
@pytest.mark.convert
def test_weight_copy_refuses_mismatched_and_leftover_layers() -> None:
    weights = shared_path(*WEIGHTS)
    _tf_or_skip()
    import keras

    from edgeface.convert import facenet_keras as facenet_arch

    inp = keras.Input((160, 160, 3))
    wrong = keras.Model(inp, keras.layers.Conv2D(16, 3, use_bias=False, name="Conv2d_1a_3x3")(inp))
    with pytest.raises(ModelError, match=r"Conv2d_1a_3x3/kernel: .* shape \[3, 3, 3, 32\], rebuilt layer expects "
                                         r"\[3, 3, 3, 16\]"):
        facenet_arch.load_h5_weights(wrong, weights)
    partial = keras.Model(inp, keras.layers.Conv2D(32, 3, strides=2, use_bias=False, name="Conv2d_1a_3x3")(inp))
    with pytest.raises(ModelError, match="244 weighted layers .* were not used"):
        facenet_arch.load_h5_weights(partial, weights)
    unknown = keras.Model(inp, keras.layers.Conv2D(8, 1, name="Not_In_File")(inp))
    with pytest.raises(ModelError, match="layer Not_In_File of the rebuilt FaceNet has no weights"):
        facenet_arch.load_h5_weights(unknown, weights)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.convert
def test_missing_model_is_converted_at_start_and_agrees_with_float(tmp_path: Path, fixture_crops) -> None:
    weights = shared_path(*WEIGHTS)
    calibration = shared_path("data", "openset", "celeba_wild")  # people disjoint from the fixtures
    _tf_or_skip()
    from edgeface.convert import facenet_keras as facenet_arch
    from edgeface.convert import ensure_embedder_model
    from edgeface.vision.embed import TFLiteEmbedder, l2_normalize, prewhiten

    # The daemon's start-up path: the configured model is missing, source weights + calibration faces are set.
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": []}))
    cfg = parse_config({"models_dir": str(tmp_path), "embedder": {
        "model": "facenet_quick", "source_weights": str(weights), "representative_dir": str(calibration)}})
    path = ensure_embedder_model(cfg, max_representative=16)
    assert path == tmp_path / "facenet_quick.tflite"
    entry = load_manifest(tmp_path)["facenet_quick"]
    assert entry.sha256 == sha256_file(path) and entry.input_dtype == "int8"
    assert entry.extra["quantization"] == "int8" and entry.extra["align_template"] == "facenet160"
    assert (tmp_path / "facenet_quick.report.json").is_file() and (tmp_path / "facenet_quick.report.md").is_file()
    assert ensure_embedder_model(cfg) == path  # present now: returned as is

    crops, _ = fixture_crops
    reference = l2_normalize(facenet_arch.load_facenet(weights).predict(prewhiten(crops), verbose=0))
    with TFLiteEmbedder("facenet_quick", models_dir=tmp_path, num_threads=2) as emb:
        got = emb.embed(crops)
    cos = np.sum(reference * got, axis=1)
    assert cos.mean() >= 0.98, cos


def test_reconversion_keeps_an_open_set_threshold_but_replaces_a_provisional_one(tmp_path) -> None:
    """A calibrated operating point survives `edgeface convert`; a provisional one is re-measured."""
    from edgeface.convert.tflite import update_manifest

    calibrated = {"name": "facenet_int8", "sha256": "a", "default_max_distance": 0.3,
                  "default_max_distance_note": "open-set operating point: ..."}
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": [calibrated]}))
    fresh = {"name": "facenet_int8", "sha256": "b", "default_max_distance": 0.58,
             "default_max_distance_note": "provisional: pairs"}
    update_manifest(tmp_path, fresh)
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert (entry["sha256"], entry["default_max_distance"]) == ("b", 0.3)
    update_manifest(tmp_path, {**fresh, "sha256": "c"})
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": [fresh]}))
    update_manifest(tmp_path, {**fresh, "sha256": "d", "default_max_distance": 0.57})
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert (entry["sha256"], entry["default_max_distance"]) == ("d", 0.57)
