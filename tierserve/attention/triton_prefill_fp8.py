"""Triton paged prefill over FP8 KV pages: each (query, key) pair read in the precision the FP8 read rule
gives it (``tierserve.quant.fp8_kv``, page level): the query at position p reads token j in FP8 iff j's page
starts at or after keep_sink and its last position l has p - l >= max(keep_recent, 1).

Same rows as ``triton_prefill.py`` (BLOCK_T tokens x the query heads of one KV head, packed chunks, 128
rows on the GPU; blocks of 32 keys, where the BF16 kernel takes 64, to stay within the registers). The
rule is monotone in p, so for a program's rows (positions p_lo..p_hi) a key is read in FP8 by every row
(rule at p_lo), by none (rule at p_hi false), or by some. Each key block is loaded once, every key in the
reading all rows use (keys of the third kind: their full reading) -- stored FP8 pages as their codes
(1 byte per value) with the power-of-two scale folded into the scores / probabilities, full-precision
pages as their values. Only the two or three blocks around ``p - keep_recent`` hold keys of the third kind
("mixed" blocks): there their FP8 reading is loaded as well, scored too, and the rule picks per (row, key).

Where a reading comes from depends on positions alone, so the loads wait for the page ids only (as in
the BF16 kernel), not also for the stored flags: FP8 readings of the pages from the keep_recent edge before
the chunk to its end come from a scratch computed once per layer and step
(``triton_fp8_quant.prefill_scratch``: pages still at full precision quantised, stored ones copied), not
quantised again by every query block; FP8 readings of older pages come from their stored codes; full
readings from the stored values. The flags only feed a per-block check: a page before the scratch range
read in FP8 but not stored yet (another holder still keeps it at full precision) is quantised in the
kernel, and a stored page read at full precision (the policy never asks for it) gives its FP8 values.
Mixed blocks are found from positions too: the rows read tokens keep_sink..end(p) in FP8, monotone in p (the
kernel gets keep_sink rounded up to a page multiple, so ``t >= keep_sink`` is the page-level sink test).
Pages spilled to CPU RAM (KV tiers, ``host``): their compact rows, staged on the device per layer and step, are
read in place of the stored codes (the rule reads them in FP8 for every query). Reference: ``TorchRefBackend``
with ``meta.kv_fp8``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.attention.triton_decode import _INTERPRET, _LOG2E
from tierserve.attention.triton_decode_fp8 import scale_offset
from tierserve.attention.triton_fp8_common import fake_fold, load_scales, split_ids
from tierserve.attention.triton_fp8_quant import prefill_scratch, scratch_first_page
from tierserve.attention.triton_prefill import chunk_rows, store_rows


@triton.jit
def _low_end(p, keep_recent, PAGE: tl.constexpr):
    """The query at p reads exactly tokens keep_sink .. _low_end(p) in FP8 (the pages ending at or before
    p - keep_recent; keep_recent >= 1 and keep_sink a page multiple here, from the wrapper; -1: none)."""
    return tl.maximum(p - keep_recent + 1, 0) // PAGE * PAGE - 1


@triton.jit
def _row(bptr, cpage, s_bp, hptr, hp, ish, s_hp, HOST: tl.constexpr):
    """Each key's code row: in the code storage (``cpage``), or (``HOST``, rows ``ish``) a staged host row."""
    r = bptr + cpage * s_bp
    if HOST:
        r = tl.where(ish, hptr + hp * s_hp, r)
    return r


@triton.jit
def _codes(bptr, sptr, cpage, rel, kvh, from_page, from_sc, s_bp, hptr, hp, ish, s_hp, SCALE_OFF: tl.constexpr,
           DTYPE: tl.constexpr, HOST: tl.constexpr):
    """FP8 code values and scales of the rows ``from_sc`` (scratch row ``sptr``) / ``from_page`` (stored page:
    ``_row``)."""
    brow = _row(bptr, cpage, s_bp, hptr, hp, ish, s_hp, HOST)
    cp = tl.load(brow[:, None] + rel, mask=from_page[:, None], other=0)
    cs = tl.load(sptr[:, None] + rel, mask=from_sc[:, None], other=0)
    val = tl.where(from_sc[:, None], cs, cp).to(tl.float8e4nv, bitcast=True).to(DTYPE)
    sc = tl.where(from_sc, load_scales(sptr + SCALE_OFF + 4 * kvh, from_sc),
                  load_scales(brow + SCALE_OFF + 4 * kvh, from_page))
    return val, sc


