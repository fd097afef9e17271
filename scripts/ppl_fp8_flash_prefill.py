"""FP8 KV perplexity through the flash-readings prefill (``attention/fp8_flash_prefill.py``) on the CPU: the Triton
backend with every prefill chunk forced through that path (its flash calls on their plain-PyTorch path; a
perplexity run is prefill chunks only), against the torch reference with the same settings.

  PYTHONPATH=. python scripts/ppl_fp8_flash_prefill.py triton 60000      # writes /tmp/ppl-triton.json
  PYTHONPATH=. python scripts/ppl_fp8_flash_prefill.py torch_ref 60000   # writes /tmp/ppl-torch_ref.json
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ".")
import tierserve.attention.fp8_flash_prefill as ff  # noqa: E402
import tierserve.attention.triton_fp8_steps as tb  # noqa: E402
from tierserve.cli import app  # noqa: E402

tb.flash_ok = lambda q: True          # the path runs where flash runs: forced here
ff.CHECKED = True                     # (no first-step comparison with the interpreted kernel)
ff.MIN_WORK = 0                       # every chunk (they are small here)
calls = []
real = ff.fp8_chunk_attention
ff.fp8_chunk_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
backend, max_bytes = sys.argv[1], sys.argv[2]
try:
    app(["eval", "ppl", "--corpus", "nano-heldout", "--max-bytes", max_bytes, "--context", "1023", "--stride", "512",
         "--max-num-batched-tokens", "32", "--compare", f"kv_dtype=fp8,attention_backend={backend}",
         "--output", f"/tmp/ppl-{backend}.json"], standalone_mode=False)
finally:
    print("chunks through the flash-readings path:", len(calls))
