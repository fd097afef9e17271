"""Launch settings of the FP8 decode kernel (``triton_decode_fp8.paged_decode_fp8``) on sparse decode steps.

A sparse step reads ~2k selected tokens per (sequence, KV head) however long the context is, so the dense
defaults (split-K sized by ``max_model_len``, 64-token blocks, 8 warps) leave most programs a single block and the
kernel latency-bound (27 us a layer at 128k on the H200, stop 17). ``scripts/sweep_fp8_sparse_decode.py`` times
the alternatives. Two settings, each a comma-separated ``key=value`` list of ``num_splits``, ``block_n``,
``num_warps``, ``num_stages``, ``prefetch`` (0/1), read once at import:

* ``TIERSERVE_FP8_SPARSE_DECODE``: every selected page on the device;
* ``TIERSERVE_FP8_SPARSE_HOST_DECODE``: with FP8 rows spilled to CPU RAM (read over PCIe in the kernel).

Unset keys keep the kernel's defaults (``num_splits``: the step's, from ``runner/cuda_graphs.decode_splits``).
The same setting applies to eager, multi-step and CUDA-graph steps, so they stay bit-identical to each other.
"""
from __future__ import annotations

import os

KEYS = ("num_splits", "block_n", "num_warps", "num_stages", "prefetch")


def parse(text: str, name: str = "setting") -> dict:
    """``"num_splits=16,block_n=32"`` -> ``{"num_splits": 16, "block_n": 32}`` (``prefetch`` as a bool)."""
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
        if v < 0 or (v == 0 and key != "prefetch") or (key == "prefetch" and v > 1):
            raise ValueError(f"{name}: {key}={v} is out of range")
        out[key] = bool(v) if key == "prefetch" else v
    return out


SPARSE = parse(os.environ.get("TIERSERVE_FP8_SPARSE_DECODE", ""), "TIERSERVE_FP8_SPARSE_DECODE")
SPARSE_HOST = parse(os.environ.get("TIERSERVE_FP8_SPARSE_HOST_DECODE", ""), "TIERSERVE_FP8_SPARSE_HOST_DECODE")


def sparse_decode_config(host: bool) -> dict:
    """The launch settings of a sparse FP8 decode call (a copy; ``host``: spilled rows read from CPU RAM)."""
    return dict(SPARSE_HOST if host else SPARSE)
