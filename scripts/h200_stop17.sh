#!/usr/bin/env bash
# Stop-17 H200 calls (benchmarks/RUNBOOK.md "Start of the stop-17 session"); one part per call:
#   bash scripts/h200_stop17.sh tests     GPU tests of the code built without a GPU since stop 15 (<= 5 min)
#   bash scripts/h200_stop17.sh v4cpu     DeepSeek-V4 --cpu-experts row and its all-device baseline at 4k (~3 min)
#   bash scripts/h200_stop17.sh micro     sparse top-k search vs radix; FP8 GEMV dot modes (~2 min)
#   bash scripts/h200_stop17.sh prefill   128k cold prefill with the flash kernel, then TIERSERVE_PREFILL_ATTN=auto (~4 min)
#   bash scripts/h200_stop17.sh profiles  decode profiles: FP8 KV at 2k; sparse+FP8 and dense at 128k (~6 min)
#   bash scripts/h200_stop17.sh tprofiles decode profiles with 10% of a 128k context on the GPU, the rest in CPU RAM:
#                                         sparse, sparse+FP8 KV (the spill graphs' kernels; ~4 min)
# Everything lands in $OUT. Test results stream one line per test (-v), so a call cut by its time limit still
# says which tests failed and why (--tb=line).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v -i "warn\|it/s\]"; }
case "${1:-}" in
tests)
    # first what failed or was not reached in stop 16's call, then the new GPU tests
    timeout ${TESTS_TIMEOUT:-290} python -m pytest -v -p no:cacheprovider -p no:warnings --tb=line \
        -o faulthandler_timeout=90 -rf --durations=8 \
        tests/kernels/test_triton_fp8_tiers.py "tests/kernels/test_triton_select.py::test_fused_selection_reads_fp8_compact_summaries" \
        tests/models/test_deepseek_v4_cpu_experts.py \
        tests/kernels/test_triton_engine.py::test_decode_over_spilled_pages_in_cuda_graphs_matches_eager \
        tests/kernels/test_triton_engine.py::test_sparse_decode_in_cuda_graphs_matches_eager \
        tests/models/test_deepseek_v4_moe_decode.py tests/models/test_deepseek_v4_mhc_triton.py \
        tests/models/test_deepseek_v4_static_decode.py tests/models/test_deepseek_v4_static_fused.py \
        tests/unit/test_sparse_prefill.py tests/unit/test_kv_tiers_overlap.py ${EXTRA_TESTS:-} \
        > "$OUT/kernels-stop17.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$OUT/kernels-stop17.txt" | tail -30 ;;
v4cpu)
    timeout ${V4_TIMEOUT:-400} python - <<'PY' 2>&1 | quiet | tail -20
import json, os, time
from tierserve.bench.deepseek_v4 import bench_deepseek_v4
from tierserve.bench.deepseek_v4_plot import plot_deepseek_v4
from tierserve.bench.results import write_result
from pathlib import Path
t = time.time()
out = Path(os.environ["OUT"]) / "deepseek-v4-cpu-experts-h200.json"
r = bench_deepseek_v4("deepseek-v4-flash", [4096], layers=4, new_tokens=16, engines=("tierserve",),
                      cpu_experts=True, max_wall_s=300, partial_path=str(out) + ".partial.jsonl",
                      log=lambda s: print(f"{time.time() - t:7.1f}s", s, flush=True))
write_result(r, out)
print(json.dumps({k: v for k, v in r["summary"].items() if "cpu" in k or "tok_s" in k}, indent=1))
for row in r["rows"]:
    print({k: row.get(k) for k in ("engine", "context", "tok_s", "ttft_s", "peak_gpu_gib", "build_s",
                                    "weights_on_device_gib", "weights_on_host_gib", "error", "skipped")})
PY
    ;;
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
tprofiles)
    for s in sparse sparse+fp8-kv; do
        SETTING=$s FILL=synthetic GPU_FRAC=0.1 BATCHES=1 CONTEXT=131072 timeout 170 python scripts/profile_decode.py \
            2>&1 | quiet | tail -16
    done ;;
round2)
    # stop 17's fixes on the GPU (pinned spill store, summary fold in the rotary+KV write, register-held wide top-k
    # rows, FP8 GEMV kernels), then the FP8 GEMV kernel sweep and the selection micro-benchmark with a page table
    # wider than the context (as the engine's)
    timeout ${TESTS_TIMEOUT:-300} python -m pytest -v -p no:cacheprovider -p no:warnings --tb=line \
        -o faulthandler_timeout=90 -rf --durations=5 tests/unit/test_pinned.py tests/kernels/test_fp8_gemv.py \
        tests/kernels/test_fused_ops.py tests/kernels/test_triton_select.py tests/kernels/test_triton_fp8_tiers.py \
        "tests/kernels/test_triton_engine.py" ${EXTRA_TESTS:-} > "$OUT/kernels-stop17-round2.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$OUT/kernels-stop17-round2.txt" | tail -20
    GRID=0 timeout 200 python scripts/sweep_fp8_gemv.py 2>&1 | quiet | tail -10
    timeout 100 python scripts/bench_sparse_select.py --batch 1,4 --table-pages 8448 \
        --output "$OUT/sparse-select-wide-h200.json" 2>&1 | quiet | grep -E "pages|fused|topk|check" | head -20 ;;
*) echo "usage: $0 tests|v4cpu|micro|prefill|profiles|tprofiles|round2"; exit 2 ;;
esac
