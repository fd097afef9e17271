"""``tierserve eval``: ppl | needle | humaneval | svg -- in-process (any engine settings) or against any
OpenAI-compatible endpoint (``--endpoint URL --model NAME [--api-key KEY]``). Each run writes one result JSON."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer

from tierserve.cli_options import engine_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Verify a model: perplexity, passkey retrieval, HumanEval pass@k, SVG generation.")

_ENDPOINT = "OpenAI-compatible server URL, e.g. http://localhost:8000 (default: the in-process engine)"
_MODEL = "in-process: checkpoint dir (default: tierserve-nano); with --endpoint: the server's model name"
_KEY = "API key for --endpoint (or env TIERSERVE_API_KEY)"
_OUT = "result JSON (default: ./eval-<command>-<UTC time>.json)"
_CONC = "parallel requests to --endpoint"
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError)
# options every subcommand has (typer accepts one OptionInfo as the default of several commands)
MODEL = typer.Option(None, help=_MODEL)
ENDPOINT = typer.Option(None, help=_ENDPOINT)
API_KEY = typer.Option(None, envvar="TIERSERVE_API_KEY", help=_KEY)
CONCURRENCY = typer.Option(8, help=_CONC)
OUTPUT = typer.Option(None, "--output", "-o", help=_OUT)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


@contextmanager
def _errors() -> Iterator[None]:
    from tierserve.eval.client import EndpointError
    try:
        yield
    except (*_USER_ERRORS, EndpointError) as e:
        _fail(str(e))


@contextmanager
def _progress(desc: str, total: int | None = None) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True))
    lock = threading.Lock()
    with bar:
        task = bar.add_task(desc, total=total)

        def advance(n: int) -> None:
            with lock:
                bar.advance(task, n)

        def set_total(n: int) -> None:
            bar.update(task, total=n)
        yield advance, set_total


def _generator(model, endpoint, api_key, concurrency, engine_settings: dict):
    from tierserve.eval.client import make_generator
    return make_generator(model=model, endpoint=endpoint, api_key=api_key, concurrency=concurrency,
                          **engine_settings)


def _report(sub: str, gen, settings: dict[str, Any], rows, summary, output: Optional[Path]) -> Path:
    from tierserve.eval.report import Report, device_info

    dev = device_info((getattr(gen, "settings", {}) or {}).get("device"), getattr(gen, "endpoint", None))
    rep = Report(sub, {"generator": gen.describe() if gen else None, **settings}, rows, summary, dev)
    path = rep.write(output)
    typer.secho(f"wrote {path}", fg="green", err=True)
    return path


def _ints(s: str, name: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        _fail(f"{name} must be comma-separated integers, got {s!r}")


def _floats(s: str, name: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        _fail(f"{name} must be comma-separated numbers, got {s!r}")


@app.command()
@engine_options()
def ppl(more: Optional[List[str]] = typer.Argument(None, metavar="[SETTINGS]...",
                                                   help="further --compare settings strings"),
        data: Optional[List[Path]] = typer.Option(None, "--data", help="text file (one document) or .jsonl "
                                                  "({\"text\": ...} per line); repeatable"),
        corpus: Optional[str] = typer.Option(None, help="nano-heldout: tierserve-nano's held-out corpus"),
        context: Optional[int] = typer.Option(None, help="window in tokens (default: 2048 or max_model_len-1)"),
        stride: Optional[int] = typer.Option(None, help="window step in tokens (default: context/4)"),
        max_bytes: Optional[int] = typer.Option(None, help="score only the first N bytes of text"),
        add_bos: bool = typer.Option(True, help="prefix each document with BOS (else EOS) so every token is scored"),
        compare: Optional[List[str]] = typer.Option(None, "--compare", help="engine settings string, e.g. "
                                                    "\"\" \"kv_dtype=fp8\" \"max_num_batched_tokens=32,page_size=8\""),
        model: Optional[str] = MODEL, endpoint: Optional[str] = ENDPOINT, api_key: Optional[str] = API_KEY,
        concurrency: int = CONCURRENCY, output: Optional[Path] = OUTPUT,
        engine_settings: dict = None) -> None:
    """Sliding-window perplexity and bits per byte; --compare runs it under several engine settings."""
    from tierserve.eval import ppl as P
    from tierserve.eval.settings import label, parse_settings, validate

    if more and compare is None:
        _fail(f"unexpected argument(s) {more!r}: settings strings follow --compare")
    specs = list(compare or []) + list(more or []) or [""]
    with _errors():
        if endpoint and len(specs) > 1:
            raise ValueError("--compare needs the in-process engine: an endpoint's settings are fixed by its server")
        parsed = [parse_settings(s) for s in specs]
        for p in parsed:
            validate({**engine_settings, **p})
        docs = P.load_documents(data or [], corpus, max_bytes)
        results, labels, gen = [], [], None
        for p in parsed:
            gen = _generator(model, endpoint, api_key, concurrency, {**engine_settings, **p})
            context, stride = P.resolve_window(gen, context, stride)
            with _progress(f"ppl {label(p)}") as (adv, tot):
                results.append(P.evaluate(gen, docs, context, stride, add_bos, adv, tot))
            labels.append(label(p))
            gen.close()
        rows = P.compare_rows(labels, results, "endpoint" if endpoint else "tierserve")
    P.print_table(rows)
    first = rows[0]
    summary = {k: first[k] for k in ("ppl", "bits_per_byte", "tokens", "bytes", "documents")}
    if len(rows) > 1:
        summary["compare"] = {r["setting"]: {"ppl": r["ppl"], "delta_ppl_pct": r["delta_ppl_pct"],
                                             "bits_per_byte": r["bits_per_byte"]} for r in rows}
    _report("ppl", gen, {"engine_settings": engine_settings, "compare": specs, "context": context,
                         "stride": stride, "data": [str(d) for d in data or []], "corpus": corpus,
                         "max_bytes": max_bytes, "add_bos": add_bos}, rows, summary, output)


@app.command()
@engine_options()
def needle(contexts: str = typer.Option("256,512,1024,2048,4096,8192", help="context lengths in tokens"),
           depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths in [0, 1]"),
           trials: int = typer.Option(3, help="passkeys per grid cell"),
           style: str = typer.Option("text", help="text (classic passkey) | code (PASS_KEY = ... in Python)"),
           max_tokens: int = typer.Option(8, help="answer length in tokens"),
           key_seed: int = typer.Option(0, help="seed of the passkeys"),
           model: Optional[str] = MODEL, endpoint: Optional[str] = ENDPOINT, api_key: Optional[str] = API_KEY,
           concurrency: int = CONCURRENCY, output: Optional[Path] = OUTPUT,
           engine_settings: dict = None) -> None:
    """Passkey retrieval over context length x depth; writes an accuracy heat map next to the JSON."""
    from tierserve.eval import needle as N
    from tierserve.eval.report import default_output, sibling

    ctx, dep = _ints(contexts, "--contexts"), _floats(depths, "--depths")
    with _errors():
        gen = _generator(model, endpoint, api_key, concurrency, engine_settings)
        with _progress("needle") as (adv, tot):
            rows, summary = N.run(gen, ctx, dep, trials, style, max_tokens, key_seed, adv, tot)
        gen.close()
    out = output or default_output("needle")
    summary["heatmap"] = str(N.heatmap(rows, sibling(out, "-heatmap.png"), f"passkey retrieval ({style}): {gen.name}"))
    typer.echo(f"accuracy {summary['accuracy']:.3f}  by context: "
               + ", ".join(f"{c}: {a:.2f}" for c, a in summary["accuracy_by_context"].items())
               + (f"  (skipped, too long or too short: {summary['skipped_contexts']})"
                  if summary["skipped_contexts"] else ""))
    _report("needle", gen, {"engine_settings": engine_settings, "contexts": ctx, "depths": dep, "trials": trials,
                            "style": style, "max_tokens": max_tokens, "key_seed": key_seed}, rows, summary, out)


@app.command()
@engine_options()
def humaneval(completions: Optional[Path] = typer.Option(None, help="score this JSONL (task_id, completion) "
                                                         "instead of generating"),
              samples: int = typer.Option(1, help="completions per problem (n)"),
              temperature: float = typer.Option(0.0, help="0 = greedy; use e.g. 0.8 with --samples 20 for pass@10"),
              top_p: float = typer.Option(0.95), max_tokens: int = typer.Option(512),
              task: Optional[List[str]] = typer.Option(None, help="only these tasks (HumanEval/0 or 0); repeatable"),
              limit: Optional[int] = typer.Option(None, help="only the first N problems"),
              timeout: float = typer.Option(10.0, help="seconds per program"),
              memory_mb: int = typer.Option(1024, help="address-space limit per program"),
              workers: int = typer.Option(max(1, os.cpu_count() or 1), help="programs run in parallel"),
              model: Optional[str] = MODEL, endpoint: Optional[str] = ENDPOINT, api_key: Optional[str] = API_KEY,
              concurrency: int = CONCURRENCY, output: Optional[Path] = OUTPUT,
              engine_settings: dict = None) -> None:
    """HumanEval pass@k with every completion executed in a sandboxed process."""
    from tierserve.eval import humaneval as H
    from tierserve.eval.client import GenParams
    from tierserve.eval.report import default_output, sibling

    out = output or default_output("humaneval")
    gen = None
    with _errors():
        problems = H.select(H.load_problems(), task or [], limit)
        if completions:
            samp = H.read_completions(completions)
            if task or limit is not None:
                samp = {t: c for t, c in samp.items() if t in problems}
                if not samp:
                    raise ValueError(f"{completions} has no completions for the selected tasks")
        else:
            gen = _generator(model, endpoint, api_key, concurrency, engine_settings)
            with _progress("generating", len(problems)) as (adv, _):
                samp = H.generate(gen, problems, GenParams(max_tokens=max_tokens, temperature=temperature,
                                                           top_p=top_p, n=samples), advance=adv)
            gen.close()
            H.write_completions(sibling(out, "-completions.jsonl"), samp)
        with _progress("executing", sum(len(v) for v in samp.values())) as (adv, _):
            rows, summary = H.score(problems, samp, timeout, workers, memory_mb, advance=adv)
    typer.echo("  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@"))
               + f"  ({summary['problems']} problems, {summary['samples_per_problem']} samples each)")
    _report("humaneval", gen, {"engine_settings": engine_settings, "completions": str(completions) if completions
                               else None, "samples": samples, "temperature": temperature, "top_p": top_p,
                               "max_tokens": max_tokens, "stop": H.STOP, "timeout": timeout, "memory_mb": memory_mb,
                               "tasks": task, "limit": limit}, rows, summary, out)


@app.command()
@engine_options()
def svg(svgs: Optional[Path] = typer.Option(None, help="score the *.svg files in this directory instead of generating"),
        prompts: Optional[Path] = typer.Option(None, help="prompt set JSON (default: the shipped one)"),
        limit: Optional[int] = typer.Option(None, help="only the first N prompts"),
        chat: bool = typer.Option(False, help="use the chat template / chat endpoint"),
        max_tokens: int = typer.Option(1024), temperature: float = typer.Option(0.0),
        timeout: float = typer.Option(10.0, help="render time limit per SVG (s)"),
        workers: int = typer.Option(max(1, os.cpu_count() or 1), help="renders in parallel"),
        model: Optional[str] = MODEL, endpoint: Optional[str] = ENDPOINT, api_key: Optional[str] = API_KEY,
        concurrency: int = CONCURRENCY, output: Optional[Path] = OUTPUT,
        engine_settings: dict = None) -> None:
    """SVG generation: safe parse, sandboxed render, metrics and a contact sheet."""
    from tierserve.eval import svg as S
    from tierserve.eval.client import GenParams
    from tierserve.eval.report import default_output, sibling

    out = output or default_output("svg")
    gen = None
    with _errors():
        if svgs:
            items = S.read_dir(svgs)
        else:
            instruction, plist = S.load_prompts(prompts, limit)
            gen = _generator(model, endpoint, api_key, concurrency, engine_settings)
            with _progress("generating", len(plist)) as (adv, _):
                items = S.generate(gen, plist, instruction, GenParams(max_tokens=max_tokens, temperature=temperature),
                                   chat, adv)
            gen.close()
            keep = sibling(out, "-svgs")
            keep.mkdir(parents=True, exist_ok=True)
            for item_id, text, _ in items:
                if text:
                    (keep / f"{item_id}.svg").write_text(text, encoding="utf-8")
        with _progress("rendering", len(items)) as (adv, _):
            rows, pngs, summary = S.score_all(items, timeout, workers, adv)
    summary["contact_sheet"] = str(S.contact_sheet(rows, pngs, sibling(out, "-contact.png")))
    typer.echo(f"valid {summary['valid_rate']:.3f}  renderable {summary['renderable_rate']:.3f}  "
               f"({summary['items']} items, renderer {summary['renderer']})")
    _report("svg", gen, {"engine_settings": engine_settings, "svgs": str(svgs) if svgs else None, "chat": chat,
                         "max_tokens": max_tokens, "temperature": temperature, "timeout": timeout,
                         "prompts": str(prompts or S.PROMPTS)}, rows, summary, out)
