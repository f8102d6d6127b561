#!/usr/bin/env bash
# Check edgeface on an emulated arm64 Debian bookworm (what Raspberry Pi OS 64-bit is built on), the Pi way:
# tools/install-pi.sh with the built wheel: a venv made with --system-site-packages and pinned to Debian's
# python3-numpy (the numpy that Raspberry Pi OS's python3-picamera2 is compiled against); then `edgeface models`,
# enrolling as user edgeface, `edgeface demo` and a fast subset of the tests, all under qemu-user-static.
#
#   sudo tools/check-arm64.sh [--root DIR] [--out DIR] [--log FILE]
#
# Exit status: 0 = everything passed and the arm64 demo made the same decisions as x86; 1 = a check failed;
# 3 = the check could not be set up (no emulation, or the Debian mirror / the package index unreachable):
# CI treats only 3 as "not run".
#
# Needs root, Debian's debootstrap and qemu-user-static (installed with apt-get when missing) and either a
# binfmt_misc registration for aarch64 (tried) or proot as the fallback. The root file system is cached in
# $EDGEFACE_ARM64_ROOT (default /var/tmp/edgeface-arm64, outside the repository): a second run only rebuilds
# the wheel and re-runs the checks. Packages come from the host's own Debian mirror and its pip index (the
# aarch64 wheels are downloaded on the host, natively, and installed inside with --no-index).
# Prints the demo's events, compares who was granted / who was unknown with the same demo run natively
# from the same wheel, and the durations. EDGEFACE_ARM64_EMULATION=proot forces the fallback.
set -Eeuo pipefail
trap 'exit 1' ERR   # any unexpected failure is a failed check (1), whatever its own status; 3 only from setup()

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${EDGEFACE_ARM64_ROOT:-/var/tmp/edgeface-arm64}"
SUITE=bookworm
OUT="${EDGEFACE_ARM64_OUT:-/var/tmp/edgeface-arm64-out}"
LOG=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
if [[ -n "$LOG" ]]; then exec > >(tee "$LOG") 2>&1; fi
if [[ $EUID -ne 0 ]]; then echo "run as root: sudo $0" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
SETUP_FAILED=3
# A failure while fetching or preparing (mirror, index, emulation) is "could not run", not "arm64 is broken".
setup() { "$@" || { echo "setup step failed (exit $?): $*" >&2; exit $SETUP_FAILED; }; }

