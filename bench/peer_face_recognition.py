"""Peer worker: embed images with ageitgey's face_recognition (dlib HOG + ResNet-34, 128-D).

Runs inside the benchmark's own virtualenv (bench/setup_peer_env.sh), never inside edgeface's: dlib is
a large native dependency the product must not need. edgeface's evaluator calls it as a subprocess:

    "$EDGEFACE_PEER_PYTHON" bench/peer_face_recognition.py LIST.txt OUT.npz

LIST.txt holds one image path per line. OUT.npz gets, per image in that order: `emb` (N, 128) float32
(NaN rows where no face was found), `n_faces`, and the milliseconds spent in `ms_decode`, `ms_detect`
and `ms_embed`. The library's defaults are used throughout: HOG detector with one upsampling,
`face_encodings(num_jitters=1, model="small")`; where several faces are found the largest is kept
(edgeface keeps its "main" face the same way).
"""
from __future__ import annotations

import sys
import time

import numpy as np


def main(list_path: str, out_path: str) -> int:
    import face_recognition

    paths = [p.strip() for p in open(list_path, encoding="utf-8") if p.strip()]
    n = len(paths)
    emb = np.full((n, 128), np.nan, np.float32)
    n_faces = np.zeros(n, np.int32)
    ms = {k: np.zeros(n, np.float64) for k in ("ms_decode", "ms_detect", "ms_embed")}
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        image = face_recognition.load_image_file(path)
        t1 = time.perf_counter()
        boxes = face_recognition.face_locations(image)  # (top, right, bottom, left), HOG, upsample 1
        t2 = time.perf_counter()
        n_faces[i] = len(boxes)
        if boxes:
            largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
            emb[i] = face_recognition.face_encodings(image, known_face_locations=[largest])[0]
        t3 = time.perf_counter()
        ms["ms_decode"][i], ms["ms_detect"][i], ms["ms_embed"][i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3
        if (i + 1) % 200 == 0:
            print(f"peer: {i + 1}/{n}", file=sys.stderr, flush=True)
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, emb=emb, n_faces=n_faces, **ms)
    import os
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: peer_face_recognition.py LIST.txt OUT.npz", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
