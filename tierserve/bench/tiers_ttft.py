"""TTFT section of `bench tiers`: one prompt cold, then its prefix hit served from each tier, in one engine
(GPU pool + CPU RAM tier + disk tier; read-ahead off, so a disk hit is the synchronous read path):

- ``cold``: nothing cached (its pages are written through to disk as they complete);
- ``gpu``: the GPU prefix cache;
- ``cpu``: after ``demote_prefix_cache`` (the pages move to CPU RAM), read by the zero-copy gather, layer by
  layer on a side stream while the forward pass runs (kv/tiers/overlap.py; on a GPU);
- ``cpu-sync`` (where zero-copy works): the same, all copied before the forward pass (``overlap_loads`` off,
  the engine's TIERSERVE_KV_OVERLAP=0);
- ``cpu-staging`` (where zero-copy works): the same through pinned staging copies, to compare the two;
- ``disk``: GPU cache and CPU tier forgotten, the page files' page cache dropped (so the hit reads the disk,
  like the raw bandwidth it is compared with), loaded whatever the cost (``kv_load_policy=always``): the forced
  load, with the chain's read + verify time;
- ``disk-policy``: the same state again, under the run's policy: what it chose (load or recompute) and its two
  estimates, next to the forced load and the cold prefill it would repeat.

``hit_paths`` runs that sequence; on a short prompt of its own first (rows not kept), so each path's one-time
work (kernel shapes, pinned staging, reader threads) is done before anything is timed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tierserve.bench.tiers_io import drop_page_cache, raw_read_files, resident_fraction
from tierserve.kv.prefix import hash_pages
from tierserve.kv.tiers import io as tier_io

HITS = ("cold", "gpu", "cpu", "cpu-sync", "cpu-staging", "disk", "disk-policy")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ttft(llm, prompt: list[int]) -> tuple[float, dict, int]:
    """Seconds to the first token, tokens served per tier, the first token."""
    from tierserve import SamplingParams

    dev = llm.engine.runner.device
    sync(dev)
    t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0]
    sync(dev)
    return time.perf_counter() - t, dict(out.cached_tokens_by_tier), out.outputs[0].token_ids[0]


def prompt_page_files(eng, prompt: list[int]) -> list[Path]:
    """The disk tier's files of the prompt's full pages (those a disk hit reads)."""
    ps = eng.config.page_size
    return [eng.kv.tiers.disk.path_of(h) for h in hash_pages(prompt, ps, len(prompt) // ps)]


def only_disk_holds_it(eng, disk_dir: str) -> float | None:
    """Forget the GPU prefix cache and the CPU tier, drop the page files' page cache; returns the share of
    their pages still cached (None: unknown)."""
    eng.kv.pool.clear_cache(demote=False)
    if eng.kv.tiers.host is not None:
        eng.kv.tiers.host.clear()
    files = sorted(Path(disk_dir).glob("*.kvp"))
    drop_page_cache(files)
    return resident_fraction(files)


def copy_pages(data: torch.Tensor, pids: list[int], step: int = 128) -> torch.Tensor:
    """CPU copy of pages ``pids`` of the KV storage ``data``, ``step`` pages at a time."""
    out = torch.empty((len(pids), *data.shape[1:]), dtype=data.dtype)
    for a in range(0, len(pids), step):
        idx = torch.tensor(pids[a:a + step], device=data.device)
        out[a:a + len(idx)].copy_(data.index_select(0, idx))
    return out


def save_prompt_kv(eng, prompt: list[int]) -> torch.Tensor:
    """CPU copy of the prompt's cached full pages (all in the GPU pool), for the decode sweep."""
    return copy_pages(eng.runner.kv.data, eng.kv.find_prefix(prompt, len(prompt) - 1).pages)


