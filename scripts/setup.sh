#!/usr/bin/env bash
# Set up the project's virtual environment in .venv (idempotent).
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh dev      plus the development tools (pytest, ruff, fire, jsonschema)
# torch is installed first and pinned, so that pip never resolves another (multi-GB CUDA) build
# for the `torch` requirement of MONAI; on a GPU machine install the CUDA build of the same
# version first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pipq() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
pipq --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || pipq "$TORCH_SPEC"
if [ -n "$extras" ]; then
  pipq -e ".[$extras]"
else
  pipq -e .
fi
