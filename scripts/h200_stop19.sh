#!/usr/bin/env bash
# Stop-19 H200 calls for issue 6 (benchmarks/RUNBOOK.md "Start of the stop-19 session"); one part per call:
#   bash scripts/h200_stop19.sh tests    GPU tests of stop 18's changes (~4 min)
#   bash scripts/h200_stop19.sh tiered   section c at 128k without / with TIERSERVE_TIERED_MULTI_STEP=1 (~5 min)
#   bash scripts/h200_stop19.sh dense    FP8 dense decode sweep incl. small blocks (bench_fp8_kv.py) (~3 min)
#   bash scripts/h200_stop19.sh b        section b (sparse FP8 decode defaults of stop 18) (~5 min)
#   bash scripts/h200_stop19.sh c1m      section c at 1M tokens after the host-work fixes (~4 min)
#   bash scripts/h200_stop19.sh tlb      FP8 host reads spread over 64 GiB of pinned RAM, engine vs layer-major layout (~3 min)
#   bash scripts/h200_stop19.sh p1m      decode profile of the tiered 1M step (sparse + FP8 KV) (~4 min)
#   bash scripts/h200_stop19.sh ncu      Nsight Compute on the BF16 and FP8 decode kernels (batch 16, 32k) (~3 min)
#   bash scripts/h200_stop19.sh fast     FP8 decode: fp32-hop conversion and the codes-only branch against 2e63176 (~6 min)
#   bash scripts/h200_stop19.sh a        dense FP8 decode engine defaults: GPU tests, kernel rows, section a (~6 min)
# Everything lands in $OUT under names without '+' (the device tool leaves such names out).
source "$(dirname "$0")/h200_common.sh"
case "${1:-}" in
tests)
    timeout 280 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_engine.py \
        -k "tiered_multi_step or spill" tests/kernels/test_host_read_check.py tests/kernels/test_triton_fp8_tiers.py \
        2>&1 | tail -4
    timeout 100 python -m pytest -q -p no:cacheprovider -p no:warnings tests/kernels/test_triton_decode_fp8.py \
        -k "sparse" 2>&1 | tail -2 ;;
tiered)
    bench 140 --sections c --tier-contexts 131072 --budgets c=130 --max-wall 130 \
        --output "$OUT/sparse-fp8-c128k-single-h200.json" | grep -E "tok_s\"|wall_s"
    TIERSERVE_TIERED_MULTI_STEP=1 bench 140 --sections c --tier-contexts 131072 --budgets c=130 \
        --max-wall 130 --output "$OUT/sparse-fp8-c128k-multistep-h200.json" | grep -E "tok_s\"|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
dense)
    timeout 200 python scripts/bench_fp8_kv.py --no-before --output "$OUT/fp8-kv-h200.json" 2>&1 | quiet \
        | grep -E "decode|setting" ;;
