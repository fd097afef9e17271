#!/usr/bin/env bash
# Stop-24 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-24 session"); one part per call:
#   bash scripts/h200_stop24.sh tests     GPU tests of stop 23's CPU-only work: engine tiered windows (now the
#                                         default), the queue-length knob, pinned buffers in captures, the FP8 GEMV
#                                         and PDL tests after the removal of the slower opt-ins (~4 min)
#   bash scripts/h200_stop24.sh queue     section c at 128k with TIERSERVE_REBALANCE_EVERY 16 (default), 64, 1024:
#                                         fewer drains of the window queue vs placement freshness (~4 min)
#   bash scripts/h200_stop24.sh host      128k tiered windows, FP8 KV + FP8 w, profiled at REBALANCE_EVERY=16 / 64:
#                                         GPU busy vs wall a token (~3 min)
#   bash scripts/h200_stop24.sh ab        sections a and b after the removal (the default path should time the same)
#   bash scripts/h200_stop24.sh c1m       section c at 1M (~4 min)
#   bash scripts/h200_stop24.sh pcie      the FP8 sparse decode over CPU RAM against the PCIe baselines of the same
#                                         rows (copy engine, zero-copy read kernel), rows side by side and spread over
#                                         64 GiB (~2 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
tests)
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_engine.py \
        -k "tiered or spill or multi or fused or sparse" 2>&1 | tail -2
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/unit/test_pinned.py \
        tests/unit/test_tiered_multi_step.py tests/unit/test_kv_tiers.py -k "pinned or capture or windows or queue" \
        2>&1 | tail -2
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_pdl.py \
        tests/kernels/test_fp8_gemv.py 2>&1 | tail -2 ;;
queue)
    for every in 16 64 1024; do
        TIERSERVE_REBALANCE_EVERY=$every bench 150 --sections c --tier-contexts 131072 --budgets c=140 --max-wall 140 \
            --output "$OUT/sparse-fp8-c128k-every$every-h200.json" | grep -E "tok_s\"|wall_s"
    done
    rm -f "$OUT"/*.partial.jsonl "$OUT"/*.png ;;
host)
    for every in 16 64; do
        TIERSERVE_REBALANCE_EVERY=$every TIERSERVE_PDL=0 QUANT=fp8 TIERSERVE_TIERED_MULTI_STEP=1 timeout 150 \
            python scripts/profile_tiered_host.py 2>&1 | quiet | head -30
        for f in "$OUT"/tiered-host-profile-windows-fp8w-h200.json; do mv "$f" "${f%.json}-every$every.json"; done
    done ;;
ab)
    bench 280 --sections a,b --budgets a=90,b=180 --max-wall 280 --output "$OUT/sparse-fp8-ab-h200.json" \
        | grep -E "tok_s\"|attention_ms_per_step\"" ;;
c1m)
    bench 280 --sections c --tier-contexts 1048576 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c1m-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
pcie)
    timeout 280 python scripts/sweep_fp8_sparse_decode.py --quick --cases host,host-spread --spread-gb 64 \
        --output "$OUT/pcie-rows-h200.json" 2>&1 | quiet | tail -8 ;;
moves)
    # page moves inside the window queue (no drain): GPU tests of the zero-copy FP8 rows, then section c at 128k
    # with the moves in the queue (default) against the stop-23 queue ends (TIERSERVE_MOVES_IN_QUEUE=0), same call
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_engine.py \
        -k "tiered or spill or multi" 2>&1 | tail -2
    for mode in 1 0; do
        TIERSERVE_MOVES_IN_QUEUE=$mode bench 150 --sections c --tier-contexts 131072 --budgets c=140 --max-wall 140 \
            --output "$OUT/sparse-fp8-c128k-moves$mode-h200.json" 2>&1 | grep -E "tok_s\"|wall_s|differ|Error"
    done
    rm -f "$OUT"/*.partial.jsonl "$OUT"/*.png ;;
*) echo "usage: $0 tests|queue|host|ab|c1m|pcie|moves"; exit 2 ;;
esac
