"""Every EngineConfig field becomes a CLI option ``--foo-bar`` (one name everywhere)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import typer

from tierserve.config import EngineConfig

_HELP = {
    "tokenizer": "tokenizer directory (default: the model's)",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda",
    "max_model_len": "longest sequence (prompt + output) in tokens",
    "page_size": "tokens per KV page (power of two)",
    "num_kv_pages": "KV pool size in pages",
    "gpu_kv_gb": "KV pool size in GiB on the compute device",
    "gpu_memory_utilization": "share of GPU memory the engine may use",
    "max_num_batched_tokens": "token budget per engine step",
    "max_num_seqs": "max running requests",
    "enable_prefix_caching": "reuse KV pages of shared prefixes",
    "prefix_unit": "DeepSeek-V4: tokens per stored prefix unit (state snapshot every N tokens; default 1024)",
    "prefix_cache_gb": "DeepSeek-V4: GiB for prefix state snapshots (default: a quarter of the KV pool's size)",
    "cpu_experts": "MoE models (DeepSeek-V4): routed experts live in (pinned) CPU RAM and run on the CPU; "
                   "attention, gates and the shared expert stay on the device",
    "load_format": "auto | safetensors | dummy (random weights from config.json)",
    "sparse_attention": "pages: top-k sparse attention over pages scored by key min/max bounds (lossy)",
    "sparse_topk_tokens": "tokens each query attends to with --sparse-attention",
    "sparse_page_spread": "--sparse-attention pages: page score q.c + S |q|.r from each page's key min / max (c: "
                          "midpoint, r: half range); 1 = the upper bound (default), 0.5 ranked better on nano "
                          "(docs/sparse.md)",
    "kv_dtype": "auto | fp8: FP8 e4m3 KV pages with power-of-two scales; sink + recent tokens stay full precision (lossy)",
    "kv_fp8_keep_sink": "with --kv-dtype fp8: first N tokens of each sequence read at full precision",
    "kv_fp8_keep_recent": "with --kv-dtype fp8: the N most recent tokens of each query read at full precision",
    "kv_fp8_storage": "with --kv-dtype fp8: auto | compact (FP8 pages in a compact pool: ~2x the tokens) | "
                      "inplace (part 1: quantised in place, no memory saved); auto = compact unless "
                      "--sparse-attention is on or the KV budget leaves the compact pool under 25% more room",
    "quantization": "fp8: block-scaled FP8 weights, quantised on load (lossy)",
    "fp8_lm_head": "with --quantization fp8: the output projection (logits) in FP8 as well (lossy; Llama family)",
    "engram_placement": "where Engram tables live: device | cpu (pinned host RAM) | disk",
    "attention_backend": "auto | torch_ref | triton",
    "enforce_eager": "run without CUDA graphs",
    "cpu_kv_gb": "KV tier in (pinned) CPU RAM, GiB",
    "disk_kv_dir": "KV tier on disk: directory (context caching across restarts)",
    "disk_kv_gb": "disk KV tier capacity, GiB",
    "remote_kv_url": "KV tier on Redis/Valkey, e.g. redis://127.0.0.1:6379",
    "kv_load_policy": "cost (load a lower-tier hit only when faster than recompute) | always",
    "kv_prefetch": "read a waiting request's disk/remote prefix hits into CPU RAM in the background "
                   "(default: on when --disk-kv-dir or --remote-kv-url is set)",
    "kv_load_overlap": "CUDA: copy CPU-RAM prefix hits layer by layer on a side stream while the forward pass "
                       "runs (--no-kv-load-overlap: all copied first; env TIERSERVE_KV_OVERLAP=0 as well)",
    "debug_invariants": "check page accounting after every step",
    "seed": "engine seed",
}


def _base_type(annotation: str) -> type:
    for name, t in (("bool", bool), ("int", int), ("float", float)):
        if name in annotation:
            return t
    return str


def engine_options(skip: tuple[str, ...] = ("model",)) -> Callable:
    """Append one option per EngineConfig field to a typer command; it receives them as
    ``engine_settings: dict`` (only the options the user set)."""
    fields = [f for f in dataclasses.fields(EngineConfig) if f.name not in skip]

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name != "engine_settings"]
        for f in fields:
            t = _base_type(str(f.type))
            flag = "--" + f.name.replace("_", "-")
            decl = f"{flag}/--no-{flag[2:]}" if t is bool else flag
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[t],
                default=typer.Option(None, decl, help=_HELP.get(f.name, ""), rich_help_panel="Engine settings")))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            settings = {f.name: kwargs.pop(f.name) for f in fields if kwargs.get(f.name) is not None}
            for f in fields:
                kwargs.pop(f.name, None)
            return fn(*args, engine_settings=settings, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        return wrapper

    return deco
