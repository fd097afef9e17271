"""Where a whole decode loop's time goes (graph replays and everything between them), per engine setting: section a
of ``bench sparse-fp8`` measured FP8 KV at 2k 1.1 ms a token slower than bf16 (5.86 vs 4.74 ms) while its
attention was only 0.15 ms slower; ``profile_decode.py`` sees graph replays only. Here torch.profiler (CPU + CUDA)
records the ``TOKENS`` decode tokens after the first of a ``CONTEXT``-token prompt (prefill not profiled;
Llama-3.1-8B shape, dummy weights, batch 1): wall ms a token, GPU kernel time a token by kernel, and the host ops
with the most self time. With PDL (default on sm_90+) a dependent kernel's time includes its wait for the kernel
before it: run with ``TIERSERVE_PDL=0`` for per-kernel costs. Writes
``$OUT/engine-loop-profile-h200.json``; ``SETTINGS`` = comma list of bf16 / fp8-kv / fp8-weights / fp8-both /
fp8-all (fp8-both + the FP8 output projection, ``fp8_lm_head``). ``LIKE_BENCH=1``: the engine as section a of
``bench sparse-fp8`` builds it (a pool of just the request's pages plus 4, ``max_num_batched_tokens`` = max(2048,
context), prefix caching off) -- stop 25 found FP8 KV ~6% slower there than here; stop 26's run of it (prefix
caching then on) traced that to the small compact FP8 pool such a pool leaves."""
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
MODEL = os.environ.get("MODEL", "llama-3.1-8b")                 # a checkpoint path runs it on the CPU too (checks)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS = int(os.environ.get("TOKENS", 64))
OPTIONS = {"bf16": {}, "fp8-kv": {"kv_dtype": "fp8"}, "fp8-weights": {"quantization": "fp8"},
           "fp8-both": {"kv_dtype": "fp8", "quantization": "fp8"},
           "fp8-all": {"kv_dtype": "fp8", "quantization": "fp8", "fp8_lm_head": True}}


def top(events, key, n):
    rows = sorted(((getattr(e, key), e.key, e.count) for e in events if getattr(e, key) > 0), reverse=True)[:n]
    return [{"name": k[:100], "us_per_token": t / TOKENS, "calls_per_token": c / TOKENS} for t, k, c in rows]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _request(llm, prompt, sp, rid: str, prof=None) -> tuple[float, float]:
    """Prefill (untimed by the profiler), then decode to the end: (prefill ms, decode ms). ``prof`` records the
    decode only (prefill kernels and their host syncs are not decode costs)."""
    eng = llm.engine
    t = time.perf_counter()
    eng.add_request(rid, prompt, sp)
    req = eng.requests[rid]
    while not req.output_token_ids:
        eng.step()
    _sync()
    t1 = time.perf_counter()
    if prof is not None:
        prof.start()
    while not req.is_finished:
        eng.step()
    _sync()
    t2 = time.perf_counter()
    if prof is not None:
        prof.stop()
    return (t1 - t) * 1e3, (t2 - t1) * 1e3


def run(setting: str) -> dict:
    dummy = {"load_format": "dummy", "dtype": "bfloat16"} if DEVICE == "cuda" else \
        {"dtype": "float32", "device": "cpu", "num_kv_pages": 64}
    if os.environ.get("LIKE_BENCH") == "1":
        n = CONTEXT + TOKENS + 16
        eng_kw = dict(max_model_len=n, num_kv_pages=-(-n // 16) + 4, max_num_batched_tokens=max(2048, CONTEXT),
                      enable_prefix_caching=False)
        if DEVICE == "cpu":
            dummy.pop("num_kv_pages")
    else:
        eng_kw = dict(max_model_len=CONTEXT + TOKENS + 64, enable_prefix_caching=False)
    llm = LLM(MODEL, seed=0, max_num_seqs=1, **eng_kw, **dummy, **OPTIONS[setting])
    vocab = llm.engine.model_cfg.vocab_size
    prompt = [(i * 7919 + 1) % vocab for i in range(CONTEXT)]
    sp = SamplingParams(temperature=0, max_tokens=TOKENS + 1, ignore_eos=True)
    _request(llm, prompt, sp, "warm")                            # warm-up (graphs, compiles)
    prefill_ms, plain_ms = _request(llm, prompt, sp, "plain")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    stack = os.environ.get("STACK") == "1"          # where the stream syncs come from (Python stacks)
    prof = torch.profiler.profile(activities=acts, with_stack=stack)
    _, prof_ms = _request(llm, prompt, sp, "profiled", prof)
    if stack:
        for e in prof.key_averages(group_by_stack_n=6):
            if e.key == "cudaStreamSynchronize":
                print(f"  sync x{e.count}: " + " <- ".join(f for f in e.stack if "tierserve" in f or "scripts" in f))
    ev = prof.key_averages()
    gpu = top(ev, "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total", 25)
    cpu = top(ev, "self_cpu_time_total", 25)
    self_key = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    busy = sum(getattr(e, self_key) for e in ev) / TOKENS       # GPU busy (kernels + copies) a token
    del llm, prof, ev
    gc.collect()                                   # the engine's graphs hold cycles: free its KV cache now
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"prefill_ms": prefill_ms, "decode_ms": plain_ms, "decode_ms_per_token": plain_ms / TOKENS,
            "profiled_decode_ms": prof_ms,
            "gpu_busy_us_per_token": busy, "gpu_kernels": gpu, "host_ops": cpu}


def main() -> None:
    dev = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    out = {"context": CONTEXT, "tokens": TOKENS, "device": dev, "like_bench": os.environ.get("LIKE_BENCH") == "1",
           "settings": {}}
    for s in os.environ.get("SETTINGS", "bf16,fp8-kv").split(","):
        r = out["settings"][s] = run(s)
        print(f"== {s}: prefill {r['prefill_ms']:.1f} ms, decode {r['decode_ms_per_token']:.3f} ms a token "
              f"(profiled decode {r['profiled_decode_ms']:.1f} ms for {TOKENS}; GPU busy "
              f"{r['gpu_busy_us_per_token']:.0f} us a token)")
        for row in r["gpu_kernels"][:10]:
            print(f"  gpu {row['us_per_token']:8.1f} us/tok x{row['calls_per_token']:6.1f}  {row['name'][:70]}")
        for row in r["host_ops"][:10]:
            print(f"  cpu {row['us_per_token']:8.1f} us/tok x{row['calls_per_token']:6.1f}  {row['name'][:70]}")
    with open(f"{OUT}/{os.environ.get('NAME', 'engine-loop-profile-h200')}.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
