"""1:N matching time and memory as the gallery grows (100 -> 1,000,000 embeddings), float32 vs float16 storage.

Run by hand: python bench/bench_matching.py   (writes bench/results/matching.json)

float32 uses the gallery's own in-memory index (edgeface.gallery.index._Index: one matrix-vector product, then the
per-person minimum), 3 embeddings per person. float16 stores the same matrix at half the size and computes in
float32 chunks of 65,536 rows (numpy has no fast float16 matrix product), which is what a float16 gallery would
have to do. Embeddings are random unit vectors: matching time does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 65536


def f16_person_distances(mat16: np.ndarray, q: np.ndarray, starts: np.ndarray) -> np.ndarray:
    d = np.empty(len(mat16), np.float32)
    for i in range(0, len(mat16), CHUNK):
        d[i:i + CHUNK] = 1.0 - mat16[i:i + CHUNK].astype(np.float32) @ q
    return np.minimum.reduceat(d, starts)


def measure(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    a = np.asarray(times)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "query_peak_extra_bytes": int(peak)}


def main() -> int:
    from edgeface.evaluation.embedding import machine_description
    from edgeface.gallery.index import _Index

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-person", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "matching.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        mat = rng.standard_normal((n, args.dim), dtype=np.float32)
        mat /= np.linalg.norm(mat, axis=1, keepdims=True)
        owners = np.arange(n) // args.per_person
        persons = int(owners[-1]) + 1
        index = _Index(mat, owners, list(range(persons)), [str(i) for i in range(persons)])
        mat16 = mat.astype(np.float16)
        q = mat[n // 2] + 0.1 * rng.standard_normal(args.dim).astype(np.float32)
        q /= np.linalg.norm(q)
        repeats = 50 if n <= 100000 else 10
        r32 = measure(lambda: int(np.argmin(index.person_distances(q, "best", 1))), repeats)
        r16 = measure(lambda: int(np.argmin(f16_person_distances(mat16, q, index.starts))), repeats)
        same = int(np.argmin(index.person_distances(q, "best", 1))) == int(np.argmin(f16_person_distances(mat16, q, index.starts)))
        rows.append({"embeddings": n, "persons": persons,
                     "float32": dict(r32, storage_bytes=int(mat.nbytes)),
                     "float16": dict(r16, storage_bytes=int(mat16.nbytes)), "same_answer": bool(same)})
        print(f"{n:>8}: f32 {r32['median_ms']:.3f} ms ({mat.nbytes / 2**20:.1f} MiB)  "
              f"f16 {r16['median_ms']:.3f} ms ({mat16.nbytes / 2**20:.1f} MiB)  same={same}", file=sys.stderr)
        del mat, mat16, index
    doc = {"machine": machine_description(), "dim": args.dim, "per_person": args.per_person,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average_1min_at_end": os.getloadavg()[0], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
