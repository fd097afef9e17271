"""Triton paged prefill over FP8 KV pages: each (query, key) pair read in the precision the FP8 read rule
gives it (``tierserve.quant.fp8_kv``): the query at position p reads token j in FP8 iff j >= keep_sink,
p - j >= keep_recent and j's page is complete before p.

Same rows as ``triton_prefill.py`` (BLOCK_T tokens x the query heads of one KV head, packed chunks), but the
rule depends on the query, so every key block is read twice -- full precision (stored values; pages stored
in FP8 give their codes x scales, which the rule never asks for more) and its FP8 reading (codes x scales,
or the page fake-quantised on the fly exactly like storage would) -- with both scores computed and the
rule choosing per (row, key); the probabilities are split the same way over the two value readings. Key
blocks are multiples of the page size, aligned to pages, so each page's amax is one reduction (the FP8
decode kernel's ``_read_kv``). No host pages (FP8 KV is refused with KV tiers).
Reference: ``TorchRefBackend`` with ``meta.kv_fp8``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.attention.triton_decode import _INTERPRET, _LOG2E
from tierserve.attention.triton_decode_fp8 import _read_kv, scale_offset
from tierserve.attention.triton_prefill import chunk_rows, store_rows


@triton.jit
def _prefill_fp8_kernel(q_ptr, kv_ptr, kvb_ptr, flag_ptr, pt_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, o_ptr, qk_scale,
                        keep_sink, keep_recent, s_qt, s_qh, s_p, s_kv, s_t, s_h, s_bp, s_bkv, s_ptb, s_ot, s_oh,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                        SCALE_OFF: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    c = tl.program_id(0)
    blk = tl.program_id(1)
    kvh = tl.program_id(2)
    if blk * BLOCK_T >= tl.load(qlen_ptr + c):
        return
    q, packed, heads, r_mask, d, q_pos, lo, hi = chunk_rows(
        q_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, c, blk, kvh, s_qt, s_qh, GROUP, GROUP_PAD, BLOCK_T, HEAD_DIM, UPCAST,
        BLOCK_N, WINDOW)
    ROWS: tl.constexpr = BLOCK_T * GROUP_PAD
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < hi
        page = tl.load(pt_ptr + c * s_ptb + t // PAGE, mask=valid, other=0).to(tl.int64)
        off = (t % PAGE).to(tl.int64)
        stored = tl.load(flag_ptr + page, mask=valid, other=0) != 0
        never = valid & (t < 0)
        kf = _read_kv(kv_ptr, kvb_ptr, page, off, kvh, d, valid, stored, never, s_p, s_t, s_h, s_bp,
                      SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM).to(q.dtype)
        kl = _read_kv(kv_ptr, kvb_ptr, page, off, kvh, d, valid, stored, valid, s_p, s_t, s_h, s_bp,
                      SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM).to(q.dtype)
        vf = _read_kv(kv_ptr + s_kv, kvb_ptr + s_bkv, page, off, kvh, d, valid, stored, never, s_p, s_t, s_h,
                      s_bp, SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM).to(q.dtype)
        vl = _read_kv(kv_ptr + s_kv, kvb_ptr + s_bkv, page, off, kvh, d, valid, stored, valid, s_p, s_t, s_h,
                      s_bp, SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM).to(q.dtype)
        last = (t // PAGE + 1) * PAGE - 1
        low = (t[None, :] >= keep_sink) & (q_pos[:, None] - t[None, :] >= keep_recent) & \
            (last[None, :] < q_pos[:, None])                                     # [ROWS, N]: the read rule
        s_f = tl.dot(q, tl.trans(kf), input_precision="ieee")
        s_l = tl.dot(q, tl.trans(kl), input_precision="ieee")
        s = tl.where(low, s_l, s_f) * qk_scale
        see = valid[None, :] & (t[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            see = see & (q_pos[:, None] - t[None, :] < WINDOW)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_l = tl.where(low, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot((p - p_l).to(vf.dtype), vf, input_precision="ieee") + \
            tl.dot(p_l.to(vl.dtype), vl, input_precision="ieee")
        m_i = m_new
    store_rows(o_ptr, acc, l_i, packed, heads, r_mask, d, s_ot, s_oh)


def paged_prefill_fp8(q: torch.Tensor, kv_layer: torch.Tensor, quantised: torch.Tensor, page_table: torch.Tensor,
                      q_start: torch.Tensor, q_len: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int,
                      scale: float, page_size: int, keep_sink: int, keep_recent: int,
                      sliding_window: int | None = None, out: torch.Tensor | None = None,
                      block_rows: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """``paged_prefill`` (same packed chunks, same return) over FP8 KV pages: kv_layer [N, 2, rows, Hkv, D]
    (one layer of the page-major storage, each (page, K/V) block contiguous); quantised [N] bool."""
    T, Hq, D = q.shape
    N, two, rows, Hkv, _ = kv_layer.shape
    assert two == 2 and rows >= page_size and q.stride(-1) == 1
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == D and kv_layer.stride(2) == Hkv * D, \
        "each (page, K/V) block must be contiguous"
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    rows_blk = block_rows or (32 if _INTERPRET else 64)
    block_t = max(1, rows_blk // group_pad)
    block_n = block_n or max(page_size, 16 if _INTERPRET else 64)
    assert block_n % page_size == 0 and block_n & (block_n - 1) == 0
    kv_bytes = kv_layer.view(torch.uint8)
    if out is None:
        out = torch.empty_like(q)
    grid = (q_len.shape[0], triton.cdiv(max_q_len, block_t), Hkv)
    _prefill_fp8_kernel[grid](
        q, kv_layer, kv_bytes, quantised.view(torch.uint8), page_table, q_start, q_len, seq_lens, out,
        scale * _LOG2E, keep_sink, keep_recent, q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1),
        kv_layer.stride(2), kv_layer.stride(3), kv_bytes.stride(0), kv_bytes.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t, HEAD_DIM=D, PAGE=page_size, BLOCK_N=block_n,
        SCALE_OFF=scale_offset(page_size, Hkv, D, kv_layer.element_size(), rows), WINDOW=sliding_window or 0,
        UPCAST=_INTERPRET, num_warps=num_warps or 4, num_stages=num_stages)
    return out
