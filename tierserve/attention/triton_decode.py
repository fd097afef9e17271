"""Triton paged-attention decode kernel: one query token per sequence, GQA, split-K (flash-decoding).

Grid (batch, kv_head, split). Each program reads the tokens of its split from the request's pages
(any page ids, any number of pages), for all query heads that share the KV head, with an online
softmax; a second small kernel merges the splits by their log-sum-exp. Work per split is bounded
by ``seq_lens`` read on the device, so a CUDA graph captured once serves every context length.
Reference: ``tierserve.attention.torch_ref`` (tests compare them on random inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.attention.backend import choose_splits  # noqa: F401  (re-export)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, seqlen_ptr, o_ptr, lse_ptr, scale,
                         s_qb, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_ptb, s_pth, s_slb, s_slh,
                         s_ob, s_oh, s_os, s_lb, s_lh,
                         tokens_per_split,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b * s_slb + kvh * s_slh)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    if WINDOW > 0:
        start = tl.maximum(start, seq_len - WINDOW)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        page = tl.load(pt_ptr + b * s_ptb + kvh * s_pth + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        off = (t % PAGE).to(tl.int64)
        k = tl.load(k_ptr + page[:, None] * s_kp + off[:, None] * s_kt + kvh * s_kh + d[None, :],
                    mask=t_mask[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + page[:, None] * s_vp + off[:, None] * s_vt + kvh * s_vh + d[None, :],
                    mask=t_mask[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                  # [G, N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :], out, mask=g_mask[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + split, lse, mask=g_mask)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, s_ob, s_oh, s_os, s_lb, s_lh, s_rb, s_rh,
                  NUM_SPLITS: tl.constexpr, SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLIT_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    o = tl.load(o_ptr + b * s_ob + h * s_oh + s[:, None] * s_os + d[None, :], mask=s_mask[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * s_rb + h * s_rh + d, res.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int, max_seq_len: int,
                 sliding_window: int | None = None, out: torch.Tensor | None = None,
                 block_n: int = 64) -> torch.Tensor:
    """q [B, Hq, D]; caches [N, page, Hkv, D] (strided views allowed, last dim contiguous);
    page_table [B, max_pages]; seq_lens [B] (>= 1). Returns [B, Hq, D].
    ``max_seq_len`` bounds the work split (an upper bound is fine, e.g. max_model_len)."""
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    # dense: one page table / length per sequence; sparse: one per (sequence, KV head)
    per_head = page_table.dim() == 3
    s_pth = page_table.stride(1) if per_head else 0
    s_slb, s_slh = (seq_lens.stride(0), seq_lens.stride(1)) if per_head else (seq_lens.stride(0), 0)
    tokens_per_split = -(-max_seq_len // num_splits)
    tokens_per_split = -(-tokens_per_split // block_n) * block_n
    part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, part, lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0), s_pth, s_slb, s_slh,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        tokens_per_split, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=D,
        PAGE=page, BLOCK_N=block_n, WINDOW=sliding_window or 0)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(B, Hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2),
                           lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                           NUM_SPLITS=num_splits, SPLIT_PAD=max(triton.next_power_of_2(num_splits), 1),
                           HEAD_DIM=D)
    return out


def compact_selection(chosen: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                      max_selected: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a page selection into per-(sequence, KV head) page tables the decode kernel reads densely.

    chosen [B, Hkv, P] bool (must include each sequence's last page); page_table [B, P]; seq_lens [B].
    Returns (table [B, Hkv, K] of page ids in position order, lengths [B, Hkv] in tokens): the selected
    pages are full except the last, whose valid length is the sequence's tail. ``max_selected`` is a
    static bound on pages per row (no host sync; entries past a row's length are never read)."""
    B, H, P = chosen.shape
    n_sel = chosen.sum(-1)                                                  # [B, Hkv]
    K = min(P, max_selected) if max_selected is not None else P
    order = torch.where(chosen, torch.arange(P, device=chosen.device), P)   # unselected sort last
    idx = order.sort(dim=-1).values[..., :K].clamp(max=P - 1)              # logical page indices
    table = page_table[:, None, :].expand(B, H, P).gather(-1, idx)
    tail = seq_lens - (seq_lens - 1) // page_size * page_size              # tokens in the last page
    lens = (n_sel - 1) * page_size + tail[:, None]
    return table.contiguous(), lens.contiguous()

