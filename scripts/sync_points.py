"""Where the engine's decode loop blocks the host on the GPU: ``torch.cuda.set_sync_debug_mode("warn")`` around one
request (after a warm-up one), each synchronising call's Python stack recorded and counted by its innermost
tierserve frames. A sync inside the multi-step window loop waits for the windows queued behind, so the GPU idles
while the host prepares the next one. ``SETTING`` = bf16 / fp8-kv / fp8-both (Llama-3.1-8B shape, dummy weights,
batch 1, ``CONTEXT`` prompt tokens, ``TOKENS`` generated). Prints the counts; writes $OUT/sync-points-<setting>.json."""
import collections
import json
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
SETTING = os.environ.get("SETTING", "fp8-kv")
OPTIONS = {"bf16": {}, "fp8-kv": {"kv_dtype": "fp8"}, "fp8-both": {"kv_dtype": "fp8", "quantization": "fp8"}}
CONTEXT, TOKENS = int(os.environ.get("CONTEXT", 2048)), int(os.environ.get("TOKENS", 64))


def main() -> None:
    llm = LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=1,
              max_model_len=CONTEXT + TOKENS + 64, enable_prefix_caching=False, **OPTIONS[SETTING])
    prompt = [(i * 7919 + 1) % llm.engine.model_cfg.vocab_size for i in range(CONTEXT)]
    sp = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    llm.generate([prompt], sp)
    counts = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "tierserve" in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1][:4])
        counts[f"{str(message)[:60]} @ {where}"] += 1
    old = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    llm.generate([prompt], sp)
    torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    for k, n in counts.most_common(20):
        print(f"{n:5d}  {k}")
    with open(f"{OUT}/sync-points-{SETTING}.json", "w") as f:
        json.dump({"setting": SETTING, "context": CONTEXT, "tokens": TOKENS, "syncs": dict(counts)}, f, indent=1)


if __name__ == "__main__":
    main()
