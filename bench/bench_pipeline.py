"""Per-stage latency of the recognition pipeline, per embedder and thread count, plus the face_recognition peer.

Run by hand (never a test): timings depend on the machine and on what else runs on it.

    python bench/bench_pipeline.py --embedder facenet_int8 \
        --embedder "$WORK/facenet_float.tflite:facenet160:prewhiten" \
        --threads 1 --threads 2 --threads 4 --peer-python "$EDGEFACE_PEER_PYTHON"

`--embedder sface_int8,facenet_int8` measures score fusion: each face aligned and embedded by both models, the
two vectors concatenated (what a fused gallery would match); its row keeps each model's embed time apart
(`embed_parts`) for the Pi projection.

Every (embedder, threads) pair runs in a fresh Python process so that its model load time and peak RSS are its
own. A "frame" is one photo of the set: JPEG decode -> BlazeFace -> face mesh (when the config enables it) ->
align -> embed -> 1:N match against a gallery of 100 people x 3 embeddings, i.e. the daemon's per-frame work.
Writes bench/results/pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean()), "n": int(len(a))}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(embedder: str, threads: int, images: list[Path], passes: int) -> dict:
    """Measure one configuration in this process: the frames go through FaceAnalyzer (the daemon's face path), whose
    stage timer gives the per-stage times."""
    from edgeface.config import EdgefaceConfig
    from edgeface.evaluation.embedding import ModelChoice
    from edgeface.models import resolve_model
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.vision.detect import build_detector
    from edgeface.vision.embed import EmbedderSpec, TFLiteEmbedder
    from edgeface.vision.images import decode_image
    from edgeface.vision.landmarks import LandmarkRefiner

    cfg = EdgefaceConfig()
    rss_start = _rss_mb()
    # "A,B": score fusion, every face aligned and embedded by both models (the gallery stores both vectors).
    choices = [ModelChoice.parse(part) for part in embedder.split(",")]
    choice = choices[0]
    t0 = time.perf_counter()
    det = build_detector(cfg.detector, num_threads=threads)
    mesh_passes = choice.mesh_passes(cfg.detector)
    mesh = LandmarkRefiner(num_threads=threads, passes=mesh_passes) if mesh_passes else None
    t1 = time.perf_counter()
    embs, paths, infos = [], [], []
    for c in choices:
        spec = None
        if c.template:
            from edgeface.vision.align import TEMPLATES
            spec = EmbedderSpec(c.base_label, TEMPLATES[c.template].size, c.template, c.preprocessing)
        path, info = resolve_model(c.model)
        paths.append(path)
        infos.append(info)
        embs.append(TFLiteEmbedder(path, spec=spec, num_threads=threads, flip_augment=c.flip))
    t2 = time.perf_counter()
    # First inference (XNNPACK packs weights lazily on the first invoke): part of start-up, not of a frame.
    for emb in embs:
        emb.embed(np.zeros((1, emb.input_size, emb.input_size, 3), np.uint8))
    t3 = time.perf_counter()
    frame_s: dict[str, float] = {}

    def timer(stage: str, seconds: float) -> None:
        frame_s[stage] = frame_s.get(stage, 0.0) + seconds

    analyzer = FaceAnalyzer(det, embs[0], refiner=mesh, min_presence=cfg.detector.min_presence, timer=timer)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((300, sum(e.spec.embedding_dim for e in embs))).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    starts = np.arange(0, 300, 3)
    blobs = [p.read_bytes() for p in images]
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "mesh", "align", "embed", "match", "frame")}
    part_ms: list[list[float]] = [[] for _ in embs]
    faces_found = frames = 0
    for rep in range(passes + 1):
        for blob in blobs:
            frame_s.clear()
            a = time.perf_counter()
            rgb = decode_image(blob)
            frame_s["decode"] = time.perf_counter() - a
            face, _n = analyzer.main_face(rgb)
            parts = []
            if face is not None:
                vecs = []
                for emb in embs:
                    before = frame_s.get("embed", 0.0)
                    vecs.append(analyzer.embed(analyzer.align(rgb, face, emb.template), emb)[0])
                    parts.append((frame_s["embed"] - before) * 1e3)
                vec = np.concatenate(vecs) / np.sqrt(len(vecs))
                m = time.perf_counter()
                dist = np.minimum.reduceat(1.0 - gallery @ vec, starts)
                int(np.argmin(dist))
                frame_s["match"] = time.perf_counter() - m
            frame_s["frame"] = time.perf_counter() - a
            if rep == 0:
                continue  # warm-up pass: caches, lazy allocations
            frames += 1
            for key in ("decode", "detect", "mesh", "frame"):
                if key in frame_s:
                    stages[key].append(frame_s[key] * 1e3)
            if face is not None:
                faces_found += 1
                for key in ("align", "embed", "match"):
                    stages[key].append(frame_s[key] * 1e3)
                for i, ms in enumerate(parts):
                    part_ms[i].append(ms)
    # A door camera mostly sees nobody: what a 1280x720 frame without a face costs the detector (with the default
    # full-range fallback that is both models), the work done on every empty frame.
    import cv2
    empty = cv2.resize(decode_image((Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nonfaces"
                                     / "pilatus_mountain.jpg").read_bytes()), (1280, 720), interpolation=cv2.INTER_AREA)
    empty_ms = []
    for rep in range(3 + 10 * max(1, passes)):
        a = time.perf_counter()
        analyzer.detect(empty)
        if rep >= 3:
            empty_ms.append((time.perf_counter() - a) * 1e3)
    stages["empty_720p"] = empty_ms
    def precision(emb: Any, info: Any) -> str:
        q = (info.extra.get("quantization") if info is not None else None) or ("int8" if emb.quantized else "float32")
        return {"float": "float32", "dynamic": "float32"}.get(q, q)  # dynamic range: float activations

    out = {
        "embedder": "⊕".join(c.label for c in choices), "model_file": ",".join(str(p) for p in paths),
        "model_bytes": sum(os.path.getsize(p) for p in paths),
        "precision": " + ".join(precision(e, i) for e, i in zip(embs, infos)),
        "embed_parts": [{"embedder": c.label, "precision": precision(e, i), "embed_ms": _stats(ms)}
                        for c, e, i, ms in zip(choices, embs, infos, part_ms) if ms],
        "detector": {"variant": cfg.detector.variant, "fallback_full_range": cfg.detector.fallback_full_range},
        "quantized": all(bool(e.quantized) for e in embs), "threads": threads, "face_mesh": bool(mesh is not None),
        "frames": frames, "frames_with_face": faces_found,
        "load_ms": {"detector_and_mesh": (t1 - t0) * 1e3, "embedder": (t2 - t1) * 1e3, "first_inference": (t3 - t2) * 1e3},
        "stages_ms": {k: _stats(v) for k, v in stages.items() if v},
        "rss_mb": {"after_imports": rss_start, "peak": _rss_mb()},
    }
    frame = np.asarray(stages["frame"])
    out["fps"] = float(1000.0 / frame.mean())
    k = cfg.policy.min_frames
    out["decision"] = {"k_frames": k, "median_ms": float(k * np.median(frame)), "p95_ms": float(k * np.percentile(frame, 95))}
    return out


def run_peer(python: str, images: list[Path]) -> dict:
    """face_recognition on the same photos, in its own venv (its own process: its RSS is its own)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(f"{p}\n" for p in images) * 2, encoding="utf-8")  # pass 1 warms up
        out = Path(tmp) / "out.npz"
        t0 = time.perf_counter()
        subprocess.run([python, str(REPO / "bench" / "peer_face_recognition.py"), str(listing), str(out)], check=True,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        with np.load(out) as d:
            n = len(images)
            found = d["n_faces"][n:] > 0
            res = {"embedder": "face_recognition (dlib HOG + ResNet-34)", "threads": 1, "frames": n,
                   "frames_with_face": int(found.sum()),
                   "stages_ms": {"decode": _stats(d["ms_decode"][n:].tolist()),
                                 "detect": _stats(d["ms_detect"][n:].tolist()),
                                 "embed": _stats(d["ms_embed"][n:][found].tolist()),
                                 "frame": _stats((d["ms_decode"][n:] + d["ms_detect"][n:] + d["ms_embed"][n:]).tolist())},
                   "wall_s": wall, "rss_mb": {"peak_children_max": rss}}
            frame = d["ms_decode"][n:] + d["ms_detect"][n:] + d["ms_embed"][n:]
            res["fps"] = float(1000.0 / frame.mean())
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedder", action="append", default=[], help="as `edgeface eval --model` (repeat)")
    ap.add_argument("--threads", action="append", type=int, default=[], help="interpreter threads (repeat)")
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--passes", type=int, default=1, help="timed passes over the photos (after one warm-up pass)")
    ap.add_argument("--peer-python", default=os.environ.get("EDGEFACE_PEER_PYTHON"),
                    help="python of the face_recognition venv (bench/setup_peer_env.sh); default $EDGEFACE_PEER_PYTHON, "
                         "unset: the peer is not measured")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.worker:
        print(json.dumps(worker(args.embedder[0], args.threads[0], images, args.passes)))
        return 0
    # The peer first: RUSAGE_CHILDREN keeps the maximum over all children, so it must not follow ours.
    peer = run_peer(args.peer_python, images) if args.peer_python else None
    if peer:
        print(f"face_recognition frame median {peer['stages_ms']['frame']['median']:.1f} ms", file=sys.stderr)
    results = []
    for embedder in args.embedder or ["facenet_int8"]:
        for threads in args.threads or [1, 2, 4]:
            proc = subprocess.run([sys.executable, __file__, "--worker", "--embedder", embedder, "--threads", str(threads),
                                   "--images", str(args.images), "--passes", str(args.passes)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['embedder']:<28} threads={threads} frame median {r['stages_ms']['frame']['median']:.1f} ms "
                  f"embed {r['stages_ms']['embed']['median']:.1f} ms  fps {r['fps']:.1f}  peak RSS {r['rss_mb']['peak']:.0f} MB",
                  file=sys.stderr)
            results.append(r)
    from edgeface.evaluation.embedding import machine_description
    doc = {"machine": machine_description(), "images": str(args.images), "n_images": len(images),
           "passes": args.passes, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average_1min_at_end": os.getloadavg()[0],
           "results": results, "peer": peer}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
