"""`tierserve bench ...` -- every benchmark writes the result JSON of DESIGN.md (+ a PNG where useful)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (each measures its baseline in the same run).")


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {s!r}")


def _write(con, res: dict, output: Path, plot_fn=None, summary: bool = False) -> Path:
    """Write the result JSON (and, with ``plot_fn``, the PNG beside it); say where on ``con``."""
    from tierserve.bench.results import write_result

    path = write_result(res, output)
    con.print(f"wrote {path}")
    if summary:
        con.print_json(data=res["summary"])
    if plot_fn is not None:
        try:
            con.print(f"wrote {plot_fn(res, path.with_suffix('.png'))}")
        except ImportError as e:
            con.print(f"no plot ({e.name} not installed)")
    return path



@app.command()
def decode(model: Optional[str] = typer.Option(None, help="checkpoint dir or shipped config (llama-3.1-8b, qwen3-8b)"),
           load_format: str = typer.Option("auto", help="auto | dummy (random weights at the config's shapes)"),
           batch: str = typer.Option("1,8", help="comma-separated batch sizes"),
           context: str = typer.Option("128", help="comma-separated prompt lengths"),
           new_tokens: int = typer.Option(128, help="tokens generated per request"),
           device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
           engines: str = typer.Option("tierserve,transformers"),
           repeats: int = typer.Option(3, help="timed runs per case (median reported), after one warm-up"),
           smoke: bool = typer.Option(False, help="tiny sizes for CI"),
           output: Path = typer.Option(Path("benchmarks/results/decode.json")),
           plot: bool = typer.Option(True, help="write a PNG beside the JSON")) -> None:
    """Decode tok/s, TTFT and peak memory for tierserve and transformers on identical weights."""
    from rich.console import Console

    from tierserve.bench.decode import DecodeCase, bench_decode

    con = Console(stderr=True)
    if "transformers" in engines:
        try:
            import transformers  # noqa: F401  (the baseline runs in the same process)
        except ModuleNotFoundError:
            con.print("error: the transformers baseline needs `pip install transformers` "
                      "(or pass --engines tierserve)")
            raise typer.Exit(2)
    if smoke:
        batch, context, new_tokens, repeats = "1,2", "16", 8, 1
    cases = [DecodeCase(b, c, new_tokens) for c in _ints(context) for b in _ints(batch)]

    def show(row):
        if "skipped" in row:
            con.print(f"{row['engine']:>12}  batch {row['batch']:>3}  ctx {row['context']:>6}  skipped: {row['skipped']}")
            return
        con.print(f"{row['engine']:>12}  batch {row['batch']:>3}  ctx {row['context']:>6}  "
                  f"{row['tok_s']:9.1f} tok/s  ttft {row['ttft_s']:.3f}s"
                  + (f"  tokens == plain path: {row['tokens_equal_plain']}" if "tokens_equal_plain" in row else ""))
    res = bench_decode(model, cases, load_format=load_format, device=device, dtype=dtype,
                       engines=tuple(engines.split(",")), repeats=repeats, progress=show)
    for row in res["rows"]:
        if "skipped" in row:
            show(row)
    from tierserve.bench.plot import plot_decode
    _write(con, res, output, plot_decode if plot else None)


@app.command()
def tiers(model: Optional[str] = typer.Option(None, help="checkpoint dir or shipped config"),
          load_format: str = typer.Option("auto"), context: str = typer.Option("32768,131072"),
          gpu_frac: str = typer.Option("1,0.6,0.5,0.25,0.1", help="shares of the sequence's KV kept on the GPU "
                                       "(the first is the reference for token equality; 0.6 = the seed's 40% saving)"),
          new_tokens: int = typer.Option(32), cpu_kv_gb: float = typer.Option(8.0),
          policy: str = typer.Option("cost", help="kv_load_policy: cost | always"),
          time_budget: float = typer.Option(500.0, help="seconds; later steps become skipped rows past it"),
          disk_bw_gb: float = typer.Option(2.0, help="GiB of the fresh file whose raw disk read is measured"),
          disk_dir: Optional[str] = typer.Option(None, help="where the disk tier's directory is made (default: TMPDIR)"),
          device: str = typer.Option("auto"), smoke: bool = typer.Option(False, help="tiny sizes for CI"),
          output: Path = typer.Option(Path("benchmarks/results/tiers.json")),
          plot: bool = typer.Option(True, help="write a PNG beside the JSON")) -> None:
    """TTFT cold vs prefix hits from GPU / CPU RAM / disk (forced and as the cost policy chooses), and decode
    with part of the KV on the GPU; rows stream to OUTPUT.partial.jsonl."""
    from rich.console import Console

    from tierserve.bench.tiers import bench_tiers
    from tierserve.bench.tiers_plot import plot_tiers

    con = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    if smoke:
        context, gpu_frac, new_tokens, cpu_kv_gb, disk_bw_gb = "200", "1,0.5", 8, 0.05, 1 / 16
    res = bench_tiers(model, _ints(context), load_format=load_format, device=device,
                      gpu_fracs=tuple(float(x) for x in gpu_frac.split(",")), new_tokens=new_tokens,
                      cpu_kv_gb=cpu_kv_gb, policy=policy, time_budget_s=time_budget,
                      disk_bw_bytes=int(disk_bw_gb * 2**30), disk_root=disk_dir,
                      partial_path=str(output) + ".partial.jsonl", progress=lambda r: con.print(r))
    _write(con, res, output, plot_tiers if plot else None)


@app.command("sparse-recall")
def sparse_recall(model: Optional[str] = typer.Option(None, help="checkpoint dir (default: tierserve-nano)"),
                  topk: str = typer.Option("128,256,512", help="comma-separated sparse_topk_tokens"),
                  context: int = typer.Option(1023), windows: int = typer.Option(4),
                  selector: str = typer.Option("pages", help="comma-separated: pages, indexer"),
                  indexer_path: Optional[str] = typer.Option(None, help="indexer dir (default <model>/indexer)"),
                  page_spread: float = typer.Option(1.0, "--sparse-page-spread", help="pages selector's score "
                                                    "(1: the bound)"),
                  page_size: Optional[int] = typer.Option(None, help="tokens per KV page (default: the engine's)"),
                  output: Path = typer.Option(Path("benchmarks/results/sparse-recall.json"))) -> None:
    """Share of the dense attention mass inside the pages the sparse selector picks, per layer."""
    from tierserve.bench.results import write_result
    from tierserve.bench.sparse_recall import measure_recall
    from tierserve.train.corpus import collect_corpus, read_text

    corpus = collect_corpus(seed=0)
    text = "\n".join(read_text(f) for f in corpus.heldout_files)
    res = measure_recall(model, text, _ints(topk), context, max_windows=windows,
                         selectors=tuple(x.strip() for x in selector.split(",") if x.strip()),
                         indexer_path=indexer_path, page_spread=page_spread, page_size=page_size)
    typer.echo(f"wrote {write_result(res, output)}  {res['summary']}")


@app.command()
def engram(model: Optional[str] = typer.Option("llama-3.1-8b", help="shipped config or checkpoint dir (config.json)"),
           load_format: str = typer.Option("dummy", help="dummy only: random backbone and tables"),
           engram_layers: str = typer.Option("1,15", help="decoder layers that carry Engram"),
           table_params: str = typer.Option("1e9,1e10", help="total table parameters over all Engram layers"),
           heads: int = typer.Option(8, help="hash heads per n-gram order (orders 2, 3)"),
           dim: int = typer.Option(64, help="row width per head"),
           placements: str = typer.Option(",".join(("device", "cpu-copy", "cpu-zero_copy"))),
           batch: str = typer.Option("1,64", help="decode batch sizes"), prompt_len: int = typer.Option(512),
           new_tokens: int = typer.Option(64), prefill: str = typer.Option("8x2048", help="PROMPTSxTOKENS"),
           repeats: int = typer.Option(2, help="timed runs per case (median), after one warm-up"),
           device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
           time_budget: float = typer.Option(480.0, help="seconds; later configurations are skipped past it"),
           smoke: bool = typer.Option(False, help="tiny sizes on the CPU for CI"),
           output: Path = typer.Option(Path("benchmarks/results/engram.json")),
           plot: bool = typer.Option(True, help="write a PNG beside the JSON")) -> None:
    """Engram tables on the device vs in host RAM (copy / zero-copy gathers) vs no Engram: decode and prefill
    tok/s, GPU memory; slowdown of host placement per metric."""
    from rich.console import Console

    from tierserve.bench.engram import EngramSizes, bench_engram, plot_engram

    con = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    if load_format != "dummy":
        raise typer.BadParameter("bench engram builds random weights and tables: use --load-format dummy")
    if smoke:
        model, engram_layers, table_params, heads, dim, device = None, "1,2", "1e5,4e5", 2, 32, "cpu"
        batch, prompt_len, new_tokens, prefill, repeats = "1,4", 16, 8, "2x64", 1
    try:
        n_prompts, prefill_len = (int(x) for x in prefill.lower().split("x"))
        params = [float(x) for x in table_params.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--prefill must be PROMPTSxTOKENS and --table-params numbers, got {prefill!r}, "
                                 f"{table_params!r}")
    sizes = EngramSizes(prompt_len, new_tokens, tuple(_ints(batch)), n_prompts, prefill_len, repeats,
                        step_tokens=256 if smoke else 8192)

    def show(r: dict) -> None:
        head = f"{r['config']:>20}"
        if "metric" not in r:
            con.print(f"{head}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']}")
            return
        peak = f"  peak {r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") else ""
        con.print(f"{head}  {r['metric']:>7} b{r['batch']:<3} {r['tok_s']:10.1f} tok/s{peak}  tokens {r['tokens_sha1']}")
    res = bench_engram(model, params, layers=tuple(_ints(engram_layers)), heads=heads, dim=dim,
                       placements=tuple(p.strip() for p in placements.split(",") if p.strip()), sizes=sizes,
                       device=device, dtype=dtype, time_budget_s=time_budget,
                       partial_path=str(output) + ".partial.jsonl", progress=show,
                       log=con.print)
    _write(con, res, output, plot_engram if plot else None, summary=True)


@app.command("sparse-fp8")
def sparse_fp8(model: Optional[str] = typer.Option("llama-3.1-8b", help="shipped config or checkpoint dir"),
               load_format: str = typer.Option("dummy", help="dummy: random weights at the config's shapes"),
               sections: str = typer.Option("a,b,c", help="a: FP8 weights/KV at 2k; b: sparse (+FP8 KV) at 128k; "
                                            "c: tiered KV (~10%% on the GPU) at 128k and 1M"),
               context: int = typer.Option(2048, help="section a: prompt tokens"),
               new_tokens: int = typer.Option(128, help="section a: tokens generated"),
               repeats: int = typer.Option(2, help="section a: timed runs (median), after one warm-up"),
               long_context: int = typer.Option(131072, help="section b: prompt tokens"),
               long_new_tokens: int = typer.Option(64, help="sections b, c: tokens generated"),
               tier_contexts: str = typer.Option("131072,1048576", help="section c: contexts"),
               prefill_max: int = typer.Option(131072, help="section c: longer contexts are filled synthetically"),
               topk: int = typer.Option(2048, help="sparse_topk_tokens"),
               gpu_frac: float = typer.Option(0.1, help="section c: share of the sequence's pages on the GPU"),
               chunk: int = typer.Option(8192, help="max_num_batched_tokens of long prefills"),
               host_ram_gb: Optional[float] = typer.Option(None, help="section c: cap on the CPU tier's host RAM "
                                                           "(default MemAvailable - 8 GiB)"),
               tier_prefill_budget: float = typer.Option(100.0, help="section c: seconds for a real prefill over "
                                                         "the tiers; past it the context is filled synthetically"),
               budgets: str = typer.Option("a=100,b=180,c=200", help="seconds per section (unused time carries "
                                           "over); later settings are skipped"),
               max_wall: float = typer.Option(510.0, help="seconds after the start past which nothing runs"),
               page_size: Optional[int] = typer.Option(None, help="KV page size of every engine in the run "
                                                       "(baselines included; default: the engine's)"),
               page_spread: float = typer.Option(1.0, "--sparse-page-spread", help="page score of the sparse rows' "
                                                 "engines (--sparse-page-spread; 1: the bound)"),
               device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
               smoke: bool = typer.Option(False, help="tiny sizes on the CPU (tierserve-nano) for CI"),
               output: Path = typer.Option(Path("benchmarks/results/sparse-fp8.json")),
               plot: bool = typer.Option(True, help="write a PNG beside the JSON")) -> None:
    """Issue 6 speed suite: FP8 weights / FP8 KV vs BF16 (a), sparse top-k (+FP8 KV) vs dense at 128k with
    attention ms per step (b), tiered KV with ~10% on the GPU at 128k / 1M (c); every baseline in the same run."""
    from dataclasses import replace

    from rich.console import Console

    from tierserve.bench.sparse_fp8 import SMOKE, Sizes, bench_sparse_fp8, plot_sparse_fp8

    con = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    try:
        budget = {k.strip(): float(v) for k, v in (x.split("=") for x in budgets.split(",") if x.strip())}
        sizes = Sizes(short_context=context, short_new_tokens=new_tokens, repeats=repeats, long_context=long_context,
                      long_new_tokens=long_new_tokens, tier_contexts=tuple(_ints(tier_contexts)),
                      prefill_max=prefill_max, topk=topk, gpu_frac=gpu_frac, chunk=chunk, host_ram_gb=host_ram_gb,
                      budgets={**Sizes().budgets, **budget}, tier_prefill_budget=tier_prefill_budget,
                      max_wall_s=max_wall, page_size=page_size, page_spread=page_spread)
    except ValueError:
        raise typer.BadParameter(f"--budgets must look like a=100,b=180,c=200, got {budgets!r}")
    if page_size is not None and (page_size < 1 or page_size & (page_size - 1)):
        raise typer.BadParameter(f"--page-size must be a power of two, got {page_size}")
    if not 0.0 <= page_spread <= 1.0:
        raise typer.BadParameter(f"--sparse-page-spread must be in [0, 1], got {page_spread}")
    if smoke:
        model, load_format, device, sizes = None, "auto", "cpu", replace(SMOKE, page_size=page_size,
                                                                         page_spread=page_spread)
    secs = tuple(x.strip() for x in sections.split(",") if x.strip())
    if not secs or set(secs) - {"a", "b", "c"}:
        raise typer.BadParameter(f"--sections must be a comma-separated subset of a,b,c, got {sections!r}")

    def show(r: dict) -> None:
        head = f"{r['section']} {r['setting']:>20} {r.get('context', ''):>8}"
        if "tok_s" not in r:
            con.print(f"{head}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r.get('error', '')}")
            return
        extra = "".join(f"  {k} {r[k]:.3g}" for k in ("speedup_vs_bf16", "greedy_match_bf16", "speedup_vs_dense_bf16",
                                                       "attention_ms_per_step", "prefill_s", "fill_s") if r.get(k) is not None)
        con.print(f"{head}  {r['tok_s']:9.1f} tok/s{extra}")
    res = bench_sparse_fp8(model, secs, sizes, load_format=load_format, device=device, dtype=dtype,
                           partial_path=str(output) + ".partial.jsonl", progress=show, log=con.print)
    _write(con, res, output, plot_sparse_fp8 if plot else None, summary=True)


def _mount(module: str, attr: str = "app") -> None:
    try:
        sub = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("tierserve"):
            return
        raise
    for cmd in sub.registered_commands:
        app.registered_commands.append(cmd)


_mount("tierserve.bench.serving_cli")


@app.command("deepseek-v4")
def deepseek_v4(model: Optional[str] = typer.Option("deepseek-v4-flash", help="shipped config or checkpoint dir "
                                                   "(config.json of a DeepSeek-V4)"),
                layers: int = typer.Option(4, help="keep the first N layers (their attention / MoE types)"),
                load_format: str = typer.Option("dummy", help="dummy only: random weights built on the device"),
                context: str = typer.Option("4096,65536,262144", help="comma-separated prompt lengths"),
                new_tokens: int = typer.Option(32, help="greedy tokens per request"),
                long_new_tokens: int = typer.Option(32, help="tokens per request for contexts above 65536"),
                chunk: int = typer.Option(8192, help="max_num_batched_tokens: prefill chunk of tierserve"),
                engines: str = typer.Option("tierserve,transformers"),
                ours_budget: float = typer.Option(330.0, help="seconds from the start by which tierserve's runs "
                                                  "must end (a prefill past it is stopped, row says where)"),
                max_wall: float = typer.Option(500.0, help="seconds from the start after which no transformers "
                                               "run starts"),
                device: str = typer.Option("auto"), dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
                smoke: bool = typer.Option(False, help="tiny V4 on the CPU (fp32) for CI; greedy tokens must agree"),
                cpu_experts: bool = typer.Option(False, "--cpu-experts", help="also run the first context with the "
                                                 "routed experts in CPU RAM (--cpu-experts), after the other rows"),
                output: Path = typer.Option(Path("benchmarks/results/deepseek-v4-h200.json")),
                plot: bool = typer.Option(True, help="write a PNG beside the JSON")) -> None:
    """DeepSeek-V4-Flash cut to N layers: decode tok/s, TTFT, peak memory and state bytes per token,
    tierserve vs transformers on the same dummy weights, at each context (issue 7)."""
    from rich.console import Console

    from tierserve.bench.deepseek_v4 import bench_deepseek_v4
    from tierserve.bench.deepseek_v4_plot import plot_deepseek_v4

    con = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    if load_format != "dummy":
        raise typer.BadParameter("bench deepseek-v4 builds random weights: use --load-format dummy")
    if smoke:
        context, new_tokens, long_new_tokens, chunk, device = "16,40,100", 8, 8, 32, "cpu"
        import torch
        torch.set_num_threads(1)        # tiny ops: thread hand-offs cost more than they give

    def show(r: dict) -> None:
        head = f"{r['engine']:>12} ctx {r['context']:>7}"
        if "tok_s" not in r:
            con.print(f"{head}  " + (f"out of memory: {r['out_of_memory']}" if "out_of_memory" in r
                                    else f"skipped: {r.get('skipped')}"))
            return
        peak = f"  peak {r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") else ""
        state = f"  state {r['state_bytes_per_token']:.0f} B/token" if "state_bytes_per_token" in r else ""
        con.print(f"{head}  {r['tok_s']:9.1f} tok/s  ttft {r['ttft_s']:.3f} s{peak}{state}")
    res = bench_deepseek_v4(model, _ints(context), layers=layers, new_tokens=new_tokens,
                            long_new_tokens=long_new_tokens, chunk=chunk, device=device, dtype=dtype, seed=seed,
                            ours_budget_s=ours_budget, max_wall_s=max_wall,
                            engines=tuple(e.strip() for e in engines.split(",") if e.strip()), smoke=smoke,
                            partial_path=str(output) + ".partial.jsonl", progress=show, log=con.print,
                            cpu_experts=cpu_experts)
    _write(con, res, output, plot_deepseek_v4 if plot else None, summary=True)
    if smoke and not all(r.get("greedy_equal", True) for r in res["rows"]):
        con.print("error: greedy tokens of tierserve and transformers differ on the smoke model")
        raise typer.Exit(1)
