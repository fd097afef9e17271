#!/usr/bin/env bash
# Stop-16 H200 calls (benchmarks/RUNBOOK.md "Start of the stop-16 session"); one part per call:
#   bash scripts/h200_stop16.sh tests     GPU tests of the code built since stop 15 without a GPU (<= 5 min)
#   bash scripts/h200_stop16.sh micro     sparse top-k search vs radix; FP8 GEMV dot modes (~2 min)
#   bash scripts/h200_stop16.sh prefill   128k cold prefill with the flash kernel, then TIERSERVE_PREFILL_ATTN=auto (~4 min)
#   bash scripts/h200_stop16.sh profiles  decode profiles: FP8 KV at 2k; sparse+FP8 and dense at 128k (~6 min)
# Everything lands in $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v -i "warn\|it/s\]"; }
case "${1:-}" in
tests)
    timeout ${TESTS_TIMEOUT:-290} python -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
        -o faulthandler_timeout=90 -rf --durations=8 \
        tests/kernels/test_flash_prefix.py tests/kernels/test_fp8_gemv.py tests/kernels/test_triton_select.py \
        tests/kernels/test_triton_decode_fp8.py tests/kernels/test_triton_fp8_compact.py tests/kernels/test_triton_fp8_tiers.py \
        tests/models/test_deepseek_v4_moe_decode.py tests/models/test_deepseek_v4_mhc_triton.py \
        tests/models/test_deepseek_v4_static_decode.py tests/models/test_deepseek_v4_static_fused.py \
        tests/unit/test_sparse_prefill.py tests/unit/test_kv_tiers_overlap.py ${EXTRA_TESTS:-} \
        > "$OUT/kernels-stop16.txt" 2>&1
    tail -25 "$OUT/kernels-stop16.txt" ;;
micro)
    timeout 120 python scripts/bench_sparse_select.py --batch 1,4 --output "$OUT/sparse-select-h200.json" 2>&1 | quiet | tail -30
    GRID=0 timeout 150 python scripts/sweep_fp8_gemv.py 2>&1 | quiet | tail -10 ;;
prefill)
    TIERSERVE_PREFILL_ATTN=flash NAME=prefill-profile-flash-h200.json timeout 200 python scripts/profile_prefill.py \
        2>&1 | quiet | head -8
    TIERSERVE_PREFILL_ATTN=auto timeout 200 python scripts/profile_prefill.py 2>&1 | quiet | head -8 ;;
profiles)
    SETTING=fp8-kv BATCHES=1 CONTEXT=2048 timeout 120 python scripts/profile_decode.py 2>&1 | quiet | tail -16
    for s in sparse+fp8-kv bf16; do
        SETTING=$s FILL=synthetic BATCHES=1 CONTEXT=131072 timeout 170 python scripts/profile_decode.py 2>&1 \
            | quiet | tail -16
    done ;;
*) echo "usage: $0 tests|micro|prefill|profiles"; exit 2 ;;
esac
