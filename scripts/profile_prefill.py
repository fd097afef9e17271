"""Where a long cold prefill's time goes on the GPU (issue 5: a 128k cold prefill took 18.3 s, transformers 11.9 s
in the same `bench tiers` run). Llama-3.1-8B shape, dummy bf16 weights, one prompt of CONTEXT tokens (default
131072) in chunks of CHUNK (default 8192): the whole prefill once untimed (warm-up at a shorter length), then
timed per engine step with CUDA events, and once more under torch.profiler: device time per kernel name and
per kind, the share of the total, host time per op. Writes $OUT/prefill-profile-h200.json."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.bench.gpu_timer import device_kernels  # noqa: E402
from tierserve.attention import flash_prefix  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
CONTEXT = int(os.environ.get("CONTEXT", 131072))
CHUNK = int(os.environ.get("CHUNK", 8192))
KINDS = [("flash attention", ("flash", "fmha", "attention")), ("gemm", ("gemm", "cutlass", "sm90", "nvjet", "matmul")),
         ("paged prefill", ("prefill", "paged")), ("copy/gather", ("copy", "index", "gather", "cat", "elementwise")),
         ("norm/rope/act", ("rms", "rope", "silu", "norm"))]


def prefill(llm, n: int, seed: int) -> list[float]:
    """One cold prefill of n tokens; device ms of each engine step."""
    eng = llm.engine
    vocab = eng.model_cfg.vocab_size
    eng.add_request(f"p{seed}", [(i * 7919 + seed * 104729 + 1) % vocab for i in range(n)],
                    SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    times = []
    while eng.has_unfinished_requests():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        eng.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def main() -> None:
    llm = LLM(os.environ.get("MODEL", "llama-3.1-8b"), load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=1,
              max_model_len=CONTEXT + 64, max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
    prefill(llm, min(CONTEXT, 4 * CHUNK), 0)
    t = time.perf_counter()
    steps = prefill(llm, CONTEXT, 1)
    wall = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill(llm, CONTEXT, 2)
    kernels, by_kind_us = device_kernels(prof, KINDS)
    host_rows = {}
    for a in prof.key_averages():
        if a.self_cpu_time_total > 0:
            host_rows[a.key] = {"op": a.key[:120], "self_cpu_ms": a.self_cpu_time_total / 1e3, "calls": a.count}
    total = sum(by_kind_us.values()) / 1e3
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": CONTEXT, "chunk": CHUNK,
              "prefill_s": wall, "step_ms": steps, "kernel_ms_total": total,
              "by_kind_ms": {k: v / 1e3 for k, v in by_kind_us.items()},
              "top_kernels": [{**r, "ms": r["us"] / 1e3} for r in kernels[:30]],
              "top_host_ops": sorted(host_rows.values(), key=lambda r: -r["self_cpu_ms"])[:20],
              "flash_prefix_on": bool(llm.engine.runner.backend.__dict__.get("flash_prefix", None)),
              "prefill_attention_kernel": (flash_prefix._CHOSEN or [None])[0],
              "TIERSERVE_PREFILL_ATTN": os.environ.get("TIERSERVE_PREFILL_ATTN", "auto")}
    print(f"cold prefill {CONTEXT} tokens in chunks of {CHUNK}: {wall:.2f} s ({len(steps)} steps; first "
          f"{steps[0]:.0f} ms, last {steps[-1]:.0f} ms); kernels {total / 1e3:.2f} s; flash prefix path "
          f"{result['flash_prefix_on']}, kernel {result['prefill_attention_kernel']}")
    for k, v in result["by_kind_ms"].items():
        print(f"   {k:16s} {v / 1e3:8.2f} s  {v / total:6.1%}")
    for r in result["top_kernels"][:12]:
        print(f"   {r['ms']:9.1f} ms x{r['calls']:6.0f}  {r['kernel'][:90]}")
    name = os.environ.get("NAME", "prefill-profile-h200.json")
    with open(f"{OUT}/{name}", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {OUT}/{name}")


if __name__ == "__main__":
    main()
