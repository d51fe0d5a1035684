#!/usr/bin/env bash
# On a CUDA machine, in under 5 minutes: the overhead benchmark at SD 1.5 scale in fp16 (every
# table of benchmarks/overhead.py, plus the added peak GPU memory per concept count) and a
# guarded generation under torch.cuda.set_sync_debug_mode("error") (any host synchronisation
# inside the guard's hook raises). Needs a Python with a CUDA torch and this checkout installed
# (make's venv on a CUDA host, or PYTHON=...). Writes $OUT (default bench-out/gpu).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-out/gpu}
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0))
PY
timeout 280 "$PY" benchmarks/overhead.py --device cuda --dtype fp16 --threads 4 \
    --steps 10 --rounds 6 --reps 50 --sync-check --out "$OUT"
echo "gpu_check: figures in $OUT/overhead.md"
