#!/bin/sh
# Create the peer's own virtualenv (ageitgey/face_recognition on the prebuilt dlib-bin wheel: no compiling).
# Usage: bench/setup_peer_env.sh [VENV_DIR]   (default $HOME/.cache/edgeface/peer-venv)
set -eu
VENV="${1:-$HOME/.cache/edgeface/peer-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --no-deps dlib-bin face_recognition_models face-recognition
"$VENV/bin/pip" install Click numpy Pillow
"$VENV/bin/python" -c "import dlib, face_recognition; print('face_recognition ready, dlib', dlib.__version__)"
