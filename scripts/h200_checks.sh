#!/usr/bin/env bash
# One H200 call (~6-8 min): every GPU test of the kernels and fast paths built without a GPU, then the
# micro-benchmarks that choose their settings. Everything lands in $OUT (kernels.txt + JSON per script).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout ${TESTS_TIMEOUT:-220} python -m pytest -q -p no:cacheprovider -p no:warnings --tb=short -o faulthandler_timeout=90 \
    tests/kernels tests/unit/test_sparse_prefill.py tests/unit/test_kv_tiers_overlap.py \
    tests/models/test_deepseek_v4_slot_engine.py tests/models/test_deepseek_v4_static_fused.py \
    tests/models/test_deepseek_v4_moe_decode.py tests/models/test_deepseek_v4_mhc_triton.py \
    tests/models/test_deepseek_v4_fused_ops.py tests/models/test_deepseek_v4_static_decode.py \
    tests/unit/test_step_timer.py ${EXTRA_TESTS:-} -rf --durations=10 \
    > "$OUT/kernels.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/kernels.txt" | head -20
[ -n "${SKIP_BENCH:-}" ] && exit 0
timeout 60 python scripts/bench_sparse_select.py --batch 1,4 --table-pages 0,8197 \
    --output "$OUT/sparse-select-h200.json" 2>&1 | grep -v -i warn | tail -12
timeout ${FP8KV_TIMEOUT:-120} python scripts/bench_fp8_kv.py --quick --output "$OUT/fp8-kv-h200.json" 2>&1 \
    | grep -v -i warn | tail -14
timeout 150 python scripts/sweep_fp8_gemv.py 2>&1 | grep -v -i warn | tail -10
