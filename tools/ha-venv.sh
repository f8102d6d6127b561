#!/usr/bin/env bash
# A Home Assistant core in its own venv, for tests/test_hass_core.py (the real-HA integration test).
#
#   tools/ha-venv.sh            # creates $EDGEFACE_HA_VENV (default ~/.cache/edgeface/ha-venv)
#
# Home Assistant needs its own Python (HA_VERSION below needs >= 3.13.0) and ~700 MB; it is never part
# of edgeface's own venv. Besides the core it installs the requirements of every integration HA sets up
# with the test's configuration (the default integrations: frontend, backup, ... plus mqtt) and of
# `hass --script check_config`, pinned by HA's own package_constraints.txt, so HA never pip-installs at run time (the test has no network).
# Idempotent: a venv that already has this HA version and its requirements is left as it is.
set -euo pipefail

HA_VERSION="${EDGEFACE_HA_VERSION:-2025.4.4}"  # the newest release that supports Python 3.13.0
VENV="${EDGEFACE_HA_VENV:-$HOME/.cache/edgeface/ha-venv}"
MARKER="$VENV/.edgeface-ha-ready"
READY_TAG="$HA_VERSION+2"  # bump the +N when what is installed besides the core changes
export PIP_DISABLE_PIP_VERSION_CHECK=1

find_python() {
  local candidates=("${EDGEFACE_HA_PYTHON:-}")
  candidates+=(/root/.pyenv/versions/3.13*/bin/python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python3.13)
  candidates+=(/usr/bin/python3.13 /usr/local/bin/python3.13 python3.13 python3)
  local py
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    # a pyenv shim answers but may refuse to run: ask the interpreter itself
    if "$py" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 13) else 1)' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$READY_TAG" ] && [ -x "$VENV/bin/hass" ]; then
  echo "Home Assistant $HA_VERSION is ready in $VENV"
  exit 0
fi

PY="$(find_python)" || {
  echo "ha-venv: no Python >= 3.13 found (set EDGEFACE_HA_PYTHON); Home Assistant $HA_VERSION needs it" >&2
  exit 1
}
start=$(date +%s)
echo "ha-venv: Home Assistant $HA_VERSION with $("$PY" --version) into $VENV"
if [ -e "$VENV" ]; then
  [ -f "$VENV/pyvenv.cfg" ] || { echo "ha-venv: $VENV exists and is not a venv; not touching it" >&2; exit 1; }
  rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"

pip_quiet() {  # pip install, its output in $VENV/pip.log; the last lines of it when it fails
  if ! "$VENV/bin/pip" install -q "$@" > "$VENV/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip.log" | tail -20 >&2
    echo "ha-venv: pip install $* failed" >&2
    return 1
  fi
}
pip_quiet "homeassistant==$HA_VERSION"
"$VENV/bin/python" -c 'import homeassistant.const as c; print("ha-venv: core", c.__version__)'

# The requirements of what the test's configuration sets up, read from HA's own manifests.
"$VENV/bin/python" - mqtt api config onboarding http lock event sensor switch binary_sensor > "$VENV/ha-requirements.txt" <<'EOF'
import json
import pathlib
import sys

import homeassistant.bootstrap as b

components = pathlib.Path(b.__file__).parent / "components"
todo = set(b.DEFAULT_INTEGRATIONS) | set(b.CORE_INTEGRATIONS) | set(b.FRONTEND_INTEGRATIONS) | set(sys.argv[1:])
todo |= {"logger", "network", "system_log", "http"}
seen, reqs = set(), set()
while todo:
    domain = todo.pop()
    if domain in seen:
        continue
    seen.add(domain)
    manifest = json.loads((components / domain / "manifest.json").read_text())
    reqs.update(manifest.get("requirements", []))
    todo.update(manifest.get("dependencies", []))
import homeassistant.scripts.check_config as check_config  # the test checks docs/mqtt.md's automations with it

reqs.update(check_config.REQUIREMENTS)
print("\n".join(sorted(reqs)))
EOF
CONSTRAINTS="$("$VENV/bin/python" -c 'import homeassistant, pathlib; print(pathlib.Path(homeassistant.__file__).parent / "package_constraints.txt")')"
echo "ha-venv: integration requirements: $(tr '\n' ' ' < "$VENV/ha-requirements.txt")"
pip_quiet -r "$VENV/ha-requirements.txt" -c "$CONSTRAINTS"
echo "$READY_TAG" > "$MARKER"
echo "ha-venv: ready in $(( $(date +%s) - start )) s: $VENV"
