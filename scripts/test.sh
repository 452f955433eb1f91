#!/usr/bin/env bash
# Set up with the development extras, lint, and run the default test suite (CPU, < 15 min).
#   bash scripts/test.sh [pytest args]      e.g. -m slow for the longer checks
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,app
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
