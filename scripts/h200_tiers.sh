#!/usr/bin/env bash
# Issue 5 on one H200 in one call: GPU kernel tests (prefill/decode kernels reading pinned host pages),
# then `bench tiers` at 32k and 128k against transformers' default and offloaded caches.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
df -h /tmp | tail -1; free -g | head -2
timeout 120 python -m pytest ${KTESTS:-tests/kernels} -q -p no:cacheprovider -p no:warnings --tb=short > "$OUT/kernels.txt" 2>&1
grep -E "rows [0-9]|Greatest|passed|failed" "$OUT/kernels.txt" | head -12
timeout ${TIERS_TIMEOUT:-400} python -m tierserve.cli bench tiers --model llama-3.1-8b --load-format dummy \
    --context ${CONTEXTS:-32768,131072} --gpu-frac ${GPU_FRACS:-1,0.6,0.5,0.25,0.1} --cpu-kv-gb 40 \
    --output "$OUT/tiers-h200.json" 2>&1 \
    | grep -v -i "warn\|it/s\]" | tee "$OUT/tiers.log" | tail -30
grep -i "zero-copy\|is off\|fall" "$OUT/tiers.log" | head -3
