#!/usr/bin/env bash
# The main job: set up, build the embedded demo cohort, run every bundle that exists on it.
#   bash scripts/demo.sh [--out DIR] [--subjects N] [--seed S] ...   (options: scripts/run_demo.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/run_demo.py "$@"
