"""SFace (OpenCV Zoo, Apache-2.0) rebuilt in Keras from the ONNX file's own tensors, for TFLite conversion.

Why rebuild rather than run a generic ONNX converter: the published file has block-quantised int8 weights
(DequantizeLinear, one fp32 scale per 64 values), NCHW layout and a Flatten in NCHW order; the network itself is
a plain chain (no residual adds) of 27 convolutions, each followed by batch norm and a per-channel PReLU, then
batch norm, a fully connected layer and batch norm. So we fold the weights back to fp32 with numpy, fold every
batch norm into the neighbouring convolution or dense layer, and build the same chain in NHWC. The graph walk
refuses any op or attribute it does not know, so a different file fails loudly instead of converting wrongly.

The graph's first two ops, (x - 127.5) * 0.0078125, are the "arcface" preprocessing the embedder already
applies, so the Keras model takes that normalised input and its padding sees the same zeros as the original.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeface.errors import ModelError

INPUT_SIZE = 112
EMBEDDING_DIM = 128
#: The normalisation inside the ONNX graph, (x - 127.5) * (1 / 128): edgeface's "arcface" preprocessing.
ONNX_MEAN, ONNX_SCALE = 127.5, 0.0078125


@dataclass
class ConvLayer:
    """One convolution (batch norm folded in) and the per-channel PReLU slopes after it; weights in Keras layout."""

    name: str
    kernel: np.ndarray  # (kh, kw, in, out) or depthwise (kh, kw, channels, 1)
    bias: np.ndarray
    stride: int
    pad: int
    depthwise: bool
    alpha: np.ndarray  # PReLU slope per output channel


@dataclass
class SFaceWeights:
    convs: list[ConvLayer]
    dense_kernel: np.ndarray  # (H*W*C in NHWC order, 128)
    dense_bias: np.ndarray
    final_hw: int


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear, per-tensor, per-axis or blocked (block_size > 0: one scale per `block` values)."""
    q = q.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (q - zero.reshape(())) * scale.reshape(())
    axis = axis % q.ndim
    if block:
        scale = np.repeat(scale, block, axis=axis)
        zero = np.repeat(zero, block, axis=axis)
        index = [slice(None)] * q.ndim
        index[axis] = slice(0, q.shape[axis])
        return (q - zero[tuple(index)]) * scale[tuple(index)]
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def _attrs(node: Any) -> dict[str, Any]:
    import onnx  # noqa: PLC0415

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Every tensor computable from initializers alone (DequantizeLinear, Reshape, Constant), folded to fp32."""
    from onnx import numpy_helper  # noqa: PLC0415

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        a = _attrs(node)
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(a["value"])
        elif node.op_type == "DequantizeLinear" and all(i in values for i in node.input if i):
            zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            values[node.output[0]] = _dequantize(values[node.input[0]], values[node.input[1]], zero,
                                                 int(a.get("axis", 1)), int(a.get("block_size", 0)))
        elif node.op_type == "Reshape" and all(i in values for i in node.input):
            values[node.output[0]] = values[node.input[0]].reshape(values[node.input[1]].astype(np.int64))
    return values


def _bn(values: dict[str, np.ndarray], node: Any) -> tuple[np.ndarray, np.ndarray]:
    """Batch norm as y = x * scale + shift."""
    gamma, beta, mean, var = (values[n].astype(np.float64) for n in node.input[1:5])
    scale = gamma / np.sqrt(var + float(_attrs(node).get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def read_onnx(path: str | os.PathLike[str]) -> SFaceWeights:
    """Walk the SFace ONNX graph and return its layers with every batch norm folded, in NHWC/Keras layout."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise ModelError("converting SFace needs the onnx package: pip install 'edgeface[convert]'") from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"SFace ONNX file {path} is unreadable: {exc}") from exc
    graph = model.graph
    values = _constants(graph)
    nodes = [n for n in graph.node if n.op_type not in ("DequantizeLinear", "Reshape", "Constant")
             or not all(i in values for i in n.input if i)]
    ops = [n.op_type for n in nodes]
    if ops[:2] != ["Sub", "Mul"] or ops[-4:] != ["Dropout", "Flatten", "Gemm", "BatchNormalization"]:
        raise ModelError(f"{path}: not the SFace graph this converter knows (ops start {ops[:3]}, end {ops[-4:]})")
    if not (np.allclose(values[nodes[0].input[1]], ONNX_MEAN) and np.allclose(values[nodes[1].input[1]], ONNX_SCALE)):
        raise ModelError(f"{path}: input normalisation is not (x - 127.5) * 0.0078125")
    body = nodes[2:-4]
    convs: list[ConvLayer] = []
    i = 0
    while i + 2 < len(body) and body[i].op_type == "Conv":
        conv, bn, prelu = body[i:i + 3]
        if (bn.op_type, prelu.op_type) != ("BatchNormalization", "PRelu"):
            raise ModelError(f"{path}: expected Conv, BatchNormalization, PRelu at {conv.name}, got "
                             f"{bn.op_type}, {prelu.op_type}")
        a = _attrs(conv)
        w = values[conv.input[1]].astype(np.float64)  # (out, in/group, kh, kw)
        group = int(a.get("group", 1))
        strides, pads, dil = a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]), a.get("dilations", [1, 1])
        if len(set(strides)) != 1 or len(set(pads)) != 1 or list(dil) != [1, 1] or len(conv.input) > 2:
            raise ModelError(f"{path}: unsupported Conv attributes at {conv.name}: {a}")
        scale, shift = _bn(values, bn)
        w = w * scale[:, None, None, None]
        depthwise = group > 1
        if depthwise:
            if group != w.shape[0] or w.shape[1] != 1:
                raise ModelError(f"{path}: grouped Conv {conv.name} is not depthwise (group {group}, {w.shape})")
            kernel = w.transpose(2, 3, 0, 1)  # (kh, kw, C, 1)
        else:
            kernel = w.transpose(2, 3, 1, 0)  # (kh, kw, in, out)
        alpha = values[prelu.input[1]].reshape(-1)
        convs.append(ConvLayer(conv.output[0], kernel.astype(np.float32), shift.astype(np.float32),
                               int(strides[0]), int(pads[0]), depthwise, alpha.astype(np.float32)))
        i += 3
    if i + 1 != len(body) or body[i].op_type != "BatchNormalization":
        raise ModelError(f"{path}: unexpected op {body[i].op_type if i < len(body) else 'none'} after the convolutions")
    bn1, gemm, fc_bn = body[i], nodes[-2], nodes[-1]
    ga = _attrs(gemm)
    if ga.get("transA", 0) or not ga.get("transB", 0) or ga.get("alpha", 1.0) != 1.0 or ga.get("beta", 1.0) != 1.0:
        raise ModelError(f"{path}: unsupported Gemm attributes {ga}")
    w = values[gemm.input[1]].astype(np.float64)  # (128, C*H*W), NCHW flatten order
    b = values[gemm.input[2]].astype(np.float64)
    channels = convs[-1].kernel.shape[2] if convs[-1].depthwise else convs[-1].kernel.shape[3]
    hw = int(round(np.sqrt(w.shape[1] / channels)))
    if channels * hw * hw != w.shape[1]:
        raise ModelError(f"{path}: dense input {w.shape[1]} is not {channels} x H x W")
    s1, t1 = _bn(values, bn1)  # per channel, before the flatten
    w4 = w.reshape(w.shape[0], channels, hw, hw)
    b = b + np.einsum("ochw,c->o", w4, t1)
    w4 = w4 * s1[None, :, None, None]
    s2, t2 = _bn(values, fc_bn)
    w4 = w4 * s2[:, None, None, None]
    b = b * s2 + t2
    dense = w4.transpose(2, 3, 1, 0).reshape(hw * hw * channels, w.shape[0])  # NHWC flatten order
    return SFaceWeights(convs, dense.astype(np.float32), b.astype(np.float32), hw)


