"""transformers baselines of `bench tiers`, in the same run and on the same prompt: decode with its default cache
(all on the GPU) and with its offloaded cache (layers' KV in CPU RAM, prefetched one layer ahead -- the baseline
for tiered decode). One ``generate`` per cache: a logits processor stamps each step, so the first stamp is the
TTFT (the prefill) and the rest time decode, without a second prefill. Few new tokens (the offloaded cache
decodes at ~0.6 tok/s at 128k), and a case the time budget cannot fit is a skipped row.
"""
from __future__ import annotations

import gc
import time

import torch


class _Stamps:
    """A logits processor that records when each step's logits are ready."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.times = dev, []

    def __call__(self, input_ids, scores):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.times.append(time.perf_counter())
        return scores


def timed_generate(hf, ids: torch.Tensor, new_tokens: int, **kw) -> dict:
    from transformers import LogitsProcessorList

    dev = ids.device
    stamps = _Stamps(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=0, use_cache=True, logits_processor=LogitsProcessorList([stamps]), **kw)
    ts = stamps.times
    n = len(ts) - 1
    return {"ttft_s": ts[0] - t0, "tok_s": n / (ts[-1] - ts[0]) if n > 0 else None, "decode_tokens": n,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def hf_baselines(model: str | None, load_format: str, prompt: list[int], budget, emit, *, cold_s: float,
                 new_tokens: int = 16, offloaded_tokens: int = 4) -> None:
    """``cold_s``: our cold prefill of the prompt, to guess each case's time (HF's prefill took about half of it
    at 128k on the H200)."""
    from tierserve.bench.decode import _hf_model
    from tierserve.loader.hf import resolve_model_path

    ctx = len(prompt)
    cases = (("dynamic", {}, new_tokens, 0.15), ("offloaded", {"cache_implementation": "offloaded"},
                                                  offloaded_tokens, 2.5))
    base = {"kind": "decode", "engine": "transformers", "context": ctx}
    why = budget.skip(30 + 0.7 * cold_s + new_tokens * 0.15, "loading transformers and its default-cache run")
    if why:
        for cache, *_ in cases:
            emit({**base, "cache": cache, "skipped": why})
        return
    gc.collect()
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    hf = _hf_model(resolve_model_path(model), load_format, dev, torch.bfloat16)
    ids = torch.tensor([prompt], device=dev)
    try:
        for cache, kw, n, s_per_token in cases:
            why = budget.skip(0.7 * cold_s + n * s_per_token + 5, f"transformers' {cache} cache at {ctx} tokens")
            if why:
                emit({**base, "cache": cache, "skipped": why})
                continue
            try:
                r = timed_generate(hf, ids, n, **kw)
            except torch.OutOfMemoryError as e:
                r = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            except Exception as e:               # a baseline failing never loses the rows measured so far
                r = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            torch.cuda.empty_cache()
            emit({**base, "cache": cache, "new_tokens": n, **r})
    finally:
        del hf
        gc.collect()
        torch.cuda.empty_cache()
