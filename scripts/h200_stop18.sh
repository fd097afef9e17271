#!/usr/bin/env bash
# Stop-18 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-18 session"); one part per call:
#   bash scripts/h200_stop18.sh micro     top-k variants at 8192, 8193 and 65536 pages; selection tests (~3 min)
#   bash scripts/h200_stop18.sh bench     bench sparse-fp8 sections b and c (~9 min)
#   bash scripts/h200_stop18.sh profiles  decode profiles at 128k: sparse + FP8 KV on the GPU, and tiered 10% (~2 min)
#   bash scripts/h200_stop18.sh knobs     the opt-in knobs on the 128k sparse + FP8 KV profile, alone and together (~4 min)
#   bash scripts/h200_stop18.sh tune      sparse FP8 decode launch settings swept; section c at 128k with the best (~6 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v -i "warn\|it/s\]"; }
plain_names() { (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "${f//+/_}"; done; true); }
case "${1:-}" in
micro)
    timeout 120 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_select.py 2>&1 | tail -2
    timeout 150 python scripts/bench_sparse_select.py --batch 1 --output "$OUT/sparse-select-h200.json" \
        2>&1 | quiet | grep -E "pages|fused|topk|check|score kernel"
    # the engine's case: a 128k context plus new tokens (8193 pages) in a wider table
    timeout 100 python scripts/bench_sparse_select.py --batch 1,4 --ctx 131088 --table-pages 8448 \
        --output "$OUT/sparse-select-wide-h200.json" 2>&1 | quiet | grep -E "pages|fused|topk|check"
    timeout 120 python scripts/bench_sparse_select.py --batch 1 --ctx 1048576 \
        --output "$OUT/sparse-select-1m-h200.json" 2>&1 | quiet | grep -E "pages|fused|topk|check" ;;
bench)
    timeout 590 python -m tierserve.cli bench sparse-fp8 --model llama-3.1-8b --load-format dummy --sections b,c \
        --budgets b=250,c=300 --max-wall 565 --output "$OUT/sparse-fp8-bc-h200.json" 2>&1 | quiet | tail -40 ;;
profiles)
    SETTING=sparse+fp8-kv FILL=synthetic BATCHES=1 CONTEXT=131072 timeout 150 python scripts/profile_decode.py \
        2>&1 | quiet | tail -16
    SETTING=sparse+fp8-kv FILL=synthetic GPU_FRAC=0.1 BATCHES=1 CONTEXT=131072 timeout 150 \
        python scripts/profile_decode.py 2>&1 | quiet | tail -16
    plain_names ;;
knobs)
    # the default (two-level top-k since stop 18's micro), then the opt-in knobs alone and together, on the 128k
    # sparse + FP8 KV profile (~50 s each): split-K sized by the selection (9 splits, not 64), FP8 decode page
    # ids a block ahead
    # (run in stop 18; TIERSERVE_FP8_PREFETCH=1 is now TIERSERVE_FP8_SPARSE_DECODE=prefetch=1, fp8_decode_config.py)
    for knob in default TIERSERVE_SPARSE_SPLITS=selection TIERSERVE_FP8_PREFETCH=1 both; do
        sub="$OUT/${knob%%=*}"; mkdir -p "$sub"
        envs="$knob"
        [ "$knob" = default ] && envs="TIERSERVE_NONE=1"
        [ "$knob" = both ] && envs="TIERSERVE_SPARSE_SPLITS=selection TIERSERVE_FP8_PREFETCH=1"
        echo "== $knob"
        env $envs OUT="$sub" SETTING=sparse+fp8-kv FILL=synthetic BATCHES=1 CONTEXT=131072 timeout 150 \
            python scripts/profile_decode.py 2>&1 | quiet | grep -E "replay|us x" | head -9
        OUT="$sub" plain_names
    done ;;
tune)
    # the sparse FP8 decode kernel's launch settings at 128k (on the device / 90% of the pages in CPU RAM; the
    # default settings timed in the same run), then section c at 128k with the best
    timeout 200 python scripts/sweep_fp8_sparse_decode.py --budget-s 65 --env "$OUT/best.env" \
        --output "$OUT/fp8-sparse-decode-sweep-h200.json" 2>&1 | quiet | grep -v '^{'
    cat "$OUT/best.env"
    source "$OUT/best.env"
    timeout 180 python -m tierserve.cli bench sparse-fp8 --model llama-3.1-8b --load-format dummy --sections c \
        --tier-contexts 131072 --budgets c=170 --max-wall 170 --output "$OUT/sparse-fp8-c128k-h200.json" \
        2>&1 | quiet | grep -E "tok_s|target" | tail -12
    rm -f "$OUT"/*.partial.jsonl ;;
*) echo "usage: $0 micro|bench|profiles|knobs|tune"; exit 2 ;;
esac
