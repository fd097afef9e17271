#!/usr/bin/env bash
# Issue 9: train tierserve-nano with and without Engram on one H200 (same corpus, tokens, data order,
# backbone init), ~8.5 min. JSON + PNG + both checkpoints (as tars, each < 16 MiB) land in $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python -m tierserve.train.engram_nano --out /tmp/engram-nano --device cuda --size nano --seed 0 \
    --minutes "${MINUTES:-8}" 2>&1 | grep -v -i "warn\|Writing model" | tail -25
cp /tmp/engram-nano/engram_vs_baseline.json "$OUT/engram-nano-h200.json"
cp /tmp/engram-nano/engram_vs_baseline.png "$OUT/engram-nano-h200.png"
tar -C /tmp/engram-nano -cf "$OUT/engram.tar" engram
tar -C /tmp/engram-nano -cf "$OUT/baseline.tar" baseline
ls -la "$OUT"
