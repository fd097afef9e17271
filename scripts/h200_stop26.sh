#!/usr/bin/env bash
# Stop-26 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-26 session"); one part per call:
#   bash scripts/h200_stop26.sh mlp      one layer's MLP as one persistent kernel (grid barriers, down weights loaded
#                                        before the first) against the engine's chain of kernels (~2 min; a barrier
#                                        bug hangs: the timeout ends it)
#   bash scripts/h200_stop26.sh warps    the two-level top-k at 1 / 2 / 4 / 16 warps against the default, 16- and
#                                        64-token pages at 128k (~2 min)
#   bash scripts/h200_stop26.sh micro    mlp, then warps, in one call (~4 min)
#   bash scripts/h200_stop26.sh b32      section b with 32-token pages for every row (~5 min)
#   bash scripts/h200_stop26.sh likebench  the loop profile with section a's engine (prefix hits, tight pool) and
#                                        without, FP8 w vs FP8 w + KV, 128 tokens (~3 min)
#   bash scripts/h200_stop26.sh a        GPU tests of the change, then section a (~4 min)
#   bash scripts/h200_stop26.sh scores   the page score kernel's launch settings, 16 / 32 / 64-token pages (~3 min)
#   bash scripts/h200_stop26.sh tma      FP8 row GEMV with TMA tile loads against the engine's (~2 min)
#   bash scripts/h200_stop26.sh final    GPU tests of the folds, then sections a and b (32-token pages) (~7 min)
#   bash scripts/h200_stop26.sh warps32  the top-k variants at 32-token pages, 128k (~1 min)
#   bash scripts/h200_stop26.sh prof     per-kernel profiles with PDL: FP8 w vs FP8 w + KV at 2k (section a's FP8 KV
#                                        cost) (~3 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
mlp)
    PYTHONPATH=.:scripts timeout -k 10 150 python scripts/bench_persistent_mlp.py \
        --output "$OUT/persistent-mlp-h200.json" 2>&1 | quiet | tail -14 ;;
warps)
    for pg in 16 64; do
        PYTHONPATH=.:scripts timeout 110 python scripts/bench_sparse_select.py --batch 1 --page $pg \
            --table-pages $((131328 / pg)) --output "$OUT/sparse-select-warps-page$pg-h200.json" 2>&1 | quiet \
            | grep -E "fused two-level|topk two-level|check"
    done ;;
b32)
    bench 330 --sections b --page-size 32 --budgets b=320 --max-wall 320 --output "$OUT/sparse-fp8-b-page32${SFX:-}-h200.json" \
        | grep -E "tok_s\"|attention_ms_per_step\"|prefill_s" ;;
prof)
    SETTINGS=fp8-weights,fp8-both timeout 280 python scripts/profile_engine_loop.py 2>&1 | quiet | tail -24 ;;
likebench)
    # section a's FP8 KV cost: the loop profiled with the bench's engine (prefix hits, tight pool) and without
    for lb in 1 0; do
        LIKE_BENCH=$lb TOKENS=128 NAME=engine-loop-likebench$lb-h200 SETTINGS=fp8-weights,fp8-both timeout 200 \
            python scripts/profile_engine_loop.py 2>&1 | quiet | grep "=="
    done ;;
warps32)
    PYTHONPATH=.:scripts timeout 110 python scripts/bench_sparse_select.py --batch 1 --page 32 --table-pages 4104 \
        --output "$OUT/sparse-select-warps-page32-h200.json" 2>&1 | quiet | grep -E "fused two-level|topk two-level|check" ;;
a)
    # the GPU tests of the change (top-k cut "auto", full compact pool quantising in place), then section a
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_select_two_level.py \
        tests/unit/test_kv_fp8_compact.py 2>&1 | tail -3
    bench 200 --sections a --budgets a=180 --max-wall 200 --output "$OUT/sparse-fp8-a-h200.json" \
        | grep -E "tok_s\"|speedup" ;;
scores)
    # the page score kernel's launch (pages a program x warps) at 16 / 32 / 64-token pages, 128k
    for pg in 16 32 64; do
        PYTHONPATH=.:scripts timeout 150 python scripts/bench_sparse_select.py --batch 1 --page $pg \
            --table-pages $((131328 / pg)) --output "$OUT/sparse-select-scores-page$pg-h200.json" 2>&1 | quiet \
            | grep -E "score kernel|check"
    done ;;
tma)
    # the FP8 row GEMV with TMA tile loads against the engine's kernel, each projection and a layer
    PYTHONPATH=.:scripts timeout 280 python scripts/bench_fp8_gemv_tma.py --output "$OUT/fp8-gemv-tma-h200.json" \
        2>&1 | quiet | tail -8 ;;
final)
    # the GPU tests of the two folds (q/k/v sum + rotary + KV write; silu * up in the gate_up epilogue), then
    # section a and section b at 32-token pages with them
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_qkv_rope.py \
        tests/kernels/test_fused_ops.py 2>&1 | tail -3
    bench 200 --sections a --budgets a=180 --max-wall 200 --output "$OUT/sparse-fp8-a-folds-h200.json" \
        | grep -E "tok_s\"|speedup"
    SFX=-folds bash "$0" b32 ;;
micro)
    bash "$0" mlp; bash "$0" warps ;;
*) echo "usage: $0 mlp|warps|micro|b32|prof|likebench|warps32|a|scores|tma|final"; exit 2 ;;
esac
