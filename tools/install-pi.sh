#!/usr/bin/env bash
# Install edgeface as a systemd service on Raspberry Pi OS (Bookworm or later, 64-bit).
# Run from a clone of the repository:  sudo tools/install-pi.sh [--with-mosquitto] [--wheel FILE] [--find-links DIR]
# Idempotent: re-running upgrades the package and keeps /etc/edgeface and /var/lib/edgeface.
#   --wheel FILE       install this built wheel (pip wheel . / a release) instead of building the clone
#   --find-links DIR   offline: take every Python package from the wheels in DIR (pip --no-index)
# numpy: the venv keeps Raspberry Pi OS's python3-numpy, the one python3-picamera2 is compiled against
# (a pip numpy 2 there makes picamera2 fail with "numpy.dtype size changed"): pip is constrained to it.
set -euo pipefail

PREFIX=/opt/edgeface
ETC=/etc/edgeface
STATE=/var/lib/edgeface
WITH_MOSQUITTO=0
WHEEL=""
PIP_SOURCE=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with-mosquitto) WITH_MOSQUITTO=1; shift ;;
    --wheel) WHEEL="$(realpath "$2")"; shift 2 ;;
    --find-links) PIP_SOURCE=(--no-index --find-links "$(realpath "$2")"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

if [[ $EUID -ne 0 ]]; then
  echo "run as root: sudo $0 $*" >&2
  exit 1
fi
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$SRC/pyproject.toml" ]] || { echo "run from an edgeface clone ($SRC has no pyproject.toml)" >&2; exit 1; }

echo "== system packages"
apt-get update
# numpy, picamera2 and lgpio come from the OS (compiled against its libcamera / kernel / numpy);
# the venv sees them through --system-site-packages.
apt-get install -y python3-venv python3-pip python3-numpy
has_apt() { [[ -n "$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '(none)')" ]]; }
for pkg in python3-picamera2 python3-lgpio; do
  if has_apt "$pkg"; then
    apt-get install -y "$pkg"
  else
    echo "   $pkg is not in this system's apt sources (not Raspberry Pi OS?): skipped"
  fi
done
if [[ $WITH_MOSQUITTO -eq 1 ]]; then
  apt-get install -y mosquitto
fi

echo "== user and groups"
if ! id edgeface >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/edgeface --no-create-home --shell /usr/sbin/nologin edgeface
fi
for g in video gpio; do
  if getent group "$g" >/dev/null; then usermod -aG "$g" edgeface; fi
done

echo "== state directory $STATE"
# Created here, not only by systemd's StateDirectory= on the first start, so that enrolling (as user
# edgeface) works before the service has ever run. systemd keeps the same owner and mode.
install -d -m 0700 -o edgeface -g edgeface "$STATE"

echo "== virtual environment in $PREFIX/venv"
install -d -m 0755 "$PREFIX"
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
  python3 -m venv --system-site-packages "$PREFIX/venv"
fi
PY="$PREFIX/venv/bin/python"
# Pin the venv to the system numpy so pip never installs a second one that shadows it; with numpy 1.x
# (Bookworm: 1.24) opencv-python-headless must stay below 4.12, the first release that needs numpy 2.
SYS_NUMPY="$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')"
{
  echo "numpy==$SYS_NUMPY"
  if [[ $SYS_NUMPY == 1.* ]]; then echo "opencv-python-headless<4.12"; fi
} > "$PREFIX/constraints.txt"
echo "   system numpy $SYS_NUMPY; pip constraints in $PREFIX/constraints.txt:"; sed 's/^/     /' "$PREFIX/constraints.txt"
# gpiozero's backend: python3-lgpio from apt; where apt has none, the `pi` extra's wheel (CPython < 3.13 only).
# The `web` extra: the owner's web app (edgeface-web.service; pure Python plus MarkupSafe/cryptography wheels).
TARGET="${WHEEL:-$SRC}"
EXTRAS="web"
if ! /usr/bin/python3 -c 'import lgpio' 2>/dev/null; then
  if "$PY" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
    EXTRAS="$EXTRAS,pi"
  else
    echo "   warning: no lgpio (apt install python3-lgpio): GPIO needs it on a Pi" >&2
  fi
fi
TARGET="$TARGET[$EXTRAS]"
if [[ ${#PIP_SOURCE[@]} -eq 0 ]]; then "$PY" -m pip install --upgrade pip; fi
# An older install may have put a numpy 2 into the venv: remove it, the system one takes its place.
if "$PY" -c 'import numpy, sys; sys.exit(not numpy.__file__.startswith(sys.prefix))' 2>/dev/null; then
  echo "   removing the venv's own numpy (it shadows the system numpy $SYS_NUMPY)"
  "$PY" -m pip uninstall -y numpy
fi
if ! "$PY" -m pip install "${PIP_SOURCE[@]}" -c "$PREFIX/constraints.txt" "$TARGET"; then
  if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 13))'; then
    echo "pip failed on Python $("$PY" -c 'import platform; print(platform.python_version())'): ai-edge-litert (the TFLite" \
         "runtime) has published aarch64 wheels only up to CPython 3.12 so far; use Raspberry Pi OS Bookworm" >&2
  fi
  exit 1
fi
"$PY" -c 'import numpy, sys; p = numpy.__file__; print("   numpy", numpy.__version__, "from", p); sys.exit(p.startswith(sys.prefix))' \
  || { echo "a numpy was installed into $PREFIX/venv: it would shadow the system numpy" >&2; exit 1; }

echo "== configuration in $ETC"
install -d -m 0750 -o root -g edgeface "$ETC"
if [[ ! -f "$ETC/config.yaml" ]]; then
  install -m 0640 -o root -g edgeface "$SRC/config.yaml" "$ETC/config.yaml"
  echo "   wrote $ETC/config.yaml (edit door.relay_pin, mqtt.host, ...)"
else
  echo "   keeping existing $ETC/config.yaml"
fi
# Secrets for LoadCredential=: root-only files; systemd hands copies to the service.
if [[ ! -f "$ETC/mqtt-password" ]]; then
  install -m 0600 -o root -g root /dev/null "$ETC/mqtt-password"
  echo "   created empty $ETC/mqtt-password (put the broker password there if mqtt.username is set)"
fi
if [[ ! -f "$ETC/unlock-secret" ]]; then
  umask 077
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/unlock-secret"
  chmod 0600 "$ETC/unlock-secret"
  echo "   generated $ETC/unlock-secret (used only when mqtt.remote_unlock is true)"
fi

echo "== check"
"$PREFIX/venv/bin/edgeface" --config "$ETC/config.yaml" check-config
"$PREFIX/venv/bin/edgeface" models

echo "== systemd unit"
install -m 0644 "$SRC/systemd/edgeface.service" /etc/systemd/system/edgeface.service
install -m 0644 "$SRC/systemd/edgeface-web.service" /etc/systemd/system/edgeface-web.service
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable edgeface.service edgeface-web.service
else
  echo "   systemd is not running here: unit installed, run 'systemctl enable edgeface' on the device"
fi
echo
echo "Installed. Enroll people, then start:"
echo "  sudo -u edgeface $PREFIX/venv/bin/edgeface --config $ETC/config.yaml enroll --folder people/"
echo "  sudo systemctl start edgeface && journalctl -u edgeface -f"
echo "  sudo systemctl start edgeface-web   # then open http://$(hostname).local:8080/ on a phone (docs/web.md)"
