#!/usr/bin/env bash
# Is this CUDA box at the 1.0611 record's pace? One script, 1 to 8 GPUs, about 8 minutes; a verdict at the end.
#
#     scripts/gpu_check.sh [OUTDIR]                                   # PRESET=record on every visible GPU
#     PRESET=tiny_record GPU_CHECK_STEPS=1 scripts/gpu_check.sh /tmp/c # on a CPU: checks the script itself
#
# Stages, each time-limited with its own log in OUTDIR (default logs/gpu_check), a failed one does not stop
# the next:
#   kernels  fused training loss and MLP against the reference ops, compiled (CUDA only)
#   train    torchrun over the GPUs: compile both looping states, time GPU_CHECK_STEPS steps in each, profile
#            one step, export (Hessians, GPTQ, LQER, coder): ms/step, tokens/s/GPU, peak memory, MFU, export s
#   ttt      bench/ttt_gpu.py on one GPU: phased TTT's scoring and SGD rates on the first GPU_CHECK_TTT_DOCS
#            validation documents (synthetic ones when the preset's split is absent), projected to the
#            50,000-document split on 8 GPUs
#   verdict  every figure against the record's (bench/gpu_check.py verdict)
# The preset's train shards are used when present; otherwise synthetic documents of the split's mean length.
# Knobs: GPU_CHECK_STAGES (default "kernels train ttt"), GPU_CHECK_WARMUP / GPU_CHECK_STEPS (steps per looping
# state), GPU_CHECK_LOOP_STATES=looped (one compile), GPU_CHECK_EXPORT=0, GPU_CHECK_TTT_DOCS / _SECONDS,
# GPU_CHECK_*_SECONDS (stage limits), GPU_CHECK_WORK (scratch: shards, artifact), GPU_PEAK_TFLOPS (MFU's peak).
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-logs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PRESET=${PRESET:-record} PYTHONUNBUFFERED=1

source scripts/stage.sh
stage_report() {  # the figures' lines; the log's tail when the stage failed
    grep -E "^(gpu_check|ttt_gpu_|export |WARNING|error|Traceback)" "$OUTDIR/$1.log" | tail -n 20
    [ "$2" -eq 0 ] || tail -n "${GPU_CHECK_TAIL:-15}" "$OUTDIR/$1.log"
}

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
echo "gpus:$NGPU preset:$PRESET $("$PY" -c 'import torch; print("torch:" + torch.__version__)')"
[ "$NGPU" -gt 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
WORK=${GPU_CHECK_WORK:-$OUTDIR/work}  # synthetic shards and the exported artifact
export GPU_CHECK_SYNTHETIC="$WORK/synthetic_data"
"$PY" bench/gpu_check.py data "$GPU_CHECK_SYNTHETIC" --tokens "${GPU_CHECK_DATA_TOKENS:-8000000}" >/dev/null

STAGES=" ${GPU_CHECK_STAGES:-kernels train ttt} "  # a subset reruns part of the check
want() { [[ $STAGES == *" $1 "* ]]; }
[ "$NGPU" -gt 0 ] && want kernels && stage kernels "${GPU_CHECK_KERNELS_SECONDS:-90}" "$PY" bench/gpu_check.py kernels
TRAIN=(bench/gpu_check.py train --work "$WORK" --warmup "${GPU_CHECK_WARMUP:-2}" --steps "${GPU_CHECK_STEPS:-4}"
       --states "${GPU_CHECK_LOOP_STATES:-both}" --export "${GPU_CHECK_EXPORT:-1}")
if ! want train; then
    :
elif [ "$NGPU" -gt 1 ]; then
    stage train "${GPU_CHECK_TRAIN_SECONDS:-280}" torchrun --standalone --nproc_per_node="$NGPU" "${TRAIN[@]}"
else
    stage train "${GPU_CHECK_TRAIN_SECONDS:-280}" "$PY" "${TRAIN[@]}"
fi
TTT=(--random-record --max-seconds "${GPU_CHECK_TTT_SECONDS:-45}" --sgd-steps "${GPU_CHECK_SGD_STEPS:-2}")
if "$PY" -c "import sys; from shared.config import Hyperparameters as H; from shared.data import val_pattern as v; \
import glob, os; sys.exit(0 if glob.glob(v(H.from_env(os.environ).data_path)) else 1)" 2>/dev/null; then
    TTT+=(--max-docs "${GPU_CHECK_TTT_DOCS:-2000}")
else
    TTT+=(--synthetic-docs "${GPU_CHECK_TTT_DOCS:-2000}")
fi
[ "$NGPU" -gt 0 ] || TTT+=(--device cpu)
want ttt && stage ttt "${GPU_CHECK_TTT_STAGE_SECONDS:-120}" env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" \
    "$PY" bench/ttt_gpu.py "${TTT[@]}"
echo "=== verdict"
"$PY" bench/gpu_check.py verdict "$OUTDIR"
