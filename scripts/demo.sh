#!/usr/bin/env bash
# The main job, offline on any machine: set up, build the demo shards, train a small model with
# MLX, write its artifact, then score that artifact under torch and MLX side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python data/prepare.py --demo
export PRESET=${PRESET:-tiny} RUN_ID=${RUN_ID:-demo}
.venv/bin/python mlx_train.py
.venv/bin/python -m parity_tests "artifacts/${RUN_ID}.int8.zst" --windows 0