def hit_paths(llm, prompt: list[int], disk_dir: str, policy: str, emit=None, budget=None,
              save_kv: bool = False) -> dict:
    """Run the cases on ``prompt``; rows go to ``emit`` (None: a warm-up). Returns {"first_token", "cold_s",
    "kv": saved pages or None}."""
    eng = llm.engine
    tiers = eng.kv.tiers
    ctx, page_bytes, ps = len(prompt), eng.runner.layout.bytes_per_page, eng.config.page_size
    out: dict = {"kv": None}

    def row(hit: str, s: float, served: dict, **extra) -> None:
        if emit is not None:
            emit({"kind": "ttft", "context": ctx, "hit": hit, "ttft_s": s, "served_by": served, **extra})

    s, served, out["first_token"] = ttft(llm, prompt)
    out["cold_s"] = s
    row("cold", s, served)
    s, served, _ = ttft(llm, prompt)
    row("gpu", s, served)
    if save_kv:
        out["kv"] = save_prompt_kv(eng, prompt)
    eng.demote_prefix_cache()
    zero_copy, overlap = tiers.zero_copy, tiers.overlap_loads
    for case in ("cpu", "cpu-sync", "cpu-staging") if zero_copy else ("cpu",):
        if case != "cpu":                                # the same hit again, from CPU RAM
            eng.demote_prefix_cache()
        if case == "cpu-staging":                        # through pinned staging copies
            tiers.zero_copy = False
        if case == "cpu-sync":                           # zero-copy, all copied before the forward pass
            tiers.overlap_loads = False
        tiers.last_onload = {}
        try:
            s, served, _ = ttft(llm, prompt)
            tiers.settle_loads()                         # an overlapped load's copy time is known now
        finally:
            tiers.zero_copy, tiers.overlap_loads = zero_copy, overlap
        load = tiers.last_onload.get("cpu") or {}
        row(case, s, served, load_s=load.get("seconds"), zero_copy=case != "cpu-staging" and bool(zero_copy),
            overlap=load.get("overlap"), issue_s=load.get("issue_s"),
            load_GBps=load["pages"] * page_bytes / load["seconds"] / 1e9 if load.get("seconds") else None)
    tiers.flush()                                        # the write-through is on disk
    disk_s = None
    for case in ("disk", "disk-policy"):
        if case == "disk-policy" and budget is not None:
            why = budget.skip(max(out["cold_s"], disk_s or 0) + 5, f"the {ctx}-token policy run")
            if why:
                if emit is not None:
                    emit({"kind": "ttft", "context": ctx, "hit": case, "skipped": why})
                break
        resident = only_disk_holds_it(eng, disk_dir)
        tiers.policy, tiers.cost.last, tiers.last_read = ("always" if case == "disk" else policy), None, {}
        tiers.last_onload = {}
        try:
            s, served, tok = ttft(llm, prompt)
        finally:
            tiers.policy = policy
        nbytes = served.get("disk", 0) // ps * page_bytes
        read = dict(tiers.last_read)
        extra = {"disk_bytes": nbytes, "page_cache_resident_before": resident, "first_token_equal": tok == out["first_token"],
                 "read_verify_s": read.get("seconds"), "copy_in": tiers.last_onload.get("copy_in"),
                 "disk_read_GBps": read["bytes"] / read["seconds"] / 1e9 if read.get("seconds") else None,
                 "disk_hit_GBps": nbytes / s / 1e9 if nbytes else None,
                 "write_dropped": tiers.disk.stats().get("write_dropped")}
        if case == "disk":
            disk_s = s
            extra.update(raw_read_files(prompt_page_files(eng, prompt), tier_io.READ_WORKERS))
        else:
            last = tiers.cost.last or {}
            extra = {"policy": policy, "policy_choice": last.get("choice", "load (no prefill measured yet)"
                                                                  if policy == "cost" else "load (policy always)"),
                     "est_load_s": last.get("est_load_s"), "est_recompute_s": last.get("est_recompute_s"),
                     "est_bandwidth_GBps": last.get("bandwidth_GBps"), "forced_disk_s": disk_s,
                     "cold_s": out["cold_s"], "right_choice": _right(last.get("choice"), disk_s, out["cold_s"]),
                     **extra}
        row(case, s, served, **extra)
    return out


def _right(choice: str | None, load_s: float | None, cold_s: float) -> bool | None:
    """Whether the policy picked the faster of the two measured alternatives (None: not comparable)."""
    if choice not in ("load", "recompute") or load_s is None:
        return None
    return (choice == "load") == (load_s < cold_s)
