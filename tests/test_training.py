"""Training an embedding head with triplet loss (`edgeface train-head`) and running it at the door."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FIXTURES, run_cli as run

FACES = FIXTURES / "faces"

pytestmark = pytest.mark.convert


def _needs_tensorflow() -> None:
    from edgeface.convert.tflite import tensorflow_available

    if not tensorflow_available():
        pytest.skip("needs TensorFlow (pip install 'edgeface[convert]')")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One MLP head trained on the fixture faces (a random start, so its loss has something to lose), with a margin
    large enough that the shipped embedder's own space still leaves triplets to fix."""
    _needs_tensorflow()
    from edgeface.training.headfile import run_training
    from edgeface.training.triplet import TrainSettings

    out = tmp_path_factory.mktemp("head") / "fixture_head.tflite"
    settings = TrainSettings(arch="mlp", margin=1.0, epochs=25, patience=25, val_fraction=0.6, seed=0)
    done = run_training([FACES], out, settings=settings, cache_dir=out.parent / "cache")
    return out, done


def test_training_reduces_the_triplet_loss(trained):
    """The head's loss on fixed training batches is lower after training than before (from a random start)."""
    _, done = trained
    assert done.result.final_loss < 0.8 * done.result.initial_loss
    assert done.result.best_epoch >= 1


def test_head_separates_held_out_people_better_than_chance(trained):
    """On the validation identities (never trained on), same-person pairs are closer than different-person pairs
    far more often than chance (AUC of pair distances > 0.5 by a margin)."""
    out, done = trained
    from edgeface.training.headfile import embed_folders, split_samples

    from edgeface.training.triplet import identity_disjoint_split

    entry = json.loads(out.with_suffix(".json").read_text())

    data = embed_folders([FACES], "sface_int8", cache_dir=out.parent / "cache")
    s = data.samples
    train_p, val_p = identity_disjoint_split(sorted(set(s.persons)), 0.6, 0)
    assert not set(train_p) & set(val_p)
    assert done.report["entry"]["training"]["validation_identities"] == len(val_p)
    _, val = split_samples(s, val_p)
    from edgeface.vision.head import EmbeddingHead, resolve_head

    path, info = resolve_head(out)
    head = EmbeddingHead(path, info)
    x = head.project(val.x)
    d = 1.0 - x @ x.T
    iu = np.triu_indices(len(x), 1)
    same = (val.y[:, None] == val.y[None, :])[iu]
    other_photo = (val.photo[:, None] != val.photo[None, :])[iu]
    genuine, impostor = d[iu][same & other_photo], d[iu][~same]
    auc = float(np.mean(genuine[:, None] < impostor[None, :]))
    assert auc > 0.8, auc
    assert entry["kind"] == "head" and entry["backbone"] == "sface_int8" and entry["input_dim"] == 128


def _config(path: Path, gallery: Path, head: Path | None) -> Path:
    doc = {"gallery": {"path": str(gallery), "keep_crops": True}}
    if head is not None:
        doc["embedder"] = {"head": str(head)}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_gallery_with_and_without_head_is_refused_until_reembedded(trained, capsys, tmp_path):
    """A gallery enrolled without the head is refused by a config with it (and back), naming both ids, until
    `gallery reembed` moves it; then the same people are identified through the head."""
    head, _ = trained
    gallery = tmp_path / "g.db"
    plain = _config(tmp_path / "plain.yaml", gallery, None)
    headed = _config(tmp_path / "headed.yaml", gallery, head)
    for name in ["paul_allen", "steve_wozniak"]:
        assert run(capsys, plain, "enroll", name, *sorted((FACES / name).glob("*.jpg"))[:2])[0] == 0
    probe = sorted((FACES / "steve_wozniak").glob("*.jpg"))[3]
    rc, out, err = run(capsys, headed, "identify", probe)
    assert rc == 1 and "sface_int8" in err and "edgeface gallery reembed" in err
    rc, out, err = run(capsys, headed, "gallery", "reembed")
    assert rc == 0 and "re-embedded 4 face chips" in err
    stats = json.loads("\n".join(run(capsys, headed, "gallery", "stats", "--json")[1]))
    assert stats["model_id"].startswith("sface_int8+fixture_head-")
    rc, out, err = run(capsys, plain, "identify", probe)
    assert rc == 1 and "fixture_head" in err
    rc, out, err = run(capsys, headed, "identify", probe)
    assert rc == 0 and out[0].split(",")[1] == "steve_wozniak"


def test_head_for_another_backbone_is_refused(trained, tmp_path):
    """A head trained on SFace embeddings cannot be put behind FaceNet: one line naming both."""
    from edgeface.config import parse_config
    from edgeface.errors import ModelError
    from edgeface.vision.analyzer import FaceAnalyzer

    head, _ = trained
    cfg = parse_config({"embedder": {"model": "facenet_int8", "head": str(head)}})
    with pytest.raises(ModelError, match="trained on sface_int8 embeddings; the embedder is facenet_int8"):
        FaceAnalyzer.from_config(cfg.detector, cfg.embedder)


def test_replaced_head_file_is_refused(trained, tmp_path):
    """A head file whose bytes no longer match its entry is refused, never used."""
    from edgeface.errors import ModelError
    from edgeface.vision.head import resolve_head

    head, _ = trained
    copy = tmp_path / head.name
    data = bytearray(head.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    copy.with_suffix(".json").write_text(head.with_suffix(".json").read_text())
    with pytest.raises(ModelError, match="replaced or damaged"):
        resolve_head(copy)


def test_triplet_loss_mining_on_a_known_batch():
    """Batch-hard and semi-hard losses are 0 for well-separated clusters and positive when a negative is closer than
    a positive."""
    _needs_tensorflow()
    from edgeface.convert.tflite import require_tensorflow
    from edgeface.training.triplet import triplet_loss

    tf = require_tensorflow()
    a = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], np.float32)
    labels = tf.constant([0, 0, 1, 1], tf.int64)
    for mining in ("batch-hard", "semi-hard"):
        assert float(triplet_loss(tf, tf.constant(a), labels, 0.2, mining)) == pytest.approx(0.0, abs=1e-6)
        swapped = tf.constant([0, 1, 0, 1], tf.int64)
        assert float(triplet_loss(tf, tf.constant(a), swapped, 0.2, mining)) > 0.1
