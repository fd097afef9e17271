#!/usr/bin/env bash
# Issue-3/6 measurements on one H200 in one call (~7 min): GPU kernel tests, `bench decode` against
# transformers, then the decode-shape kernel timings. Everything lands in $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$OUT/gpu.txt"
[ -z "${SKIP_TESTS:-}" ] && timeout 150 python -m pytest tests/kernels -q -x -p no:cacheprovider -p no:warnings 2>&1 \
    | tail -5 | tee "$OUT/kernels.txt"
timeout ${DECODE_TIMEOUT:-320} python -m tierserve.cli bench decode --model llama-3.1-8b --load-format dummy --batch 1,16,64 \
    --context 2048,32768 --new-tokens 128 --repeats 1 --output "$OUT/decode-h200.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/decode.log" | tail -12
[ -z "${SKIP_KERNELS:-}" ] && timeout 120 python scripts/h200_kernels.py 2>&1 | grep -v -i warn | tail -12
grep -i "zero-copy\|is off\|fall" "$OUT/decode.log" | head -3
