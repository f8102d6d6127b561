"""TensorFlow access, Keras -> TFLite conversion and installing a converted model: atomic writes of the model, its
manifest entry and its report (a half-written model or manifest never replaces a good one).

TensorFlow is an optional extra (`edgeface[convert]`), imported lazily here, never when `edgeface` is imported."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edgeface.errors import ConverterUnavailable, ModelError
from edgeface.models import MANIFEST_NAME, sha256_file

TF_MISSING = "edgeface convert needs TensorFlow: pip install 'edgeface[convert]'"

QUANTIZATIONS = ("int8", "dynamic", "float16", "float")


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


def tf_version() -> str:
    tf = require_tensorflow()
    import keras  # noqa: PLC0415

    return f"tensorflow {tf.__version__}, keras {keras.__version__}"


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


def tflite_embedder(path: Path, spec: Any, models_dir: Path) -> Any:
    """A converted file (in the scratch folder, so no shipped manifest is consulted) run as the daemon would."""
    from edgeface.vision.embed import TFLiteEmbedder

    return TFLiteEmbedder(path, spec=spec, num_threads=os.cpu_count() or 1, models_dir=models_dir)


def stage_candidate(work: Path, name: str, data: bytes, report: dict[str, Any], *, float_name: str,
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


def install_model(out_dir: Path, name: str, data: bytes, float_path: Optional[Path],
                   keep_float: Optional[str | os.PathLike[str]]) -> Path:
    """Replace the shipped model (atomically) once the report is done; keep the float reference if asked."""
    model_path = out_dir / f"{name}.tflite"
    write_atomic(model_path, data)
    if keep_float is not None and float_path is not None:
        write_atomic(Path(keep_float), float_path.read_bytes())
    return model_path