def build_sface(weights: SFaceWeights) -> Any:
    """The Keras model: (N,112,112,3) arcface-normalised RGB -> (N,128) embedding (not L2-normalised)."""
    import keras  # noqa: PLC0415

    x = inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="input")
    for layer in weights.convs:
        kh = layer.kernel.shape[0]
        if layer.pad:
            # Symmetric padding as in the ONNX graph ("same" in Keras pads stride-2 layers unevenly).
            x = keras.layers.ZeroPadding2D(layer.pad, name=f"{layer.name}_pad")(x)
        if layer.depthwise:
            conv = keras.layers.DepthwiseConv2D(kh, strides=layer.stride, padding="valid", name=layer.name)
        else:
            conv = keras.layers.Conv2D(layer.kernel.shape[3], kh, strides=layer.stride, padding="valid",
                                       name=layer.name)
        x = conv(x)
        conv.set_weights([layer.kernel, layer.bias])
        act = keras.layers.PReLU(shared_axes=[1, 2], name=f"{layer.name}_prelu")
        x = act(x)
        act.set_weights([layer.alpha.reshape(1, 1, -1)])
    x = keras.layers.Flatten(name="flatten")(x)
    dense = keras.layers.Dense(weights.dense_kernel.shape[1], name="fc1")
    out = dense(x)
    dense.set_weights([weights.dense_kernel, weights.dense_bias])
    return keras.Model(inp, out, name="sface")


