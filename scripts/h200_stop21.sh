#!/usr/bin/env bash
# Stop-21 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-21 session"); one part per call:
#   bash scripts/h200_stop21.sh tests    GPU tests of stop 20's CPU-only work: fused split-K reduce, PDL, FP8 windows (~6 min)
#   bash scripts/h200_stop21.sh gemv     row GEMV defaults: two-kernel vs fused split-K reduce vs + prefetch, bit-compared (~1 min)
#   bash scripts/h200_stop21.sh a        section a (FP8 weights + FP8 KV at 2k) [PDL=1: TIERSERVE_PDL=1]
#                                        [PREFETCH=1: TIERSERVE_FP8_GEMV_PREFETCH=1]
#                                        [FUSED=1: TIERSERVE_FP8_GEMV_FUSED=1] (~3 min)
#   bash scripts/h200_stop21.sh loop     whole 2k decode loops under torch.profiler, bf16 vs FP8 w + KV (+ FP8 LM head) (~1 min)
#   bash scripts/h200_stop21.sh b        section b (sparse + FP8 at 128k) (~5 min)
#   bash scripts/h200_stop21.sh c        section c at 128k and 1M (tiered) (~7 min)
#   bash scripts/h200_stop21.sh p1m      decode profile of the tiered 1M step (sparse + FP8 KV) (~4 min)
#   bash scripts/h200_stop21.sh tlb      FP8 host reads spread over 64 GiB of pinned RAM, engine vs layer-major (~3 min)
#   bash scripts/h200_stop21.sh c1m      section c at 1M only (~4 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
tests)
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_fp8_gemv.py \
        -k row_gemv tests/kernels/test_pdl.py tests/kernels/test_fused_ops.py tests/kernels/test_triton_decode.py \
        2>&1 | tail -2
    timeout 250 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_fp8_compact.py \
        tests/kernels/test_triton_engine.py -k "fp8 or compact or multi" tests/unit/test_fp8_windows.py 2>&1 | tail -2
    # every engine test again with programmatic dependent launch on (decode chain, sparse selection, graphs)
    TIERSERVE_PDL=1 timeout 180 python -m pytest -q -p no:cacheprovider -p no:warnings -x \
        tests/kernels/test_triton_engine.py -k "sparse or fp8 or graphs or fused" tests/kernels/test_pdl.py \
        2>&1 | tail -2 ;;
gemv)
    timeout 120 python scripts/bench_fp8_gemv_rows.py --output "$OUT/fp8-gemv-rows-fused-h200.json" 2>&1 \
        | quiet | tail -6 ;;
a)
    name=sparse-fp8-a-h200
    if [ -n "${PDL:-}" ]; then export TIERSERVE_PDL=1; name=$name-pdl; fi
    if [ -n "${FUSED:-}" ]; then export TIERSERVE_FP8_GEMV_FUSED=1; name=$name-fused; fi
    if [ -n "${PREFETCH:-}" ]; then export TIERSERVE_FP8_GEMV_PREFETCH=1; name=$name-prefetch; fi
    bench 200 --sections a --budgets a=180 --max-wall 190 --output "$OUT/$name.json" | tail -14
    rm -f "$OUT"/*.partial.jsonl ;;
loop)
    SETTINGS=bf16,fp8-both,fp8-all timeout 240 python scripts/profile_engine_loop.py 2>&1 | quiet | grep -v tokenizer \
        | tail -24 ;;
b|c1m|tlb|p1m)      # as in stop 19's plan (tlb / p1m: where the 1M step's ~23 ms of attention go)
    [ "$1" != b ] && exec bash scripts/h200_stop19.sh "$1"
    bench 300 --sections b --budgets b=280 --max-wall 290 --output "$OUT/sparse-fp8-b-h200.json" | tail -25
    rm -f "$OUT"/*.partial.jsonl ;;
c)
    bench 420 --sections c --budgets c=400 --max-wall 410 --output "$OUT/sparse-fp8-c-h200.json" \
        | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
*) echo "usage: $0 tests|gemv|a|loop|b|c|c1m|tlb|p1m"; exit 2 ;;
esac
