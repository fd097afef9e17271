# Shared preamble of the scripts/h200_stopNN.sh call scripts (sourced): strict mode, PYTHONPATH, $OUT, and
#   quiet        drop warnings and progress bars from a pipe
#   bench S ...  `tierserve bench sparse-fp8` (Llama-3.1-8B shape, dummy weights) under a timeout of S seconds
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v -i "warn\|it/s\]"; }
bench() { timeout "$1" python -m tierserve.cli bench sparse-fp8 --model llama-3.1-8b --load-format dummy "${@:2}" 2>&1 | quiet; }
