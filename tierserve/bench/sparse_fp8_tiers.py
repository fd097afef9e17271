"""Section c of `tierserve bench sparse-fp8` (see sparse_fp8.py): decode with ~10% of the sequence's KV pages on the GPU and the rest
in CPU RAM (``num_kv_pages`` = the GPU share, ``cpu_kv_gb`` for the others), sparse pages top-k: the selector
scores every page from its key min/max summary (kept on the GPU) and attention reads only the chosen pages,
from the GPU or straight from pinned host memory.

Contexts up to ``prefill_max`` are prefilled for real (densely, see sparse_fp8.py). Longer ones are filled
synthetically (``synthetic_prefill``): the request's pages are allocated through the KV manager chunk by chunk
-- which spills the oldest to CPU RAM as the pool fills, as a prefill would -- and filled with N(0, 1) keys and
values plus their summary rows, and the request is marked as having computed them; its last prompt token is then
computed by an ordinary engine step. A context whose CPU tier does not fit in host RAM is a skipped row with the
bytes; the largest power-of-two context that does fit is then measured instead (``fallback_for``).

``tiered-sparse+fp8-kv``: the same with ``kv_dtype="fp8"``; spilled pages sit in CPU RAM as compact FP8 rows (about
half a bf16 page: the host-bytes estimate uses the row size), and the GPU pool keeps room for the pages read at full
precision (sink, recent window), which never spill. Contexts above 4 chunks are filled synthetically: steps with
prefill over spilled FP8 pages stage those rows on the device per layer (``paged_prefill_fp8(host=...)``), but
that path has not run on a GPU yet, and its fallback (the torch reference) needs O(chunk x context) memory.
"""
from __future__ import annotations

import math
import time

import torch

from tierserve.bench.engram import _host_available as host_available
from tierserve.bench.sparse_fp8_run import DENSE_PREFILL, Bench, Budget, check
from tierserve.config import EngineConfig
from tierserve.quant.fp8_compact import slot_bytes

SYNTHETIC = "synthetic: N(0,1) K/V written into the pages (no prefill), oldest pages spilled to CPU RAM"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fill(data: torch.Tensor, pids: list[int], page_size: int, gen: torch.Generator) -> None:
    idx = torch.tensor(pids, dtype=torch.int64, device=data.device)
    L, _, rows, H, D = data.shape[1:]
    x = torch.randn((len(pids), L, 2, page_size, H, D), generator=gen, device=data.device, dtype=data.dtype)
    data[idx, :, :, :page_size] = x
    if rows > page_size:                 # the sparse selector's per-page key min / max rows
        data[idx, :, 0, page_size] = x[:, :, 0].amin(2)
        data[idx, :, 1, page_size] = x[:, :, 0].amax(2)


