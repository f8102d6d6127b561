"""Measure the liveness gate (edgeface.vision.liveness) on what can be measured without a real camera.

Photo attacks (REAL images, real detector + face mesh): a photo from data/faces is treated as a flat
print held in front of the camera and moved: a smooth random 3-D pose trajectory of the plane (tilt up
to +-max_tilt degrees, in-plane roll, distance and offset changes), projected with a pinhole camera,
warped, noised and JPEG-compressed per frame. The gate must call these NOT live.

Live proxies (SIMULATED motion): we have no video of real people here. A real head is approximated by
the 3-D face mesh of the same photos (x, y, z from the mesh model) rotated by a smooth yaw/pitch
trajectory of a given amplitude and projected; the landmark noise of the real model is added by taking
the per-frame residuals observed in a photo-attack sequence of the same face. This shows how much head
rotation the threshold needs; it does NOT show how people actually move at a door, nor blinks.

Usage: python bench/liveness_bench.py [--faces ../shared/data/faces] [--seqs 3] [--frames 16]
Writes bench/results/liveness.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from edgeface.vision.detect import BlazeFaceDetector
from edgeface.vision.images import list_images, load_image
from edgeface.vision.landmarks import INPUT_SIZE, LandmarkRefiner, _roi_matrix
from edgeface.vision.liveness import LivenessGate, inter_ocular

REPO = Path(__file__).resolve().parents[1]


def mesh3d(refiner: LandmarkRefiner, image: np.ndarray, face) -> np.ndarray:
    """468 x (x, y, z) in frame pixels (z scaled like x); bench-only access to the raw mesh output."""
    m = _roi_matrix(face)
    crop = cv2.warpAffine(image, m, (INPUT_SIZE, INPUT_SIZE))
    it = refiner._interpreter
    it.set_tensor(refiner._input, (crop.astype(np.float32) / 255.0)[None])
    it.invoke()
    p = it.get_tensor(refiner._mesh).reshape(468, 3).astype(np.float64)
    inv = cv2.invertAffineTransform(m)
    s = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))
    return np.c_[p[:, :2] @ inv[:, :2].T + inv[:, 2], p[:, 2] * s]


def rot(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_walk(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """A smooth trajectory in [-amp, amp] (random phase/frequency sine plus a little jitter)."""
    t = np.linspace(0, 1, n)
    f = rng.uniform(0.5, 1.5)
    return amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.5, 1.0)


def photo_attack_frames(rng: np.random.Generator, photo: np.ndarray, n: int, max_tilt: float) -> list[np.ndarray]:
    """Frames of a camera (same size as the photo) looking at the photo held as a moving plane."""
    h, w = photo.shape[:2]
    f = 1.2 * max(w, h)  # focal length in pixels (~45 deg horizontal field of view)
    corners = np.array([[-w / 2, -h / 2, 0], [w / 2, -h / 2, 0], [w / 2, h / 2, 0], [-w / 2, h / 2, 0]], float)
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    yaw, pitch = smooth_walk(rng, n, max_tilt), smooth_walk(rng, n, max_tilt)
    roll = smooth_walk(rng, n, 10.0)
    dist = f * rng.uniform(1.0, 1.3) + smooth_walk(rng, n, 0.15 * f)
    dx, dy = smooth_walk(rng, n, 0.08 * w), smooth_walk(rng, n, 0.08 * h)
    frames = []
    for i in range(n):
        p3 = corners @ rot(yaw[i], pitch[i], roll[i]).T + np.array([dx[i], dy[i], dist[i]])
        dst = np.float32(np.c_[f * p3[:, 0] / p3[:, 2] + w / 2, f * p3[:, 1] / p3[:, 2] + h / 2])
        hmat = cv2.getPerspectiveTransform(src, dst)
        img = cv2.warpPerspective(photo, hmat, (w, h), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90))
        img = np.clip(img.astype(np.float32) + rng.normal(0, 3.0, img.shape), 0, 255).astype(np.uint8)
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
        frames.append(cv2.imdecode(enc, cv2.IMREAD_UNCHANGED))
    return frames


def nearest_face(det: BlazeFaceDetector, img: np.ndarray, prev_center):
    faces = det.detect(img)
    if not faces:
        return None
    if prev_center is None:
        return max(faces, key=lambda f: f.size)
    return min(faces, key=lambda f: np.hypot(f.center[0] - prev_center[0], f.center[1] - prev_center[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", default=str(REPO.parent / "shared" / "data" / "faces"))
    ap.add_argument("--seqs", type=int, default=3, help="photo-attack sequences per photo")
    ap.add_argument("--frames", type=int, default=16, help="frames per sequence (~ a 3-4 s window at 4-5 fps)")
    ap.add_argument("--max-tilt", type=float, default=25.0)
    ap.add_argument("--per-person", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "liveness.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    det = BlazeFaceDetector()
    ref = LandmarkRefiner(num_threads=2)
    photos = []
    for person in sorted(p for p in Path(args.faces).iterdir() if p.is_dir()):
        photos.extend(list_images(person)[: args.per_person])

    attack, live = {"parallax": [], "blink": [], "motion": []}, {}
    amps = (5.0, 8.0, 12.0, 20.0)
    for a in amps:
        live[a] = []
    mesh_ms, gate_ms = [], []
    for path in photos:
        photo = load_image(path)
        for _s in range(args.seqs):
            frames = photo_attack_frames(rng, photo, args.frames, args.max_tilt)
            pts_seq, prev = [], None
            for img in frames:
                face = nearest_face(det, img, prev)
                if face is None:
                    continue
                prev = face.center
                t0 = time.perf_counter()
                pts, _ = ref.mesh(img, face)
                mesh_ms.append((time.perf_counter() - t0) * 1000)
                pts_seq.append(pts.astype(np.float64))
            if len(pts_seq) < 3:
                continue
            gate = LivenessGate(window_s=1e9, max_frames=1000)
            for i, p in enumerate(pts_seq):
                t0 = time.perf_counter()
                gate.observe(float(i), p)
                gate_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            v = gate.verdict()
            verdict_ms = (time.perf_counter() - t0) * 1000
            attack["parallax"].append(v.parallax)
            attack["blink"].append(v.blink)
            attack["motion"].append(v.motion)
            # live proxy for this photo: rotated 3-D mesh + this sequence's real landmark noise
            face0 = nearest_face(det, photo, None)
            if face0 is None:
                continue
            p3 = mesh3d(ref, photo, face0)
            c = p3.mean(axis=0)
            base = np.asarray(pts_seq[0])
            noise = []
            for p in pts_seq:
                hm, _ = cv2.findHomography(base, p, 0)
                fitted = cv2.perspectiveTransform(base[None], hm)[0]
                noise.append((p - fitted) * inter_ocular(base) / inter_ocular(p))
            for a in amps:
                yaw, pitch = smooth_walk(rng, len(noise), a), smooth_walk(rng, len(noise), a / 2)
                g = LivenessGate(window_s=1e9, max_frames=1000)
                for i, nz in enumerate(noise):
                    q = (p3 - c) @ rot(yaw[i], pitch[i]).T + c
                    g.observe(float(i), q[:, :2] + nz)
                live[a].append(g.verdict().parallax)

    cfg = LivenessGate()
    thr_p, thr_b = cfg.min_parallax, cfg.min_blink
    tradeoff = {}
    for thr in (0.03, 0.04, 0.05, 0.06):
        tradeoff[str(thr)] = {
            "attack_pass_rate": float(np.mean(np.array(attack["parallax"]) >= thr)),
            "live_proxy_pass_rate_by_yaw_amplitude_deg": {str(a): float(np.mean(np.array(v) >= thr))
                                                          for a, v in live.items()}}
    par, bl = np.array(attack["parallax"]), np.array(attack["blink"])
    res = {
        "photos": len(photos), "attack_sequences": int(len(par)), "frames_per_sequence": args.frames,
        "max_tilt_deg": args.max_tilt,
        "attack_parallax": {"median": float(np.median(par)), "p95": float(np.percentile(par, 95)),
                            "max": float(par.max())},
        "attack_blink": {"median": float(np.median(bl)), "p95": float(np.percentile(bl, 95)), "max": float(bl.max())},
        "attack_motion_median": float(np.median(attack["motion"])),
        "thresholds": {"min_parallax": thr_p, "min_blink": thr_b},
        "attack_pass_rate_parallax": float(np.mean(par >= thr_p)),
        "attack_pass_rate_blink": float(np.mean(bl >= thr_b)),
        "attack_pass_rate_any": float(np.mean((par >= thr_p) | (bl >= thr_b))),
        "live_proxy_pass_rate_by_yaw_amplitude_deg": {str(a): float(np.mean(np.array(v) >= thr_p)) for a, v in live.items()},
        "live_proxy_parallax_median_by_yaw_amplitude_deg": {str(a): float(np.median(v)) for a, v in live.items()},
        "parallax_threshold_tradeoff": tradeoff,
        "cost_ms": {"mesh_per_frame_median": float(np.median(mesh_ms)), "gate_observe_median": float(np.median(gate_ms)),
                    "verdict_last": verdict_ms},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