# ------------------------------------------------------------------------------------------ host tools
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[[ -x /usr/bin/qemu-aarch64-static ]] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v proot >/dev/null || need+=(proot)
if [[ ${#need[@]} -gt 0 ]]; then
  step "installing ${need[*]}"
  setup apt-get update -qq
  setup apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Prefer the kernel's binfmt_misc (chroot runs aarch64 binaries transparently, children included);
# fall back to proot, which runs every process of the tree under qemu itself.
MODE=none
command -v proot >/dev/null && MODE=proot
if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [[ -e /proc/sys/fs/binfmt_misc/status && ${EDGEFACE_ARM64_EMULATION:-} != proot ]]; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  if grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then MODE=chroot; fi
fi
[[ $MODE != none ]] || { echo "no way to run aarch64 binaries (binfmt_misc or proot)" >&2; exit $SETUP_FAILED; }
step "emulation through $MODE (qemu-aarch64-static $(qemu-aarch64-static --version | head -1 | awk '{print $3}'))"

MOUNTED=()
cleanup() {
  local m
  for (( i=${#MOUNTED[@]}-1; i>=0; i-- )); do umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that `timeout` still unmounts
mount_binds() {
  [[ $MODE == chroot ]] || return 0
  local d
  for d in proc sys dev dev/pts; do
    if ! mountpoint -q "$ROOT/$d"; then
      case "$d" in
        proc) mount -t proc proc "$ROOT/proc" ;;
        sys) mount -t sysfs sysfs "$ROOT/sys" ;;
        *) mount --bind "/$d" "$ROOT/$d" ;;
      esac
      MOUNTED+=("$ROOT/$d")
    fi
  done
}
# Run a command inside the arm64 root (as root, HOME=/root, a clean PATH).
inroot() {
  local envs=(env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
              LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
              OMP_NUM_THREADS=2 EDGEFACE_THREADS=2)
  if [[ $MODE == chroot ]]; then
    chroot "$ROOT" "${envs[@]}" "$@"
  else
    proot -q /usr/bin/qemu-aarch64-static -0 -r "$ROOT" -b /proc -b /dev -b /sys -w / "${envs[@]}" "$@"
  fi
}

# ------------------------------------------------------------------------------------------ root file system
# The host's Debian mirror (so this works wherever apt works), else Debian's default.
MIRROR="$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
[[ -n "$MIRROR" ]] || MIRROR="$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[[ -n "$MIRROR" ]] || MIRROR="http://deb.debian.org/debian"

if [[ ! -f "$ROOT/.edgeface-stage1" ]]; then
  step "debootstrap stage 1: $SUITE arm64 from $MIRROR into $ROOT"
  { grep -o " $ROOT/[^ ]*" /proc/mounts || true; } | sort -r | xargs -r -n1 umount -l   # never rm -rf through a mount
  rm -rf "$ROOT"; mkdir -p "$ROOT"
  setup debootstrap --foreign --arch=arm64 --variant=minbase "$SUITE" "$ROOT" "$MIRROR"
  touch "$ROOT/.edgeface-stage1"
fi
install -D -m 0755 /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static"
mkdir -p "$ROOT/usr/libexec/qemu-binfmt"
ln -sf ../../bin/qemu-aarch64-static "$ROOT/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
if [[ ! -f "$ROOT/.edgeface-stage2" ]]; then
  step "debootstrap stage 2 (emulated)"
  setup inroot /debootstrap/debootstrap --second-stage
  touch "$ROOT/.edgeface-stage2"
fi
mount_binds
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
echo "deb $MIRROR $SUITE main" > "$ROOT/etc/apt/sources.list"
APT_PKGS="python3 python3-venv python3-pip python3-numpy python3-bottleneck ca-certificates"
if [[ "$(cat "$ROOT/.edgeface-apt" 2>/dev/null)" != "$APT_PKGS" ]]; then
  step "apt inside: $APT_PKGS"
  setup inroot apt-get update -qq
  setup inroot apt-get install -y -qq --no-install-recommends $APT_PKGS >/dev/null
  inroot apt-get clean
  echo "$APT_PKGS" > "$ROOT/.edgeface-apt"
fi
setup inroot python3 -c 'import platform, numpy; print("arm64 root:", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__)'
step "root file system ready"

# ------------------------------------------------------------------------------------------ wheel and wheelhouse
# The host's Python (builds the wheel, fetches the wheels, runs the x86 demo): $PYTHON, else the checkout's
# .venv (the README's), else python3 (then without the x86 comparison unless it has edgeface's dependencies).
HOSTPY="${PYTHON:-}"
if [[ -z "$HOSTPY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then HOSTPY="$REPO/.venv/bin/python"; else HOSTPY=python3; fi
fi
CHK=/opt/edgeface-check          # inside the root
H="$ROOT$CHK"                    # the same place seen from the host
rm -rf "$H/dist" "$H/src" "$H/tests-root" "$H/people"
mkdir -p "$H/dist" "$H/wheelhouse" "$H/src" "$H/tests-root"
step "building the wheel on the host ($HOSTPY)"
"$HOSTPY" -m pip wheel "$REPO" --no-deps -q -w "$H/dist" 2>&1 | grep -v "^WARNING: Location" || true
WHEEL_NAME="$(cd "$H/dist" && ls edgeface-*.whl 2>/dev/null || true)"
[[ -n "$WHEEL_NAME" ]] || { echo "no wheel was built" >&2; exit 1; }
ROOT_PY="$(inroot python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
ROOT_NUMPY="$(inroot python3 -c 'import numpy; print(numpy.__version__)')"
# The constraints install-pi.sh will write inside (the root's own numpy; opencv < 4.12 with numpy 1.x).
{ echo "numpy==$ROOT_NUMPY"; if [[ $ROOT_NUMPY == 1.* ]]; then echo "opencv-python-headless<4.12"; fi; } > "$H/constraints.txt"
step "aarch64 wheels for CPython $ROOT_PY (downloaded natively on the host)"
# sdnotify publishes only an sdist (pure Python): build its wheel here, natively.
# A download that fails for want of the network is "could not run" (3); any other failure is a real one (1).
pip_fetch() {
  local log="$OUT/pip-download.log"
  if ! "$@" > "$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -5 >&2
    if grep -Eqi "NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is unreachable|timed out|Could not fetch URL" "$log"; then
      exit $SETUP_FAILED
    fi
    echo "pip could not resolve the aarch64 dependencies (log: $log)" >&2
    exit 1
  fi
}
pip_fetch "$HOSTPY" -m pip wheel -q --no-deps -w "$H/wheelhouse" sdnotify
pip_fetch "$HOSTPY" -m pip download -q --only-binary=:all: --implementation cp --python-version "$ROOT_PY" \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  --platform manylinux_2_34_aarch64 -c "$H/constraints.txt" -d "$H/wheelhouse" --find-links "$H/wheelhouse" \
  "$H/dist/$WHEEL_NAME[pi,web]" pytest hypothesis
cp "$H/dist/$WHEEL_NAME" "$H/wheelhouse/"

# ------------------------------------------------------------------------------------------ the Pi installer
# What a Pi owner runs, from the clone's files, with the wheel and the wheelhouse (offline).
cp -r "$REPO/tools" "$REPO/systemd" "$REPO/config.yaml" "$REPO/pyproject.toml" "$H/src/"
# Every run installs on a fresh "Pi": no venv, config, state or user left from the previous run.
inroot sh -c 'userdel edgeface 2>/dev/null; rm -rf /opt/edgeface /etc/edgeface /var/lib/edgeface /etc/systemd/system/edgeface.service'
step "tools/install-pi.sh --wheel $WHEEL_NAME (emulated)"
T_INSTALL=$(date +%s)
inroot bash "$CHK/src/tools/install-pi.sh" --wheel "$CHK/dist/$WHEEL_NAME" --find-links "$CHK/wheelhouse" \
  > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; echo "install-pi.sh failed (log: $OUT/install.log)" >&2; exit 1; }
T_INSTALL=$(( $(date +%s) - T_INSTALL ))
grep -E "^==|numpy|skipped|config OK| ok$" "$OUT/install.log" | sed 's/^/   /'
EF=/opt/edgeface/venv/bin/edgeface
inroot "$EF" --version
inroot /opt/edgeface/venv/bin/python -c 'import numpy, cv2, bottleneck; print("venv: numpy", numpy.__version__, "from", numpy.__file__); print("venv: opencv", cv2.__version__, "; bottleneck (an apt C extension built for that numpy) imports")'

# ------------------------------------------------------------------------------------------ the README's Pi steps
# Enroll as user edgeface before the service ever ran (the state dir must already be there).
mkdir -p "$H/people/barack_obama"
cp "$REPO"/tests/fixtures/faces/barack_obama/barack_obama_0[12].jpg "$H/people/barack_obama/"
chmod -R a+rX "$H"
step "enroll --folder as user edgeface (emulated)"
inroot runuser -u edgeface -- env TQDM_DISABLE=1 "$EF" --config /etc/edgeface/config.yaml enroll --folder "$CHK/people"
inroot runuser -u edgeface -- "$EF" --config /etc/edgeface/config.yaml identify \
  "$CHK/people/barack_obama/barack_obama_01.jpg" | tee "$OUT/identify.csv"
grep -q ',barack_obama,' "$OUT/identify.csv" || { echo "identify after enroll did not answer barack_obama" >&2; exit 1; }

# ------------------------------------------------------------------------------------------ demo, both sides
step "edgeface demo (emulated arm64)"
T_DEMO=$(date +%s)
inroot runuser -u edgeface -- env TQDM_DISABLE=1 "$EF" demo --broker 127.0.0.1:1 > "$OUT/demo-arm64.jsonl" \
  2> "$OUT/demo-arm64.err" || { tail -20 "$OUT/demo-arm64.err"; echo "demo failed on arm64" >&2; exit 1; }
T_DEMO=$(( $(date +%s) - T_DEMO ))
X86="$OUT/x86-venv"
rm -f "$OUT/demo-x86.jsonl"
if "$HOSTPY" -c 'import cv2, numpy, click' 2>/dev/null; then
  step "edgeface demo (native x86, the same wheel)"
  rm -rf "$X86"
  "$HOSTPY" -m venv "$X86"
  PURELIB="$("$X86/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$HOSTPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$PURELIB/_host_deps.pth"
  # --ignore-installed: the host's own site (on the path through the .pth) may hold an edgeface of the same version
  "$X86/bin/python" -m pip install -q --no-deps --no-index --ignore-installed "$H/dist/$WHEEL_NAME"
  (cd "$OUT" && env -u EDGEFACE_MODELS_DIR -u PYTHONPATH TQDM_DISABLE=1 "$X86/bin/edgeface" demo --broker 127.0.0.1:1 \
     > "$OUT/demo-x86.jsonl" 2> "$OUT/demo-x86.err") || { tail -20 "$OUT/demo-x86.err"; echo "demo failed on x86" >&2; exit 1; }
else
  echo "   $HOSTPY has no edgeface dependencies (make .venv first): no x86 comparison" >&2
fi

# ------------------------------------------------------------------------------------------ the service, as its unit runs it
# What a Pi owner's first `systemctl start edgeface` does, as far as the emulation allows (no systemd in the root):
# the unit's User=, WorkingDirectory=, StateDirectory= and ExecStart= read from systemd/edgeface.service, on the
# installed /etc/edgeface/config.yaml with only the camera (the enrolled photos as a looping folder camera) and the
# relay (mock pins) changed, for a few seconds; then its ExecStopPost= (door release). ProtectSystem=strict with
# ReadWritePaths= is reproduced as a check: nothing may be written outside those paths.
UNIT="$REPO/systemd/edgeface.service"
unit_key() { sed -n "s/^$1=//p" "$UNIT" | head -1; }
U_USER="$(unit_key User)"; U_DIR="$(unit_key WorkingDirectory)"; U_RW="$(unit_key ReadWritePaths)"
U_START="$(unit_key ExecStart)"; U_STOP="$(unit_key ExecStopPost)"; U_STATE="/var/lib/$(unit_key StateDirectory)"
step "edgeface run as the unit runs it: user $U_USER, in $U_DIR (emulated)"
inroot sh -c "cp -p /etc/edgeface/config.yaml /etc/edgeface/config.yaml.check-orig && sed -i \
  -e 's#^  source: picamera\$#  source: $CHK/people/barack_obama#' -e 's#^  loop: false\$#  loop: true#' \
  -e 's#^  pin_factory: null\$#  pin_factory: mock#' /etc/edgeface/config.yaml"
touch "$ROOT/$CHK/run-marker"
sleep 1
T_RUN=$(date +%s)
RUN_RC=0
inroot runuser -u "$U_USER" -- env STATE_DIRECTORY="$U_STATE" TQDM_DISABLE=1 sh -c "cd '$U_DIR' && exec $U_START --max-frames 12" \
  > "$OUT/run-arm64.log" 2>&1 || RUN_RC=$?
RELEASE_RC=0
inroot runuser -u "$U_USER" -- env STATE_DIRECTORY="$U_STATE" sh -c "cd '$U_DIR' && exec $U_STOP" \
  >> "$OUT/run-arm64.log" 2>&1 || RELEASE_RC=$?
T_RUN=$(( $(date +%s) - T_RUN ))
inroot mv /etc/edgeface/config.yaml.check-orig /etc/edgeface/config.yaml
grep -E "granted|unknown|error|ERROR|released|stopped" "$OUT/run-arm64.log" | sed 's/^/   /' | tail -8
WRITTEN="$(cd "$ROOT" && find . -xdev -newer "./$CHK/run-marker" -type f \
  -not -path "./${U_RW#/}/*" -not -path "./proc/*" -not -path "./sys/*" -not -path "./dev/*" -not -path "./tmp/*" \
  -not -path "./var/tmp/*" -not -path "./run/*" -not -path ".$CHK/*" 2>/dev/null | head -20)"
if [[ $RUN_RC -ne 0 ]]; then tail -20 "$OUT/run-arm64.log"; echo "edgeface run failed as the unit runs it (exit $RUN_RC)" >&2; exit 1; fi
if [[ $RELEASE_RC -ne 0 ]]; then tail -5 "$OUT/run-arm64.log"; echo "the unit's ExecStopPost (door release) failed (exit $RELEASE_RC)" >&2; exit 1; fi
grep -q "granted barack_obama" "$OUT/run-arm64.log" || { tail -20 "$OUT/run-arm64.log"; echo "edgeface run did not grant the enrolled person" >&2; exit 1; }
if [[ -n "$WRITTEN" ]]; then echo "$WRITTEN" | sed 's/^/   written outside ReadWritePaths: /' >&2; echo "edgeface run wrote outside $U_RW" >&2; exit 1; fi
echo "   edgeface run: granted the enrolled person, door release exit 0, nothing written outside $U_RW (${T_RUN} s)"

# ------------------------------------------------------------------------------------------ fast tests, emulated
SUBSET="${EDGEFACE_ARM64_TESTS:-tests/test_models.py tests/test_detect.py tests/test_align.py tests/test_decide.py tests/test_door.py tests/test_install.py tests/test_cli_errors.py}"
# A clone without the edgeface/ sources (so the tests import the installed wheel), with the files tests read.
cp -r "$REPO/tests" "$REPO/models" "$REPO/systemd" "$REPO/tools" "$REPO/pyproject.toml" "$REPO/README.md" \
  "$REPO/config.yaml" "$H/tests-root/"
find "$H/tests-root" -name __pycache__ -prune -exec rm -rf {} +
chmod -R a+rX "$H"
setup inroot /opt/edgeface/venv/bin/python -m pip install -q --no-index --find-links "$CHK/wheelhouse" \
  -c /opt/edgeface/constraints.txt pytest hypothesis
step "pytest $SUBSET (emulated)"
T_TESTS=$(date +%s)
TESTS_RC=0
inroot sh -c "cd $CHK/tests-root && TQDM_DISABLE=1 /opt/edgeface/venv/bin/python -m pytest -q -p no:cacheprovider \
  -m 'not slow and not convert' $SUBSET" > "$OUT/pytest-arm64.log" 2>&1 || TESTS_RC=$?
T_TESTS=$(( $(date +%s) - T_TESTS ))
tail -15 "$OUT/pytest-arm64.log"

# ------------------------------------------------------------------------------------------ comparison
step "demo events, arm64 vs x86"
SAME=0
"$HOSTPY" - "$OUT/demo-arm64.jsonl" "$OUT/demo-x86.jsonl" <<'PY' || SAME=$?
import json, os, sys

def load(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else None

def pairs(events):
    return [(e["result"], e["person_name"]) for e in events]

def line(events):
    p = pairs(events)
    return (f"{len(p)} events, granted {sorted({n for r, n in p if r == 'granted'})}, "
            f"unknown {sum(r == 'unknown' for r, _ in p)}: {' '.join(n or r for r, n in p)}")

arm, x86 = load(sys.argv[1]), load(sys.argv[2])
print("   arm64:", line(arm))
if x86 is None:
    print("   x86:   not run")
    sys.exit(0)
print("   x86:  ", line(x86))
if pairs(arm) != pairs(x86):
    sys.exit(1)
worst = max((abs(a["distance"] - b["distance"]) for a, b in zip(arm, x86)), default=0.0)
print(f"   the same {len(arm)} decisions in the same order; largest distance difference {worst:.4f}")
PY
echo "== durations: total $(( $(date +%s) - T0 )) s; install-pi.sh ${T_INSTALL} s, demo ${T_DEMO} s," \
     "tests ${T_TESTS} s (emulated)"
if [[ $TESTS_RC -ne 0 ]]; then echo "emulated tests failed (exit $TESTS_RC; log: $OUT/pytest-arm64.log)" >&2; exit 1; fi
if [[ $SAME -ne 0 ]]; then echo "the arm64 demo decided differently from x86" >&2; exit 1; fi
echo "arm64 check passed"
