#!/usr/bin/env bash
# Stop-23 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-23 session"); one part per call:
#   bash scripts/h200_stop23.sh tests     GPU tests of stop 22's CPU-only work: two-level top-k (tight capacity, group
#                                         size by lanes), fused selection, engine sparse / tiered windows (~4 min)
#   bash scripts/h200_stop23.sh select    top-k at the engine's table widths (128k / 1M + new tokens): stop 22's
#                                         two-level sizing vs stop 21's, each with the score kernel (~2 min)
#   bash scripts/h200_stop23.sh c128k     section c at 128k, step by step [WIN=1: multi-step windows over the tiers,
#                                         the bench no longer times a window queued by the warm-up] (~2 min)
#   bash scripts/h200_stop23.sh host      128k tiered step, FP8 KV + FP8 weights: wall vs GPU busy a token, kernels,
#                                         host ops, sync stacks, step by step then with windows (~4 min)
#   bash scripts/h200_stop23.sh c1m       section c at 1M [WIN=1] (~4 min)
#   bash scripts/h200_stop23.sh b         section b at 128k (~3 min)
#   bash scripts/h200_stop23.sh a         section a at 2k (~2 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
sfx=""
if [ -n "${PDL:-}" ]; then export TIERSERVE_PDL=$PDL; sfx=-pdl$PDL; fi
if [ -n "${WIN:-}" ]; then export TIERSERVE_TIERED_MULTI_STEP=$WIN; sfx=$sfx-win$WIN; fi
case "${1:-}" in
tests)
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_select_two_level.py \
        tests/kernels/test_triton_select.py tests/unit/test_bench_decode_window_accounting.py 2>&1 | tail -2
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_engine.py \
        -k "sparse or tiered or fused or folds" 2>&1 | tail -2
    timeout 90 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_decode_fp8.py \
        -k "flash or falls_back or small_prefill" 2>&1 | tail -2 ;;
select)
    for pages in 8208 65552; do
        timeout 140 python scripts/bench_sparse_select.py --batch 1 --ctx $((pages * 16 - 256)) --table-pages $pages \
            --layers 2 --output "$OUT/sparse-select-table$pages-h200.json" 2>&1 | quiet | grep -E "two-level|score kernel|check"
    done ;;
c128k)
    bench 280 --sections c --tier-contexts 131072 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c128k$sfx-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
c1m)
    bench 280 --sections c --tier-contexts 1048576 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c1m$sfx-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
host)
    for w in 0 1; do
        TIERSERVE_PDL=0 STACK=1 QUANT=fp8 TIERSERVE_TIERED_MULTI_STEP=$w timeout 200 python scripts/profile_tiered_host.py \
            2>&1 | quiet | head -45
    done ;;
b)
    bench 280 --sections b --budgets b=270 --max-wall 270 --output "$OUT/sparse-fp8-b$sfx-h200.json" \
        | grep -E "tok_s\"|attention_ms_per_step\"|best|wall_s" ;;
a)
    bench 200 --sections a --budgets a=180 --max-wall 190 --output "$OUT/sparse-fp8-a$sfx-h200.json" | grep -E "tok_s\""
    rm -f "$OUT"/*.partial.jsonl ;;
*) echo "usage: $0 tests|select|c128k|host|c1m|b|a"; exit 2 ;;
esac
