# Sourced by scripts/cuda_smoke.sh and scripts/gpu_check.sh: one time-limited stage with its own log.
#
#     stage NAME SECONDS CMD...
#
# runs CMD under `timeout SECONDS` into $OUTDIR/NAME.log, prints its exit status and seconds, then calls
# `stage_report NAME RC`, which the sourcing script defines (what of the log it shows). A failed stage does
# not stop the script: the next stage still runs.
stage() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    echo "=== $name rc=$rc $(($(date +%s) - start))s"
    stage_report "$name" "$rc"
}
