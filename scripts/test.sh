#!/usr/bin/env bash
# The test command: set up the environment (scripts/setup.sh), then run the tests on up to 4 workers.
#
#     ./scripts/test.sh              # what CI runs: every test not marked slow
#     ./scripts/test.sh --all        # every test, the slow end-to-end runs too
#     ./scripts/test.sh --all tests/test_trainers.py -x -n 0   # further arguments go to pytest (-n 0: one process)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
fi
# One BLAS/OpenMP thread per worker unless set: two workers on two cores at two threads each spent 1,111 CPU-s
# on the whole suite against 751 at one (both pass; the results may not depend on the thread count).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# a test module stays on one worker (--dist loadscope), so its module-scoped trained models are built once
# (no paths given: pytest.ini's testpaths, tests/ and parity_tests/)
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadscope ${select[@]+"${select[@]}"} "$@"
