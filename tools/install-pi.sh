#!/usr/bin/env bash
# Install edgeface as a systemd service on Raspberry Pi OS (Bookworm or later, 64-bit).
# Run from a clone of the repository:  sudo tools/install-pi.sh [--with-mosquitto]
# Idempotent: re-running upgrades the package and keeps /etc/edgeface and /var/lib/edgeface.
set -euo pipefail

PREFIX=/opt/edgeface
ETC=/etc/edgeface
WITH_MOSQUITTO=0
for arg in "$@"; do
  case "$arg" in
    --with-mosquitto) WITH_MOSQUITTO=1 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
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
# picamera2 and lgpio come from Raspberry Pi OS (compiled against its libcamera / kernel);
# the venv sees them through --system-site-packages.
apt-get install -y python3-venv python3-pip python3-picamera2 python3-lgpio
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

echo "== virtual environment in $PREFIX/venv"
install -d -m 0755 "$PREFIX"
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
  python3 -m venv --system-site-packages "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --upgrade pip
"$PREFIX/venv/bin/pip" install "$SRC"

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
systemctl daemon-reload
systemctl enable edgeface.service
echo
echo "Installed. Enroll people, then start:"
echo "  sudo -u edgeface $PREFIX/venv/bin/edgeface --config $ETC/config.yaml enroll NAME photo1.jpg photo2.jpg ..."
echo "  sudo systemctl start edgeface && journalctl -u edgeface -f"