def synthetic_prefill(eng, rid: str, n_tokens: int, new_tokens: int, chunk: int, deadline: float, seed: int):
    """A running request whose first ``n_tokens`` (a multiple of the page size) are in the KV cache, filled with
    random values instead of computed; its prompt has one more token, computed by the next engine step. With FP8
    KV pages the filled pages start at full precision and are quantised after each chunk, as a prefill's are
    (then the oldest spill as compact FP8 rows)."""
    from tierserve import SamplingParams
    from tierserve.engine.request import Status

    ps, kv, runner = eng.config.page_size, eng.kv, eng.runner
    if n_tokens % ps or chunk % ps:
        raise ValueError(f"n_tokens ({n_tokens}) and chunk ({chunk}) must be multiples of the page size {ps}")
    prompt = torch.randint(3, eng.model_cfg.vocab_size, (n_tokens + 1,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    req = eng.requests[rid]
    eng.scheduler.waiting.remove(req)
    gen = torch.Generator(device=runner.device).manual_seed(seed)
    done = 0
    while done < n_tokens:
        check(deadline, f"the synthetic fill, at {done} of {n_tokens} tokens")
        before = len(kv.page_table(rid)) if kv.has(rid) else 0
        n = min(chunk, n_tokens - done)
        if not kv.allocate(rid, done + n):            # spills the oldest complete pages to CPU RAM
            raise RuntimeError(f"KV pool and CPU tier are full at {done} of {n_tokens} tokens")
        if kv.tiers is not None:                      # those pages leave before their GPU pages are reused
            runner.tiers_apply(kv.tiers.take_transfers())
        fresh = kv.page_table(rid)[before:]
        if runner.fp8 is not None:                    # written at full precision (a recycled page starts over)
            runner.fp8.on_write(torch.tensor(fresh, dtype=torch.int64, device=runner.device))
        _fill(runner.kv.data, fresh, ps, gen)
        done += n
        kv.commit(rid, req.all_token_ids, done)
        if runner.fp8 is not None:                    # pages out of every full-precision window -> FP8 now
            runner.fp8.quantise(runner.kv.data, kv.take_quantise())
    req.num_computed_tokens, req.num_cached_tokens, req.status = n_tokens, 0, Status.RUNNING
    eng.scheduler.running.append(req)
    return req


def section_c(bench: Bench, deadline: float) -> None:
    from tierserve.loader.hf import load_config, resolve_model_path
    from tierserve.models.config import ModelConfig
    from tierserve.runner.model_runner import resolve_device, resolve_dtype

    s, common = bench.sizes, bench.common
    cfg = ModelConfig.from_hf(load_config(resolve_model_path(bench.model)))
    item = resolve_dtype(common["dtype"], cfg, resolve_device(common["device"])).itemsize
    ps, new = bench.page_size, s.long_new_tokens
    page_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item * (ps + 1)
    # kv_dtype=fp8: spilled pages sit in CPU RAM as compact FP8 rows (codes, scales, the key min/max row)
    fp8_bytes = 2 * cfg.num_layers * slot_bytes(ps, cfg.num_kv_heads, cfg.head_dim, 1, item)
    fp8_cfg = EngineConfig()            # keep_sink / keep_recent defaults: those pages stay on the GPU
    fp8_full = -(-fp8_cfg.kv_fp8_keep_sink // ps) + -(-fp8_cfg.kv_fp8_keep_recent // ps) + 2

    def plan(ctx: int, fp8: bool = False) -> dict:
        total = -(-(ctx + new + 16) // ps)
        gpu = max(4, math.ceil(s.gpu_frac * total))
        if fp8:               # the full-precision pages (sink, recent window) never spill: room for them + a chunk
            gpu = max(gpu, 2 * fp8_full)
        nbytes = fp8_bytes if fp8 else page_bytes
        return {"context": ctx, "seq_pages": total, "gpu_pages": gpu, "gpu_share": gpu / total,
                "host_pages": total - gpu + 8, "host_bytes": (total - gpu + 8) * nbytes,
                "host_page_bytes": nbytes}

    def limit() -> tuple[int, str]:
        avail = host_available()
        usable = avail - 8 * 2**30
        why = f"MemAvailable {avail / 2**30:.1f} GiB - 8 GiB"
        if s.host_ram_gb is not None and s.host_ram_gb * 2**30 < usable:
            usable, why = int(s.host_ram_gb * 2**30), f"--host-ram-gb {s.host_ram_gb:g}"
        return usable, why

    # the bf16 baseline first, then what can meet the targets (PCIe bytes halved by FP8 rows, weights by FP8
    # weights; FP8 rows also make 1M tokens fit in host RAM), then the diagnostic rows
    c0, rest = s.tier_contexts[0], s.tier_contexts[1:]
    both = {"kv_dtype": "fp8", "quantization": "fp8"}
    settings = [("tiered-sparse", {"context": c0}),
                *[("tiered-sparse+fp8-kv+fp8-weights", {"context": c, **both}) for c in s.tier_contexts],
                ("tiered-sparse+fp8-kv+fp8-weights+fp8-lm-head", {"context": c0, **both, "fp8_lm_head": True}),
                ("tiered-sparse+fp8-kv", {"context": c0, "kv_dtype": "fp8"}),
                *[("tiered-sparse", {"context": c}) for c in rest]]

    def one(name, setting, deadline):
        fp8 = setting.get("kv_dtype") == "fp8"
        p = plan(setting["context"], fp8)
        ctx = p["context"]
        # FP8: the staged prefill over spilled FP8 pages is not yet measured on a GPU (its fallback, the torch
        # reference, needs O(chunk x context) memory), so only short contexts are prefilled for real
        synthetic = setting.get("synthetic", ctx > s.prefill_max or (fp8 and ctx > 4 * s.chunk))
        row = {**p, "batch": 1, "new_tokens": new, "sparse_topk_tokens": s.topk,
               "kv_fill": SYNTHETIC if synthetic else DENSE_PREFILL}
        usable, why = limit()
        if p["host_bytes"] > usable:
            fit = 1 << int(math.log2(max(ctx, 2)))
            while fit > s.prefill_max and plan(fit, fp8)["host_bytes"] > usable:
                fit //= 2
            if fit > s.prefill_max and "fallback_for" not in setting:
                settings.append((name, {**setting, "context": fit, "fallback_for": ctx}))
            what = (f"compact FP8 rows of {ps} tokens (e4m3 K+V codes, per-head scales and the key min/max "
                    f"row, all layers)") if fp8 else \
                f"pages of {ps} tokens (K+V plus the key min/max row, all layers, {item}-byte values)"
            row["skipped"] = (
                f"the CPU tier needs {_gib(p['host_bytes'])} (page-locked at its exact size) for "
                f"{p['host_pages']} {what} of {p['host_page_bytes'] / 2**20:.3f} MiB each; usable host RAM "
                f"{_gib(usable)} ({why})")
            return row
        gpu_why = bench.gpu_room(p["gpu_pages"], sparse=True)
        if gpu_why:
            return {**row, "skipped": gpu_why}
        chunk = min(s.chunk, (p["gpu_pages"] - (fp8_full if fp8 else 0)) // 2 * ps)
        extra = {k: v for k, v in setting.items() if k in ("kv_dtype", "quantization", "fp8_lm_head")}
        llm, build_s = bench.build(max_model_len=ctx + new + 16, num_kv_pages=p["gpu_pages"],
                                   cpu_kv_gb=(p["host_pages"] + 4) * p["host_page_bytes"] / 2**30,
                                   sparse_attention="pages",
                                   sparse_topk_tokens=s.topk, max_num_batched_tokens=chunk, **extra)
        eng = llm.engine
        row["build_s"] = build_s
        if synthetic:
            t = time.perf_counter()
            req = synthetic_prefill(eng, "synthetic", ctx, new + s.decode_warmup_steps, chunk, deadline, bench.seed)
            row["fill_s"] = time.perf_counter() - t
            t = time.perf_counter()
            while not req.output_token_ids:           # the last prompt token: an ordinary (decode-shaped) step
                check(deadline, "the first step after the synthetic fill")
                eng.step()
            row["first_step_s"] = time.perf_counter() - t
            out = bench.decode(eng, req, deadline, warmup_steps=s.decode_warmup_steps)
            out.pop("tokens")
        else:          # a prefill whose attention reads the spilled context from CPU RAM: give it a bounded share
            try:
                out = bench.long_run(llm, ctx, new, min(deadline, time.perf_counter() + s.tier_prefill_budget),
                                     dense_prefill=True, warmup_steps=s.decode_warmup_steps)
            except Budget as e:
                settings.append((name, {**setting, "synthetic": True, "fallback_for": "prefill"}))
                return {**row, "skipped": f"{e} (limit {s.tier_prefill_budget:.0f} s for this prefill); "
                                          "measured with a synthetic fill instead"}
        row.update(out, spilled_pages=eng.kv.num_spilled, promoted_pages=eng.kv.num_promoted,
                   demoted_pages=eng.kv.num_demoted,
                   host_reads_in_kernel=getattr(eng.runner.backend, "fp8_host_reads" if fp8 else "host_reads", None),
                   **bench.facts(eng, ctx, {"sparse_attention": "pages", **extra}))
        del llm, eng
        return row
    bench.run_settings("c", settings, deadline, one)
