"""`tierserve` command line: generate | info | serve | eval | bench (typer)."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

import typer

from tierserve.cli_options import engine_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tierserve: LLM inference with tiered KV memory, sparse FP8 decoding and an eval suite.")

# Sub-command groups living with their own packages: (module, attribute, name). A group whose extra
# dependencies are not installed is still listed and explains what to install.
_GROUPS = [("tierserve.server.cli", "serve", "serve"), ("tierserve.eval.cli", "app", "eval"),
           ("tierserve.bench.cli", "app", "bench")]


def _version(value: bool) -> None:
    if value:
        from tierserve import __version__
        typer.echo(f"tierserve {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    pass


@app.command()
@engine_options()
def generate(prompt: str = typer.Argument("def fibonacci(n):", help="prompt text"),
             model: Optional[str] = typer.Option(None, help="checkpoint dir (default: embedded tierserve-nano)"),
             max_tokens: int = typer.Option(128, help="tokens to generate"),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_p: float = typer.Option(1.0), top_k: int = typer.Option(0),
             chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
             stream: bool = typer.Option(True, help="print tokens as they arrive"),
             engine_settings: dict = None) -> None:
    """Generate a completion for PROMPT and print it."""
    from tierserve import SamplingParams
    from tierserve.config import EngineConfig
    from tierserve.engine.engine import Engine

    try:
        sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        engine = Engine(EngineConfig.from_kwargs(model=model, **engine_settings), progress=True)
        ids = (engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
               if chat else prompt)
        engine.add_request("cli", ids, sp)
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    if not chat:
        sys.stdout.write(prompt)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            if stream or out.finished:
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
    sys.stdout.write("\n")


@app.command("train-indexer")
def train_indexer_cmd(model: Optional[str] = typer.Option(None, help="checkpoint dir (default: tierserve-nano)"),
                      output: str = typer.Option(..., help="directory for indexer.safetensors + indexer.json"),
                      steps: int = typer.Option(300, min=1), seq_len: int = typer.Option(512, min=32),
                      batch: int = typer.Option(4, min=1), heads: int = typer.Option(4, min=1),
                      lr: float = typer.Option(2e-3), seed: int = typer.Option(0),
                      device: str = typer.Option("auto")) -> None:
    """Distil a lightning indexer (sparse page selector) from the model's own attention on local text."""
    from rich.progress import Progress

    from tierserve.train.indexer import train_indexer

    with Progress(transient=True) as bar:
        task = bar.add_task("training indexer", total=steps)
        res = train_indexer(model, output, steps=steps, seq_len=seq_len, batch=batch, heads=heads, lr=lr,
                            seed=seed, device=device,
                            progress=lambda step, loss: bar.update(task, completed=step + 1,
                                                                   description=f"KL {loss:.4f}"))
    for row in res["heldout"]["per_layer"]:
        typer.echo("  ".join(f"{k} {v}" for k, v in row.items()))
    typer.echo(f"wrote {output} ({res['train_seconds']} s)")


@app.command()
def info(model: Optional[str] = typer.Option(None, help="checkpoint dir or shipped config name")) -> None:
    """Architecture, parameter count, dtype and KV bytes per token of a model (no weights loaded)."""
    from tierserve.loader.hf import load_config, resolve_model_path
    from tierserve.models.config import ModelConfig
    from tierserve.models.registry import get_model_class

    try:
        path = resolve_model_path(model)
        raw = load_config(path)
        if (raw.get("architectures") or [""])[0] == "DeepseekV4ForCausalLM":
            rows = _deepseek_v4_info(path, raw)
        else:
            rows = _llama_info(path, ModelConfig.from_hf(raw))
            get_model_class(rows[1][1])
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{w}}  {v}")


cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear a disk KV cache directory.")
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats(disk_kv_dir: str = typer.Option(..., help="the --disk-kv-dir of the engine")) -> None:
    """Blocks and bytes stored in a disk KV cache."""
    from tierserve.kv.tiers.disk import scan

    s = scan(disk_kv_dir)
    if not s["exists"]:
        typer.secho(f"error: {disk_kv_dir} does not exist", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"dir     {s['dir']}\nblocks  {s['blocks']}\nbytes   {s['bytes']:,} ({s['bytes'] / 2**30:.3f} GiB)")


