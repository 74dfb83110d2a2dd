#!/usr/bin/env bash
# The main job on the embedded demo corpus, offline: set up, build demo shards.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python data/prepare.py --demo
