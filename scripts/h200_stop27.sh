#!/usr/bin/env bash
# Stop-27 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-27 session"); one part per call:
#   bash scripts/h200_stop27.sh a        GPU tests of stop 26's changes (small-pool storage rule, the opt-in folds), then
#                                        section a -- its first valid FP8 KV rows since stop 24 (~5 min)
#   bash scripts/h200_stop27.sh folds    the engine loop (FP8 w, 2k, 128 tokens) with neither fold, the q/k/v + rotary
#                                        fold alone, the silu fold alone (~2 min)
#   bash scripts/h200_stop27.sh fp8kv    dense FP8 KV at 128k (section b's 0.6x row): per-kernel profile without PDL,
#                                        synthetic fill, bf16 KV beside it; the kernel alone with more splits (~5 min)
#   bash scripts/h200_stop27.sh b32      section b at 32-token pages, with the opt-in FP8 LM head row (~4 min);
#                                        SPREAD=0.5 for the opt-in page score
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
a)
    timeout 240 python -m pytest -q -p no:cacheprovider -p no:warnings -rf tests/kernels/test_qkv_rope.py \
        tests/unit/test_kv_fp8_compact.py tests/kernels/test_triton_fp8_tiers.py tests/kernels/test_triton_select.py \
        2>&1 | tail -4
    bench 220 --sections a --budgets a=200 --max-wall 220 --output "$OUT/sparse-fp8-a-h200.json" \
        | grep -E "tok_s\"|speedup" ;;
folds)
    for f in ${FOLDS:-none qkv silu}; do
        QKV=0; SILU=0; [ $f = qkv ] && QKV=1; [ $f = silu ] && SILU=1
        TIERSERVE_QKV_ROPE_FOLD=$QKV TIERSERVE_SILU_FOLD=$SILU LIKE_BENCH=1 TOKENS=128 NAME=engine-loop-fold-$f-h200 \
            SETTINGS=fp8-weights timeout 150 python scripts/profile_engine_loop.py 2>&1 | quiet | grep "==" \
            | sed "s/^/$f /"
    done ;;
fp8kv)
    for s in fp8-kv bf16; do
        TIERSERVE_PDL=0 SETTING=$s FILL=synthetic BATCHES=1 CONTEXT=131072 timeout 250 \
            python scripts/profile_decode.py 2>&1 | quiet | tail -12
    done
    (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "${f//+/_}"; done; true)
    # the kernel alone at 128k, 4 layers in turn: the engine's launch (64 splits: choose_splits caps it) against
    # more splits and other blocks (each program walks 32 blocks of 64 tokens one after another now)
    PYTHONPATH=.:scripts timeout 200 python scripts/bench_fp8_kv.py --decode-only --no-before --compact --layers 4 \
        --cases 1x131072 --configs "num_splits=128;num_splits=256;num_splits=256,block_n=32;num_splits=128,num_warps=8" \
        --output "$OUT/fp8-kv-decode-128k-h200.json" 2>&1 | quiet | tail -12 ;;
b32)
    # section b at 32-token pages with the opt-in FP8 LM head row (stop 26: 2.26x without it); SPREAD=0.5: the
    # opt-in page score that kept nano's loss under 2% at 32-token pages
    bench 330 --sections b --page-size 32 --sparse-page-spread "${SPREAD:-1.0}" --budgets b=320 --max-wall 320 \
        --output "$OUT/sparse-fp8-b-page32-spread${SPREAD:-1}-h200.json" | grep -E "tok_s\"|attention_ms_per_step\"|prefill_s" ;;
bulk)
    # the FP8 decode kernel's pipelined bulk loop (bulk=1) against the engine's dense default, 4 layers in turn,
    # at 2k / 32k / 128k; then the compact-pool row (the engine's storage) with it
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_decode_fp8.py \
        tests/kernels/test_triton_fp8_compact.py tests/kernels/test_qkv_rope.py tests/unit/test_kv_fp8_compact.py \
        tests/kernels/test_triton_fp8_tiers.py tests/kernels/test_triton_select.py > "$OUT/tests-bulk.txt" 2>&1
    tail -3 "$OUT/tests-bulk.txt"
    B=fast=1,bulk=1
    PYTHONPATH=.:scripts timeout 200 python scripts/bench_fp8_kv.py --decode-only --no-before --layers 4 \
        --cases 1x2048,1x32768,1x131072 --configs "fast=1,num_splits=128;$B;$B,num_stages=3;$B,num_warps=8,num_stages=3;\
$B,block_n=32,num_stages=3;$B,block_n=128,num_warps=8,num_stages=3;$B,num_splits=128,num_warps=8,num_stages=3;\
$B,num_splits=32,num_warps=8,num_stages=3" --output "$OUT/fp8-kv-bulk-h200.json" 2>&1 | quiet | grep -v pending | cut -c1-150
    TIERSERVE_FP8_DECODE=${BULK_SET:-bulk=1} PYTHONPATH=.:scripts timeout 100 python scripts/bench_fp8_kv.py \
        --decode-only --no-before --layers 4 --quick --compact --cases 1x2048,1x131072 \
        --output "$OUT/fp8-kv-bulk-compact-h200.json" 2>&1 | quiet | grep compact ;;
layout)
    # page score kernel: summaries in the pool's page rows (the engine) against one contiguous array per layer
    timeout 150 python scripts/bench_summary_layout.py --output "$OUT/summary-layout-h200.json" 2>&1 | quiet
    # the GPU tests of this stop's and stop 26's changes (the bulk loop, folds, small-pool storage, selection)
    timeout 380 python -m pytest -q -p no:cacheprovider -p no:warnings -rf tests/kernels/test_triton_decode_fp8.py \
        tests/kernels/test_triton_fp8_compact.py tests/kernels/test_qkv_rope.py tests/unit/test_kv_fp8_compact.py \
        tests/kernels/test_triton_fp8_tiers.py tests/kernels/test_triton_select.py > "$OUT/tests-gpu.txt" 2>&1
    echo "pytest exit $?"; tail -4 "$OUT/tests-gpu.txt" ;;
*) echo "usage: $0 a|folds|fp8kv|b32|bulk|layout"; exit 2 ;;
esac
