"""Where a whole decode loop's time goes (graph replays and everything between them), per engine setting: section a
of ``bench sparse-fp8`` measured FP8 KV at 2k 1.1 ms a token slower than bf16 (5.86 vs 4.74 ms) while its
attention was only 0.15 ms slower; ``profile_decode.py`` sees graph replays only. Here torch.profiler (CPU + CUDA)
records ``TOKENS`` generated tokens after a ``CONTEXT``-token prompt (Llama-3.1-8B shape, dummy weights, batch 1):
wall ms a token, GPU kernel time a token by kernel, and the host ops with the most self time. Writes
``$OUT/engine-loop-profile-h200.json``; ``SETTINGS`` = comma list of bf16 / fp8-kv / fp8-weights / fp8-both /
fp8-all (fp8-both + the FP8 output projection, ``fp8_lm_head``)."""
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
CONTEXT = int(os.environ.get("CONTEXT", 2048))
TOKENS = int(os.environ.get("TOKENS", 64))
OPTIONS = {"bf16": {}, "fp8-kv": {"kv_dtype": "fp8"}, "fp8-weights": {"quantization": "fp8"},
           "fp8-both": {"kv_dtype": "fp8", "quantization": "fp8"},
           "fp8-all": {"kv_dtype": "fp8", "quantization": "fp8", "fp8_lm_head": True}}


def top(events, key, n):
    rows = sorted(((getattr(e, key), e.key, e.count) for e in events if getattr(e, key) > 0), reverse=True)[:n]
    return [{"name": k[:100], "us_per_token": t / TOKENS, "calls_per_token": c / TOKENS} for t, k, c in rows]


def run(setting: str) -> dict:
    llm = LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=1,
              max_model_len=CONTEXT + TOKENS + 64, enable_prefix_caching=False, **OPTIONS[setting])
    vocab = llm.engine.model_cfg.vocab_size
    prompt = [(i * 7919 + 1) % vocab for i in range(CONTEXT)]
    sp = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    llm.generate([prompt], sp)                                   # warm-up (graphs, compiles)
    t = time.perf_counter()
    llm.generate([prompt], sp)
    plain_ms = (time.perf_counter() - t) * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    stack = os.environ.get("STACK") == "1"          # where the stream syncs come from (Python stacks)
    with torch.profiler.profile(activities=acts, with_stack=stack) as prof:
        t = time.perf_counter()
        llm.generate([prompt], sp)
        torch.cuda.synchronize()
        prof_ms = (time.perf_counter() - t) * 1e3
    if stack:
        for e in prof.key_averages(group_by_stack_n=6):
            if e.key == "cudaStreamSynchronize":
                print(f"  sync x{e.count}: " + " <- ".join(f for f in e.stack if "tierserve" in f or "scripts" in f))
    ev = prof.key_averages()
    gpu = top(ev, "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total", 25)
    cpu = top(ev, "self_cpu_time_total", 25)
    del llm, prof, ev
    gc.collect()                                   # the engine's graphs hold cycles: free its KV cache now
    torch.cuda.empty_cache()
    return {"request_ms_incl_prefill": plain_ms, "profiled_request_ms": prof_ms, "gpu_kernels": gpu, "host_ops": cpu}


def main() -> None:
    out = {"context": CONTEXT, "tokens": TOKENS, "device": torch.cuda.get_device_name(0), "settings": {}}
    for s in os.environ.get("SETTINGS", "bf16,fp8-kv").split(","):
        r = out["settings"][s] = run(s)
        print(f"== {s}: request {r['request_ms_incl_prefill']:.1f} ms (profiled {r['profiled_request_ms']:.1f})")
        for row in r["gpu_kernels"][:10]:
            print(f"  gpu {row['us_per_token']:8.1f} us/tok x{row['calls_per_token']:6.1f}  {row['name'][:70]}")
        for row in r["host_ops"][:10]:
            print(f"  cpu {row['us_per_token']:8.1f} us/tok x{row['calls_per_token']:6.1f}  {row['name'][:70]}")
    with open(f"{OUT}/engine-loop-profile-h200.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