def equalise(weights: SFaceWeights, activation_max: list[np.ndarray], alpha: float = 0.5) -> SFaceWeights:
    """Per-channel activation equalisation (SmoothQuant-style), folded into the weights; the float output is unchanged.

    Why: int8 activations have one scale per tensor, and some SFace channels are far wider than the rest, so the
    narrow channels lose most of their resolution. PReLU is positively homogeneous per channel (prelu(x / s) =
    prelu(x) / s for s > 0), so dividing a layer's output channel c by s_c (kernel and bias) and multiplying the
    next layer's input channel c by s_c (or, for a depthwise next layer, carrying 1/s_c through it) leaves the
    network's function the same while flattening the activation ranges. s_c = (max|a_c| / mean max|a|) ** alpha,
    with `activation_max[i]` the observed per-channel max |output| of conv i (after PReLU) on calibration faces.
    """
    convs = [ConvLayer(c.name, c.kernel.copy(), c.bias.copy(), c.stride, c.pad, c.depthwise, c.alpha.copy())
             for c in weights.convs]
    dense = weights.dense_kernel.copy()
    carry = np.ones(convs[0].kernel.shape[2], np.float64)  # pending input-channel multiplier of the next layer
    for i, layer in enumerate(convs):
        # Undo the previous layer's division: input channel c (axis 2 for both layouts) times carry_c.
        k = layer.kernel.astype(np.float64) * carry[None, None, :, None]
        amax = np.maximum(np.asarray(activation_max[i], np.float64), 1e-6)
        s = (amax / amax.mean()) ** alpha
        # Output channel c divided by s_c: prelu(y / s) = prelu(y) / s (slopes unchanged).
        if layer.depthwise:
            k = k / s[None, None, :, None]
        else:
            k = k / s[None, None, None, :]
        layer.kernel = k.astype(np.float32)
        layer.bias = (layer.bias / s).astype(np.float32)
        carry = s
    hw = weights.final_hw
    dense = (dense.reshape(hw, hw, -1, dense.shape[1]) * carry[None, None, :, None]).reshape(dense.shape)
    return SFaceWeights(convs, dense.astype(np.float32), weights.dense_bias.copy(), hw)


def activation_ranges(model: Any, inputs: np.ndarray) -> list[np.ndarray]:
    """Per-channel max |activation| after each PReLU of `model` (a build_sface model) on `inputs`."""
    import keras  # noqa: PLC0415

    outs = [layer.output for layer in model.layers if layer.name.endswith("_prelu")]
    probe = keras.Model(model.input, outs)
    acts = probe.predict(inputs, batch_size=16, verbose=0)
    return [np.abs(a).max(axis=(0, 1, 2)) for a in acts]
