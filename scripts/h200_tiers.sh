#!/usr/bin/env bash
# Issue 5 on one H200 in one call of at most LIMIT (555) s: the kernel tests of the tier paths (zero-copy gather
# from pinned host pages, staging of spilled pages), then `bench tiers` at 32k and 128k (TTFT cold / GPU / CPU-RAM
# / disk hits, the cost policy's choice, decode with 100..10% of the KV on the GPU, transformers' default and
# offloaded caches) with the rest of the time as its --time-budget. Writes $OUT/tiers-h200.json + .png; rows
# stream to $OUT/tiers-h200.json.partial.jsonl, and if the bench is stopped the JSON + PNG are rebuilt from it.
# --cpu-kv-gb 30 holds both prompts (the tier is page-locked at its exact size, memory/pinned.py).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-555}
START=$SECONDS
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
df -h "${TMPDIR:-/tmp}" | tail -1; free -g | head -2
timeout ${KTIMEOUT:-90} python -m pytest ${KTESTS:-tests/kernels/test_zero_copy.py tests/kernels/test_stage.py} \
    -q -p no:cacheprovider -p no:warnings --tb=short > "$OUT/kernels.txt" 2>&1
grep -E "rows [0-9]|Greatest|passed|failed" "$OUT/kernels.txt" | head -12
LEFT=$((LIMIT - (SECONDS - START)))
BUDGET=$((LEFT - 50))                  # start-up before the budget's clock, writing the JSON + PNG, margin
echo "bench tiers: time budget ${BUDGET} s, hard stop after $((LEFT - 5)) s"
rm -f "$OUT/tiers-h200.json" "$OUT/tiers-h200.json.partial.jsonl"
timeout $((LEFT - 5)) python -m tierserve.cli bench tiers --model llama-3.1-8b --load-format dummy \
    --context ${CONTEXTS:-32768,131072} --gpu-frac ${GPU_FRACS:-1,0.6,0.5,0.25,0.1} --cpu-kv-gb ${CPU_KV_GB:-30} \
    --time-budget $BUDGET --output "$OUT/tiers-h200.json" 2>&1 \
    | grep -v -i "warn\|it/s\]" > "$OUT/tiers.log"
tail -c 6000 "$OUT/tiers.log"
if [ ! -s "$OUT/tiers-h200.json" ] && [ -s "$OUT/tiers-h200.json.partial.jsonl" ]; then
    python - "$OUT/tiers-h200.json" <<'EOF'
import sys
from pathlib import Path

from tierserve.bench.results import write_result
from tierserve.bench.tiers import result_from_partial
from tierserve.bench.tiers_plot import plot_tiers

out = Path(sys.argv[1])
res = result_from_partial(str(out) + ".partial.jsonl")
write_result(res, out)
plot_tiers(res, out.with_suffix(".png"))
print("rebuilt", out, "from the partial rows:", len(res["rows"]))
EOF
fi
python -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; s.pop('tier_stats', None); print(json.dumps(s, indent=1))" \
    "$OUT/tiers-h200.json" 2>/dev/null | head -60
grep -i "zero-copy\|is off\|fall" "$OUT/tiers.log" | head -3
echo "total $((SECONDS - START)) s"
