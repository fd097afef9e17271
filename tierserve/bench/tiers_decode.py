"""Decode section of `bench tiers`: decode speed with only part of the sequence's KV pages on the GPU (the rest
spilled to CPU RAM, read by attention from pinned memory), and transformers' caches on the same prompt.

One engine (prefix caching off, a CPU-RAM tier for the spilled pages) serves every GPU share: its pool holds
the whole sequence and, for a share f, all but f of it is taken out of use first (``pool.allocate`` of
"ballast" pages that no request owns, given back after the run), so the request sees exactly the pool an engine
built with ``num_kv_pages`` = f x pages would give it (the ballast is a KV-manager table of its own, so the
page accounting stays exact; with no computed tokens its pages are never spilled). The prompt's KV is not prefilled again for each share:
the pages the TTFT section computed for the same prompt are written into the request's pages chunk by chunk
through the KV manager (``transplant``), which spills the oldest pages to CPU RAM as the pool fills -- as a
chunked prefill does -- and the last page of prompt tokens is computed by an ordinary engine step, which samples
the first token. Decode is timed from there. The first share (1.0: all on the GPU) gives the reference tokens;
every other share must decode the same ones (tiering is lossless).
"""
from __future__ import annotations

import gc
import time

import torch

from tierserve.bench.tiers_ttft import sync

BALLAST = "bench-ballast"     # KV table of the pages kept out of use (no request: never scheduled nor spilled)
FILL = "transplanted: the TTFT section's prefill of the same prompt, copied into the pages (no second prefill)"


