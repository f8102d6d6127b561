"""Post-training int8 quantization of an existing float TFLite embedder (e.g. MobileFaceNet).

Needed because such files ship without a SignatureDef, which ai-edge-quantizer requires: we add one
(input and output tensors by index) and then run its static int8 recipe (int8 weights and activations)
calibrated on real faces aligned by our own pipeline, so the activation ranges are those the daemon sees.
The quantizer is an optional dependency (pip install 'edgeface[convert]'); nothing here runs on the Pi.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

from edgeface.errors import ConverterUnavailable, ModelError
from edgeface.vision.runtime import load_interpreter

if TYPE_CHECKING:
    from edgeface.vision.analyzer import FaceAnalyzer

SIGNATURE_KEY = "serving_default"


def add_signature(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> tuple[str, str]:
    """Copy a TFLite file adding a serving_default SignatureDef; return (input name, output name)."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ConverterUnavailable("edgeface quantize needs TensorFlow: pip install 'edgeface[convert]'") from exc
    model = flatbuffer_utils.read_model(str(src))
    if len(model.subgraphs) != 1:
        raise ModelError(f"{src}: expected one subgraph, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelError(f"{src}: expected one input and one output tensor")

    def tensor_map(index: int) -> "schema.TensorMapT":
        entry = schema.TensorMapT()
        entry.name = graph.tensors[index].name
        entry.tensorIndex = int(index)
        return entry

    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE_KEY.encode()
    signature.subgraphIndex = 0
    signature.inputs = [tensor_map(graph.inputs[0])]
    signature.outputs = [tensor_map(graph.outputs[0])]
    model.signatureDefs = [signature]
    flatbuffer_utils.write_model(model, str(dst))
    return graph.tensors[graph.inputs[0]].name.decode(), graph.tensors[graph.outputs[0]].name.decode()


def quantize_int8(float_model: str | os.PathLike[str], calibration: Iterable[np.ndarray],
                  out_path: str | os.PathLike[str]) -> Path:
    """Static int8 (weights and activations) via ai-edge-quantizer; `calibration` yields preprocessed (1,S,S,3) float32."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        raise ConverterUnavailable("edgeface quantize needs ai-edge-quantizer: pip install 'edgeface[convert]'") from exc
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / "signed.tflite"
        input_name, _ = add_signature(float_model, signed)
        qt = quantizer.Quantizer(str(signed))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        samples = [{input_name: np.asarray(x, np.float32)} for x in calibration]
        if not samples:
            raise ModelError("no calibration faces: give a folder of face photos with --representative")
        result = qt.calibrate({SIGNATURE_KEY: samples}, num_threads=max(1, min(4, os.cpu_count() or 1)))
        quantized = qt.quantize(result, enable_progress_report=False)
        tmp_out = Path(tmp) / "int8.tflite"
        quantized.export_model(str(tmp_out))
        load_interpreter(tmp_out, 1)  # refuse to install a file the runtime cannot load
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staged = out_path.with_name(f".{out_path.name}.tmp")
        staged.write_bytes(tmp_out.read_bytes())
        os.replace(staged, out_path)
    return out_path


def calibration_crops(images: Iterable[Path], analyzer: "FaceAnalyzer", limit: Optional[int] = None) -> list[np.ndarray]:
    """Aligned crops of the main face of each image (the same detector/landmarks/template as at run time)."""
    from edgeface.errors import ImageError
    from edgeface.vision.images import load_image

    crops = []
    for path in images:
        try:
            image = load_image(path)
        except ImageError:
            continue
        _face, crop, _n = analyzer.main_crop(image)
        if crop is None:
            continue
        crops.append(crop)
        if limit is not None and len(crops) >= limit:
            break
    return crops
