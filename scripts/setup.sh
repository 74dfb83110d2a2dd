#!/usr/bin/env bash
# Create .venv (if missing) and install this platform's lock from requirements/ into it: every package at one
# version, each file checked against its sha256. Idempotent, and a no-op (well under a second) when .venv
# already holds that lock: the lock's hash and the Python version are stamped in .venv/lock.stamp.
#
#     ./scripts/setup.sh                                     # the lock for this machine (below)
#     LOCK=requirements/linux-x86_64-cuda.txt ./scripts/setup.sh   # choose one
#
# Linux x86-64: linux-x86_64-cuda.txt where nvidia-smi sees a GPU, else linux-x86_64-cpu.txt (torch's CPU
# build, from a local wheelhouse in pip's find-links or PyTorch's CPU index). macOS arm64: macos-arm64.txt.
# Anything else: requirements.txt unpinned, with a warning. scripts/lock.sh regenerates the locks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

platform_lock() {
  case "$(uname -s)/$(uname -m)" in
    Darwin/arm64) echo requirements/macos-arm64.txt ;;
    Linux/x86_64)
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        echo requirements/linux-x86_64-cuda.txt
      else
        echo requirements/linux-x86_64-cpu.txt
      fi ;;
  esac
}

torch_cpu_index() {  # PyTorch's CPU index, unless a find-links folder pip already searches holds the wheel
  local want dir
  want=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK")
  for dir in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    if compgen -G "${dir#file://}/torch-${want}-*.whl" >/dev/null; then return; fi
  done
  echo "--extra-index-url=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
}

LOCK=${LOCK:-$(platform_lock)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ -z "$LOCK" ]; then
  echo "setup.sh: no lock for $(uname -s) $(uname -m); installing requirements.txt unpinned" >&2
  exec .venv/bin/python -m pip install --quiet -r requirements.txt
fi
PYVER=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYVER" != 3.11 ]; then
  echo "setup.sh: the locks are resolved for CPython 3.11; .venv has $PYVER (PYTHON=python3.11 to choose)" >&2
fi
STAMP="$LOCK $(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$LOCK") python $PYVER"
if [ -f .venv/lock.stamp ] && [ "$(cat .venv/lock.stamp)" = "$STAMP" ]; then
  exit 0
fi
extra=""
if [[ "$LOCK" == *cpu.txt ]]; then
  extra=$(torch_cpu_index)
fi
# (the filter drops pip's notes on find-links/index folders configured on this machine that lack a package)
.venv/bin/python -m pip install --quiet --require-hashes --no-deps $extra -r "$LOCK" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$STAMP" >.venv/lock.stamp
