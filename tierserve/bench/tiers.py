"""Tiered-KV benchmark (issue 5): TTFT of a long prompt cold and on a prefix hit from each tier, and
decode speed with only part of the sequence's KV on the GPU -- with the tiers' raw bandwidths (pinned
host->device copy, disk read) measured in the same run as the baselines.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from tierserve.bench.results import make_result


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_bandwidths(dev: torch.device, disk_dir: str, nbytes: int = 256 << 20) -> dict[str, float]:
    """Pinned host->device copy and local-disk read (after a write + fsync; page cache not dropped)."""
    out = {}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(host)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(host, non_blocking=True)
    _sync(dev)
    out["host_to_device_GBps"] = 3 * nbytes / (time.perf_counter() - t) / 1e9
    path = os.path.join(disk_dir, "bw.bin")
    data = os.urandom(1 << 20) * (nbytes >> 20)
    with open(path, "wb") as f:
        t = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        out["disk_write_GBps"] = nbytes / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    out["disk_read_GBps"] = nbytes / (time.perf_counter() - t) / 1e9
    os.unlink(path)
    return out


def _free(dev) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up(llm, vocab: int, n: int) -> None:
    """Compile and capture what the timed runs use, on tokens no timed prompt shares."""
    from tierserve import SamplingParams

    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(-1 % 2**31)).tolist()
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))


def _ttft(llm, prompt) -> tuple[float, dict]:
    from tierserve import SamplingParams

    dev = llm.engine.runner.device
    _sync(dev)
    t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    _sync(dev)
    return time.perf_counter() - t, out.cached_tokens_by_tier


def hf_baselines(model: str | None, load_format: str, ctx: int, new_tokens: int, progress=None) -> list[dict]:
    """transformers on the same shapes in the same run: decode with its default (all-GPU) cache and with its
    offloaded cache (layers' KV in CPU RAM, prefetched one layer ahead) -- the baseline for tiered decode."""
    import gc

    from tierserve.bench.decode import DecodeCase, _hf_model, run_transformers
    from tierserve.loader.hf import resolve_model_path

    gc.collect()
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    hf = _hf_model(resolve_model_path(model), load_format, dev, torch.bfloat16)
    prompt = torch.randint(3, hf.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    for cache in ("dynamic", "offloaded"):
        kw = {} if cache == "dynamic" else {"cache_implementation": "offloaded"}
        # the offloaded cache decodes at ~0.6 tok/s at 128k: 8 tokens measure its rate
        case = DecodeCase(1, ctx, new_tokens if cache == "dynamic" else min(new_tokens, 8))
        try:
            r = run_transformers(hf, case, prompt, **kw)
        except torch.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        r.pop("tokens", None)
        rows.append({"kind": "decode", "engine": "transformers", "cache": cache, "context": ctx, **r})
        if progress:
            progress(rows[-1])
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_tiers(model: str | None, contexts: list[int], *, load_format: str = "dummy", device: str = "auto",
                gpu_fracs: tuple[float, ...] = (1.0, 0.6, 0.5, 0.25, 0.1), new_tokens: int = 32,
                cpu_kv_gb: float = 8.0, policy: str = "cost", progress=None) -> dict:
    from tierserve import LLM, SamplingParams

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tierserve-tiers-") as disk:
        common = dict(load_format=load_format, device=device, max_model_len=max(contexts) + new_tokens + 1,
                      max_num_seqs=4, kv_load_policy=policy)
        bw = page_bytes = vocab = None
        for ctx in contexts:
            # one engine per context (each takes most of the GPU for its pool), warmed up on other tokens
            # (kernels compiled for fresh and continued chunks) before the cold prefill is timed
            llm = LLM(model, cpu_kv_gb=cpu_kv_gb, disk_kv_dir=disk, **common)
            dev = llm.engine.runner.device
            if bw is None:
                bw = measure_bandwidths(dev, disk)
                page_bytes = llm.engine.runner.layout.bytes_per_page
                vocab = llm.engine.model_cfg.vocab_size
            _warm_up(llm, vocab, min(ctx, 2 * llm.engine.config.max_num_batched_tokens + 17))
            prompt = torch.randint(3, vocab, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
            for case in ("cold", "gpu", "cpu"):
                if case == "cpu":
                    llm.engine.demote_prefix_cache()              # cached pages move to CPU RAM
                s, tiers = _ttft(llm, prompt)
                rows.append({"kind": "ttft", "context": ctx, "hit": case, "ttft_s": s, "served_by": tiers})
                if progress:
                    progress(rows[-1])
            llm.engine.kv.tiers.flush()
            del llm
            _free(dev)
            fresh = LLM(model, disk_kv_dir=disk, **common)        # new engine: only the disk tier has it
            _warm_up(fresh, vocab, min(ctx, 2 * fresh.engine.config.max_num_batched_tokens + 17))
            s, tiers = _ttft(fresh, prompt)
            nbytes = tiers.get("disk", 0) / fresh.engine.config.page_size * page_bytes
            rows.append({"kind": "ttft", "context": ctx, "hit": "disk", "ttft_s": s, "served_by": tiers,
                         "disk_bytes": nbytes})
            if progress:
                progress(rows[-1])
            del fresh
            _free(dev)
        ctx = max(contexts)
        prompt = torch.randint(3, vocab, (ctx,), generator=torch.Generator().manual_seed(1)).tolist()
        total_pages = -(-(ctx + new_tokens) // 16) + 2
        ref_tokens = None
        for frac in gpu_fracs:
            pages = max(4, int(total_pages * frac))
            spill_gb = (total_pages - pages) * page_bytes / 1e9      # what must leave the GPU
            kw = dict(common, num_kv_pages=pages, cpu_kv_gb=min(cpu_kv_gb, 1.1 * spill_gb + 0.5),
                      enable_prefix_caching=False,
                      max_num_batched_tokens=min(2048, max(64, (pages - 2) * 16)))
            llm = LLM(model, **kw)
            sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            eng = llm.engine
            eng.add_request("d", prompt, sp)
            while not eng.requests["d"].output_token_ids:
                eng.step()
            _sync(eng.runner.device)
            t, n0 = time.perf_counter(), len(eng.requests["d"].output_token_ids)
            req = eng.requests["d"]
            while eng.has_unfinished_requests():
                eng.step()
            _sync(eng.runner.device)
            dt = time.perf_counter() - t
            n = len(req.output_token_ids) - n0
            kv_bytes = (ctx + new_tokens) * eng.runner.layout.bytes_per_token
            tokens = list(req.output_token_ids)
            ref_tokens = ref_tokens if ref_tokens is not None else tokens      # the first (all-GPU) run
            rows.append({"kind": "decode", "engine": "tierserve", "context": ctx, "gpu_frac": frac, "gpu_pages": pages,
                         "gpu_kv_gib": pages * page_bytes / 2**30, "gpu_kv_saving": 1 - pages / total_pages,
                         "tok_s": n / dt, "spilled_pages": eng.kv.num_spilled,
                         "kv_read_GBps": kv_bytes * (1 - min(frac, 1.0)) * n / dt / 1e9,
                         "tokens_equal_first_run": tokens == ref_tokens})
            if progress:
                progress(rows[-1])
            del llm
            _free(dev)
        if dev.type == "cuda":
            rows += hf_baselines(model, load_format, ctx, new_tokens, progress)
    summary = dict(bw)
    for ctx in contexts:
        cold = next(r["ttft_s"] for r in rows if r["kind"] == "ttft" and r["context"] == ctx and r["hit"] == "cold")
        for hit in ("gpu", "cpu", "disk"):
            r = next(r for r in rows if r["kind"] == "ttft" and r["context"] == ctx and r["hit"] == hit)
            summary[f"ttft_{hit}_over_cold_c{ctx}"] = r["ttft_s"] / cold
    settings = dict(model=model or "tierserve-nano", load_format=load_format, contexts=contexts,
                    gpu_fracs=list(gpu_fracs), new_tokens=new_tokens, cpu_kv_gb=cpu_kv_gb, policy=policy)
    return make_result("tierserve bench", "tiers", settings, rows, summary)
