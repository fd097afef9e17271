#!/usr/bin/env bash
# Stop-22 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-22 session"); one part per call:
#   bash scripts/h200_stop22.sh tests     GPU tests of stop 21's CPU-only work: two-level top-k past 65,536 pages, activation quant (~3 min)
#   bash scripts/h200_stop22.sh c1m       section c at 1M (tiered sparse + FP8 KV [+ FP8 weights]) [PDL=0: TIERSERVE_PDL=0] (~4 min)
#   bash scripts/h200_stop22.sh p1m       kernel profile of the tiered 1M step without PDL (was: top-k 16.6 of 28.6 ms) (~3 min)
#   bash scripts/h200_stop22.sh select1m  page selection micro-benchmark at the engine's 1M table width (65,600 pages) (~1 min)
#   bash scripts/h200_stop22.sh loop      decode-only loop profiles: FP8 weights vs FP8 w + KV without PDL, sync stacks (~2 min)
#   bash scripts/h200_stop22.sh c128k     section c at 128k (~4 min)
#   bash scripts/h200_stop22.sh a         section a at 2k [L2=N: TIERSERVE_FP8_GEMV_L2=N, each GEMV row's first N bytes
#                                         asked of L2 before the PDL wait] [FOLD=1: TIERSERVE_FP8_GEMV_FOLD=1, norms and
#                                         residual adds folded into the FP8 row GEMVs] [AHEAD=1: TIERSERVE_L2_AHEAD=1,
#                                         o_proj's weights asked of L2 during attention] (~1 min)
#   bash scripts/h200_stop22.sh gemv      row GEMV variants incl. the L2 prefetch, every byte from HBM (~1 min)
#   bash scripts/h200_stop22.sh abs       section a: default, L2=512, FOLD=1, AHEAD=1, all three, each with its bf16 row (~4 min)
#   bash scripts/h200_stop22.sh fold      the folded-row test on the GPU (graphs recaptured now) and section a with FOLD=1 (~3 min)
#   bash scripts/h200_stop22.sh p128      kernel profiles of the 128k step, sparse + FP8 KV + FP8 weights, on the GPU and tiered 10% (~4 min)
#   bash scripts/h200_stop22.sh prefill   FP8 KV prefill: flash over readings vs the Triton kernel vs bf16, 32k / 128k (~2 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
sfx=""
if [ -n "${PDL:-}" ]; then export TIERSERVE_PDL=$PDL; sfx=-pdl$PDL; fi
if [ -n "${L2:-}" ]; then export TIERSERVE_FP8_GEMV_L2=$L2; sfx=$sfx-l2-$L2; fi
if [ -n "${FOLD:-}" ]; then export TIERSERVE_FP8_GEMV_FOLD=1; sfx=$sfx-fold; fi
if [ -n "${AHEAD:-}" ]; then export TIERSERVE_L2_AHEAD=1; sfx=$sfx-ahead; fi
case "${1:-}" in
tests)
    timeout 220 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_select_two_level.py \
        tests/kernels/test_triton_select.py tests/unit/test_fp8_quant.py tests/kernels/test_fp8_gemv.py \
        tests/unit/test_fp8_flash_prefill.py tests/kernels/test_triton_fp8_kv.py tests/unit/test_fp8_linear.py \
        tests/kernels/test_pdl.py \
        2>&1 | tail -2
    timeout 180 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_engine.py \
        -k "sparse or fp8 or fused or folds" 2>&1 | tail -2
    # the FP8 prefill in the engine (flash readings, its fallback) and DeepSeek V4's fused paths with PDL on
    timeout 90 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_decode_fp8.py \
        -k "flash or falls_back or prefill" 2>&1 | tail -2
    timeout 90 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/models/test_deepseek_v4_fused_ops.py \
        tests/models/test_deepseek_v4_static_fused.py 2>&1 | tail -2 ;;
c1m)
    bench 280 --sections c --tier-contexts 1048576 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c1m$sfx-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
p1m)
    TIERSERVE_PDL=0 SETTING=sparse+fp8-kv FILL=synthetic GPU_FRAC=0.1 BATCHES=1 CONTEXT=1048576 timeout 280 \
        python scripts/profile_decode.py 2>&1 | quiet | tail -16
    (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "nopdl-${f//+/_}"; done; true) ;;
select1m)
    timeout 200 python scripts/bench_sparse_select.py --batch 1 --ctx 1048576 --table-pages 65600 --layers 2 \
        --output "$OUT/sparse-select-1m-table65600-h200.json" 2>&1 | quiet | tail -12 ;;
loop)
    TIERSERVE_PDL=0 STACK=1 SETTINGS=fp8-weights,fp8-both timeout 280 python scripts/profile_engine_loop.py 2>&1 \
        | quiet | grep -v tokenizer | tail -40
    mv "$OUT/engine-loop-profile-h200.json" "$OUT/engine-loop-decode-nopdl-h200.json" ;;
c128k)
    bench 280 --sections c --tier-contexts 131072 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c128k$sfx-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
a)
    bench 200 --sections a --budgets a=180 --max-wall 190 --output "$OUT/sparse-fp8-a$sfx-h200.json" | grep -E "tok_s\""
    rm -f "$OUT"/*.partial.jsonl ;;
abs)
    for v in "X=1" "L2=512" "FOLD=1" "AHEAD=1" "L2=512 FOLD=1 AHEAD=1"; do
        echo "== $v"; env $v bash "$0" a
    done
    rm -f "$OUT"/*.png ;;       # (at most 8 files come back)
gemv)
    timeout 120 python scripts/bench_fp8_gemv_rows.py --output "$OUT/fp8-gemv-rows-l2-h200.json" 2>&1 | quiet | tail -6 ;;
fold)
    timeout 100 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_engine.py \
        -k "folds or gemv" 2>&1 | tail -2
    FOLD=1 bash "$0" a
    rm -f "$OUT"/*.png ;;
p128)
    for frac in "" 0.1; do
        TIERSERVE_PDL=0 SETTING=sparse+fp8-kv+fp8-weights FILL=synthetic GPU_FRAC=$frac BATCHES=1 CONTEXT=131072 \
            timeout 250 python scripts/profile_decode.py 2>&1 | quiet | tail -14
    done
    (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "nopdl-${f//+/_}"; done; true) ;;
prefill)
    timeout 280 python scripts/bench_fp8_prefill.py --output "$OUT/fp8-prefill-flash-h200.json" 2>&1 | quiet | tail -10 ;;
*) echo "usage: $0 tests|fold|p128|c1m|p1m|select1m|loop|c128k|a|abs|gemv|prefill"; exit 2 ;;
esac
