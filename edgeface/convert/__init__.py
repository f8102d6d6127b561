"""The [convert] extra: Keras/ONNX source weights -> the TFLite embedders the daemon runs (TensorFlow, never on the
service path). `ensure_embedder_model` is the one entry point the daemon uses, imported only when the model file is missing.

    tflite.py   TensorFlow access, TFLite conversion, atomic install of model + manifest entry
    crops.py    aligned crops of a photo folder through FaceAnalyzer (representative / evaluation sets)
    report.py   agreement with the float32 reference, the conversion report
    facenet.py  Keras FaceNet .h5 -> TFLite           (facenet_keras.py: the rebuilt network)
    sface.py    SFace ONNX -> TFLite                  (sface_keras.py: the rebuilt network)
    quantize.py int8 post-training quantisation of an existing float TFLite embedder
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeface.errors import EdgefaceError, ModelError
from edgeface.models import embedder_model_path


def ensure_embedder_model(config: Any, *, max_representative: int = 200) -> Path:
    """The embedder model file the daemon will load; convert it from `embedder.source_weights` when it is missing.

    Returns the model path. Raises ModelError naming the missing file and the two ways to get it.
    """
    from edgeface.convert.tflite import tensorflow_available  # noqa: PLC0415  (TensorFlow only when converting)
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
    from edgeface.convert.facenet import convert_facenet  # noqa: PLC0415
    from edgeface.convert.sface import convert_sface  # noqa: PLC0415

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
