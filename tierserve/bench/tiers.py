"""Tiered-KV benchmark (issue 5): TTFT of a long prompt cold and on a prefix hit from each tier (tiers_ttft.py),
decode speed with only part of the sequence's KV on the GPU (tiers_decode.py) and transformers' caches on the
same prompt (tiers_hf.py) -- with the raw bandwidths they are bounded by (pinned host -> device copy, disk read
with the page cache dropped: tiers_io.py) measured in the same run.

Every row is streamed to ``partial_path`` (JSON lines) as it is produced, so a run stopped by a time limit keeps
them (``result_from_partial`` turns that file into a result). ``time_budget_s`` bounds the run: a step whose
estimated time no longer fits is a skipped row that says why, and time is kept for the transformers baselines.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from tierserve.bench.results import make_result, row_emitter
from tierserve.bench.results import result_from_partial as _result_from_partial
from tierserve.bench.tiers_io import Budget, measure_bandwidths
from tierserve.bench.tiers_ttft import HITS, hit_paths


def _free(host: bool = False) -> None:
    """Give back device memory; with ``host`` also the pinned host memory torch's allocator caches (staging
    buffers; the CPU tiers themselves are page-locked at their exact size and unlocked when freed)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if host and empty_host is not None:
            empty_host()


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_reserve(cold_s: float, on_gpu: bool) -> float:
    """Seconds kept for the transformers baselines: loading, two prefills, a few decode steps."""
    return 30 + 1.4 * cold_s + 16 * 0.15 + 4 * 2.5 if on_gpu else 0.0