@triton.jit
def _reading(ptr, bptr, sptr, page, cpage, rel, kvh, full, low_page, low_sc, fake, bad, any_fix, s_p, s_bp,
             hptr, hp, ish, s_hp, SCALE_OFF: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
             DTYPE: tl.constexpr, HOST: tl.constexpr):
    """One K/V block in the reading every row of the program uses for each key (keys some rows read in FP8
    and others not: their full reading), as (values, scales; 1 for full readings), loaded from positions
    alone. Rows where storage disagrees (``any_fix``): ``fake`` (a page before the scratch range not stored
    yet) quantised on the fly, ``bad`` (a stored page read at full precision) dequantised. ``page`` / ``cpage``:
    the rows of the values / codes (``split_ids``); ``HOST``: rows ``ish`` have their codes in staged host row
    ``hp`` instead."""
    vptr = ptr + page[:, None] * s_p + rel
    x = tl.load(vptr, mask=full[:, None], other=0.0)
    val, sc = _codes(bptr, sptr, cpage, rel, kvh, low_page, low_sc, s_bp, hptr, hp, ish, s_hp, SCALE_OFF, DTYPE, HOST)
    val = tl.where(full[:, None], x.to(DTYPE), val)
    if any_fix:
        xa = tl.where(fake[:, None], tl.load(vptr, mask=fake[:, None], other=0.0).to(DTYPE), val)   # whole pages
        val, sc = fake_fold(xa, val, sc, fake, PAGE, BLOCK_N, DTYPE)
        brow = _row(bptr, cpage, s_bp, hptr, hp, ish, s_hp, HOST)
        deq = tl.load(brow[:, None] + rel, mask=bad[:, None], other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32) * \
            load_scales(brow + SCALE_OFF + 4 * kvh, bad)[:, None]
        val = tl.where(bad[:, None], deq.to(DTYPE), val)
    return val, sc


