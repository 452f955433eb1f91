#!/usr/bin/env bash
# Set up with the development extras, lint, and run the default test suite (CPU, < 15 min).
#   bash scripts/test.sh [pytest args]      e.g. -m slow for the longer checks
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,app
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# two workers, each module on one worker (its module-scoped trainings are shared by its tests): the bundle
# tests are mostly single-threaded subprocess start-up and config parsing, so two run in about the time of one
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
