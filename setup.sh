#!/usr/bin/env bash
# One setup command: creates .venv and installs undo with the right torch build.
#   bash setup.sh            (then: source .venv/bin/activate)
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so pip
# never pulls a multi-GB CUDA wheel; with a GPU it installs the default (CUDA) build.
# Elsewhere set UNDO_TORCH_INDEX to a CPU wheel index if plain torch==X is a CUDA build there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${UNDO_TORCH_CPU_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) torch build"
    "$PIP" install -q "torch>=2.4"
  elif [ -n "${UNDO_TORCH_INDEX:-}" ]; then
    "$PIP" install -q "torch==${TORCH_CPU_VERSION}" --index-url "$UNDO_TORCH_INDEX"
  else
    echo "setup: no GPU, installing the CPU build of torch ${TORCH_CPU_VERSION}"
    "$PIP" install -q "torch==${TORCH_CPU_VERSION}"
  fi
fi
"$PIP" install -q -e ".[dev]"
echo "setup: done. Activate with: source .venv/bin/activate"
