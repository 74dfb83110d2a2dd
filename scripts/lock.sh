#!/usr/bin/env bash
# Regenerate the locks in requirements/ from requirements.txt (every package pinned, with sha256 hashes):
#
#     scripts/lock.sh            # all three: linux-x86_64-cpu, linux-x86_64-cuda, macos-arm64
#     scripts/lock.sh --upgrade  # the same, moving every package to its newest release
#
# uv cross-resolves each platform from the package index, so one Linux box writes all three; only the one for
# the machine at hand can be tested there. torch's CPU build is not on PyPI: TORCH_CPU_WHEELS names where to
# find it (a folder of wheels or a flat page of links; default /opt/wheels if it holds one, else PyTorch's
# CPU index). Every lock is resolved for CPython 3.11 (PYTHON_VERSION to change).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
PYVER=${PYTHON_VERSION:-3.11}
TOOL=${LOCK_TOOL_DIR:-.lock-tool}
if [ ! -x "$TOOL/bin/uv" ] || [ "$("$TOOL/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PY" -m venv "$TOOL"
  "$TOOL/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi
if [ -z "${TORCH_CPU_WHEELS:-}" ]; then
  if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then TORCH_CPU_WHEELS=/opt/wheels
  else TORCH_CPU_WHEELS=https://download.pytorch.org/whl/cpu/torch/; fi
fi
compile() {  # compile OUT PLATFORM [uv options]
  local out=$1 platform=$2
  shift 2
  "$TOOL/bin/uv" pip compile requirements.txt --quiet --generate-hashes --python-version "$PYVER" \
    --python-platform "$platform" --custom-compile-command "scripts/lock.sh" -o "$out" "$@" ${UPGRADE:+--upgrade}
  echo "wrote $out ($(grep -c '^[a-z]' "$out") packages)"
}
[ "${1:-}" = "--upgrade" ] && UPGRADE=1
# mlx's Linux wheels are manylinux_2_35; torch's CPU wheel is manylinux_2_28
compile requirements/linux-x86_64-cpu.txt x86_64-manylinux_2_35 -c requirements/torch-cpu.txt \
  --find-links "$TORCH_CPU_WHEELS" --no-emit-find-links
compile requirements/linux-x86_64-cuda.txt x86_64-manylinux_2_35  # PyPI's torch: the CUDA build
MACOSX_DEPLOYMENT_TARGET=14.0 compile requirements/macos-arm64.txt aarch64-apple-darwin  # torch and mlx: macOS 14+
