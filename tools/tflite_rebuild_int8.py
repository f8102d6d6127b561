#!/usr/bin/env python3
"""Rebuild a small float/dynamic-range TFLite embedder as a TensorFlow graph from its own tensors, then convert it
to full-integer int8 with a representative set aligned by edgeface's pipeline.

Why: files without a SignatureDef (e.g. the MobileFaceNet candidate) cannot go through ai-edge-quantizer, and
TensorFlow's converter only takes TensorFlow graphs. Only the ops such embedders use are supported
(CONV_2D, DEPTHWISE_CONV_2D, ADD, SUB, MUL, ABS, RELU, RESHAPE, L2_NORMALIZATION); any other op is refused.
Development tool: it writes where you tell it and never touches models/.

    python tools/tflite_rebuild_int8.py IN.tflite OUT.tflite --representative DIR --template arcface112 \
        --preprocessing arcface [--evaluate DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_DTYPES = {0: np.float32, 2: np.int32, 4: np.int64, 9: np.int8, 3: np.uint8}
_PADDING = {0: "SAME", 1: "VALID"}


def _constant(model, graph, index):
    tensor = graph.tensors[index]
    buf = model.buffers[tensor.buffer].data
    if buf is None or len(buf) == 0:
        return None
    arr = np.frombuffer(bytes(bytearray(buf)), dtype=_DTYPES[tensor.type]).reshape(tensor.shape)
    q = tensor.quantization
    if tensor.type in (9, 3) and q is not None and q.scale is not None and len(q.scale):
        scale = np.asarray(q.scale, np.float32)
        zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), np.float32)
        shape = [1] * arr.ndim
        if len(scale) > 1:
            shape[q.quantizedDimension] = len(scale)
        arr = (arr.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
    return arr


def build_graph(path: Path):
    """(tf.function taking [N,S,S,3] float, input size S) reproducing the TFLite graph."""
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema

    buf = path.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    if len(model.subgraphs) != 1:
        raise SystemExit(f"{path}: {len(model.subgraphs)} subgraphs, expected 1")
    graph = model.subgraphs[0]
    codes = [oc.builtinCode for oc in model.operatorCodes]
    consts = {i: _constant(model, graph, i) for i in range(len(graph.tensors))}
    size = int(graph.tensors[graph.inputs[0]].shape[1])

    def act(x, fused):
        if fused == 0:
            return x
        if fused == 1:
            return tf.nn.relu(x)
        if fused == 3:
            return tf.nn.relu6(x)
        raise SystemExit(f"fused activation {fused} unsupported")

    def run(x):
        values = {graph.inputs[0]: x}

        def val(i):
            return values[i] if i in values else tf.constant(consts[i])

        for op in graph.operators:
            code, opt, ins = codes[op.opcodeIndex], op.builtinOptions, list(op.inputs)
            if code == 3:  # CONV_2D, filter [out, h, w, in]
                w = np.transpose(consts[ins[1]], (1, 2, 3, 0))
                y = tf.nn.conv2d(val(ins[0]), w, [1, opt.strideH, opt.strideW, 1], _PADDING[opt.padding],
                                 dilations=[1, opt.dilationHFactor, opt.dilationWFactor, 1])
                if len(ins) > 2 and ins[2] >= 0:
                    y = y + consts[ins[2]]
                y = act(y, opt.fusedActivationFunction)
            elif code == 4:  # DEPTHWISE_CONV_2D, filter [1, h, w, in*mult]
                f = consts[ins[1]]
                cin = int(graph.tensors[ins[0]].shape[-1])
                w = f.reshape(f.shape[1], f.shape[2], cin, opt.depthMultiplier)
                y = tf.nn.depthwise_conv2d(val(ins[0]), w, [1, opt.strideH, opt.strideW, 1], _PADDING[opt.padding],
                                           dilations=[opt.dilationHFactor, opt.dilationWFactor])
                if len(ins) > 2 and ins[2] >= 0:
                    y = y + consts[ins[2]]
                y = act(y, opt.fusedActivationFunction)
            elif code in (0, 41, 18):  # ADD, SUB, MUL
                a, b = val(ins[0]), val(ins[1])
                y = act(a + b if code == 0 else a - b if code == 41 else a * b, opt.fusedActivationFunction)
            elif code == 101:
                y = tf.abs(val(ins[0]))
            elif code == 19:
                y = tf.nn.relu(val(ins[0]))
            elif code == 22:  # RESHAPE: keep the batch dimension free
                target = list(graph.tensors[op.outputs[0]].shape)
                y = tf.reshape(val(ins[0]), [-1, *target[1:]])
            elif code == 11:
                y = tf.math.l2_normalize(val(ins[0]), axis=-1, epsilon=1e-12)
            else:
                raise SystemExit(f"op with builtin code {code} is not supported by this rebuild")
            values[op.outputs[0]] = y
        return values[graph.outputs[0]]

    fn = tf.function(run, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="input")])
    return fn, size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--representative", type=Path, required=True)
    parser.add_argument("--max-representative", type=int, default=200)
    parser.add_argument("--template", default="arcface112")
    parser.add_argument("--preprocessing", default="arcface")
    parser.add_argument("--evaluate", type=Path)
    args = parser.parse_args(argv)

    from edgeface.convert.crops import aligned_crops
    from edgeface.convert.report import compare_embedders
    from edgeface.convert.tflite import require_tensorflow, write_atomic
    from edgeface.vision.embed import PREPROCESSING, EmbedderSpec, TFLiteEmbedder

    tf = require_tensorflow()
    fn, size = build_graph(args.source)
    pre = PREPROCESSING[args.preprocessing]
    rep = aligned_crops(args.representative, template=args.template, limit=args.max_representative, per_person=1)
    rep_x = pre(rep.crops)
    # The rebuilt graph must reproduce the source file before it is worth quantising.
    source = TFLiteEmbedder(args.source, spec=EmbedderSpec("source", size, args.template, args.preprocessing),
                            models_dir=args.out.parent)
    rebuilt = fn(tf.constant(rep_x[:16])).numpy()
    rebuilt /= np.linalg.norm(rebuilt, axis=1, keepdims=True)
    rebuild_cos = np.sum(rebuilt * source.embed(rep.crops[:16]), axis=1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rep_x[i:i + 1]] for i in range(len(rep_x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    write_atomic(args.out, bytes(converter.convert()))
    result = {"rebuild_vs_source_cosine_min": float(rebuild_cos.min()), "calibration_faces": len(rep),
              "bytes": args.out.stat().st_size, "source_bytes": args.source.stat().st_size}
    if args.evaluate:
        faces = aligned_crops(args.evaluate, template=args.template)
        cand = TFLiteEmbedder(args.out, spec=EmbedderSpec("int8", size, args.template, args.preprocessing),
                              models_dir=args.out.parent)
        result["evaluation"] = compare_embedders(source, cand, faces)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
