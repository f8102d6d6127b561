#!/bin/sh
# Reproduce every number of docs/benchmarks.md (and docs/accuracy.md) on this machine. Run by hand, on an idle
# machine (other processes distort the timings): bench/run_all.sh
# Environment: PY (edgeface's python), PEER_PY (face_recognition venv, see bench/setup_peer_env.sh),
# SHARED (development data), WORK (where the float FaceNet reference model is written, ~90 MB, never committed).
set -eu
cd "$(dirname "$0")/.."
PY="${PY:-/work/venv/bin/python}"
PEER_PY="${PEER_PY:-/work/bench-venv/bin/python}"
SHARED="${SHARED:-../shared}"
WORK="${WORK:-$HOME/.cache/edgeface/bench}"
MFN="$SHARED/weights/mobilefacenet/mobilefacenet.tflite:arcface112:arcface"
FLOAT="$WORK/facenet_float.tflite"

[ -x "$PEER_PY" ] || bench/setup_peer_env.sh "$(dirname "$(dirname "$PEER_PY")")"
# Float FaceNet, for float-vs-int8 (the shipped model is the int8 one in models/).
[ -f "$FLOAT" ] || "$PY" -m edgeface convert --weights "$SHARED/weights/facenet/facenet_keras.h5" --out "$WORK" \
    --quantization float --name facenet_float

# 1. Speed: reference networks for the Pi projection, 1:N matching, pipeline stages (+ peer) at 1/2/4 threads.
"$PY" bench/bench_reference.py
"$PY" bench/bench_matching.py
"$PY" bench/bench_pipeline.py --embedder facenet_int8 --embedder "$FLOAT:facenet160:prewhiten" --embedder "$MFN" \
    --threads 1 --threads 2 --threads 4 --peer-python "$PEER_PY"

# 2. Accuracy on the same photos and pairs, ours (int8, float) next to face_recognition. Float FaceNet is not in
#    the manifest: it gets the shipped int8 model's threshold, so float and int8 are compared at the same setting.
THR="$("$PY" -c "from edgeface.gallery import default_max_distance as d; print(d('facenet_int8'))")"
"$PY" -m edgeface eval "$SHARED/data/faces" --model facenet_int8 --model "$FLOAT:facenet160:prewhiten" --model "$MFN" \
    --model face_recognition --peer-python "$PEER_PY" --threshold "facenet_float=$THR" --report bench/results/eval_faces.md \
    --json bench/results/eval_faces.json --plots-dir docs/img --quiet

# 3. The open-set study of issue 8 (tuning/reporting halves, levers), same galleries for every model.
"$PY" -m edgeface eval "$SHARED/data/openset/celeba_wild" --open-set --ablation --model facenet_int8 --model "$MFN" \
    --model face_recognition --peer-python "$PEER_PY" --k 100 --enroll 3 --enroll 1 --draws 20 --seed 0 \
    --exclude bench/openset_exclude.txt \
    --report docs/accuracy.md --json bench/results/accuracy.json --plots-dir docs/img --quiet

"$PY" bench/make_docs.py