def bench_tiers(model: str | None, contexts: list[int], *, load_format: str = "dummy", device: str = "auto",
                gpu_fracs: tuple[float, ...] = (1.0, 0.6, 0.5, 0.25, 0.1), new_tokens: int = 32,
                cpu_kv_gb: float = 8.0, policy: str = "cost", time_budget_s: float = 500.0,
                disk_bw_bytes: int = 2 << 30, disk_root: str | None = None, partial_path: str | None = None,
                progress=None) -> dict:
    from tierserve import LLM
    from tierserve.kv.tiers import io as tier_io

    contexts = sorted(contexts)
    settings = dict(model=model or "tierserve-nano", load_format=load_format, contexts=contexts,
                    gpu_fracs=list(gpu_fracs), new_tokens=new_tokens, cpu_kv_gb=cpu_kv_gb, policy=policy,
                    time_budget_s=time_budget_s, kv_prefetch=False, read_workers=tier_io.READ_WORKERS)
    rows: list[dict] = []
    emit = row_emitter(rows, settings, partial_path, progress)
    budget = Budget(time_budget_s)
    common = dict(load_format=load_format, device=device, max_model_len=max(contexts) + new_tokens + 1,
                  max_num_seqs=4)
    with tempfile.TemporaryDirectory(prefix="tierserve-tiers-", dir=disk_root) as disk:
        llm = LLM(model, cpu_kv_gb=cpu_kv_gb, disk_kv_dir=disk, kv_prefetch=False, kv_load_policy=policy, **common)
        eng = llm.engine
        dev, vocab = eng.runner.device, eng.model_cfg.vocab_size
        page_size, page_bytes = eng.config.page_size, eng.runner.layout.bytes_per_page
        bw = measure_bandwidths(dev, disk, disk_bw_bytes, tier_io.READ_WORKERS)
        emit({"kind": "bandwidth", **bw})
        cold: dict[int, float] = {}
        saved = None
        for ctx in contexts:
            last = ctx == contexts[-1]
            est = eng.kv.tiers.cost.prefill.estimate(ctx)
            reserve = _hf_reserve(est or 0, dev.type == "cuda") if last else 0.0
            why = budget.skip(3 * est + 30, f"the {ctx}-token TTFT cases", reserve) if est else None
            if why:
                emit({"kind": "ttft", "context": ctx, "skipped": why})
                continue
            try:
                warm = _prompt(vocab, min(ctx, 2 * eng.config.max_num_batched_tokens + 17), -ctx % 2**31)
                hit_paths(llm, warm, disk, policy)                      # each path once, not timed
                got = hit_paths(llm, _prompt(vocab, ctx, ctx), disk, policy, emit, budget, save_kv=last)
            except Exception as e:                  # keep the rows so far; the next context may still fit
                emit({"kind": "ttft", "context": ctx, "error": f"{type(e).__name__}: {e}"})
                continue
            cold[ctx] = got["cold_s"]
            if last:
                saved = got
        tiers_stats = eng.kv.tiers.stats()
        del llm, eng
        _free()
        ctx = contexts[-1]
        prompt = _prompt(vocab, ctx, ctx)
        reserve = _hf_reserve(cold.get(ctx, 0), dev.type == "cuda")
        kv, first = (saved["kv"], saved["first_token"]) if saved is not None else (None, None)
        if saved is not None:
            saved["kv"] = None                  # the sweep holds the only reference (freed after it)
        from tierserve.bench.tiers_decode import decode_sweep
        try:
            decode_sweep(model, common, prompt, kv, first, gpu_fracs, new_tokens, budget, emit,
                         page_size=page_size, page_bytes=page_bytes, reserve_s=reserve)
        except Exception as e:
            emit({"kind": "decode", "engine": "tierserve", "context": ctx, "error": f"{type(e).__name__}: {e}"})
        del kv
        _free(host=True)
        if dev.type == "cuda":
            from tierserve.bench.tiers_hf import hf_baselines

            hf_baselines(model, load_format, prompt, budget, emit, cold_s=cold.get(ctx, 60.0))
    summary = summarize(rows)
    summary["tier_stats"] = tiers_stats
    return make_result("tierserve bench", "tiers", settings, rows, summary)


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    bw = next((r for r in rows if r["kind"] == "bandwidth"), {})
    out.update({k: v for k, v in bw.items() if k != "kind"})
    ttft = {(r["context"], r["hit"]): r for r in rows if r["kind"] == "ttft" and "ttft_s" in r}
    for ctx in sorted({c for c, _ in ttft}):
        cold = ttft.get((ctx, "cold"), {}).get("ttft_s")
        for hit in HITS:
            r = ttft.get((ctx, hit))
            if r is None:
                continue
            out[f"ttft_{hit}_s_c{ctx}"] = r["ttft_s"]
            if cold and hit != "cold":
                out[f"ttft_{hit}_over_cold_c{ctx}"] = r["ttft_s"] / cold
        disk = ttft.get((ctx, "disk"), {})
        if disk.get("disk_read_GBps") and bw.get("disk_bandwidth_GBps"):
            out[f"disk_read_over_bandwidth_c{ctx}"] = disk["disk_read_GBps"] / bw["disk_bandwidth_GBps"]
        if disk.get("disk_read_GBps") and disk.get("raw_files_GBps"):
            out[f"disk_read_over_raw_files_c{ctx}"] = disk["disk_read_GBps"] / disk["raw_files_GBps"]
        pol = ttft.get((ctx, "disk-policy"), {})
        if pol:
            out[f"policy_choice_c{ctx}"] = pol.get("policy_choice")
            out[f"policy_right_c{ctx}"] = pol.get("right_choice")
    for r in rows:
        if r["kind"] == "decode" and r.get("tok_s"):
            key = f"gpu{r['gpu_frac']}" if r["engine"] == "tierserve" else r.get("cache")
            out[f"decode_tok_s_{r['engine']}_{key}_c{r['context']}"] = r["tok_s"]
    out["skipped"] = sum(1 for r in rows if "skipped" in r)
    out["errors"] = sum(1 for r in rows if "error" in r)
    return out


def result_from_partial(partial: str | Path, device: str | None = None) -> dict:
    """The result of a run that was stopped: its settings and rows from the partial file (last run in it)."""
    return _result_from_partial(partial, "tiers", lambda settings, rows: summarize(rows), device)
