#!/usr/bin/env bash
# Issue 9 on one H200: device vs host placement check at a small size, then `bench engram` (8B backbone,
# Engram at layers 1 and 15, 1B and 10B tables; device, host copy and host zero-copy gathers).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 90 python scripts/debug_engram_placement.py cuda 2>&1 | grep -v -i "warn\|synthetic" | tail -5
timeout ${ENGRAM_TIMEOUT:-240} python -m tierserve.cli bench engram --model llama-3.1-8b --load-format dummy \
    --engram-layers 1,15 --table-params 1e9,1e10 --placements "${PLACEMENTS:-device,cpu-copy,cpu-zero_copy}" \
    --time-budget "${ENGRAM_BUDGET:-200}" --repeats "${REPEATS:-2}" --output "$OUT/engram-h200.json" 2>&1 \
    | grep -v -i "warn\|synthetic" | tail -6
