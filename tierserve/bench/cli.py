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
    from tierserve.bench.results import write_result

    con = Console(stderr=True)
    if smoke:
        batch, context, new_tokens, repeats = "1,2", "16", 8, 1
    cases = [DecodeCase(b, c, new_tokens) for c in _ints(context) for b in _ints(batch)]

    def show(row):
        con.print(f"{row['engine']:>12}  batch {row['batch']:>3}  ctx {row['context']:>6}  "
                  f"{row['tok_s']:9.1f} tok/s  ttft {row['ttft_s']:.3f}s")
    res = bench_decode(model, cases, load_format=load_format, device=device, dtype=dtype,
                       engines=tuple(engines.split(",")), repeats=repeats, progress=show)
    path = write_result(res, output)
    con.print(f"wrote {path}")
    if plot:
        try:
            from tierserve.bench.plot import plot_decode
            con.print(f"wrote {plot_decode(res, path.with_suffix('.png'))}")
        except ImportError as e:
            con.print(f"no plot ({e.name} not installed)")


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