def transplant(eng, rid: str, prompt: list[int], kv: torch.Tensor, new_tokens: int, chunk_pages: int = 128):
    """Add ``rid`` with ``prompt`` as a running request whose first ``kv.shape[0]`` pages hold ``kv``."""
    from tierserve import SamplingParams
    from tierserve.engine.request import Status

    ps, mgr, runner = eng.config.page_size, eng.kv, eng.runner
    n_tokens = kv.shape[0] * ps
    if n_tokens >= len(prompt):
        raise ValueError(f"{kv.shape[0]} saved pages cover the whole {len(prompt)}-token prompt")
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    req = eng.requests[rid]
    eng.scheduler.waiting.remove(req)
    done = 0
    while done < n_tokens:
        n = min(chunk_pages * ps, n_tokens - done)
        before = len(mgr.page_table(rid)) if mgr.has(rid) else 0
        if not mgr.allocate(rid, done + n):          # spills the oldest complete pages to CPU RAM
            raise RuntimeError(f"KV pool and CPU tier are full at {done} of {n_tokens} tokens")
        if mgr.tiers is not None:                     # those pages leave before their GPU pages are reused
            runner.tiers_apply(mgr.tiers.take_transfers())
        new = mgr.page_table(rid)[before:]
        src = kv[done // ps:(done + n) // ps]
        runner.kv.data[torch.tensor(new, device=runner.kv.data.device)] = src.to(runner.kv.data.device)
        done += n
        mgr.commit(rid, req.all_token_ids, done)
    req.num_computed_tokens, req.num_cached_tokens, req.status = n_tokens, 0, Status.RUNNING
    eng.scheduler.running.append(req)
    return req


def _prefill(eng, rid: str, prompt: list[int], new_tokens: int):
    """Fallback when the TTFT section left no KV: prefill for real (the first, all-GPU share) and keep the KV."""
    from tierserve import SamplingParams
    from tierserve.bench.tiers_ttft import copy_pages

    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    req = eng.requests[rid]
    while not req.output_token_ids:
        eng.step()
    pids = eng.kv.page_table(rid)[:(len(prompt) - 1) // eng.config.page_size]
    if min(pids, default=0) < 0:
        raise RuntimeError("pages were spilled during the fallback prefill")
    return req, copy_pages(eng.runner.kv.data, pids)


def _replays(runner):
    """How the decode steps ran so far: the runner's counters of graph replays by kind (plain / spill) and
    eager steps (``ModelRunner.step_kinds``)."""
    return getattr(runner, "step_kinds", {})


def decode_sweep(model: str | None, common: dict, prompt: list[int], kv: torch.Tensor | None, first_token: int | None,
                 fracs: tuple[float, ...], new_tokens: int, budget, emit, *, page_size: int, page_bytes: int,
                 reserve_s: float = 0.0) -> None:
    """``kv``: the prompt's full pages (all but the last page of prompt tokens) from the TTFT section; None: the
    first share (which must be 1.0) prefills them for real."""
    from tierserve import LLM

    ps, ctx = page_size, len(prompt)
    total_pages = -(-(ctx + new_tokens) // ps) + 2
    spill_gib = (total_pages - max(4, int(total_pages * min(fracs)))) * page_bytes / 2**30
    why = budget.skip(60, "building the decode engine and one GPU share", reserve=reserve_s)
    if why is None and kv is None and fracs[0] < 1:
        why = "no KV of the prompt from the TTFT section, and the first GPU share is not 1.0 (its prefill would spill)"
    if why:
        for frac in fracs:
            emit({"kind": "decode", "engine": "tierserve", "context": ctx, "gpu_frac": frac, "skipped": why})
        return
    llm = LLM(model, **common, num_kv_pages=total_pages, cpu_kv_gb=1.1 * spill_gib + 0.25,
              enable_prefix_caching=False)
    eng = llm.engine
    dev, pool = eng.runner.device, eng.kv.pool
    ref, need, transplanted = None, 30.0, FILL
    try:
        for frac in fracs:
            base = {"kind": "decode", "engine": "tierserve", "context": ctx, "gpu_frac": frac}
            why = budget.skip(need, f"decode at GPU share {frac}", reserve=reserve_s)
            if why:
                emit({**base, "skipped": why})
                continue
            t_start = time.monotonic()
            pages = max(4, int(total_pages * frac))
            if pool.num_free > pages and not eng.kv.allocate(BALLAST, (pool.num_free - pages) * ps):
                raise RuntimeError(f"could not take {pool.num_free - pages} pages out of use")
            spilled0 = eng.kv.num_spilled
            rid = f"decode-{frac}"
            fill = transplanted
            try:
                if kv is None:
                    req, kv = _prefill(eng, rid, prompt, new_tokens)
                    fill = "prefilled in this engine (the TTFT section left no KV)"
                    transplanted = "transplanted: the first share's prefill of the prompt, copied into the pages"
                else:
                    req = transplant(eng, rid, prompt, kv, new_tokens, chunk_pages=min(128, max(1, (pages - 2) // 2)))
                while not req.output_token_ids:
                    eng.step()
                sync(dev)
                t, n0 = time.perf_counter(), len(req.output_token_ids)
                while eng.has_unfinished_requests():
                    eng.step()
                sync(dev)
                dt = time.perf_counter() - t
            except Exception as e:                   # one share failing (e.g. out of memory) keeps the others
                if rid in eng.requests:
                    eng.abort_request(rid)
                emit({**base, "error": f"{type(e).__name__}: {e}"})
                if kv is None:
                    break
                continue
            finally:
                if eng.kv.has(BALLAST):
                    eng.kv.free(BALLAST)
            n = len(req.output_token_ids) - n0
            tokens = list(req.output_token_ids)
            ref = tokens if ref is None else ref
            kv_bytes = (ctx + new_tokens) * eng.runner.layout.bytes_per_token
            emit({**base, "gpu_pages": pages, "gpu_kv_gib": pages * page_bytes / 2**30,
                  "gpu_kv_saving": 1 - pages / total_pages, "tok_s": n / dt, "decode_tokens": n,
                  "spilled_pages": eng.kv.num_spilled - spilled0,
                  "kv_read_GBps": kv_bytes * (1 - min(frac, 1.0)) * n / dt / 1e9,
                  "tokens_equal_first_run": tokens == ref,
                  "first_differing_token": next((i for i, (x, y) in enumerate(zip(tokens, ref)) if x != y), None),
                  "graph_replays": dict(_replays(eng.runner)),
                  "first_token_equal_ttft_run": None if first_token is None else tokens[0] == first_token,
                  "kv_fill": fill})
            need = 1.3 * (time.monotonic() - t_start) + 5
    finally:
        del llm, eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
