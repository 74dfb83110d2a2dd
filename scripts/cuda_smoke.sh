#!/usr/bin/env bash
# One GPU, a few minutes: does the record path run on this CUDA box before you pay for eight?
#
#     scripts/cuda_smoke.sh [OUTDIR]                # PRESET=record on the dataset the preset names
#     DATA_PATH=... TOKENIZER_PATH=... scripts/cuda_smoke.sh /tmp/smoke
#
# Trains PRESET (default record) for SMOKE_ITERATIONS steps with the compiled model, bf16 and the batched
# Muon, then exports the way a real run does (GPTQ Hessians on training batches, the quantizer, the coder)
# and scores the artifact with TTT when the preset enables it. Every knob can be overridden from the
# environment; the smoke only shortens the run (iterations, warmup, calibration batches). Each stage has a
# time limit, writes OUTDIR/<stage>.log and prints its tail and exit status; a failed stage does not stop
# the next. A tiny validation split (e.g. data/prepare.py --text ... --val-docs 600) keeps the
# evaluation short.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-logs/cuda_smoke}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"

source scripts/stage.sh
stage_report() { tail -n "${SMOKE_TAIL:-40}" "$OUTDIR/$1.log"; }

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'"

export PRESET=${PRESET:-record} RUN_ID=${RUN_ID:-cuda_smoke}
export ITERATIONS=${SMOKE_ITERATIONS:-20} WARMUP_STEPS=${WARMUP_STEPS:-2} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-1}
export VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0} GPTQ_CALIBRATION_BATCHES=${GPTQ_CALIBRATION_BATCHES:-4}
stage train "${SMOKE_TRAIN_SECONDS:-330}" "$PY" cuda_train.py
grep -E "^(step|warmup_step|export|looping|val_|no_ttt|ttt|final|peak|artifact|warning)" \
    "$OUTDIR/train.log" >"$OUTDIR/summary.txt" 2>/dev/null
echo "=== summary: $OUTDIR/summary.txt"