b)
    bench 300 --sections b --budgets b=280 --max-wall 290 --output "$OUT/sparse-fp8-b-h200.json" | tail -25
    rm -f "$OUT"/*.partial.jsonl ;;
c1m)
    bench 280 --sections c --tier-contexts 1048576 --budgets c=270 --max-wall 270 \
        --output "$OUT/sparse-fp8-c1m-h200.json" | grep -E "tok_s\"|skipped|wall_s"
    rm -f "$OUT"/*.partial.jsonl ;;
tlb)
    # FP8 host reads with the selected rows side by side, spread over 64 GiB of pinned RAM (a 1M-token tier), and
    # spread with a layer-major store: is the 1M attention (0.74 ms a layer against ~0.25 at 128k) GPU page walks?
    timeout 280 python scripts/sweep_fp8_sparse_decode.py --quick --check --cases host,host-spread,host-spread-lm \
        --spread-gb 64 --output "$OUT/fp8-sparse-decode-host-spread-h200.json" 2>&1 | quiet | grep -v '^{' ;;
p1m)
    # where a tiered 1M step goes (sparse + FP8 KV, 10% of the pages on the GPU, compact FP8 rows in CPU RAM)
    SETTING=sparse+fp8-kv FILL=synthetic GPU_FRAC=0.1 BATCHES=1 CONTEXT=1048576 timeout 280 \
        python scripts/profile_decode.py 2>&1 | quiet | tail -16
    (cd "$OUT" && for f in *+*; do [ -e "$f" ] && mv "$f" "${f//+/_}"; done; true) ;;
ncu)
    # Nsight Compute on one launch of each decode kernel (batch 16, 32k): where the FP8 kernel's time goes
    for cfg in "block_n=32,num_warps=4,num_stages=1" ""; do
        timeout 200 ncu --clock-control none -k regex:decode_split --launch-skip 2 --launch-count 2 \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
            --section InstructionStats --section MemoryWorkloadAnalysis \
            python scripts/ncu_fp8_decode.py "$cfg" > "$OUT/ncu-fp8-decode${cfg:+-bn32}.txt" 2>&1
        grep -E "^  [a-z_]+decode|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occ|Theoretical Occ|Executed Ipc A|Issue Slots Busy|Stall|Warp Cycles Per Issued|L1/TEX Hit|Executed Instructions  " \
            "$OUT/ncu-fp8-decode${cfg:+-bn32}.txt" | head -60
    done ;;
fast)
    # FP8 decode after the fp32-hop code conversion, with and without the codes-only branch (fast=1); the
    # committed kernel of 2e63176 ("before", FP8_BEFORE_DIR: its three files) in the same run
    C="block_n=32,num_warps=4,num_stages=1;block_n=32,num_warps=4,num_stages=1,fast=1"
    C="$C;block_n=16,num_warps=2,num_stages=1;block_n=16,num_warps=2,num_stages=1,fast=1"
    C="$C;block_n=64,num_warps=8,num_stages=2,fast=1;block_n=64,num_warps=4,num_stages=2,fast=1"
    C="$C;num_splits=32,block_n=16,num_warps=2,num_stages=1,fast=1;num_splits=32,block_n=32,num_warps=4,num_stages=1,fast=1"
    FP8_BEFORE_DIR=${FP8_BEFORE_DIR:-bench_before} timeout 260 python scripts/bench_fp8_kv.py --decode-only \
        --before-rev 2e63176 --configs "$C" --output "$OUT/fp8-kv-fast-h200.json" 2>&1 | quiet | grep -E "decode|setting"
    S="block_n=16,num_warps=2,num_stages=1;block_n=16,num_warps=2,num_stages=1,fast=1"
    S="$S;num_splits=16,block_n=32,num_warps=4,num_stages=2;num_splits=16,block_n=32,num_warps=4,num_stages=2,fast=1"
    S="$S;block_n=32,num_warps=4,num_stages=1,fast=1;num_splits=32,block_n=16,num_warps=2,num_stages=1,fast=1"
    timeout 150 python scripts/sweep_fp8_sparse_decode.py --check --cases gpu,host --configs "$S" \
        --output "$OUT/fp8-sparse-decode-fast-h200.json" 2>&1 | quiet | grep -v '^{' | tail -3
    python - "$OUT/fp8-sparse-decode-fast-h200.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    cfg = ",".join(f"{k}={int(r[k])}" for k in ("num_splits", "block_n", "num_warps", "num_stages", "fast") if k in r)
    print(r["case"], r["kernel"][:8], cfg, round(r.get("us", -1), 2), r.get("same_bits_without_fast", ""),
          r.get("max_abs_diff_vs_default", ""), r.get("error", ""))
PY
    ;;
a)
    # the engine's new dense FP8 decode defaults (more splits, fast=1): GPU kernel tests, the kernel rows, section a
    timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/kernels/test_triton_decode_fp8.py \
        2>&1 | tail -2
    timeout 120 python scripts/bench_fp8_kv.py --decode-only --no-before --configs "block_n=64,num_warps=4,num_stages=2,fast=1" \
        --output "$OUT/fp8-kv-engine-h200.json" 2>&1 | quiet | grep -E "bf16|engine|best"
    bench 200 --sections a --budgets a=180 --max-wall 190 --output "$OUT/sparse-fp8-a-h200.json" | tail -12
    rm -f "$OUT"/*.partial.jsonl ;;
*) echo "usage: $0 tests|tiered|dense|b|c1m|tlb|p1m|ncu|fast|a"; exit 2 ;;
esac