@cache_app.command("clear")
def cache_clear(disk_kv_dir: str = typer.Option(..., help="the --disk-kv-dir of the engine")) -> None:
    """Delete every stored KV block (and stale temporary files) in the directory."""
    from tierserve.kv.tiers.disk import clear

    typer.echo(f"removed {clear(disk_kv_dir)} file(s) from {disk_kv_dir}")


def _llama_info(path, cfg) -> list[tuple[str, str]]:
    kv16 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    return [("path", str(path)), ("architecture", cfg.architecture),
            ("parameters", f"{cfg.num_params() / 1e6:,.2f} M"), ("checkpoint dtype", cfg.torch_dtype),
            ("layers", str(cfg.num_layers)), ("hidden size", str(cfg.hidden_size)),
            ("heads / kv heads / head dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"),
            ("vocab", str(cfg.vocab_size)), ("max positions", str(cfg.max_position_embeddings)),
            ("rope", f"{cfg.rope.rope_type} (theta {cfg.rope.theta:g})"),
            ("KV bytes per token (bf16)", f"{kv16:,}"), ("KV bytes per token (fp32)", f"{2 * kv16:,}"),
            ("KV bytes per token (fp8 compact)", _fp8_compact_bytes(cfg, 16))]


def _fp8_compact_bytes(cfg, page_size: int) -> str:
    """Bytes per token of a page stored in the FP8 compact pool (codes + per-head scales), pages of 16."""
    from tierserve.quant.fp8_compact import slot_bytes
    per_page = 2 * cfg.num_layers * slot_bytes(page_size, cfg.num_kv_heads, cfg.head_dim, 0, 2)
    kv16 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    return f"{per_page / page_size:,.1f} ({kv16 * page_size / per_page:.2f}x fewer than bf16; " \
           f"sink / recent / written pages stay bf16)"


def _deepseek_v4_info(path, raw: dict) -> list[tuple[str, str]]:
    from tierserve.models.deepseek_v4.config import DeepseekV4Config
    from tierserve.models.deepseek_v4.kv_bytes import page_bytes, state_bytes

    cfg = DeepseekV4Config.from_hf(raw)
    # --kv-dtype fp8 stores compressed entries and index keys in MODEL1; the window ring stays in bf16
    bf16, m1 = state_bytes(cfg, "bf16"), state_bytes(cfg, "model1", window_layout="bf16")
    kinds = {k: cfg.layer_types.count(k) for k in dict.fromkeys(cfg.layer_types)}
    return [("path", str(path)), ("architecture", "DeepseekV4ForCausalLM (engine: per-request state, entries and index keys paged)"),
            ("layers", f"{len(cfg.layer_types)} ({', '.join(f'{n} {k}' for k, n in kinds.items())})"),
            ("hidden size", str(raw.get("hidden_size"))), ("vocab", str(raw.get("vocab_size"))),
            ("experts", f"{raw.get('n_routed_experts')} routed, top-{raw.get('num_experts_per_tok')}, "
                        f"{raw.get('n_shared_experts')} shared"),
            ("KV bytes per token (bf16 / MODEL1 fp8)", f"{bf16.per_token:,.1f} / {m1.per_token:,.1f}"),
            ("state page bytes, 16 tokens (bf16 / MODEL1 fp8)", f"{page_bytes(cfg):,} / {page_bytes(cfg, 'model1'):,}"),
            ("fixed state per request (bf16 / --kv-dtype fp8)",
             f"{(bf16.window + bf16.buffers) / 2**20:.1f} / {(m1.window + m1.buffers) / 2**20:.1f} MiB")]


def _register_groups() -> None:
    for module, attr, name in _GROUPS:
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("tierserve"):
                continue          # not built yet
            missing = e.name

            def _missing(missing=missing, name=name) -> None:
                typer.secho(f"`tierserve {name}` needs {missing}: pip install 'tierserve[server]'",
                            fg="red", err=True)
                raise typer.Exit(2)
            app.command(name, help=f"(needs {missing})")(_missing)
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


_register_groups()

if __name__ == "__main__":
    app()
