"""Engram placement benchmark (issue 9): a backbone with Engram tables on the device and in host RAM, and
without Engram, in one run. For each total table size (parameters over all Engram layers) and placement --
``device``, ``cpu-copy`` (pageable host table, gather into pinned staging, side-stream copy), ``cpu-zero_copy``
(host table page-locked in place, a Triton kernel reads the rows over PCIe) -- the same random backbone
(``--load-format dummy``, same seed) with random tables is built from a temporary model directory (the base
config.json plus an ``"engram"`` entry) and measured:

  decode   ``batch`` prompts of ``prompt_len`` random ids, ``new_tokens`` greedy tokens (ignore_eos);
           tok/s = batch * (new_tokens - 1) / time after every request has its first token
  prefill  ``prefill_prompts`` prompts of ``prefill_len`` ids and one new token; tok/s = prompt tokens / time

Each case runs ``repeats + 1`` times; the first is a warm-up, the median is reported. Prefix caching is off,
so repeats recompute their prompts. Memory: bytes allocated once the engine is built (weights, KV pool,
device tables) and the peak of each case (``max_memory_allocated`` after a reset). Rows are bit-identical
across placements, so the greedy tokens of every cpu placement must equal the device placement's.
The runner runs Engram models (without conv) through CUDA graphs with the fused kernels; tables on the device
or read zero-copy are hashed and gathered inside the graph (multi-step windows), copy-gather host tables
before every step (one step per round trip). So the backbone without Engram is measured twice: as the engine
runs it by default (the path of device and zero-copy tables) and ``none-1step`` (one step per host round
trip: the path of copy-gather host tables).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tierserve.bench.decode import DecodeCase, _prompts, _sync, run_tierserve
from tierserve.bench.plot import save_figure
from tierserve.bench.results import make_result, row_emitter

PLACEMENTS = ("device", "cpu-copy", "cpu-zero_copy")
TARGET_SLOWDOWN_PCT = 3.0


@dataclass
class EngramSizes:
    prompt_len: int = 512
    new_tokens: int = 64
    batches: tuple[int, ...] = (1, 64)
    prefill_prompts: int = 8
    prefill_len: int = 2048
    repeats: int = 2
    step_tokens: int = 8192          # max_num_batched_tokens


def engram_config(layers, total_params: float, heads: int, dim: int, **kw):
    """(EngramConfig whose tables hold about ``total_params`` parameters over all layers, the exact count)."""
    from tierserve.memory.engram_config import EngramConfig
    from tierserve.memory.engram_hash import table_sizes

    per_table = max(2, int(total_params) // (len(layers) * 2 * heads * dim))     # orders (2, 3)
    cfg = EngramConfig(layers=tuple(layers), heads_per_order=heads, dim_per_head=dim, table_size=per_table, **kw)
    return cfg, dim * sum(sum(s) for s in table_sizes(cfg).values())


def label(n: float) -> str:
    for unit, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.3g}{s}"
    return f"{n:g}"


def plan(table_params, placements, cuda: bool) -> list[dict]:
    out = [{"config": "none", "eager": False}]
    if cuda:    # the paths Engram models take, without Engram: device / zero-copy tables, copy-gather tables
        out += [{"config": "none-1step", "eager": True}]
    bad = [pl for pl in placements if pl not in PLACEMENTS]
    if bad:
        raise ValueError(f"placements must be among {', '.join(PLACEMENTS)}, got {', '.join(bad)}")
    for pl in placements:            # placements outer: the first GPU runs of zero-copy come last
        for p in table_params:
            place, _, gather = pl.partition("-")
            out.append({"config": f"{label(p)}-{pl}", "requested": p, "placement": place,
                        "host_gather": gather or None})
    return out


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _why_not(c: dict, dev: torch.device, table_bytes: int, base_bytes: int) -> str | None:
    """A reason the configuration cannot run here, or None."""
    gib = 2**30
    if c.get("host_gather") == "zero_copy" and dev.type != "cuda":
        return "zero_copy needs a CUDA device (Triton kernel on page-locked host memory)"
    on_gpu = dev.type == "cuda" and c.get("placement") == "device"
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        need = base_bytes + (table_bytes if on_gpu else 0) + 6 * gib
        if need > free:
            return f"needs ~{need / gib:.1f} GiB of GPU memory (weights, KV, tables, 6 work), {free / gib:.1f} free"
    if not on_gpu and table_bytes:
        avail = _host_available()
        if table_bytes + 4 * gib > avail:
            return f"tables need {table_bytes / gib:.1f} GiB of host RAM (+4 GiB), {avail / gib:.1f} GiB available"
    return None


def _measure(llm, sizes: EngramSizes, seed: int, base: dict, emit) -> None:
    vocab = llm.engine.model_cfg.vocab_size
    cases = [("decode", DecodeCase(b, sizes.prompt_len, sizes.new_tokens)) for b in sizes.batches]
    cases.append(("prefill", DecodeCase(sizes.prefill_prompts, sizes.prefill_len, 1)))
    for metric, case in cases:
        prompts = _prompts(case, vocab, seed)
        runs = [run_tierserve(llm, case, prompts) for _ in range(sizes.repeats + 1)][1:]
        for r in runs:
            r["tok_s"] = case.batch * case.context / r["ttft_s"] if metric == "prefill" else r["tok_s"]
        mid = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
        digests = [hashlib.sha1(json.dumps(r["tokens"]).encode()).hexdigest()[:16] for r in runs]
        emit({**base, "metric": metric, "batch": case.batch, "prompt_len": case.context, "new_tokens": case.new_tokens,
              "tok_s": mid["tok_s"], "tok_s_runs": [round(r["tok_s"], 2) for r in runs], "ttft_s": mid["ttft_s"],
              "ms_per_token": None if metric == "prefill" else mid["ms_per_token"],
              "peak_gpu_gib": max((r["peak_gpu_gib"] or 0) for r in runs) or None,
              "tokens_sha1": digests[runs.index(mid)], "tokens_same_across_runs": len(set(digests)) == 1})


def _run_config(c: dict, base_path: Path, tmp: str, common: dict, dev: torch.device, sizes, seed, emit) -> None:
    from tierserve import LLM
    from tierserve.loader.hf import load_config
    from tierserve.memory.engram import engram_modules

    kw = dict(common)
    path = str(base_path)
    if "placement" in c:
        cfg = load_config(base_path)
        cfg["engram"] = c["engram"].to_dict()
        d = Path(tmp) / c["config"]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        path = str(d)
        if (base_path / "tokenizer.json").is_file():
            kw["tokenizer"] = str(base_path)        # else the engine uses its synthetic dummy tokenizer
    elif c["eager"]:                                 # one step per host round trip
        kw.update(num_scheduler_steps=1)
    before = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    t0 = time.perf_counter()
    llm = LLM(path, **kw)
    try:
        _sync(dev)
        tables = [m.table for m in engram_modules(llm.engine.runner.model).values()]
        on_gpu = sum(t.nbytes() for t in tables if t.placement == "device" and t.device.type == "cuda")
        base = {k: v for k, v in c.items() if k not in ("engram", "eager")}
        base.update(build_s=round(time.perf_counter() - t0, 2), table_gpu_bytes=on_gpu,
                    table_host_bytes=sum(t.nbytes() for t in tables) - on_gpu,
                    gpu_allocated_gib=torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                    gpu_allocated_before_gib=before)
        _measure(llm, sizes, seed, base, emit)
    finally:
        for m in engram_modules(llm.engine.runner.model).values():
            m.table.close()
        del llm


def bench_engram(model: str | None, table_params, *, layers=(1, 15), heads: int = 8, dim: int = 64,
                 placements=PLACEMENTS, sizes: EngramSizes | None = None, device: str = "auto", dtype: str = "auto",
                 seed: int = 0, time_budget_s: float = 480.0, partial_path: str | Path | None = None,
                 progress=None, log=None) -> dict:
    from tierserve.loader.hf import load_config, resolve_model_path
    from tierserve.models.config import ModelConfig
    from tierserve.runner.model_runner import resolve_device, resolve_dtype

    t_start = time.perf_counter()
    sizes = sizes or EngramSizes()
    base_path = resolve_model_path(model)
    mcfg = ModelConfig.from_hf(load_config(base_path))
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, mcfg, dev)
    item = tdtype.itemsize
    max_len = max(sizes.prompt_len + sizes.new_tokens, sizes.prefill_len + 1) + 16
    pages = max(max(sizes.batches) * -(-(sizes.prompt_len + sizes.new_tokens) // 16),
                sizes.prefill_prompts * -(-(sizes.prefill_len + 1) // 16)) + 16
    common = dict(load_format="dummy", device=dev.type, dtype=dtype, seed=seed, max_model_len=max_len,
                  max_num_seqs=max(max(sizes.batches), sizes.prefill_prompts), num_kv_pages=pages,
                  max_num_batched_tokens=sizes.step_tokens, enable_prefix_caching=False)
    base_bytes = item * (mcfg.num_params() + pages * 16 * 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim)
    configs = plan(table_params, placements, dev.type == "cuda")
    for c in configs:
        if "placement" in c:
            c["engram"], c["table_params"] = engram_config(layers, c["requested"], heads, dim, placement=c["placement"],
                                                           host_gather=c["host_gather"] or "copy")
            c["table_bytes"] = c["table_params"] * item
            c["engram_bytes_per_token"] = len(layers) * 2 * heads * dim * item
    settings = dict(model=str(model or "tierserve-nano"), load_format="dummy", device=str(dev),
                    dtype=str(tdtype).removeprefix("torch."), engram_path="CUDA graphs with fused ops; device / zero-copy "
                    "tables hashed and gathered in the graph (multi-step), copy-gather tables before each replay",
                    engram_layers=list(layers), heads_per_order=heads, dim_per_head=dim, orders=[2, 3],
                    table_params=[float(p) for p in table_params], placements=list(placements), seed=seed,
                    sizes=asdict(sizes), prefix_caching=False, time_budget_s=time_budget_s)
    rows: list[dict] = []
    emit = row_emitter(rows, settings, partial_path, progress)

    last = 0.0
    with tempfile.TemporaryDirectory(prefix="tierserve-engram-") as tmp:
        for c in configs:
            info = {k: v for k, v in c.items() if k not in ("engram", "eager")}
            elapsed = time.perf_counter() - t_start
            why = f"time budget: {elapsed:.0f} s used of {time_budget_s:.0f} s" \
                if elapsed + last > time_budget_s else _why_not(c, dev, c.get("table_bytes", 0), base_bytes)
            if why:
                emit({**info, "skipped": why})
                continue
            if log:
                gib = c.get("table_bytes", 0) / 2**30
                log(f"{c['config']}: building ({gib:.2f} GiB of tables) and measuring, {elapsed:.0f} s so far")
            t0 = time.perf_counter()
            try:
                _run_config(c, base_path, tmp, common, dev, sizes, seed, emit)
            except Exception as e:       # report and go on: one failing placement must not lose the others
                emit({**info, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            last = time.perf_counter() - t0
    summary = summarise(rows, table_params)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    return make_result("tierserve bench", "engram", settings, rows, summary)


def _key(r: dict) -> str:
    return f"decode_b{r['batch']}" if r["metric"] == "decode" else "prefill"


def summarise(rows: list[dict], table_params) -> dict:
    """Per table size: slowdown of each cpu placement vs device (%), GPU GiB saved, greedy match; and the
    cost of Engram on the device vs the backbone on the same path (``none``)."""
    done = [r for r in rows if "metric" in r]
    by = {(r["config"], _key(r)): r for r in done}
    ref = "none"
    out: dict = {"target_slowdown_pct": TARGET_SLOWDOWN_PCT, "tables": {}}
    for p in table_params:
        lab = label(p)
        dev_rows = {k: r for (cfg, k), r in by.items() if cfg == f"{lab}-device"}
        s: dict = {}
        if dev_rows:
            d0 = next(iter(dev_rows.values()))
            s.update(table_params=d0["table_params"], table_gib=d0["table_bytes"] / 2**30)
            s["engram_cost_pct_vs_backbone"] = {k: 100 * (1 - r["tok_s"] / by[(ref, k)]["tok_s"])
                                                for k, r in dev_rows.items() if (ref, k) in by}
        for pl in PLACEMENTS[1:]:
            cpu_rows = {k: r for (cfg, k), r in by.items() if cfg == f"{lab}-{pl}"}
            if not cpu_rows or not dev_rows:
                continue
            slow = {k: 100 * (1 - r["tok_s"] / dev_rows[k]["tok_s"]) for k, r in cpu_rows.items() if k in dev_rows}
            c0, d0 = next(iter(cpu_rows.values())), next(iter(dev_rows.values()))
            saved = None if d0["gpu_allocated_gib"] is None else d0["gpu_allocated_gib"] - c0["gpu_allocated_gib"]
            s[pl] = {"slowdown_pct": slow, "max_slowdown_pct": max(slow.values(), default=None),
                     "within_target": all(v <= TARGET_SLOWDOWN_PCT for v in slow.values()),
                     "gpu_gib_saved": saved, "table_gpu_gib_saved": d0["table_gpu_bytes"] / 2**30,
                     "greedy_tokens_match_device": all(r["tokens_sha1"] == dev_rows[k]["tokens_sha1"]
                                                       for k, r in cpu_rows.items() if k in dev_rows)}
        out["tables"][lab] = s
    return out


def plot_engram(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "metric" in r]
    keys = sorted({_key(r) for r in rows}, key=lambda k: (k == "prefill", len(k), k))
    names = list(dict.fromkeys(r["config"] for r in rows))
    colours = {"device": "tab:blue", "cpu-copy": "tab:orange", "cpu-zero_copy": "tab:green"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        vals = {r["config"]: r["tok_s"] for r in rows if _key(r) == k}
        xs = [n for n in names if n in vals]
        ax.bar(range(len(xs)), [vals[n] for n in xs],
               color=[next((c for pl, c in colours.items() if n.endswith(pl)), "tab:gray") for n in xs])
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="tok/s", title=k.replace("_", " "))
        ax.grid(alpha=0.3, axis="y")
    meta = result["meta"]
    return save_figure(fig, path, f"Engram tables: device vs host RAM, {Path(meta['settings']['model']).name} "
                                  f"on {meta['device']}")
