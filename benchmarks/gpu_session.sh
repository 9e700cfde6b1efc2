#!/bin/bash
# The GPU checks of one lent-device session, in one command (device time is short):
#   bash benchmarks/gpu_session.sh          # writes JSON rows under $OUT (default /tmp/gpu_out)
# Targets (DEVELOPERS.md): MFU >= 40% on the 0.3B shape; distillation >= 0.75x of pretraining's
# tokens/s. Each step has its own timeout so one slow variant cannot eat the lease.
set -u
export PYTHONPATH="$PWD/src" UNDO_NO_PROGRESS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() { local name=$1; shift; echo "== $name: $*"; timeout "$TIME" python3 benchmarks/gpu.py --json "$OUT/$name.json" "$@"; }
TIME=150 bench default --presets gemma2-0.3b llama-1b
