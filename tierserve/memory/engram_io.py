"""Engram weights in safetensors: ``model.layers.N.engram.*`` keys (documented in docs/engram.md).

    model.layers.N.engram.table.weight         [R, dim_per_head]  rows of all tables of layer N, concatenated
                                                                  order-major (order 2 heads 0..H-1, then order
                                                                  3 ...); head (o, h) starts at the sum of the
                                                                  earlier tables' prime sizes (float dtype, or
                                                                  float8_e4m3fn with fp8_rows)
    model.layers.N.engram.table.weight_scale   [R, dim/32] uint8  UE8M0 scales (2^(s-127)), FP8 rows only
    model.layers.N.engram.key_proj.weight      [hc*C, E]          E = len(orders) * heads_per_order * dim
    model.layers.N.engram.value_proj.weight    [C, E]
    model.layers.N.engram.key_norm.weight      [hc, C]
    model.layers.N.engram.query_norm.weight    [hc, C]
    model.layers.N.engram.conv_norm.weight     [hc, C]            conv_kernel_size > 0 only
    model.layers.N.engram.conv.weight          [hc*C, K]          depthwise taps, tap K-1 = current position
    model.engram.canonical_ids                 [vocab] int64      token id -> canonical id (optional)

The file's metadata holds ``engram_config`` (EngramConfig as JSON). Disk-placed tables are memory-mapped
straight from the safetensors file (``map_safetensors``), so a table larger than RAM loads without a copy.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tierserve.memory.engram import Engram
from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_table import _memmap

CANONICAL_KEY = "model.engram.canonical_ids"
_NAME = re.compile(r"^model\.layers\.(\d+)\.engram\.(.+)$")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
              "U8": torch.uint8, "I64": torch.int64, "I32": torch.int32}


def engram_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.engram.{name}"


def split_engram_key(key: str) -> tuple[int, str] | None:
    """``model.layers.N.engram.X`` -> (N, X); None for any other tensor name."""
    m = _NAME.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def engram_state(modules: Mapping[int, Engram], canonical: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = {engram_key(layer, n): t for layer, m in modules.items() for n, t in m.checkpoint_tensors().items()}
    if canonical is not None:
        out[CANONICAL_KEY] = canonical.to(torch.int64)
    return out


def save_engram(path: str | os.PathLike, modules: Mapping[int, Engram], canonical: torch.Tensor | None = None) -> None:
    tensors = {k: t.detach().cpu().contiguous() for k, t in engram_state(modules, canonical).items()}
    cfg = next(iter(modules.values())).cfg if modules else None
    meta = {"format": "pt"}
    if cfg is not None:
        meta["engram_config"] = json.dumps(cfg.to_dict())
    save_file(tensors, str(path), metadata=meta)


def read_engram_config(path: str | os.PathLike) -> EngramConfig | None:
    header, _ = read_header(path)
    raw = (header.get("__metadata__") or {}).get("engram_config")
    return EngramConfig.from_dict(json.loads(raw)) if raw else None


def load_engram_weights(modules: Mapping[int, Engram], weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Route ``model.layers.N.engram.*`` tensors of a checkpoint stream into ``modules``; returns the names
    consumed (others are left for the model's loader). Raises on an Engram tensor of a layer without one."""
    used: set[str] = set()
    for key, tensor in weights:
        parsed = split_engram_key(key)
        if parsed is None:
            continue
        layer, name = parsed
        if layer not in modules:
            raise ValueError(f"checkpoint tensor {key!r}: layer {layer} has no Engram "
                             f"(engram.layers = {sorted(modules)})")
        modules[layer].load_tensor(name, tensor)
        used.add(key)
    return used


def load_engram(path: str | os.PathLike, modules: Mapping[int, Engram], strict: bool = True) -> torch.Tensor | None:
    """Load every Engram tensor of a safetensors file. Tables are read through a memory map of the file:
    disk-placed tables without a ``disk_path`` keep using it as their storage (no copy); other placements
    copy from it in row chunks, so a table never sits in RAM twice. ``strict``: every module must find all
    its weights in this file (pass False per shard of a sharded checkpoint and check the union yourself).
    Returns the stored canonical-id table, if any."""
    header, _ = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    engram = [k for k in keys if split_engram_key(k)]
    tables = [k for k in engram if split_engram_key(k)[1].startswith("table.")]
    attached: set[str] = set()
    for layer, m in modules.items():
        mine = {n: engram_key(layer, f"table.{n}") for n in m.table.storage_shapes()}
        if m.table.placement == "disk" and m.table.path is None and any(k in header for k in mine.values()):
            m.table.attach_({n: map_safetensors(path, k) for n, k in mine.items() if k in header})
            attached.update(mine.values())
    load_engram_weights(modules, ((k, map_safetensors(path, k)) for k in tables if k not in attached))
    with safe_open(str(path), framework="pt") as f:
        load_engram_weights(modules, ((k, f.get_tensor(k)) for k in engram if k not in tables))
        canonical = f.get_tensor(CANONICAL_KEY) if CANONICAL_KEY in keys else None
    for layer, m in (modules.items() if strict else ()):
        table = header.get(engram_key(layer, "table.weight"), {})
        quantise = table.get("dtype") not in (None, "F8_E4M3")     # float rows into an FP8 table
        missing = [n for n in m.weight_names() if engram_key(layer, n) not in header
                   and not (quantise and n == "table.weight_scale")]
        if missing:
            raise ValueError(f"{path}: Engram of layer {layer} is missing {missing}")
    return canonical


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(safetensors JSON header, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def map_safetensors(path: str | os.PathLike, key: str) -> torch.Tensor:
    """One tensor of a safetensors file as a copy-on-write memory map (nothing read until rows are used)."""
    header, base = read_header(path)
    if key not in header:
        raise KeyError(f"{path}: no tensor {key!r}")
    info = header[key]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: {key!r} has dtype {info['dtype']}, not one Engram tables use")
    shape = tuple(info["shape"])
    return _memmap(Path(path), shape, dtype, "c", offset=base + info["data_offsets"][0])
