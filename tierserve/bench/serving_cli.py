"""`tierserve bench serving`: load an OpenAI-compatible server and write JSON (+ PNG)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import httpx
import typer

app = typer.Typer(add_completion=False, help="Serving benchmark against a running OpenAI-compatible server.")

SMOKE = dict(concurrency="1,4", input_len=16, output_len=8, num_prompts=8)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise typer.BadParameter(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return vals


@app.command("serving")
def serving(url: str = typer.Option("http://127.0.0.1:8000", help="server base URL"),
            model: Optional[str] = typer.Option(None, help="model name (default: the server's first model)"),
            concurrency: str = typer.Option("1,16,64,256", help="comma-separated concurrency levels"),
            input_len: int = typer.Option(512, min=1, help="prompt tokens per request"),
            output_len: int = typer.Option(128, min=1, help="new tokens per request (ignore_eos)"),
            num_prompts: int = typer.Option(0, min=0, help="requests per level (0: 4 x concurrency, >= 32)"),
            request_rate: float = typer.Option(math.inf, help="Poisson arrival rate, requests/s (inf: all at once)"),
            seed: int = typer.Option(0, help="prompt and arrival seed"),
            api_key: Optional[str] = typer.Option(None, envvar="TIERSERVE_API_KEY"),
            output: Path = typer.Option(Path("benchmarks/results/serving.json"),
                                        help="result JSON; a PNG plot goes beside it"),
            smoke: bool = typer.Option(False, help="tiny CPU-sized run (concurrency 1,4; 16 in / 8 out; 8 prompts)"),
            ) -> None:
    """Request throughput, output tok/s, TTFT and ITL p50/p99 per concurrency level."""
    from tierserve.bench.results import write_result
    from tierserve.bench.serving import plot_serving, run_serving_bench

    if smoke:
        concurrency, input_len, output_len, num_prompts = (SMOKE["concurrency"], SMOKE["input_len"],
                                                           SMOKE["output_len"], SMOKE["num_prompts"])
    levels = _ints(concurrency)
    try:
        result = run_serving_bench(url, model, levels, input_len, output_len, num_prompts, request_rate, seed,
                                   api_key=api_key)
    except (RuntimeError, httpx.HTTPError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    write_result(result, output)
    png = plot_serving(result, output.with_suffix(".png"))
    for r in result["rows"]:
        typer.echo(f"concurrency {r['concurrency']:>4}: {r['request_throughput']:8.2f} req/s "
                   f"{r['output_throughput']:9.1f} tok/s  "
                   f"TTFT p50/p99 {r['ttft_p50_ms']:8.1f}/{r['ttft_p99_ms']:8.1f} ms  "
                   f"ITL p50/p99 {r['itl_p50_ms']:7.1f}/{r['itl_p99_ms']:7.1f} ms  failed {r['failed']}")
    typer.echo(f"wrote {output}" + (f" and {png}" if png else ""))
    if result["summary"]["failed"]:
        raise typer.Exit(1)
