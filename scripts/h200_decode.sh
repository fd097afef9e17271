#!/usr/bin/env bash
# The issue-3 measurement on one H200: equality checks, then `tierserve bench decode` vs transformers.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$OUT/gpu.txt"
timeout 200 python -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tail -2 | tee "$OUT/kernels.txt"
timeout 300 python scripts/gpu_smoke.py "${SMOKE_ARGS:-}" 2>&1 | grep -v Warning | tee "$OUT/smoke.txt"
