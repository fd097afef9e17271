"""`tierserve bench sparse-fp8` (issue 6): decode speed of the lossy modes against our own BF16 engine, every
baseline measured in the same run, random weights at real shapes (``--load-format dummy``), batch 1.

  a  short context (2k): BF16 vs FP8 block-scaled weights (quantization=fp8) + FP8 KV (kv_dtype=fp8), and each
     alone: decode tok/s, ratio to BF16, greedy-token agreement with BF16 (lossy: reported, not required).
  b  long context (128k): dense BF16 vs sparse pages top-k + FP8 KV, and sparse alone: decode tok/s and attention
     ms per step (FP8 KV alone is a skipped row above 32k: its prefill runs on the torch reference).
  c  tiered KV (sparse_fp8_tiers.py): 128k and 1M contexts with ~10% of the sequence's pages on the GPU, the rest
     in CPU RAM; sparse pages top-k.
Code: this file (sizes, driver, summary, plot), sparse_fp8_run.py (engine runs, sections a and b),
sparse_fp8_tiers.py (section c, synthetic KV fill). A combination the engine refuses (config validation) is a
skipped row carrying the engine's message.

Decode: greedy, ignore_eos; tok/s = (tokens after the first) / (time after the first), as in bench decode.
Attention ms per step: the AttnMetadata of the first decode step is kept (runner._prepare wrapped) and layer
0's backend call is replayed on the engine's real KV pool and page table with a random query (the cost does not
depend on its values); ms per step = ms per layer x layers. It includes the sparse selection (page scoring,
top-k, compaction), not the K/V write.
Sparse engines prefill densely (the runner's sparse setting is off until the first token): a sparse prefill
runs on the torch reference (masked attention, O(chunk x context) memory per layer), hours at 128k. The decode
that is timed is sparse, over the same KV; only the KV values differ from a sparse prefill's.
Each section has a time budget (unused time carries over to the next; nothing runs past ``max_wall_s``): a setting
starts only if its predecessor's wall time still fits, and a run past the budget stops between engine steps; both
leave a row with ``skipped`` saying why.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tierserve.bench.plot import save_figure
from tierserve.bench.results import make_result, row_emitter

SECTIONS = ("a", "b", "c")
TARGETS = {"a_speedup": 1.8, "b_speedup": 2.5, "c_tok_s": {131072: 120.0, 1048576: 50.0}}


@dataclass
class Sizes:
    short_context: int = 2048
    short_new_tokens: int = 128
    repeats: int = 2                   # timed runs in section a (median), after one warm-up
    long_context: int = 131072
    long_new_tokens: int = 64
    tier_contexts: tuple[int, ...] = (131072, 1048576)
    prefill_max: int = 131072          # tier contexts above this are filled synthetically
    topk: int = 2048                   # sparse_topk_tokens
    gpu_frac: float = 0.1              # share of the sequence's pages in the GPU pool (section c)
    chunk: int = 8192                  # max_num_batched_tokens of long prefills
    host_ram_gb: float | None = None   # cap on host RAM for the CPU tier (None: MemAvailable - 8 GiB)
    budgets: dict = field(default_factory=lambda: {"a": 100.0, "b": 180.0, "c": 200.0})
    warmup: bool = True                # a warm-up run before the timed ones (kernels compiled, graphs captured)
    # section c: decode tokens of the measured request made before its timing starts (CUDA graphs over spilled
    # pages are captured at their first use, placement settles); their time is reported as ``decode_warmup_s``
    decode_warmup_steps: int = 8
    tier_prefill_budget: float = 100.0  # section c: seconds for a real prefill over the tiers, else synthetic
    max_wall_s: float = 510.0          # no section runs past this many seconds after the start
    page_size: int | None = None       # KV page size of every engine of the run (None: the engine's default)
    page_spread: float = 1.0           # sparse_page_spread of the sparse rows' engines (1: the bound, the default)


# the CPU tier cap makes the 4096 context a skipped row and its fallback (2048) a synthetic fill
SMOKE = Sizes(short_context=300, short_new_tokens=8, repeats=1, long_context=300, long_new_tokens=32,
              tier_contexts=(300, 4096), prefill_max=300, topk=96, chunk=128, host_ram_gb=0.0075,
              budgets={"a": 60.0, "b": 60.0, "c": 60.0}, warmup=False, decode_warmup_steps=2)


def bench_sparse_fp8(model: str | None, sections=SECTIONS, sizes: Sizes | None = None, *, load_format: str = "dummy",
                     device: str = "auto", dtype: str = "auto", seed: int = 0, partial_path=None, progress=None,
                     log=None) -> dict:
    from tierserve.bench.decode import copy_bandwidth
    from tierserve.bench.sparse_fp8_run import Bench, free_memory
    from tierserve.bench.sparse_fp8_tiers import section_c
    from tierserve.runner.model_runner import resolve_device

    t_start = time.perf_counter()
    sizes = sizes or Sizes()
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise ValueError(f"sections must be among {', '.join(SECTIONS)}, got {', '.join(bad)}")
    settings = dict(model=str(model or "tierserve-nano"), load_format=load_format, device=device, dtype=dtype,
                    seed=seed, sections=list(sections), sizes=asdict(sizes), batch=1, prefix_caching=False,
                    attention_time="layer 0's backend call replayed on a captured decode step, x layers")
    rows: list[dict] = []
    emit = row_emitter(rows, settings, partial_path, progress)

    common = dict(load_format=load_format, device=device, dtype=dtype, seed=seed, max_num_seqs=1,
                  enable_prefix_caching=False)
    if sizes.page_size is not None:      # baselines and sparse rows alike
        common["page_size"] = sizes.page_size
    if sizes.page_spread != 1.0:         # read by sparse engines only
        common["sparse_page_spread"] = sizes.page_spread
    bench = Bench(model, sizes, common, seed, emit, log or (lambda m: None))
    dev = resolve_device(device)
    if dev.type == "cuda":
        bench.bandwidth = copy_bandwidth(dev)
    run = {"a": bench.section_a, "b": bench.section_b, "c": lambda d: section_c(bench, d)}
    end = time.perf_counter()            # budgets add up: time a section leaves unused carries over to the next
    for name in SECTIONS:
        if name in sections:
            end += sizes.budgets[name]
            deadline = min(end, t_start + sizes.max_wall_s)
            bench.log(f"section {name}: until {deadline - t_start:.0f} s, {time.perf_counter() - t_start:.0f} s so far")
            run[name](deadline)
            free_memory()
    summary = summarise(rows)
    summary.update(wall_s=round(time.perf_counter() - t_start, 1),
                   copy_bandwidth_GBps=bench.bandwidth / 1e9 if bench.bandwidth else None)
    return make_result("tierserve bench", "sparse-fp8", settings, rows, summary)


def summarise(rows: list[dict]) -> dict:
    done = {(r["section"], r["setting"], r.get("context")): r for r in rows if "tok_s" in r}
    out: dict = {"targets": {"a_speedup_vs_bf16": TARGETS["a_speedup"], "b_speedup_vs_dense_bf16": TARGETS["b_speedup"],
                             "c_tok_s": {str(k): v for k, v in TARGETS["c_tok_s"].items()}}}
    for (sec, name, ctx), r in done.items():
        key = f"{sec}_{name}_c{ctx}"
        out[f"{key}_tok_s"] = r["tok_s"]
        if sec == "c":
            out[f"{key}_synthetic_fill"] = "fill_s" in r
        for extra in ("speedup_vs_bf16", "greedy_match_bf16", "speedup_vs_dense_bf16", "attention_ms_per_step",
                      "attention_speedup_vs_dense_bf16"):
            if r.get(extra) is not None:
                out[f"{key}_{extra}"] = r[extra]
    both = [r for (s, n, _), r in done.items() if s == "a" and n == "fp8-weights+fp8-kv" and "speedup_vs_bf16" in r]
    if both:
        out["a_target_met"] = both[0]["speedup_vs_bf16"] >= TARGETS["a_speedup"]
    sp = [r for (s, n, _), r in done.items() if s == "b" and n.startswith("sparse") and "speedup_vs_dense_bf16" in r]
    if sp:
        out["b_best_speedup"] = max(r["speedup_vs_dense_bf16"] for r in sp)
        out["b_target_met"] = out["b_best_speedup"] >= TARGETS["b_speedup"]
    for ctx, target in TARGETS["c_tok_s"].items():       # the best tiered setting at each target context
        cands = [(r["tok_s"], n) for (s, n, c), r in done.items() if s == "c" and c == ctx]
        if cands:
            best, name = max(cands)
            out.update({f"c_best_tok_s_c{ctx}": best, f"c_best_setting_c{ctx}": name,
                        f"c_target_met_c{ctx}": best >= target})
    return out


def merge_sparse_fp8(results: list[tuple[str, dict]]) -> dict:
    """One result from separate runs' ``(name, result)``: whole sections from one run each (every comparison keeps
    its baseline from the same run), rows tagged with their source and its env, the summary recomputed. A section
    at the same contexts in two inputs is refused."""
    rows, sources, owner = [], [], {}
    for name, r in results:
        meta = r["meta"]
        if meta.get("subcommand") != "sparse-fp8":
            raise ValueError(f"{name}: not a `bench sparse-fp8` result (subcommand {meta.get('subcommand')!r})")
        secs = sorted({row["section"] for row in r["rows"]})
        for sec in secs:
            key = (sec, tuple(sorted({row.get("context") for row in r["rows"] if row["section"] == sec})))
            if key in owner:
                raise ValueError(f"section {sec} at contexts {key[1]} is in both {owner[key]} and {name}")
            owner[key] = name
        rows += [{**row, "source": name, "source_env": meta.get("env")} for row in r["rows"]]
        sizes = meta.get("settings", {}).get("sizes", {})
        sources.append({"file": name, "date": meta.get("date"), "device": meta.get("device"), "sections": secs,
                        "env": meta.get("env"), "wall_s": r["summary"].get("wall_s"),
                        "page_size": sizes.get("page_size"), "page_spread": sizes.get("page_spread", 1.0)})
    # ``settings`` is the first input's; each source's own page size and page spread are in ``sources``
    meta = {**results[0][1]["meta"], "sources": sources,
            "merged": "rows of separate runs, whole sections from one run each (baselines from the same run)"}
    return {"meta": meta, "rows": rows, "summary": summarise(rows)}


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def plot_sparse_fp8(result: dict, path) -> object:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tok_s" in r]
    ctx = {r["section"]: _ctx(r["context"]) for r in rows}
    panels = [("a", "tok_s", f"a: batch 1, {ctx.get('a', '')} context, decode tok/s"),
              ("b", "tok_s", f"b: batch 1, {ctx.get('b', '')} context, decode tok/s"),
              ("b", "attention_ms_per_step", "b: attention ms per decode step"),
              ("c", "tok_s", "c: tiered KV (GPU share ~10%), decode tok/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (sec, key, title) in zip(axes[0], panels):
        pts = [r for r in rows if r["section"] == sec and r.get(key) is not None]
        names = [f"{r['setting']}\n{_ctx(r['context'])}{' synthetic' if 'fill_s' in r else ''}" if sec == "c"
                 else r["setting"] for r in pts]
        ax.bar(range(len(pts)), [r[key] for r in pts], color="tab:blue" if key == "tok_s" else "tab:orange")
        for i, r in enumerate(pts):
            ax.annotate(f"{r[key]:.3g}", (i, r[key]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(pts)), names, rotation=30, ha="right", fontsize=7)
        ax.set(title=title, ylabel="ms" if key != "tok_s" else "tok/s")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, axis="y")
    meta = result["meta"]
    return save_figure(fig, path, f"sparse / FP8 decode, {meta['settings']['model']} on {meta['device']}")
