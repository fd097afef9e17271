#!/usr/bin/env bash
# Issue-4 measurement on one H200: the server on the Llama-3.1-8B shape (dummy weights) under load.
# The H200 image lacks the server's packages: carry .whl (see benchmarks/RUNBOOK.md) and install them first.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
python -m tierserve.cli serve --model llama-3.1-8b --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
    ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 180); do
  curl -sf http://127.0.0.1:8000/health > /dev/null && break
  sleep 1
done
curl -sf http://127.0.0.1:8000/health > /dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
python -m tierserve.cli bench serving --url http://127.0.0.1:8000 --concurrency ${LEVELS:-1,16,64,256} \
    --input-len 512 --output-len 128 --output "$OUT/serving-h200.json"
rc=$?
curl -s http://127.0.0.1:8000/metrics | grep -E "^tierserve:(num_preemptions|prefix_cache|generation_tokens)" | head
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
exit $rc
