"""Triton paged prefill kernel: the new tokens of prefill chunks attend to their whole context, read
straight from the pages (no gather of the cached context, no mask tensor).

Packed input: chunk c owns query tokens ``q_start[c] : q_start[c] + q_len[c]`` of ``q [T, Hq, D]``, at
positions ``seq_len[c] - q_len[c] ..`` of its sequence, whose keys (the cached context and the chunk's own,
already written) are in the pages of ``page_table[c]``. Grid (chunk, query block, KV head). A program's
rows are BLOCK_T tokens x the query heads sharing one KV head (padded to a power of two), so each key
block is loaded once per group and both products run on tensor cores; causal (and sliding-window) masks
come from positions; online softmax in base 2. Page ids >= ``num_device_pages`` are read from pinned host
memory (``host_cache``), as in the decode kernel. Reference: ``tierserve.attention.torch_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.attention.triton_decode import _INTERPRET, _LOG2E, load_page_rows, softmax_update


@triton.jit
def chunk_rows(q_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, c, blk, kvh, s_qt, s_qh, GROUP: tl.constexpr,
               GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """A program's rows: BLOCK_T tokens of chunk ``c`` x the query heads of KV head ``kvh``.
    Returns (q [ROWS, D], packed token index, head, row mask, dims, query positions, and the key range
    [lo, hi) the rows can see: up to the block's last query, from the window's start rounded down to BLOCK_N)."""
    q_len = tl.load(qlen_ptr + c)
    q_start = tl.load(qstart_ptr + c)
    seq_len = tl.load(seqlen_ptr + c)
    ROWS: tl.constexpr = BLOCK_T * GROUP_PAD
    r = tl.arange(0, ROWS)
    tok = blk * BLOCK_T + r // GROUP_PAD                     # token index inside the chunk
    g = r % GROUP_PAD
    r_mask = (tok < q_len) & (g < GROUP)
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    packed = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + packed[:, None] * s_qt + heads[:, None] * s_qh + d[None, :], mask=r_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    ctx0 = seq_len - q_len                                   # position of the chunk's first token
    q_pos = ctx0 + tok
    hi = tl.minimum(ctx0 + (blk + 1) * BLOCK_T, seq_len)     # keys past the block's last query are unseen
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(ctx0 + blk * BLOCK_T - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    return q, packed, heads, r_mask, d, q_pos, lo, hi


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, o_ptr, qk_scale,
                    s_qt, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_ptb, s_ot, s_oh,
                    hk_ptr, hv_ptr, s_hkp, s_hvp, n_dev,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                    WINDOW: tl.constexpr, UPCAST: tl.constexpr, HOST: tl.constexpr):
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
        t_mask = t < hi
        k, v = load_page_rows(k_ptr, v_ptr, hk_ptr, hv_ptr, pt_ptr + c * s_ptb, t, t_mask, kvh, d,
                              s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_hkp, s_hvp, n_dev, PAGE, HOST)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale           # [ROWS, N], log2 units
        see = t_mask[None, :] & (t[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            see = see & (q_pos[:, None] - t[None, :] < WINDOW)
        s = tl.where(see, s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc)
    store_rows(o_ptr, acc, l_i, packed, heads, r_mask, d, s_ot, s_oh)


@triton.jit
def store_rows(o_ptr, acc, l_i, packed, heads, r_mask, d, s_ot, s_oh):
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + packed[:, None] * s_ot + heads[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=r_mask[:, None])


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                  q_start: torch.Tensor, q_len: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int,
                  scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
                  host_cache: tuple[torch.Tensor, torch.Tensor] | None = None, num_device_pages: int = 0,
                  block_rows: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2) -> torch.Tensor:
    """q [T, Hq, D] packed; caches [N, page, Hkv, D] (strided views, last dim contiguous); per chunk c:
    page_table [C, P], q_start / q_len / seq_lens [C] (device tensors). ``max_q_len`` (a host int, an upper
    bound of q_len) sizes the grid. Writes the rows of every chunk into ``out`` ([T, Hq, D], default a
    new tensor; rows of tokens outside the chunks are left untouched) and returns it."""
    T, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    assert supported(D), f"head_dim {D} must be a power of two >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    rows = block_rows or (64 if _INTERPRET or D > 128 else 128)
    block_t = max(1, rows // group_pad)
    block_n = block_n or (16 if _INTERPRET else 64)
    if out is None:
        out = torch.empty_like(q)
    hk, hv = host_cache if host_cache is not None else (k_cache, v_cache)
    if host_cache is not None:
        assert hk.stride()[1:] == k_cache.stride()[1:] and hv.stride()[1:] == v_cache.stride()[1:], \
            "host pages must have the device pages' layout"
    C = q_len.shape[0]
    grid = (C, triton.cdiv(max_q_len, block_t), Hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, page_table, q_start, q_len, seq_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        out.stride(0), out.stride(1), hk, hv, hk.stride(0), hv.stride(0), num_device_pages,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t, HEAD_DIM=D, PAGE=page, BLOCK_N=block_n,
        WINDOW=sliding_window or 0, UPCAST=_INTERPRET, HOST=host_cache is not None,
        num_warps=num_warps or (4 if rows <= 64 else 8), num_stages=num_stages)
    return out