@triton.jit
def _prefill_fp8_kernel(q_ptr, kv_ptr, kvb_ptr, flag_ptr, pt_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, o_ptr, sc_ptr,
                        soff_ptr, qk_scale, keep_sink, keep_recent, cbase, s_qt, s_qh, s_p, s_kv, s_t, s_h, s_bp, s_bkv, s_ptb,
                        s_ot, s_oh, s_sp, s_skv, hb_ptr, hbase, s_hp, s_hkv,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                        SCALE_OFF: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                        COMPACT: tl.constexpr, HOST: tl.constexpr):
    c = tl.program_id(0)
    blk = tl.program_id(1)
    kvh = tl.program_id(2)
    q_len = tl.load(qlen_ptr + c)
    if blk * BLOCK_T >= q_len:
        return
    q, packed, heads, r_mask, d, q_pos, lo, hi = chunk_rows(
        q_ptr, qstart_ptr, qlen_ptr, seqlen_ptr, c, blk, kvh, s_qt, s_qh, GROUP, GROUP_PAD, BLOCK_T, HEAD_DIM, UPCAST,
        BLOCK_N, WINDOW)
    seq_len = tl.load(seqlen_ptr + c)
    c0 = seq_len - q_len
    first = scratch_first_page(c0, keep_recent, PAGE)      # scratch pages soff[c].. hold logical pages first..
    s0 = tl.load(soff_ptr + c)
    p_lo = c0 + blk * BLOCK_T                               # positions of the program's first and last rows
    p_hi = tl.minimum(p_lo + BLOCK_T, seq_len) - 1
    end_all = _low_end(p_lo, keep_recent, PAGE)             # keys sink..end_all: FP8 for every row
    end_any = _low_end(p_hi, keep_recent, PAGE)             # keys sink..end_any: FP8 for some row
    ROWS: tl.constexpr = BLOCK_T * GROUP_PAD
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < hi
        lp = t // PAGE
        page = tl.load(pt_ptr + c * s_ptb + lp, mask=valid, other=0).to(tl.int64)
        rel = (t % PAGE).to(tl.int64)[:, None] * s_t + kvh * s_h + d[None, :]
        low_all = valid & (t >= keep_sink) & (t <= end_all)
        mix = valid & (t >= keep_sink) & (t > end_all) & (t <= end_any)      # FP8 for some rows only
        in_sc = lp >= first
        if HOST:        # ids >= hbase: staged compact rows of pages spilled to CPU RAM, always stored FP8
            ish = valid & (page >= hbase)
            hp = tl.where(ish, page - hbase, 0)
            page = tl.where(ish, 0, page)
            stored = (tl.load(flag_ptr + page, mask=valid, other=0) != 0) | ish     # only for the fix-up check
        else:
            ish = valid                 # (unused)
            hp = page
            stored = tl.load(flag_ptr + page, mask=valid, other=0) != 0
        page, cpage = split_ids(page, cbase, COMPACT)                     # values' row, codes' row
        fake = low_all & ~in_sc & ~stored
        bad = valid & ~low_all & stored
        any_fix = tl.sum((fake | bad).to(tl.int32), axis=0) > 0
        sptr = sc_ptr + (s0 + tl.maximum(lp - first, 0)).to(tl.int64) * s_sp
        full = valid & ~low_all
        low_sc = low_all & in_sc
        low_page = low_all & ~in_sc
        k, ks = _reading(kv_ptr, kvb_ptr, sptr, page, cpage, rel, kvh, full, low_page, low_sc, fake, bad, any_fix,
                         s_p, s_bp, hb_ptr, hp, ish, s_hp, SCALE_OFF, PAGE, BLOCK_N, q.dtype, HOST)
        v, vs = _reading(kv_ptr + s_kv, kvb_ptr + s_bkv, sptr + s_skv, page, cpage, rel, kvh, full, low_page, low_sc,
                         fake, bad, any_fix, s_p, s_bp, hb_ptr + s_hkv, hp, ish, s_hp, SCALE_OFF, PAGE, BLOCK_N,
                         q.dtype, HOST)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * (ks * qk_scale)[None, :]
        # keys some rows read in FP8 and others not: (end_all, end_any] from keep_sink, inside this block
        mixed = tl.maximum(tl.maximum(end_all + 1, keep_sink), t0) <= tl.minimum(end_any, tl.minimum(t0 + BLOCK_N, hi) - 1)
        if mixed:       # their FP8 reading too (two or three blocks per program): the rule per (row, key)
            kl, ksl = _codes(kvb_ptr, sptr, cpage, rel, kvh, mix & ~in_sc, mix & in_sc, s_bp, hb_ptr, hp, ish, s_hp,
                             SCALE_OFF, q.dtype, HOST)
            low = mix[None, :] & (t[None, :] <= _low_end(q_pos, keep_recent, PAGE)[:, None])
            s = tl.where(low, tl.dot(q, tl.trans(kl), input_precision="ieee") * (ksl * qk_scale)[None, :], s)
        see = valid[None, :] & (t[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            see = see & (q_pos[:, None] - t[None, :] < WINDOW)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if mixed:
            vl, vsl = _codes(kvb_ptr + s_bkv, sptr + s_skv, cpage, rel, kvh, mix & ~in_sc, mix & in_sc, s_bp,
                             hb_ptr + s_hkv, hp, ish, s_hp, SCALE_OFF, q.dtype, HOST)
            low = mix[None, :] & (t[None, :] <= _low_end(q_pos, keep_recent, PAGE)[:, None])
            p_l = tl.where(low, p, 0.0)
            pv = tl.dot(((p - p_l) * vs[None, :]).to(v.dtype), v, input_precision="ieee") + \
                tl.dot((p_l * vsl[None, :]).to(vl.dtype), vl, input_precision="ieee")
        else:
            pv = tl.dot((p * vs[None, :]).to(v.dtype), v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    store_rows(o_ptr, acc, l_i, packed, heads, r_mask, d, s_ot, s_oh)


def paged_prefill_fp8(q: torch.Tensor, kv_layer: torch.Tensor, quantised: torch.Tensor, page_table: torch.Tensor,
                      q_start: torch.Tensor, q_len: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int,
                      scale: float, page_size: int, keep_sink: int, keep_recent: int,
                      sliding_window: int | None = None, out: torch.Tensor | None = None,
                      block_rows: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int = 2,
                      compact: tuple[torch.Tensor, int] | None = None,
                      host: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """``paged_prefill`` (same packed chunks, same return) over FP8 KV pages: kv_layer [N, 2, rows, Hkv, D]
    (one layer of the page-major storage, each (page, K/V) block contiguous); quantised [N] bool.
    Two launches: the chunks' FP8 scratch, then the attention. ``compact``: as in ``paged_decode_fp8``.
    ``host``: (compact rows [U, 2, slot bytes] uint8, first host id): page ids >= it are read from those rows
    -- pages spilled to CPU RAM, staged on the device for the step (``triton_stage.stage_rows``): every query
    block reads the context, so rows read in place over PCIe would cross the bus once per block."""
    T, Hq, D = q.shape
    _, two, rows, Hkv, _ = kv_layer.shape
    assert two == 2 and rows >= page_size and q.stride(-1) == 1
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == D and kv_layer.stride(2) == Hkv * D, \
        "each (page, K/V) block must be contiguous"
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    rows_blk = block_rows or (32 if _INTERPRET else (64 if D > 128 else 128))
    block_t = max(1, rows_blk // group_pad)
    # 32 keys per block: with 64 (the BF16 kernel's) ptxas for sm_90 spills ~400 bytes a thread, with 32 ~8
    block_n = block_n or max(page_size, 16 if _INTERPRET else 32)
    assert block_n % page_size == 0 and block_n & (block_n - 1) == 0
    kv_bytes = kv_layer.view(torch.uint8)
    cbase = 0
    if compact is not None:
        kv_bytes, cbase = compact
    hb, hbase = host if host is not None else (kv_bytes, 1 << 62)
    if host is not None:
        assert hb.dtype == torch.uint8 and hb.stride(-1) == 1 and hbase >= quantised.shape[0]
    if out is None:
        out = torch.empty_like(q)
    scratch, soff = prefill_scratch(kv_layer, quantised, page_table, q_len, seq_lens, max_q_len, T, page_size,
                                    keep_recent, compact, host)
    grid = (q_len.shape[0], triton.cdiv(max_q_len, block_t), Hkv)
    sink_start = -(-keep_sink // page_size) * page_size        # page-level rule: the first page past the sink
    _prefill_fp8_kernel[grid](
        q, kv_layer, kv_bytes, quantised.view(torch.uint8), page_table, q_start, q_len, seq_lens, out, scratch,
        soff, scale * _LOG2E, sink_start, max(keep_recent, 1), cbase,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1),
        kv_layer.stride(2), kv_layer.stride(3), kv_bytes.stride(0), kv_bytes.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), scratch.stride(0), scratch.stride(1), hb, hbase, hb.stride(0), hb.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t, HEAD_DIM=D, PAGE=page_size, BLOCK_N=block_n,
        SCALE_OFF=scale_offset(page_size, Hkv, D, kv_layer.element_size(), rows), WINDOW=sliding_window or 0,
        UPCAST=_INTERPRET, COMPACT=compact is not None, HOST=host is not None, num_warps=num_warps or (4 if block_t * group_pad <= 64 else 8), num_stages=num_stages)
    return out
