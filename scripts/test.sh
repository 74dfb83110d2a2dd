#!/usr/bin/env bash
# The test command: set up the environment, then run every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q tests parity_tests "$@"
