"""Steps that mix prefill chunks with decodes (GPU backend).

The step is split once (cached in ``meta.backend_data``): decode rows go to the paged decode kernel
as one batch; a fresh prompt (position 0, within the window) runs SDPA with ``is_causal`` on its own
new keys (flash attention, nothing gathered); every other chunk (continued, a prefix-cache hit, or a
prompt longer than the sliding window) goes, packed (``packed_chunks``), to the paged prefill kernel (attention/triton_prefill.py), which reads the cached context from the pages
(``prefill_chunk`` below, a gather + masked SDPA, is the fallback for head sizes the kernel lacks). The
reference (``torch_ref``) instead pads every request of the step to the longest query and longest
context, which costs O(batch x max_query x max_context) per layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierserve.attention.backend import AttnMetadata, choose_splits


@dataclass
class StepSplit:
    dec_tokens: torch.Tensor | None         # packed token index of each decode row
    dec_table: torch.Tensor | None
    dec_lens: torch.Tensor | None
    dec_splits: int
    prefills: list[tuple[int, int, int, int]]   # (sequence, first token, last token + 1, start position)


def is_fresh(n: int, start: int, window: int | None) -> bool:
    """A chunk that attends only to its own new tokens (SDPA with is_causal)."""
    return start == 0 and (window is None or n <= window)


def split_step(meta: AttnMetadata, num_kv_heads: int) -> StepSplit:
    cached = meta.backend_data.get("mixed_split")
    if cached is not None:
        return cached
    qsl = [0]
    for n in meta.query_lens_cpu:
        qsl.append(qsl[-1] + n)
    dec = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
    prefills = [(b, qsl[b], qsl[b + 1], meta.seq_lens_cpu[b] - n)
                for b, n in enumerate(meta.query_lens_cpu) if n > 1]
    dev = meta.positions.device
    if dec:
        idx = torch.tensor(dec, device=dev)
        max_len = max(meta.seq_lens_cpu[b] for b in dec)
        split = StepSplit(torch.tensor([qsl[b] for b in dec], device=dev), meta.page_table[idx],
                          meta.seq_lens[idx], choose_splits(len(dec), num_kv_heads, max_len), prefills)
    else:
        split = StepSplit(None, None, None, 1, prefills)
    meta.backend_data["mixed_split"] = split
    return split


def decode_meta(meta: AttnMetadata, split: StepSplit) -> AttnMetadata:
    """The step's decode rows as a pure decode step of their own (for paths that select pages per row, and their
    reference fallback): the rows' tokens, tables and lengths."""
    n, t = split.dec_tokens.shape[0], split.dec_tokens
    return dataclasses.replace(meta, num_seqs=n, num_tokens=n, page_table=split.dec_table, seq_lens=split.dec_lens,
                               positions=meta.positions[t], slot_pages=meta.slot_pages[t],
                               slot_offsets=meta.slot_offsets[t],
                               query_start_loc=torch.arange(n + 1, device=t.device, dtype=meta.query_start_loc.dtype),
                               decode_only=True, backend_data={}, query_lens_cpu=[1] * n, num_splits=split.dec_splits,
                               seq_lens_cpu=[s for s, q_n in zip(meta.seq_lens_cpu, meta.query_lens_cpu) if q_n == 1])


def packed_chunks(meta: AttnMetadata, split: StepSplit, window: int | None, fresh_too: bool = False,
                  skip: frozenset = frozenset()):
    """The step's prefill chunks that a prefill kernel handles -- those that read cached context (or, with a
    window, more than their own tokens' window), or every chunk with ``fresh_too`` -- packed: (page-table
    rows, first packed token, query length, context length per chunk on the device, longest chunk), or None
    when there are none; the chunks of the sequences in ``skip`` left out (another path computes them). Cached
    per (window, fresh_too, skip) in ``meta.backend_data``."""
    key = ("packed_chunks", window, fresh_too, skip)
    if key not in meta.backend_data:
        ch = [c for c in split.prefills if (fresh_too or not is_fresh(c[2] - c[1], c[3], window))
              and c[0] not in skip]
        dev = meta.positions.device
        meta.backend_data[key] = None if not ch else (
            meta.page_table[torch.tensor([c[0] for c in ch], device=dev)],
            torch.tensor([c[1] for c in ch], device=dev), torch.tensor([c[2] - c[1] for c in ch], device=dev),
            torch.tensor([c[3] + c[2] - c[1] for c in ch], device=dev), max(c[2] - c[1] for c in ch))
    return meta.backend_data[key]


def prefill_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                  meta: AttnMetadata, seq: int, start: int, scale: float,
                  window: int | None = None) -> torch.Tensor:
    """Attention of one request's new tokens (q/k/v [n, H, D], already written to the pages) over its
    context. Returns [n, Hq, D]."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    qh = q.transpose(0, 1)[None]                                              # [1, Hq, n, D]
    if is_fresh(n, start, window):
        keys, vals = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qh, keys, vals, is_causal=True, scale=scale,
                                             enable_gqa=hq != hkv)
        return out[0].transpose(0, 1)
    page = meta.page_size
    end = start + n
    pages = meta.page_table[seq, :-(-end // page)]
    kv = kv_layer[pages][:, :, :page]                                         # [np, 2, page, Hkv, D]
    keys = kv[:, 0].reshape(-1, hkv, d)[:end].transpose(0, 1)[None].to(q.dtype)
    vals = kv[:, 1].reshape(-1, hkv, d)[:end].transpose(0, 1)[None].to(q.dtype)
    q_pos = torch.arange(start, end, device=q.device)[:, None]
    k_pos = torch.arange(end, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    out = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    return out[0].transpose(0, 1)
