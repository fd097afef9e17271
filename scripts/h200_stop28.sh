#!/usr/bin/env bash
# Stop-28 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-28 session"); one part per call:
#   bash scripts/h200_stop28.sh bulk5    dense FP8 decode, 2k / 32k / 128k, against the engine default: the in-kernel
#                                        bulk loop with 5 stages (the only depth at which Triton keeps two blocks of
#                                        codes in flight: async_wait num=6 instead of 0, offline TTGIR) and stop 27's
#                                        best; the split launch (lean=1: 128 registers at 64 tokens / 4 warps / 5
#                                        stages, 4 programs an SM) at several settings; then the compact-pool row with
#                                        LEAN_SET (default lean=1,num_stages=5) (~4 min)
#   bash scripts/h200_stop28.sh fp8kv    per-kernel profiles of dense FP8 KV and bf16 decode at 128k without PDL (the
#                                        synthetic fill now in chunks of the engine's step budget) (~4 min)
#   bash scripts/h200_stop28.sh tests1   GPU tests: test_triton_decode_fp8.py, test_triton_fp8_compact.py (~6 min)
#   bash scripts/h200_stop28.sh tests2   GPU tests: test_kv_fp8_compact.py, test_triton_fp8_tiers.py,
#                                        test_triton_select.py, test_qkv_rope.py (~8 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
gpu_tests() {   # FILE... : each file under its own timeout, its summary line printed, the log in $OUT
    for f in "$@"; do
        name=$(basename "$f" .py)
        timeout 280 python -m pytest -q -p no:cacheprovider -p no:warnings -rf "$f" > "$OUT/$name.txt" 2>&1
        echo "$name: exit $? $(tail -1 "$OUT/$name.txt")"
    done
}
case "${1:-}" in
bulk5)
    B=fast=1,bulk=1
    PYTHONPATH=.:scripts timeout 330 python scripts/bench_fp8_kv.py --decode-only --no-before --layers 4 \
        --cases 1x2048,1x32768,1x131072 --configs "$B,num_warps=8,num_stages=5;$B,block_n=32,num_stages=5;\
$B,block_n=128,num_warps=8,num_stages=3;lean=1,num_stages=5;lean=1,num_stages=3;lean=1,num_warps=8,num_stages=5;\
lean=1,block_n=32,num_stages=5;lean=1,block_n=128,num_warps=8,num_stages=5;lean=1,num_stages=5,num_splits=128" \
        --output "$OUT/fp8-kv-bulk5-h200.json" 2>&1 | quiet | grep -v pending | cut -c1-150
    TIERSERVE_FP8_DECODE=${LEAN_SET:-lean=1,num_stages=5} PYTHONPATH=.:scripts timeout 100 python \
        scripts/bench_fp8_kv.py --decode-only --no-before --layers 4 --quick --compact --cases 1x2048,1x131072 \
        --output "$OUT/fp8-kv-lean-compact-h200.json" 2>&1 | quiet | grep compact ;;
fp8kv)
    for s in fp8-kv bf16; do
        TIERSERVE_PDL=0 SETTING=$s FILL=synthetic BATCHES=1 CONTEXT=131072 timeout 250 \
            python scripts/profile_decode.py 2>&1 | quiet | tail -12
    done
    (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "${f//+/_}"; done; true) ;;
tests1) gpu_tests tests/kernels/test_triton_decode_fp8.py tests/kernels/test_triton_fp8_compact.py ;;
tests2) gpu_tests tests/unit/test_kv_fp8_compact.py tests/kernels/test_triton_fp8_tiers.py \
            tests/kernels/test_triton_select.py tests/kernels/test_qkv_rope.py ;;
*) echo "usage: $0 bulk5|fp8kv|tests1|tests2"; exit 2 ;;
esac
