"""Bytes of decode state per request and per token of context, in BF16 and in the MODEL1 layout.

MODEL1 (DeepSeek's FP8 KV format) stores one K=V entry of ``D`` = head_dim channels with ``r`` rope
channels as ``D - r`` FP8 e4m3 values + ``r`` BF16 values + one UE8M0 scale byte per 64 FP8 values,
padded to 8 bytes: 448 + 2*64 + 8 = 584 bytes for V4 (D = 512, r = 64) against 1024 in BF16.
Indexer keys (``Di`` = 128) are FP8 with one fp32 scale per 128 values (132 bytes) against 256 in BF16.

Per layer and request:

* grows with the context ``n``: ``n // m`` compressed entries (CSA ``m = 4``, HCA ``m = 128``) and, in
  CSA layers, ``n // 4`` indexer keys;
* bounded: the window ring (``W`` raw entries, every layer) and the compressors' open-window buffers
  (``< m`` tokens of ``wkv``/``wgate`` projections, plus the previous window's overlap half for CSA and
  its indexer); these stay in the compute dtype (BF16) in both layouts.
"""
from __future__ import annotations

from dataclasses import dataclass

from tierserve.models.deepseek_v4.config import CSA, SLIDING, DeepseekV4Config

LAYOUTS = ("bf16", "model1")


def entry_bytes(head_dim: int, rope_dim: int, layout: str) -> int:
    """Bytes of one K=V entry (window or compressed)."""
    if layout == "bf16":
        return 2 * head_dim
    if layout == "model1":
        nope = head_dim - rope_dim
        scales = -(-nope // 64)
        return nope + 2 * rope_dim + -(-scales // 8) * 8
    raise ValueError(f"KV layout {layout!r} is not supported; allowed: {', '.join(LAYOUTS)}")


def index_key_bytes(index_head_dim: int, layout: str) -> int:
    if layout == "bf16":
        return 2 * index_head_dim
    if layout == "model1":
        return index_head_dim + 4 * -(-index_head_dim // 128)
    raise ValueError(f"KV layout {layout!r} is not supported; allowed: {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class StateBytes:
    per_token: float      # bytes per token of context, summed over layers (compressed entries + index keys)
    window: int           # bytes of all window rings of one request (full window)
    buffers: int          # bytes of all compressor open-window buffers of one request (worst case)

    def at(self, num_tokens: int) -> float:
        """Upper bound of one request's state at ``num_tokens`` tokens of context."""
        return self.window + self.buffers + self.per_token * num_tokens


def state_bytes(cfg: DeepseekV4Config, layout: str = "bf16", buffer_dtype_bytes: int = 2,
                window_layout: str | None = None) -> StateBytes:
    """``window_layout`` (default: ``layout``): the layout of the window rings. The engine's
    ``--kv-dtype fp8`` keeps them in the model dtype (``window_layout="bf16"``, times
    ``buffer_dtype_bytes / 2``); ``layout="model1"`` alone counts them in MODEL1 as well."""
    D, r, W = cfg.head_dim, cfg.rope_compress.rope_dim, cfg.sliding_window
    entry, key = entry_bytes(D, r, layout), index_key_bytes(cfg.index_head_dim, layout)
    wl = layout if window_layout is None else window_layout
    wscale = buffer_dtype_bytes / 2 if wl == "bf16" and window_layout is not None else 1
    per_token, window, buffers = 0.0, 0, 0
    for i, kind in enumerate(cfg.layer_types):
        window += int(W * entry_bytes(D, cfg.rope_for(i).rope_dim, wl) * wscale)
        if kind == SLIDING:
            continue
        m = cfg.compress_ratio(i)
        per_token += entry / m
        width = 2 * D if kind == CSA else D
        buffers += buffer_dtype_bytes * (2 * (m - 1) * width + (2 * m * D if kind == CSA else 0))
        if kind == CSA:
            per_token += key / m
            Di = cfg.index_head_dim
            buffers += buffer_dtype_bytes * (2 * (m - 1) * 2 * Di + 2 * m * Di)
    return StateBytes(per_token=per_token, window=window, buffers=buffers)


def page_bytes(cfg: DeepseekV4Config, layout: str = "bf16", page_size: int = 16) -> int:
    """Bytes of one state page of ``page_size`` tokens over all layers (``paged_state.py``: CSA entries and
    keys ``page_size / m`` per page, an HCA entry cut into ``m / page_size`` pieces padded to whole bytes)."""
    D, r, total = cfg.head_dim, cfg.rope_compress.rope_dim, 0
    for i, kind in enumerate(cfg.layer_types):
        if kind == SLIDING:
            continue
        m = cfg.compress_ratio(i)
        rows = [entry_bytes(D, r, layout)] + ([index_key_bytes(cfg.index_head_dim, layout)] if kind == CSA else [])
        for row in rows:
            total += row * (page_size // m) if m <= page_size else -(-row // (m // page_size))
    return total


def dense_kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """A standard GQA model's K and V bytes per token (e.g. Llama-3.1-8B: 32 * 2 * 8 * 128 * 2 = 131072)."""
    return num_layers * 2 * num_kv_heads * head_dim * dtype_bytes
