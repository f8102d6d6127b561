"""SFace, the default embedder: the shipped file, its threshold on real faces, its converter, and what happens to a
gallery enrolled with the previous default (FaceNet).

Tests that need TensorFlow, onnx or ../shared skip with the reason when they are absent.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, REPO, shared_path
from edgeface.config import EdgefaceConfig
from edgeface.errors import GalleryError, ModelError
from edgeface.models import default_models_dir, load_manifest, sha256_file

ONNX = ("weights", "sface", "face_recognition_sface_2021dec_int8bq.onnx")


def _pairs(emb: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    dist = 1.0 - emb @ emb.T
    idx = list(itertools.combinations(range(len(labels)), 2))
    same = np.array([dist[i, j] for i, j in idx if labels[i] == labels[j]])
    diff = np.array([dist[i, j] for i, j in idx if labels[i] != labels[j]])
    return same, diff


def _embed_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    from edgeface.convert.crops import aligned_crops
    from edgeface.vision.embed import TFLiteEmbedder

    faces = aligned_crops(folder, template="arcface112")
    with TFLiteEmbedder(EdgefaceConfig().embedder.model, num_threads=2) as emb:
        return emb.embed(faces.crops), faces.labels


def _assert_same_model(path: Path) -> None:
    """A reconverted file is the shipped one: byte for byte on the machine that made it (measured: same sha256
    three times); on another CPU the int8 calibration may round a scale differently, so the check that holds
    everywhere is that both files give the same embeddings of the fixture faces."""
    from edgeface.convert.crops import aligned_crops
    from edgeface.vision.embed import EmbedderSpec, TFLiteEmbedder

    shipped = load_manifest()["sface_int8"]
    if sha256_file(path) == shipped.sha256:
        return
    crops = aligned_crops(FIXTURES / "faces", template="arcface112").crops
    spec = EmbedderSpec("rebuilt", 112, "arcface112", "arcface")
    other = path.with_name("rebuilt.tflite")  # its own name: the manifest's sface_int8.tflite entry would refuse it
    other.write_bytes(path.read_bytes())
    with TFLiteEmbedder(other, spec=spec, num_threads=2) as a, TFLiteEmbedder("sface_int8", num_threads=2) as b:
        cos = np.sum(a.embed(crops) * b.embed(crops), axis=1)
    assert cos.min() >= 0.995, cos


def _onnx_or_skip() -> None:
    pytest.importorskip("onnx", reason="needs the onnx package (pip install 'edgeface[convert]')")


# ------------------------------------------------------------------------------------- shipped model (fresh clone)
def test_default_embedder_is_the_shipped_sface_and_separates_fixture_people() -> None:
    """The default config's embedder, on the 26 committed photos of 7 people, at its shipped threshold (blend mode).

    Measured (sface_int8, 0.49; the same at centroid's 0.47): AUC 1.0 over 42 same-person and 283 different-person pairs (largest same 0.511,
    smallest different 0.681); 40 of 42 same-person pairs match, none of the different-person pairs does. One
    photo per side; the gallery averages several and the daemon votes over frames."""
    cfg = EdgefaceConfig()
    info = load_manifest()[cfg.embedder.model]
    assert cfg.embedder.model == "sface_int8" and cfg.gallery.match_mode == "blend"
    path = default_models_dir() / info.file
    assert sha256_file(path) == info.sha256 and path.stat().st_size == info.bytes
    assert (info.extra["align_template"], info.extra["preprocessing_id"]) == ("arcface112", "arcface")
    assert info.extra["license"].startswith("Apache-2.0")
    emb, labels = _embed_folder(FIXTURES / "faces")
    assert len(labels) >= 24 and emb.shape == (len(labels), 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    same, diff = _pairs(emb, labels)
    assert np.mean(same[:, None] < diff[None, :]) >= 0.99
    from edgeface.gallery import resolve_max_distance
    thr = resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir)
    assert thr == info.extra["default_max_distance_by_mode"]["blend"] == info.extra["default_max_distance"]
    assert np.mean(same <= thr) >= 0.85
    assert np.mean(diff <= thr) == 0.0


@pytest.mark.shared
def test_default_embedder_separates_the_shared_faces_at_its_threshold() -> None:
    """All pairs of ../shared/data/faces (117 photos, 18 people, some hard on purpose).

    Measured (sface_int8, 0.49): AUC 1.0 (350 same, 6436 different pairs; largest same 0.609, smallest
    different 0.627); 328/350 same-person pairs (93.7%) match, 0 different-person pairs (at 0.47: 320/350)."""
    emb, labels = _embed_folder(shared_path("data", "faces"))
    same, diff = _pairs(emb, labels)
    assert len(same) >= 300 and len(diff) >= 6000
    assert np.mean(same[:, None] < diff[None, :]) >= 0.999
    cfg = EdgefaceConfig()
    from edgeface.gallery import resolve_max_distance
    thr = resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir)
    assert np.mean(same <= thr) >= 0.88
    assert np.mean(diff <= thr) == 0.0


# ------------------------------------------------------------------------- a gallery enrolled with the old default
def test_facenet_gallery_is_refused_by_the_sface_default_until_reembedded(tmp_path: Path) -> None:
    """Switching the default embedder must never compare FaceNet vectors with SFace ones: the gallery refuses to
    open (the daemon does not start, nothing is granted) and names the fix; `reembed` from kept chips converts it."""
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.config import parse_config
    from edgeface.enroll import enroll_images
    from edgeface.gallery import Gallery, resolve_max_distance
    from edgeface.vision.images import list_images, load_image

    old = parse_config({"embedder": {"model": "facenet_int8"}})
    new = EdgefaceConfig()
    path = tmp_path / "gallery.db"
    people = ("barack_obama", "kit_harington")
    with FaceAnalyzer.from_config(old.detector, old.embedder, old.models_dir) as fa:
        with Gallery.open(path, model_id=fa.embedder.model_id, keep_crops=True, match_mode="centroid",
                          max_distance=resolve_max_distance(old.gallery, old.embedder)) as g:
            for p in people:
                g.enroll(p, enroll_images(fa, list_images(FIXTURES / "faces" / p)[:2], keep_chips=True))
    sface_thr = resolve_max_distance(new.gallery, new.embedder)
    with pytest.raises(GalleryError, match=r"enrolled with model 'facenet_int8' but the embedder is 'sface_int8'.*"
                                           r"edgeface gallery reembed"):
        Gallery.open(path, model_id="sface_int8", max_distance=sface_thr)
    with FaceAnalyzer.from_config(new.detector, new.embedder, new.models_dir) as fa:
        with Gallery.open(path, model_id="facenet_int8", max_distance=sface_thr, allow_model_change=True,
                          keep_crops=True) as g:
            assert g.reembed(fa.embedder) == 4
        with Gallery.open(path, model_id="sface_int8", max_distance=sface_thr, match_mode="centroid") as g:
            probe = load_image(list_images(FIXTURES / "faces" / "barack_obama")[-1])
            assert g.match(fa.analyze_main(probe)[0].embedding).name == "barack_obama"
            stranger = load_image(list_images(FIXTURES / "faces" / "paul_allen")[0])
            assert g.match(fa.analyze_main(stranger)[0].embedding).name is None


# ----------------------------------------------------------------------------------------------- the converter
def test_reading_an_onnx_file_that_is_not_sface_fails_clearly(tmp_path: Path) -> None:
    _onnx_or_skip()
    import onnx
    from onnx import TensorProto, helper

    from edgeface.convert.sface_keras import read_onnx

    graph = helper.make_graph([helper.make_node("Relu", ["data"], ["out"])], "other",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 112, 112])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(ModelError, match=r"other.onnx: not the SFace graph this converter knows"):
        read_onnx(other)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match=r"garbage.onnx is unreadable"):
        read_onnx(garbage)


def test_block_dequantisation_repeats_each_scale_over_its_block() -> None:
    from edgeface.convert.sface_keras import _dequantize

    q = np.array([[1, 2, 3, -4, 5]], np.int8)
    scale = np.array([[0.5, 2.0]], np.float32)  # block 3 along axis 1: columns 0-2 and 3-4
    zero = np.array([[1, 0]], np.int8)
    np.testing.assert_allclose(_dequantize(q, scale, zero, axis=1, block=3), [[0.0, 0.5, 1.0, -8.0, 10.0]])


@pytest.mark.shared
@pytest.mark.convert
def test_keras_rebuild_matches_the_onnx_graph_and_equalisation_keeps_the_function() -> None:
    onnx_path = shared_path(*ONNX)
    _onnx_or_skip()
    from edgeface.convert.crops import aligned_crops
    from edgeface.convert.sface import check_against_onnx
    from edgeface.convert.tflite import tensorflow_available

    if not tensorflow_available():
        pytest.skip("needs TensorFlow (pip install 'edgeface[convert]')")
    from edgeface.convert import sface_keras as sface_arch
    from edgeface.vision.embed import arcface_norm

    weights = sface_arch.read_onnx(onnx_path)
    assert len(weights.convs) == 27 and weights.dense_kernel.shape == (7 * 7 * 1024, 128)
    model = sface_arch.build_sface(weights)
    crops = aligned_crops(FIXTURES / "faces", template="arcface112", per_person=1).crops
    check = check_against_onnx(model, onnx_path, crops[:4])
    assert check["cosine_min"] > 0.99999, check
    x = arcface_norm(crops)
    eq = sface_arch.build_sface(sface_arch.equalise(weights, sface_arch.activation_ranges(model, x), 0.5))
    a, b = model.predict(x, verbose=0), eq.predict(x, verbose=0)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.convert
def test_convert_command_reproduces_the_shipped_sface_byte_for_byte(tmp_path: Path) -> None:
    """`edgeface convert --model sface` (the command in the manifest, without its evaluation) gives the file in models/:
    int8 calibrated on the 26 MIT fixture faces, activation equalisation 0.5, PReLU in float32."""
    onnx_path = shared_path(*ONNX)
    _onnx_or_skip()
    from edgeface.convert.tflite import tensorflow_available

    if not tensorflow_available():
        pytest.skip("needs TensorFlow (pip install 'edgeface[convert]')")
    proc = subprocess.run([sys.executable, "-m", "edgeface", "convert", "--model", "sface", "--weights", str(onnx_path),
                           "--out", str(tmp_path), "--quantization", "int8", "--equalise", "0.5", "--float-prelu",
                           "--representative", str(FIXTURES / "faces"), "--per-person", "1000"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_model(tmp_path / "sface_int8.tflite")
    entry = json.loads((tmp_path / "manifest.json").read_text())["models"][0]
    assert (entry["name"], entry["input_dtype"], entry["float_ops"]) == ("sface_int8", "float32", ["PRELU"])
    assert (tmp_path / "sface_int8.report.md").is_file()


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.convert
def test_missing_sface_model_is_converted_at_start_from_the_onnx(tmp_path: Path) -> None:
    """The daemon's start-up path with embedder.source_weights = the .onnx and the fixture faces to calibrate on:
    the shipped file's bytes."""
    onnx_path = shared_path(*ONNX)
    _onnx_or_skip()
    from edgeface.config import parse_config
    from edgeface.convert import ensure_embedder_model
    from edgeface.convert.tflite import tensorflow_available

    if not tensorflow_available():
        pytest.skip("needs TensorFlow (pip install 'edgeface[convert]')")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": []}))
    cfg = parse_config({"models_dir": str(tmp_path), "embedder": {
        "source_weights": str(onnx_path), "representative_dir": str(FIXTURES / "faces")}})
    path = ensure_embedder_model(cfg)
    assert path == tmp_path / "sface_int8.tflite"
    entry = load_manifest(tmp_path)["sface_int8"]
    assert entry.sha256 == sha256_file(path)
    _assert_same_model(path)
    assert entry.extra["quantization"] == "int8" and entry.extra["align_template"] == "arcface112"
