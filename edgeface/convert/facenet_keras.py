"""Inception-ResNet-v1 (FaceNet, 160x160x3 -> 128-D) in Keras 3, plus strict weight loading from the Keras 2 .h5.

Why this exists: the published Keras FaceNet file (Keras 2.1.2) stores its residual scaling in `Lambda` layers that
Keras 3 cannot deserialize. We rebuild the network in code with the same layer names and copy every weight by name
with h5py, refusing any mismatch. `build_from_h5_config` is an independent second route (it walks the file's own
`model_config` JSON) used only to check the hand-written architecture.

Keras/TensorFlow are imported lazily by the callers (`edgeface.convert.facenet`); importing this module needs Keras.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from edgeface.errors import ModelError

import keras  # noqa: E402  (this module is only imported by the converter, after TF was checked)
from keras import layers

INPUT_SIZE = 160
EMBEDDING_DIM = 128


@keras.saving.register_keras_serializable(package="edgeface")
class ScaleSum(layers.Layer):
    """Residual merge of Inception-ResNet: inputs[0] + scale * inputs[1] (the original file's `Lambda`)."""

    def __init__(self, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs: list[Any]) -> Any:
        return inputs[0] + inputs[1] * self.scale

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


def _conv_bn(x: Any, filters: int, kernel: tuple[int, int] | int, name: str, *, strides: int = 1,
             padding: str = "same", activation: bool = True) -> Any:
    """Conv (no bias) -> BatchNorm (no gamma, eps 1e-3) -> ReLU, named like the original file."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(axis=3, momentum=0.995, epsilon=0.001, scale=False, name=f"{name}_BatchNorm")(x)
    if activation:
        x = layers.Activation("relu", name=f"{name}_Activation")(x)
    return x


def _residual(x: Any, branches: list[Any], prefix: str, scale: float, activation: bool) -> Any:
    mixed = layers.Concatenate(axis=3, name=f"{prefix}_Concatenate")(branches)
    up = layers.Conv2D(int(x.shape[-1]), 1, padding="same", use_bias=True, name=f"{prefix}_Conv2d_1x1")(mixed)
    x = ScaleSum(scale, name=f"{prefix}_ScaleSum")([x, up])
    if activation:
        x = layers.Activation("relu", name=f"{prefix}_Activation")(x)
    return x


def _block35(x: Any, i: int) -> Any:
    p = f"Block35_{i}"
    b0 = _conv_bn(x, 32, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 32, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 32, 3, f"{p}_Branch_1_Conv2d_0b_3x3")
    b2 = _conv_bn(x, 32, 1, f"{p}_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 32, 3, f"{p}_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 32, 3, f"{p}_Branch_2_Conv2d_0c_3x3")
    return _residual(x, [b0, b1, b2], p, 0.17, True)


def _block17(x: Any, i: int) -> Any:
    p = f"Block17_{i}"
    b0 = _conv_bn(x, 128, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 128, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 128, (1, 7), f"{p}_Branch_1_Conv2d_0b_1x7")
    b1 = _conv_bn(b1, 128, (7, 1), f"{p}_Branch_1_Conv2d_0c_7x1")
    return _residual(x, [b0, b1], p, 0.1, True)


def _block8(x: Any, i: int, scale: float = 0.2, activation: bool = True) -> Any:
    p = f"Block8_{i}"
    b0 = _conv_bn(x, 192, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 192, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, (1, 3), f"{p}_Branch_1_Conv2d_0b_1x3")
    b1 = _conv_bn(b1, 192, (3, 1), f"{p}_Branch_1_Conv2d_0c_3x1")
    return _residual(x, [b0, b1], p, scale, activation)


def build_facenet() -> "keras.Model":
    """The Inception-ResNet-v1 graph of the Keras FaceNet file, same layer names, random weights."""
    inp = keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), name="input_1")
    x = _conv_bn(inp, 32, 3, "Conv2d_1a_3x3", strides=2, padding="valid")
    x = _conv_bn(x, 32, 3, "Conv2d_2a_3x3", padding="valid")
    x = _conv_bn(x, 64, 3, "Conv2d_2b_3x3")
    x = layers.MaxPooling2D(3, strides=2, name="MaxPool_3a_3x3")(x)
    x = _conv_bn(x, 80, 1, "Conv2d_3b_1x1", padding="valid")
    x = _conv_bn(x, 192, 3, "Conv2d_4a_3x3", padding="valid")
    x = _conv_bn(x, 256, 3, "Conv2d_4b_3x3", strides=2, padding="valid")
    for i in range(1, 6):
        x = _block35(x, i)
    b0 = _conv_bn(x, 384, 3, "Mixed_6a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 192, 1, "Mixed_6a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, 3, "Mixed_6a_Branch_1_Conv2d_0b_3x3")
    b1 = _conv_bn(b1, 256, 3, "Mixed_6a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_6a_Branch_2_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_6a")([b0, b1, b2])
    for i in range(1, 11):
        x = _block17(x, i)
    b0 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_0_Conv2d_0a_1x1")
    b0 = _conv_bn(b0, 384, 3, "Mixed_7a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 256, 3, "Mixed_7a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 256, 3, "Mixed_7a_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 256, 3, "Mixed_7a_Branch_2_Conv2d_1a_3x3", strides=2, padding="valid")
    b3 = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_7a_Branch_3_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_7a")([b0, b1, b2, b3])
    for i in range(1, 6):
        x = _block8(x, i)
    x = _block8(x, 6, scale=1.0, activation=False)
    x = layers.GlobalAveragePooling2D(name="AvgPool")(x)
    x = layers.Dropout(0.2, name="Dropout")(x)
    x = layers.Dense(EMBEDDING_DIM, use_bias=False, name="Bottleneck")(x)
    x = layers.BatchNormalization(momentum=0.995, epsilon=0.001, scale=False, name="Bottleneck_BatchNorm")(x)
    return keras.Model(inp, x, name="inception_resnet_v1")


def _open_weights(h5_path: str | os.PathLike[str]) -> Any:
    import h5py

    try:
        fh = h5py.File(h5_path, "r")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot open Keras weights {h5_path}: {exc}") from exc
    if "model_weights" not in fh:
        fh.close()
        raise ModelError(f"{h5_path} has no 'model_weights' group (expected a full Keras 2 model .h5)")
    return fh


def _h5_layer_weights(group: Any) -> list[tuple[str, np.ndarray]]:
    """(short weight name, array) in the file's own order, e.g. ('kernel', ...), ('moving_mean', ...)."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    return [(n.split("/")[-1].split(":")[0], np.asarray(group[n])) for n in names]


def load_h5_weights(model: "keras.Model", h5_path: str | os.PathLike[str]) -> dict[str, int]:
    """Copy every weight of the .h5 into `model` by layer name and weight name; refuse any mismatch or leftover.

    Returns {"layers": layers with weights copied, "arrays": arrays copied}.
    """
    with _open_weights(h5_path) as fh:
        group = fh["model_weights"]
        h5_layers = {name: _h5_layer_weights(group[name]) for name in group.keys()}
        used: set[str] = set()
        n_arrays = n_layers = 0
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in h5_layers:
                raise ModelError(f"layer {layer.name} of the rebuilt FaceNet has no weights in {h5_path}")
            stored = dict(h5_layers[layer.name])
            if len(stored) != len(layer.weights):
                raise ModelError(f"layer {layer.name}: {h5_path} holds {sorted(stored)}, the rebuilt layer needs "
                                 f"{[w.name for w in layer.weights]}")
            for var in layer.weights:
                if var.name not in stored:
                    raise ModelError(f"layer {layer.name}: weight {var.name!r} missing in {h5_path} "
                                     f"(file has {sorted(stored)})")
                arr = stored[var.name]
                if tuple(arr.shape) != tuple(var.shape):
                    raise ModelError(f"layer {layer.name}/{var.name}: {h5_path} has shape {list(arr.shape)}, "
                                     f"rebuilt layer expects {list(var.shape)}")
                var.assign(arr.astype(np.float32))
                n_arrays += 1
            used.add(layer.name)
            n_layers += 1
        leftovers = sorted(name for name, ws in h5_layers.items() if ws and name not in used)
        if leftovers:
            raise ModelError(f"{len(leftovers)} weighted layers of {h5_path} were not used by the rebuilt FaceNet, "
                             f"e.g. {leftovers[:3]}")
    return {"layers": n_layers, "arrays": n_arrays}


def load_facenet(h5_path: str | os.PathLike[str]) -> "keras.Model":
    """The float FaceNet with all weights of `h5_path` (raw 128-D output, not L2-normalised)."""
    model = build_facenet()
    load_h5_weights(model, h5_path)
    return model


def build_from_h5_config(h5_path: str | os.PathLike[str]) -> "keras.Model":
    """Second, independent route: rebuild from the file's own `model_config` JSON and load weights in file order.

    Only the layer classes this file uses are known; a Lambda becomes ScaleSum(arguments.scale). Used to check
    `build_facenet` (not for conversion).
    """
    with _open_weights(h5_path) as fh:
        config = json.loads(fh.attrs["model_config"])
        tensors: dict[str, Any] = {}
        built: dict[str, Any] = {}
        for spec in config["config"]["layers"]:
            cls, cfg, name = spec["class_name"], spec["config"], spec["name"]
            inbound = [tensors[node[0]] for node in spec["inbound_nodes"][0]] if spec["inbound_nodes"] else []
            if cls == "InputLayer":
                tensors[name] = keras.Input(shape=tuple(cfg["batch_input_shape"][1:]), name=name)
                continue
            if cls == "Conv2D":
                layer = layers.Conv2D(cfg["filters"], tuple(cfg["kernel_size"]), strides=tuple(cfg["strides"]),
                                      padding=cfg["padding"], use_bias=cfg["use_bias"], activation=cfg["activation"],
                                      name=name)
            elif cls == "BatchNormalization":
                layer = layers.BatchNormalization(axis=cfg["axis"], momentum=cfg["momentum"], epsilon=cfg["epsilon"],
                                                  center=cfg["center"], scale=cfg["scale"], name=name)
            elif cls == "Activation":
                layer = layers.Activation(cfg["activation"], name=name)
            elif cls == "MaxPooling2D":
                layer = layers.MaxPooling2D(tuple(cfg["pool_size"]), strides=tuple(cfg["strides"]),
                                            padding=cfg["padding"], name=name)
            elif cls == "Concatenate":
                layer = layers.Concatenate(axis=cfg["axis"], name=name)
            elif cls == "Lambda":
                layer = ScaleSum(cfg["arguments"]["scale"], name=name)
            elif cls == "GlobalAveragePooling2D":
                layer = layers.GlobalAveragePooling2D(name=name)
            elif cls == "Dropout":
                layer = layers.Dropout(cfg["rate"], name=name)
            elif cls == "Dense":
                layer = layers.Dense(cfg["units"], use_bias=cfg["use_bias"], activation=cfg["activation"], name=name)
            else:
                raise ModelError(f"{h5_path}: layer {name} has class {cls}, unknown to the config walker")
            tensors[name] = layer(inbound if len(inbound) > 1 else inbound[0])
            built[name] = layer
        outputs = [tensors[o[0]] for o in config["config"]["output_layers"]]
        inputs = [tensors[i[0]] for i in config["config"]["input_layers"]]
        model = keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs)
        group = fh["model_weights"]
        for name, layer in built.items():
            arrays = [a for _, a in _h5_layer_weights(group[name])] if name in group else []
            if len(arrays) != len(layer.weights):
                raise ModelError(f"{h5_path}: layer {name} has {len(arrays)} arrays, needs {len(layer.weights)}")
            if arrays:
                layer.set_weights(arrays)
    return model
