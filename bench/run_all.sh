#!/bin/sh
# Reproduce every number of docs/benchmarks.md (and docs/accuracy.md) on this machine. Run by hand, on an idle
# machine (other processes distort the timings): bench/run_all.sh
# Environment: PY (edgeface's python), PEER_PY (face_recognition venv, see bench/setup_peer_env.sh),
# SHARED (development data), WORK (where the float FaceNet reference model is written, ~90 MB, never committed).
set -eu
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
PEER_PY="${PEER_PY:-${EDGEFACE_PEER_PYTHON:-$HOME/.cache/edgeface/peer-venv/bin/python}}"
SHARED="${SHARED:-../shared}"
WORK="${WORK:-$HOME/.cache/edgeface/bench}"
SFACE_ONNX="$SHARED/weights/sface/face_recognition_sface_2021dec_int8bq.onnx"
FLOAT="$WORK/facenet_float.tflite"
SFACE_FLOAT="$WORK/sface_float32.tflite"
SFACE_FP16="$WORK/sface_fp16.tflite"
SFACE_INT8_FULL="$WORK/sface_int8_eq.tflite"

[ -x "$PEER_PY" ] || bench/setup_peer_env.sh "$(dirname "$(dirname "$PEER_PY")")"
# Float FaceNet for float-vs-int8, and the SFace variants measured against the shipped sface_int8 (models/MODELS.md):
# float32, float16, and fully int8 (PReLU in int8 too, which XNNPACK cannot run), never shipped.
[ -f "$FLOAT" ] || "$PY" -m edgeface convert --weights "$SHARED/weights/facenet/facenet_keras.h5" --out "$WORK" \
    --quantization float --name facenet_float
[ -f "$SFACE_FLOAT" ] || "$PY" -m edgeface convert --model sface --weights "$SFACE_ONNX" --out "$WORK" \
    --quantization float --name sface_float32
[ -f "$SFACE_FP16" ] || "$PY" -m edgeface convert --model sface --weights "$SFACE_ONNX" --out "$WORK" \
    --quantization float16 --name sface_fp16
[ -f "$SFACE_INT8_FULL" ] || "$PY" -m edgeface convert --model sface --weights "$SFACE_ONNX" --out "$WORK" \
    --quantization int8 --equalise 0.5 --representative tests/fixtures/faces --per-person 1000 \
    --evaluate "$SHARED/data/faces" --name sface_int8_eq
SF32="$SFACE_FLOAT:arcface112:arcface"
SF16="$SFACE_FP16:arcface112:arcface"
SI8F="$SFACE_INT8_FULL:arcface112:arcface"

# 1. Speed: 1:N matching, pipeline stages (+ peer) at 2 threads (the core count here; "sface_int8,facenet_int8"
#    is score fusion, each face embedded by both), then the reference networks for the Pi projection, timed in
#    turns with each embedder (same load for the ratio).
"$PY" bench/bench_matching.py
"$PY" bench/bench_pipeline.py --embedder sface_int8 --embedder sface_int8+mesh2 --embedder "$SF16" --embedder "$SF32" --embedder "$SI8F" \
    --embedder facenet_int8 --embedder sface_int8,facenet_int8 --threads 2 --passes 2 --peer-python "$PEER_PY"
"$PY" bench/bench_reference.py --threads 2 --embedder sface_int8 --embedder "$SF16" --embedder "$SF32" \
    --embedder "$SI8F" --embedder facenet_int8
# The replayed doorway (presence gate off and on): empty-doorway CPU and face-to-relay latency, here and for a Pi 4
# (reference networks timed in turns with the replays).
"$PY" bench/bench_doorway.py

# 2. Accuracy on the same photos and pairs, ours (default sface_int8, its float32 reference, facenet_int8) next to
#    face_recognition. The float32 SFace is not in the manifest: it gets the shipped model's threshold.
THR="$("$PY" -c "from edgeface.config import EdgefaceConfig as C; from edgeface.gallery import default_max_distance as d; print(d('sface_int8', match_mode=C().gallery.match_mode))")"
"$PY" -m edgeface eval "$SHARED/data/faces" --model sface_int8 --model "$SF32" --model facenet_int8 \
    --model face_recognition --peer-python "$PEER_PY" --threshold "sface_float32=$THR" --report bench/results/eval_faces.md \
    --json bench/results/eval_faces.json --plots-dir docs/img --quiet

# 3. The open-set study (tuning/reporting halves, levers; fusion = the first two models), same galleries
#    for every model.
"$PY" -m edgeface eval "$SHARED/data/openset/celeba_wild" --open-set --ablation --model sface_int8 --model facenet_int8 \
    --model face_recognition --peer-python "$PEER_PY" --k 100 --enroll 3 --enroll 1 --draws 20 --seed 0 \
    --exclude bench/openset_exclude.txt \
    --report docs/accuracy.md --json bench/results/accuracy.json --plots-dir docs/img --quiet

# 4. The SFace precisions against each other on the tuning half only (where the shipped one was chosen).
"$PY" -m edgeface eval "$SHARED/data/openset/celeba_wild" --open-set --split tune --model sface_int8 --model "$SF16" \
    --model "$SI8F" --k 100 --enroll 3 --enroll 1 --draws 20 --seed 0 --exclude bench/openset_exclude.txt \
    --report bench/results/sface_variants_tune.md --json bench/results/sface_variants_tune.json \
    --plots-dir "$WORK/img" --quiet

"$PY" bench/make_docs.py
