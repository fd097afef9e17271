"""Launch settings of the FP8 decode kernel (``triton_decode_fp8.paged_decode_fp8``) in pure decode steps.

A sparse step reads ~2k selected tokens per (sequence, KV head) however long the context is, so the dense
defaults (split-K sized by ``max_model_len``, 64-token blocks, 8 warps) leave most programs a single block and the
kernel latency-bound (27 us a layer at 128k on the H200, stop 17). ``scripts/sweep_fp8_sparse_decode.py`` times
the alternatives. Three settings, each a comma-separated ``key=value`` list of ``num_splits``, ``block_n``,
``num_warps``, ``num_stages``, ``fast`` (0/1: blocks read wholly in FP8 skip the full-precision loads,
bit-identical), ``bulk`` (0/1, dense steps: the blocks between the sink and the recent pages in a loop of unmasked,
pipelined code loads, bit-identical), ``lean`` (0/1, dense steps: a split launch, those blocks by a kernel of their
own in ``num_splits`` parts, then the general kernel over the rest; the same values up to the order of the split
sums; ``block_n`` / ``num_warps`` / ``num_stages`` are the lean kernel's), read once at import:

* ``TIERSERVE_FP8_SPARSE_DECODE``: every selected page on the device;
* ``TIERSERVE_FP8_SPARSE_HOST_DECODE``: with FP8 rows spilled to CPU RAM (read over PCIe in the kernel);
* ``TIERSERVE_FP8_DECODE``: dense steps (no selection).

Unset keys keep the defaults below, then the kernel's (``num_splits``: the step's, from
``runner/cuda_graphs.decode_splits``).
The same setting applies to eager, multi-step and CUDA-graph steps, so they stay bit-identical to each other.
"""
from __future__ import annotations

import os

KEYS = ("num_splits", "block_n", "num_warps", "num_stages", "fast", "bulk", "lean")
FLAGS = ("fast", "bulk", "lean")     # 0 / 1


def parse(text: str, name: str = "setting") -> dict:
    """``"num_splits=16,block_n=32"`` -> ``{"num_splits": 16, "block_n": 32}`` (``fast`` as a bool)."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(f"{name}: expected key=value pairs with keys among {', '.join(KEYS)}, got {part!r}")
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"{name}: {key} must be an integer, got {value!r}") from None
        if v < 0 or (v == 0 and key not in FLAGS) or (key in FLAGS and v > 1):
            raise ValueError(f"{name}: {key}={v} is out of range")
        out[key] = bool(v) if key in FLAGS else v
    return out


# defaults from the H200 sweep at 128k (benchmarks/results/fp8-sparse-decode-sweep-h200.json, 32 layers of 2,048
# selected tokens): on the device 16-token blocks, 2 warps, 1 stage: 16.4 us a layer against 25.8 us with the dense
# settings (the BF16 kernel: 9.9 us); with 90% of the rows in CPU RAM 16 splits of 32-token blocks, 4 warps: 96.6
# against 112.9 us (every setting tried: 96-124 us, PCIe-bound). Inside the engine's tiered 128k step the FP8
# kernel took 3.35 ms with these against 3.41 ms before (profiles-stop18/).
DEFAULT_SPARSE = dict(block_n=16, num_warps=2, num_stages=1)
# dense steps (H200; benchmarks/results/fp8-kv-fast-h200.json with the kernel of 2e63176 in the same run, and
# fp8-kv-32layers-h200.json, 32 layers in turn so that every read comes from HBM): the FP8 kernel holds few programs
# per SM (~190 registers a thread), so it wants more, shorter splits than the BF16 one (``SPLITS``, passed to
# backend.choose_splits by runner/cuda_graphs.decode_splits), 64-token blocks of 4 warps and the codes-only branch.
# Batch 1, 2k context, 32 layers: 36 splits 10.2 us against 24.8 us with the BF16 kernel's 9 splits and the old
# settings (BF16 kernel: 12.6 us); 32k: 80.3 against 170.9 us (BF16: 40.3 us)
DEFAULT_DENSE = dict(block_n=64, num_warps=4, num_stages=2, fast=True)
SPLITS = dict(min_tokens_per_split=64, per_sm=16)
DEFAULT_SPARSE_HOST = dict(num_splits=16, block_n=32, num_warps=4, num_stages=2)
DENSE = parse(os.environ.get("TIERSERVE_FP8_DECODE", ""), "TIERSERVE_FP8_DECODE")
SPARSE = parse(os.environ.get("TIERSERVE_FP8_SPARSE_DECODE", ""), "TIERSERVE_FP8_SPARSE_DECODE")
SPARSE_HOST = parse(os.environ.get("TIERSERVE_FP8_SPARSE_HOST_DECODE", ""), "TIERSERVE_FP8_SPARSE_HOST_DECODE")


def decode_config(sparse: bool, host: bool, page_size: int = 16) -> dict:
    """The launch settings of an FP8 decode call (``sparse``: over a selection; ``host``: spilled rows read from
    CPU RAM): the defaults, overridden key by key by the environment; blocks hold at least one page."""
    if not sparse:
        cfg = {**DEFAULT_DENSE, **DENSE}
    else:
        cfg = {**DEFAULT_SPARSE_HOST, **SPARSE_HOST} if host else {**DEFAULT_SPARSE, **SPARSE}
    if "block_n" in cfg:
        cfg["block_n"] = max(cfg["block_n"], page_size)
    return cfg
