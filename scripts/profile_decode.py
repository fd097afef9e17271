"""Where a decode step's time goes on the GPU (issue 3: "report what you reached ... with the profile that shows
where the time goes"). Llama-3.1-8B shape, dummy bf16 weights; for each batch in BATCHES (default 1,16) at
CONTEXT (default 2048): the engine decodes a few tokens (graphs captured), then

* the step time: median of CUDA-event-timed replays of the decode graph of that batch's bucket;
* the kernels: torch.profiler over eager runs of the same captured forward (``DecodeGraphs._forward``, the
  graph's exact kernels and inputs), grouped by kernel name and by kind (GEMV/GEMM, attention, norm,
  rotary, activation, sampling/other), per step, with each kind's share of the step;
* the roofline: weights + KV read per step / the device-to-device copy bandwidth of the same run.

Writes $OUT/decode-profile-h200.json and prints a table. Replays write K/V past the request's tokens into its
last page or the scratch page (outputs are discarded).

Other decode paths (issue 6): ``SETTING`` = ``sparse`` / ``fp8-kv`` / ``sparse+fp8-kv`` / ``fp8-weights`` /
``sparse+fp8-kv+fp8-weights`` (engine
options as in ``bench sparse-fp8``; sparse top-2048 tokens) and ``FILL=synthetic`` (batch 1 only: the context's
K/V written as random values instead of a prefill -- a 128k FP8 prefill takes over a minute) write
``$OUT/decode-profile-<setting>-c<context>-h200.json``. ``GPU_FRAC`` (with ``FILL=synthetic``; e.g. 0.1): the KV
pool holds that share of the context's pages and the rest spills to a CPU-RAM tier (the oldest pages, as
``bench sparse-fp8``'s section c does); the graphs profiled are the spill set (steps that read spilled pages)
-> ``decode-profile-tiered-<setting>-c<context>-h200.json``. ``PAGE_SIZE`` (not with ``GPU_FRAC``): the engine's KV page
size (``-page<N>`` in the file name)."""
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.bench.decode import copy_bandwidth, untied_embedding_bytes  # noqa: E402
from tierserve.bench.gpu_timer import device_kernels  # noqa: E402
from tierserve.bench.results import tierserve_env  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,16").split(",")]
CONTEXT = int(os.environ.get("CONTEXT", 2048))
STEPS = 20
SETTING = os.environ.get("SETTING", "bf16")
SETTINGS = {"bf16": {}, "sparse": {"sparse_attention": "pages", "sparse_topk_tokens": 2048},
            "fp8-kv": {"kv_dtype": "fp8"}, "fp8-weights": {"quantization": "fp8"},
            "sparse+fp8-kv": {"sparse_attention": "pages", "sparse_topk_tokens": 2048, "kv_dtype": "fp8"},
            "sparse+fp8-kv+fp8-weights": {"sparse_attention": "pages", "sparse_topk_tokens": 2048, "kv_dtype": "fp8",
                                          "quantization": "fp8"}}
SYNTHETIC = os.environ.get("FILL", "prefill") == "synthetic"
GPU_FRAC = float(os.environ["GPU_FRAC"]) if os.environ.get("GPU_FRAC") else None
SPILL = GPU_FRAC is not None
PAGE = int(os.environ["PAGE_SIZE"]) if os.environ.get("PAGE_SIZE") else None     # (not with GPU_FRAC)
KINDS = [("gemv/gemm", ("gemv", "gemm", "cutlass", "sm90", "nvjet", "matmul", "splitk")),
         ("attention", ("decode", "attn", "flash", "merge")),
         ("sparse selection", ("page_score", "topk", "two_level")),
         ("norm", ("rms", "norm")), ("rotary", ("rope", "rotary")), ("activation", ("silu", "act", "mul")),
         ("copy/index", ("copy", "index", "gather", "scatter", "fill", "cat")), ("argmax/sampling", ("argmax", "max", "sort"))]


