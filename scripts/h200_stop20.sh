#!/usr/bin/env bash
# Stop-20 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-20 session"); one part per call:
#   bash scripts/h200_stop20.sh gemv     FP8 row GEMV (TIERSERVE_FP8_GEMV=rows) vs fp8_gemm vs bf16 cuBLAS (~4 min)
#   bash scripts/h200_stop20.sh ncu2k    compact-slot FP8 decode micro-benchmark, then the engine's 2k launch under ncu (~3 min)
#   bash scripts/h200_stop20.sh diag     the engine's 2k FP8 decode launches timed as captured / small pool / ... (~2 min)
#   bash scripts/h200_stop20.sh loop     whole decode loops under torch.profiler, bf16 vs fp8-kv (~1 min)
#   bash scripts/h200_stop20.sh a        section a [GEMV=gemm: fp8_gemm for one row instead of the row GEMV] (~4 min)
#   bash scripts/h200_stop20.sh b        section b (~5 min)
#   bash scripts/h200_stop20.sh c1m      section c at 1M tokens after stop 18's host-work fixes (~4 min)
#   bash scripts/h200_stop20.sh tlb      FP8 host reads spread over 64 GiB of pinned RAM, engine vs layer-major (~3 min)
#   bash scripts/h200_stop20.sh p1m      decode profile of the tiered 1M step (sparse + FP8 KV) (~4 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
gemv)
    timeout 100 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_fp8_gemv.py -k row_gemv \
        2>&1 | tail -1
    timeout 300 python scripts/bench_fp8_gemv_rows.py --budget-s 220 --output "$OUT/fp8-gemv-rows-h200.json" 2>&1 \
        | quiet | tail -8 ;;
ncu2k)
    # the engine's FP8 decode kernel at 2k took 22.5 us a layer (stop 19 profile) against ~11 us in the
    # micro-benchmark: first the micro-benchmark with compact-slot storage (the engine's), then the engine's own
    # launch under Nsight Compute: grid (batch, KV heads, splits), block size, registers and counters
    # (+ 1 stage: SASS shows 2 stages sending the codes through shared memory and reading them back a byte at a
    # time, 9.7 against 7.1 instructions a value on the codes-only path; which is faster is not measured)
    timeout 150 python scripts/bench_fp8_kv.py --decode-only --no-before --compact --layers 32 \
        --configs "block_n=64,num_warps=4,num_stages=1,fast=1" --cases 1x2048,1x32768,16x2048 \
        --output "$OUT/fp8-kv-compact-h200.json" 2>&1 | quiet | grep -E "bf16|engine|#"
    SETTING=fp8-kv BATCHES=1 CONTEXT=2048 timeout 200 ncu --clock-control none -k regex:_fp8_decode_split \
        --launch-skip 64 --launch-count 1 --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats --section InstructionStats python scripts/profile_decode.py \
        > "$OUT/ncu-engine-fp8-decode-2k.txt" 2>&1
    grep -E "_fp8_decode_split_kernel|Duration|Grid Size|Block Size|Registers Per|Achieved Occ|Executed Instructions  |DRAM Throughput" \
        "$OUT/ncu-engine-fp8-decode-2k.txt" | head -20 ;;
diag)       # the engine's own FP8 decode launches at 2k, timed as captured and with one thing changed
    timeout 200 python scripts/diag_fp8_engine_decode.py 2>&1 | quiet | tail -8 ;;
loop)       # the whole decode loop (graph replays and the host work between them) under torch.profiler
    SETTINGS=${SETTINGS:-bf16,fp8-kv} timeout 300 python scripts/profile_engine_loop.py 2>&1 | quiet | grep -v tokenizer \
        | tail -24 ;;
a)
    if [ -n "${GEMV:-}" ]; then export TIERSERVE_FP8_GEMV="$GEMV"; fi      # rows (default since stop 20) | gemm
    bench 200 --sections a --budgets a=180 --max-wall 190 --output "$OUT/sparse-fp8-a-h200.json" | tail -14
    rm -f "$OUT"/*.partial.jsonl ;;
b|c1m|tlb|p1m)      # as in stop 19's plan
    exec bash scripts/h200_stop19.sh "$1" ;;
*) echo "usage: $0 gemv|ncu2k|diag|loop|a|b|c1m|tlb|p1m"; exit 2 ;;
esac
