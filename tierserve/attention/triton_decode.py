"""Triton paged-attention decode kernel: one query token per sequence, GQA, split-K (flash-decoding).

Grid (batch, kv_head, split). Each program reads its share of a sequence's tokens from the
request's pages (any page ids, any number of pages) for all query heads that share the KV head
(padded to 16 rows so both products run on tensor cores), with an online softmax in base 2; a
second small kernel merges the splits by their log-sum-exp (skipped with one split). The split
length comes from ``seq_lens`` read on the device, so a CUDA graph captured once serves every
context length and a short context still uses every split.
Reference: ``tierserve.attention.torch_ref`` (tests compare them on random inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.attention.backend import choose_splits  # noqa: F401  (re-export)


@triton.jit
def load_group_q(q_ptr, b, kvh, s_qb, s_qh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The query heads sharing KV head ``kvh``, padded to GROUP_PAD rows: (q, heads, row mask, dims)."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, heads, g_mask, d


@triton.jit
def load_page_rows(k_ptr, v_ptr, hk_ptr, hv_ptr, row_pt_ptr, t, t_mask, kvh, d,
                   s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_hkp, s_hvp, n_dev, PAGE: tl.constexpr, HOST: tl.constexpr):
    """K and V rows [N, D] of KV head ``kvh`` at token positions ``t`` of the sequence whose page table
    starts at ``row_pt_ptr``. With HOST, page ids >= n_dev are host slots read from pinned CPU RAM
    (``hk_ptr`` / ``hv_ptr``, the same per-page layout)."""
    page = tl.load(row_pt_ptr + t // PAGE, mask=t_mask, other=0).to(tl.int64)
    off = (t % PAGE).to(tl.int64)
    if HOST:
        on_host = page >= n_dev
        dp = tl.where(on_host, 0, page)
        hp = tl.where(on_host, page - n_dev, 0)
        dm, hm = t_mask & (page < n_dev), t_mask & on_host
        row = off[:, None] * s_kt + kvh * s_kh + d[None, :]
        k = tl.load(k_ptr + dp[:, None] * s_kp + row, mask=dm[:, None], other=0.0) + \
            tl.load(hk_ptr + hp[:, None] * s_hkp + row, mask=hm[:, None], other=0.0)
        row = off[:, None] * s_vt + kvh * s_vh + d[None, :]
        v = tl.load(v_ptr + dp[:, None] * s_vp + row, mask=dm[:, None], other=0.0) + \
            tl.load(hv_ptr + hp[:, None] * s_hvp + row, mask=hm[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + page[:, None] * s_kp + off[:, None] * s_kt + kvh * s_kh + d[None, :],
                    mask=t_mask[:, None], other=0.0)
        v = tl.load(v_ptr + page[:, None] * s_vp + off[:, None] * s_vt + kvh * s_vh + d[None, :],
                    mask=t_mask[:, None], other=0.0)
    return k, v


@triton.jit
def softmax_update(s, v, m_i, l_i, acc):
    """One key block of the online softmax in base 2 (``s`` [rows, N] scores, -inf where masked; ``v``
    [N, D]): returns the new running max, sum and accumulator. Rows with no visible key so far stay empty."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def store_split(o_ptr, lse_ptr, acc, m_i, l_i, b, heads, split, g_mask, d, s_ob, s_oh, s_os, s_lb, s_lh,
                DIRECT: tl.constexpr):
    """Epilogue of a split program: normalise; with one split write the final output (no merge pass),
    else the partial output and its base-2 log-sum-exp."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_mask[:, None])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :], out, mask=g_mask[:, None])
        tl.store(lse_ptr + b * s_lb + heads * s_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, seqlen_ptr, o_ptr, lse_ptr, qk_scale,
                         s_qb, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_ptb, s_pth, s_slb, s_slh,
                         s_ob, s_oh, s_os, s_lb, s_lh, hk_ptr, hv_ptr, s_hkp, s_hvp, n_dev,
                         NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         WINDOW: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
                         HOST: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``: fires once every program has started)
    pdl.wait(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b * s_slb + kvh * s_slh)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seq_len - WINDOW, 0)
    # each sequence spreads its own length over the splits (read on the device: graph-safe)
    per = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per
    end = tl.minimum(start + per, seq_len)
    q, heads, g_mask, d = load_group_q(q_ptr, b, kvh, s_qb, s_qh, GROUP, GROUP_PAD, HEAD_DIM, UPCAST)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        k, v = load_page_rows(k_ptr, v_ptr, hk_ptr, hv_ptr, pt_ptr + b * s_ptb + kvh * s_pth, t, t_mask, kvh, d,
                              s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_hkp, s_hvp, n_dev, PAGE, HOST)
        if UPCAST:     # the CPU interpreter's dot mishandles bf16; the GPU multiplies bf16 directly
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale          # [G, N], log2 units
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc)
    store_split(o_ptr, lse_ptr, acc, m_i, l_i, b, heads, split, g_mask, d, s_ob, s_oh, s_os, s_lb, s_lh, DIRECT)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, s_ob, s_oh, s_os, s_lb, s_lh, s_rb, s_rh,
                  NUM_SPLITS: tl.constexpr, SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PDL: tl.constexpr = False):
    pdl.release(PDL)        # the next kernel (o_proj, ``tierserve.pdl``) may be scheduled now
    pdl.wait(PDL)           # (launched early itself: the partials come from the decode kernel)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLIT_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    o = tl.load(o_ptr + b * s_ob + h * s_oh + s[:, None] * s_os + d[None, :], mask=s_mask[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * s_rb + h * s_rh + d, res.to(out_ptr.dtype.element_ty))


_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def split_buffers(out: torch.Tensor, num_splits: int):
    """Per-split partial outputs and log-sum-exps [B, Hq, splits(, D)] fp32 with their strides; with one
    split the kernel writes ``out`` directly (strides of ``out``, no lse)."""
    B, Hq, D = out.shape
    if num_splits == 1:
        return out, out, (out.stride(0), out.stride(1), 0), (0, 0)
    part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=out.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=out.device)
    return part, lse, (part.stride(0), part.stride(1), part.stride(2)), (lse.stride(0), lse.stride(1))


def merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    B, Hq, num_splits, D = part.shape
    _merge_kernel[(B, Hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2),
                           lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                           NUM_SPLITS=num_splits, SPLIT_PAD=max(triton.next_power_of_2(num_splits), 1),
                           HEAD_DIM=D, PDL=pdl.active(out.device), **pdl.dependent_options(out.device))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int, sliding_window: int | None = None,
                 out: torch.Tensor | None = None, block_n: int | None = None, num_warps: int = 4,
                 num_stages: int = 2, host_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                 num_device_pages: int = 0) -> torch.Tensor:
    """q [B, Hq, D]; caches [N, page, Hkv, D] (strided views allowed, last dim contiguous);
    page_table [B, max_pages] (or [B, Hkv, K] per KV head); seq_lens [B] (or [B, Hkv]), each >= 1.
    Returns [B, Hq, D]. Each sequence's keys are split evenly over ``num_splits`` programs.
    ``host_cache``: (K, V) views of spilled pages in (pinned) CPU RAM with the caches' per-page layout;
    page ids >= ``num_device_pages`` are read from there (slot = id - num_device_pages)."""
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if block_n is None:     # H200 sweep: 128-token blocks when one program reads a whole sequence
        block_n = 128 if num_splits == 1 else 64
    group = Hq // Hkv
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    # dense: one page table / length per sequence; sparse: one per (sequence, KV head)
    per_head = page_table.dim() == 3
    s_pth = page_table.stride(1) if per_head else 0
    s_slb, s_slh = (seq_lens.stride(0), seq_lens.stride(1)) if per_head else (seq_lens.stride(0), 0)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    direct = num_splits == 1
    part, lse, s_part, s_lse = split_buffers(out, num_splits)
    hk, hv = host_cache if host_cache is not None else (k_cache, v_cache)
    if host_cache is not None:
        assert hk.stride()[1:] == k_cache.stride()[1:] and hv.stride()[1:] == v_cache.stride()[1:], \
            "host pages must have the device pages' layout"
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, part, lse, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0), s_pth, s_slb, s_slh,
        *s_part, *s_lse, hk, hv, hk.stride(0), hv.stride(0), num_device_pages,
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16),
        HEAD_DIM=D, PAGE=page, BLOCK_N=block_n, WINDOW=sliding_window or 0, DIRECT=direct,
        UPCAST=_INTERPRET, HOST=host_cache is not None, PDL=pdl.active(q.device),
        num_warps=num_warps, num_stages=num_stages, **pdl.dependent_options(q.device))
    if not direct:
        merge_splits(part, lse, out)
    return out


def compact_selection(chosen: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                      max_selected: int | None = None, logical: bool = False):
    """Turn a page selection into per-(sequence, KV head) page tables the decode kernel reads densely.

    chosen [B, Hkv, P] bool (must include each sequence's last page); page_table [B, P]; seq_lens [B].
    Returns (table [B, Hkv, K] of page ids in position order, lengths [B, Hkv] in tokens): the selected
    pages are full except the last, whose valid length is the sequence's tail. ``max_selected`` is a
    static bound on pages per row (no host sync; entries past a row's length are never read).
    ``logical``: also return the logical page index of each entry (table, logical, lengths)."""
    B, H, P = chosen.shape
    n_sel = chosen.sum(-1)                                                  # [B, Hkv]
    K = min(P, max_selected) if max_selected is not None else P
    order = torch.where(chosen, torch.arange(P, device=chosen.device), P)   # unselected sort last
    idx = order.sort(dim=-1).values[..., :K].clamp(max=P - 1)              # logical page indices
    table = page_table[:, None, :].expand(B, H, P).gather(-1, idx)
    tail = seq_lens - (seq_lens - 1) // page_size * page_size              # tokens in the last page
    lens = (n_sel - 1) * page_size + tail[:, None]
    if logical:
        return table.contiguous(), idx.contiguous(), lens.contiguous()
    return table.contiguous(), lens.contiguous()

