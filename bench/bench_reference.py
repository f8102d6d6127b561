"""Reference networks for projecting our timings onto a Raspberry Pi (an estimate, never a measurement).

XNNPACK's README publishes MobileNet v1/v2 latencies on a Raspberry Pi 4 (BCM2711, ARM64, multi-threaded:
4 threads), measured with randomized weights and inputs:

    FP32 MobileNet v1 1.0X 77 ms, FP32 MobileNet v2 1.0X 46 ms, INT8 MobileNet v1 1.0X 24 ms, INT8 v2 1.0X 17 ms
    (google/XNNPACK README, "Raspberry Pi" table, benchmarked Feb 8, 2022 with end2end-bench)

This script builds the same two networks (Keras applications, random weights, 224x224), converts them to
TFLite float32 and full-integer int8, and times them here through the same runtime edgeface uses (ai-edge-litert,
XNNPACK). ratio = published Pi 4 ms / our ms, per network and precision; docs/benchmarks.md multiplies our
pipeline timings by that ratio to estimate a Pi 4, and divides by Raspberry Pi Ltd's stated 2-3x CPU speed-up of
the Pi 5 over the Pi 4 for a Pi 5 estimate. Needs TensorFlow (pip install .[convert]).

    python bench/bench_reference.py    (writes bench/results/reference.json)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PI4_PUBLISHED_MS = {  # XNNPACK README, RPi 4 (BCM2711, ARM64) column
    ("mobilenet_v1", "float32"): 77.0, ("mobilenet_v2", "float32"): 46.0,
    ("mobilenet_v1", "int8"): 24.0, ("mobilenet_v2", "int8"): 17.0,
}
PI4_THREADS = 4
SOURCE = "google/XNNPACK README, Raspberry Pi table (RPi 4 BCM2711 ARM64, multi-threaded, Feb 8 2022)"


def build(name: str, quant: str, out: Path) -> Path:
    path = out / f"{name}_{quant}.tflite"
    if path.is_file():
        return path
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    ctor = {"mobilenet_v1": tf.keras.applications.MobileNet, "mobilenet_v2": tf.keras.applications.MobileNetV2}[name]
    model = ctor(input_shape=(224, 224, 3), weights=None, alpha=1.0)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "int8":
        rng = np.random.default_rng(0)

        def rep():
            for _ in range(20):
                yield [rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)]
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    out.mkdir(parents=True, exist_ok=True)
    path.write_bytes(conv.convert())
    return path


def time_model(path: Path, threads: int, runs: int = 30) -> float:
    from edgeface.vision.runtime import load_interpreter
    it = load_interpreter(path, threads)
    inp = it.get_input_details()[0]
    x = np.zeros(inp["shape"], inp["dtype"])
    it.set_tensor(inp["index"], x)
    for _ in range(3):
        it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _embedder_interpreter(spec: str, threads: int) -> tuple[Any, str]:
    """An embedder named as `edgeface eval --model` (name or PATH:TEMPLATE:PREPROCESSING): its interpreter and
    precision (the manifest's quantization, else int8 / float32 from its input tensor)."""
    from edgeface.evaluation.embedding import ModelChoice
    from edgeface.models import resolve_model
    from edgeface.vision.runtime import load_interpreter

    choice = ModelChoice.parse(spec)
    path, info = resolve_model(choice.model)
    it = load_interpreter(path, threads)
    q = info.extra.get("quantization") if info is not None else None
    if q is None:
        q = "int8" if it.get_input_details()[0]["dtype"] in (np.int8, np.uint8) else "float32"
    return it, {"float": "float32", "dynamic": "float32"}.get(q, q)


def time_in_turns(interpreters: dict[str, Any], rounds: int = 40) -> dict[str, float]:
    """Median ms per invoke, every interpreter timed once per round in turn, so all see the same machine load."""
    times: dict[str, list[float]] = {k: [] for k in interpreters}
    for it in interpreters.values():
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        for _ in range(3):
            it.invoke()
    for _ in range(rounds):
        for key, it in interpreters.items():
            t0 = time.perf_counter()
            it.invoke()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> int:
    from edgeface.evaluation.embedding import machine_description
    from edgeface.vision.runtime import load_interpreter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgeface" / "bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads here (default: every core, as the published Pi figures use all 4)")
    ap.add_argument("--embedder", action="append", default=[],
                    help="also time this embedder (as `edgeface eval --model`), in turns with the reference networks, "
                         "for a per-face Pi 4 estimate (repeat)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reference.json")
    args = ap.parse_args()
    interpreters: dict[str, Any] = {}
    for (name, quant) in PI4_PUBLISHED_MS:
        interpreters[f"{name}/{quant}"] = load_interpreter(build(name, quant, args.work), args.threads)
    precisions = {}
    for spec in args.embedder:
        interpreters[spec], precisions[spec] = _embedder_interpreter(spec, args.threads)
    here = time_in_turns(interpreters)
    rows = []
    for (name, quant), pi_ms in PI4_PUBLISHED_MS.items():
        ours = here[f"{name}/{quant}"]
        rows.append({"network": name, "precision": quant, "here_ms": ours, "here_threads": args.threads,
                     "pi4_published_ms": pi_ms, "pi4_threads": PI4_THREADS, "ratio_pi4_over_here": pi_ms / ours})
        print(f"{name} {quant}: here {ours:.1f} ms ({args.threads} threads), Pi 4 published {pi_ms} ms, "
              f"ratio {pi_ms / ours:.2f}", file=sys.stderr)
    embedders = []
    for spec in args.embedder:
        factor = "int8" if precisions[spec] == "int8" else "float32"  # float16 weights run as float32 on a Pi 4
        ratios = [r["ratio_pi4_over_here"] for r in rows if r["precision"] == factor]
        embedders.append({"embedder": spec, "precision": precisions[spec], "here_ms": here[spec],
                          "here_threads": args.threads, "pi4_factor": factor,
                          "pi4_est_ms": [here[spec] * min(ratios), here[spec] * max(ratios)]})
        print(f"{spec} ({precisions[spec]}): here {here[spec]:.1f} ms, Pi 4 est. {here[spec] * min(ratios):.0f}-"
              f"{here[spec] * max(ratios):.0f} ms", file=sys.stderr)
    doc = {"machine": machine_description(), "source": SOURCE, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average_1min_at_end": os.getloadavg()[0], "timing": "all networks timed in turns, 40 rounds (medians)",
           "pi5_over_pi4_speedup": {"low": 2.0, "high": 3.0,
                                    "source": "Raspberry Pi Ltd, Raspberry Pi 5 launch announcement (Sept 2023): "
                                              "'a 2-3x increase in CPU performance relative to Raspberry Pi 4'"},
           "rows": rows, "embedders": embedders}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
