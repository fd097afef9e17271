#!/usr/bin/env bash
# Stop-25 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-25 session"); one part per call:
#   bash scripts/h200_stop25.sh tests     GPU tests of stop 24's CPU-only work: sparse prefill over FP8 pages (unit on
#                                         CUDA = the flash path, engine vs the reference), FP8 tiers + windows with
#                                         the in-queue moves, the bench's decode-metadata capture (~5 min)
#   bash scripts/h200_stop25.sh prefill   sparse prefill at 32k / 128k: bf16 pages, FP8 pages (new), the dense FP8
#                                         path, same run (~3 min)
#   bash scripts/h200_stop25.sh c1m       section c at 1M with the in-queue moves (the default) (~4 min)
#   bash scripts/h200_stop25.sh queue     128k, 96 new tokens: in-queue moves every 16 / 64 against no moves
#                                         (TIERSERVE_MOVES_IN_QUEUE=0, every 1024), same call (~6 min)
#   bash scripts/h200_stop25.sh pcie      the FP8 sparse decode over CPU RAM against the fixed PCIe baselines (the
#                                         decode's own bytes) (~2 min)
#   bash scripts/h200_stop25.sh b         section b with the sparse FP8 fill (prefill_s of the FP8 rows) (~4 min)
#   bash scripts/h200_stop25.sh fixes     the engine tests that failed in call 1 (fp32 sparse FP8 prefill on CUDA), after
#                                         the fix (~2 min)
#   bash scripts/h200_stop25.sh b64       section b with 64-token pages for every row, dense bf16 included (~5 min)
#   bash scripts/h200_stop25.sh bits      (ran in call 7 at the commit that added TIERSERVE_TOPK_BITS; removed after: slower)
#                                         the top-k threshold search three bits a step against two: GPU tests, then the
#                                         selection kernels at 128k in 16- / 64-token pages (~3 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
tests)
    timeout 120 python -m pytest -q -p no:cacheprovider -p no:warnings tests/unit/test_sparse_fp8_prefill.py \
        tests/unit/test_fp8_flash_prefill.py tests/unit/test_spill_snapshot.py 2>&1 | tail -2
    timeout 240 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_engine.py \
        tests/kernels/test_triton_decode_fp8.py tests/kernels/test_triton_fp8_tiers.py \
        -k "sparse or tiered or spill or multi" 2>&1 | tail -2 ;;
prefill)
    timeout 280 python scripts/bench_fp8_prefill.py --cases "" --sparse-cases 32768x8192,131072x8192 \
        --output "$OUT/sparse-fp8-prefill-h200.json" 2>&1 | quiet | tail -8 ;;
c1m)
    bench 280 --sections c --tier-contexts 1048576 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c1m-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
queue)
    for m in "1 16" "1 64" "0 1024"; do
        set -- $m
        TIERSERVE_MOVES_IN_QUEUE=$1 TIERSERVE_REBALANCE_EVERY=$2 bench 180 --sections c --tier-contexts 131072 \
            --long-new-tokens 96 --budgets c=170 --max-wall 170 \
            --output "$OUT/c128k-moves$1-every$2-h200.json" | grep -E "tok_s\"|wall_s"
    done
    rm -f "$OUT"/*.partial.jsonl "$OUT"/*.png ;;
pcie)
    timeout 280 python scripts/sweep_fp8_sparse_decode.py --quick --cases host,host-spread --spread-gb 64 \
        --output "$OUT/pcie-rows-h200.json" 2>&1 | quiet | tail -8 ;;
b)
    bench 280 --sections b --budgets b=270 --max-wall 270 --output "$OUT/sparse-fp8-b-h200.json" \
        | grep -E "tok_s\"|attention_ms_per_step\"|prefill_s" ;;
fixes)
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/unit/test_sparse_fp8_prefill.py \
        "tests/kernels/test_triton_engine.py::test_sparse_fp8_prefill_chunks_are_sparse_on_cuda" \
        "tests/kernels/test_triton_decode_fp8.py::test_engine_triton_fp8_with_sparse_pages_matches_reference" \
        "tests/kernels/test_triton_fp8_tiers.py::test_sparse_fp8_prefill_over_spilled_pages" --tb=short -rf 2>&1 \
        | grep -v "^\.\+ *\[" | tail -25 ;;
b64)
    bench 330 --sections b --page-size 64 --budgets b=320 --max-wall 320 --output "$OUT/sparse-fp8-b-page64-h200.json" \
        | grep -E "tok_s\"|attention_ms_per_step\"|prefill_s" ;;
bits)
    timeout 100 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_select.py \
        tests/kernels/test_triton_select_two_level.py 2>&1 | tail -2
    for pg in 16 64; do
        PYTHONPATH=.:scripts timeout 110 python scripts/bench_sparse_select.py --batch 1 --page $pg \
            --table-pages $((131328 / pg)) --output "$OUT/sparse-select-bits-page$pg-h200.json" 2>&1 | quiet \
            | grep -E "fused|topk two-level|topk\+compact|check"
    done ;;
*) echo "usage: $0 tests|prefill|c1m|queue|pcie|b|fixes|b64|bits"; exit 2 ;;
esac