def step_ms(graphs, bs: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(STEPS):
        start.record()
        graphs.replay(bs, spill=SPILL)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels(graphs, bs: int) -> tuple[list[dict], dict]:
    with torch.inference_mode():
        for _ in range(3):
            graphs._forward(bs, SPILL)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                graphs._forward(bs, SPILL)
            torch.cuda.synchronize()
    return device_kernels(prof, KINDS, STEPS)


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    if SYNTHETIC and BATCHES != [1]:
        sys.exit("FILL=synthetic profiles batch 1 only (BATCHES=1)")
    if SPILL and not SYNTHETIC:
        sys.exit("GPU_FRAC needs FILL=synthetic")
    tier = {}
    if SPILL:       # Llama-3.1-8B pages: 32 layers x K/V x (16 + 1 summary row) x 8 heads x 128 x 2 bytes; with
        # FP8 KV pages spilled pages are compact FP8 rows in CPU RAM (about half: 1M tokens fit in host RAM)
        from tierserve.quant.fp8_compact import slot_bytes
        pages = -(-(CONTEXT + 256) // 16)
        gpu = max(64, math.ceil(GPU_FRAC * pages))
        fp8 = SETTINGS[SETTING].get("kv_dtype") == "fp8"
        page_bytes = 2 * 32 * slot_bytes(16, 8, 128, 1, 2) if fp8 else 2.2 * 2**20
        tier = dict(num_kv_pages=gpu, cpu_kv_gb=(pages - gpu + 64) * page_bytes / 2**30,
                    max_num_batched_tokens=min(8192, gpu // 4 * 16))
    llm = LLM(os.environ.get("MODEL", "llama-3.1-8b"), load_format="dummy", dtype="bfloat16", seed=0,
              max_num_seqs=max(BATCHES), max_model_len=CONTEXT + 256, enable_prefix_caching=False,
              **SETTINGS[SETTING], **tier, **({"page_size": PAGE} if PAGE else {}))
    eng, runner = llm.engine, llm.engine.runner
    graphs = runner.graphs
    if graphs is None:
        sys.exit("no CUDA graphs in this engine")
    if SPILL and not graphs.spill_graphs:
        sys.exit("GPU_FRAC: no spill graphs were captured (see the engine's warnings)")
    # DESIGN.md's roofline (and bench decode's) counts every parameter; a step really reads one row of an
    # untied embedding table, so the bytes it must read are fewer: both are reported
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    read_bytes = weight_bytes - untied_embedding_bytes(runner.model)
    kv_per_token = runner.layout.bytes_per_token
    opts = SETTINGS[SETTING]             # KV bytes a sparse / FP8 step reads (bench sparse-fp8's accounting)
    if opts.get("sparse_attention"):
        kv_per_token *= min(CONTEXT, opts["sparse_topk_tokens"] + 80) / CONTEXT
    if opts.get("kv_dtype") == "fp8":
        kv_per_token *= 0.5
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "context": CONTEXT,
              "setting": SETTING, "engine_options": SETTINGS[SETTING],
              "kv_fill": "synthetic" if SYNTHETIC else "prefill", "gpu_frac": GPU_FRAC, **tier,
              "copy_bandwidth_GBps": bw / 1e9, "weight_bytes": weight_bytes, "weight_bytes_read": read_bytes,
              "batches": {}, "env": tierserve_env()}
    vocab = eng.model_cfg.vocab_size
    for bs in BATCHES:
        if SYNTHETIC:
            from tierserve.bench.sparse_fp8_tiers import synthetic_prefill
            # chunks of the engine's own step budget: with FP8 KV pages in a compact pool the full-precision pool
            # holds about one step's pages (8192-token chunks stopped at "full at 0 of 131072 tokens", stop 27)
            chunk = tier.get("max_num_batched_tokens", eng.config.max_num_batched_tokens)
            req = synthetic_prefill(eng, "synthetic", CONTEXT - CONTEXT % 16, 8, chunk - chunk % 16, float("inf"), 0)
            while not req.is_finished:
                eng.step()
        else:
            prompts = [[(i * 7919 + j * 104729 + 1) % vocab for i in range(CONTEXT)] for j in range(bs)]
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        b = graphs.bucket_for(bs)
        t0 = time.perf_counter()
        ms = step_ms(graphs, b)
        ks, by_kind = kernels(graphs, b)
        total = sum(by_kind.values())
        kv_step = b * (CONTEXT + 8) * kv_per_token
        bytes_step = weight_bytes + kv_step
        result["batches"][str(bs)] = {
            "bucket": b, "replay_ms": ms, "tok_s": b / ms * 1e3, "roofline_ms": bytes_step / bw * 1e3,
            "roofline_frac": bytes_step / bw * 1e3 / ms,
            "roofline_frac_bytes_read": (read_bytes + kv_step) / bw * 1e3 / ms, "kernel_us_sum_eager": total,
            "kernel_launches": sum(k["calls"] for k in ks),
            "by_kind_us": by_kind, "by_kind_share": {k: v / total for k, v in by_kind.items()},
            "top_kernels": ks[:25], "profile_s": time.perf_counter() - t0,
            "step_kinds": dict(runner.step_kinds), "spilled_pages": eng.kv.num_spilled}
        r = result["batches"][str(bs)]
        print(f"batch {bs} (bucket {b}) ctx {CONTEXT}: replay {ms:.3f} ms = {r['tok_s']:.0f} tok/s, roofline "
              f"{r['roofline_ms']:.3f} ms ({r['roofline_frac']:.3f}); kernels {total / 1e3:.3f} ms in "
              f"{r['kernel_launches']:.0f} launches")
        for k, v in r["by_kind_us"].items():
            print(f"   {k:18s} {v:9.1f} us  {v / total:6.1%}")
        for k in ks[:12]:
            print(f"   {k['us']:9.1f} us x{k['calls']:5.0f}  {k['kernel'][:90]}")
    name = "decode-profile-h200.json" if SETTING == "bf16" and not SYNTHETIC else \
        f"decode-profile-{'tiered-' if SPILL else ''}{SETTING}-c{CONTEXT}{f'-page{PAGE}' if PAGE else ''}-h200.json"
    with open(f"{OUT}/{name}", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {OUT}/{name}")


if __name__ == "__main__":
    main()
