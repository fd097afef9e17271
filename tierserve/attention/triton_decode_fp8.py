"""Triton paged decode over FP8 KV pages: each key/value read at full precision or in FP8, per token.

Same scheme as ``triton_decode.py`` (one query token per sequence; grid (batch, kv_head, split); the
query heads sharing a KV head padded to 16 rows for ``tl.dot``; online softmax in base 2; the splits
merged by their log-sum-exp with that module's ``_merge_kernel``), but every token is read in the
precision the FP8 read rule (``tierserve.quant.fp8_kv``, page level) gives it. For the query at
p = seq_len - 1, token j is read in FP8 iff j's page starts at or after ``keep_sink`` and its last position l
has ``p - l >= max(keep_recent, 1)``; otherwise at full precision. Each key/value is loaded once, in the precision the rule gives it (so
the loads wait only for the page ids, as in the BF16 kernel, not for the per-page stored flags):

* read in FP8 from a page stored as FP8 (``quantised[page]``; the bulk of a long context): only its e4m3
  codes (1 byte per value) and the (page, head) fp32 scale (format in ``triton_fp8_common``). The codes
  enter ``tl.dot`` as model-dtype code values (exact) and the power-of-two scale is folded into the scores
  (keys) and the probabilities (values): no per-value multiply, bit-identical to dequantising first.
* read at full precision (sink and recent tokens, a page not complete yet): its stored values (2 bytes).
* rule and storage disagree (checked per block from the flags; only while storage lags the rule): a page
  read in FP8 but still at full precision (one that left the window but is not converted yet, e.g. inside a
  multi-step window, or held at full precision by another request) is quantised on the fly, exactly like
  storage would (``fake_fold``); a stored page the rule reads at full precision (the policy never lets
  that happen) gives its FP8 values.

The per-block pieces (ids, the rule, loads and fix-ups) live in ``triton_fp8_blocks``. Keys are processed in
blocks of ``BLOCK_N`` tokens, a multiple of the page size, aligned to page
boundaries (also with a sliding window and across splits), so every page lies inside one block and its
per-head amax is a row reduction and one small per-page reduction.

CUDA-graph safe: the flags, page tables, sequence lengths and scales are read on the device; the
wrapper does no host sync, and keep_sink / keep_recent are plain kernel arguments fixed per engine.
Under the CPU interpreter (``TRITON_INTERPRET=1``) keys/values enter the dot in fp32 (its bf16 dot is
unreliable). Reference: ``TorchRefBackend`` with ``meta.kv_fp8`` (tests/kernels/test_triton_decode_fp8.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.attention.triton_decode import (
    load_group_q,
    merge_splits,
    split_buffers,
    store_split,
)
from tierserve.attention.triton_fp8_blocks import (
    block_ids,
    block_meta,
    stored_flags,
    block_flags,
    attend,
    bulk_block,
    bulk_bounds,
    bulk_part,
    lagging,
    read_folded,
)
from tierserve.attention.triton_decode_fp8_lean import launch_bulk


@triton.jit
def _general_block(u, q, d, kvh, n, p, lo, keep_sink, keep_recent, cbase, hbase, qk_scale, row_ids, row_lg, flag_ptr,
                   kp, vp, kb, vb, hk, hv, s_p, s_t, s_h, s_bp, s_hp, m_i, l_i, acc,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_OFF: tl.constexpr, SPARSE: tl.constexpr,
                   COMPACT: tl.constexpr, HOST: tl.constexpr, RULE_LOADS: tl.constexpr, FAST: tl.constexpr):
    """One block of tokens ``u`` under the per-token read rule (any mix of precisions, storage lagging the rule,
    selections, host rows): ids, rule, flags, keys and values, then the online softmax update."""
    page, lg = block_ids(row_ids, row_lg, u, n, PAGE, SPARSE)
    page, valid, t, off, ish, low, vpage, cpage, hpage = block_meta(
        page, lg, u, n, p, keep_sink, keep_recent, cbase, hbase, PAGE, SPARSE, COMPACT, HOST)
    stored = stored_flags(flag_ptr, page, valid, ish, HOST)
    any_fix, all_low = block_flags(valid, low, stored, RULE_LOADS, FAST)
    k, ks = read_folded(kp, kb, vpage, cpage, off, kvh, d, valid, low, stored, any_fix, s_p, s_t, s_h,
                        s_bp, hk, hpage, ish, s_hp, all_low, SCALE_OFF, PAGE, BLOCK_N, q.dtype, RULE_LOADS, HOST,
                        FAST)
    v, vs = read_folded(vp, vb, vpage, cpage, off, kvh, d, valid, low, stored, any_fix, s_p, s_t, s_h,
                        s_bp, hv, hpage, ish, s_hp, all_low, SCALE_OFF, PAGE, BLOCK_N, q.dtype, RULE_LOADS, HOST,
                        FAST)
    return attend(q, k, ks, v, vs, valid, t, lo, qk_scale, m_i, l_i, acc)


@triton.jit
def _fp8_decode_split_kernel(q_ptr, kv_ptr, kvb_ptr, flag_ptr, pt_ptr, seqlen_ptr, o_ptr, lse_ptr,
                             qk_scale, keep_sink, keep_recent, cbase,
                             s_qb, s_qh, s_p, s_kv, s_t, s_h, s_bp, s_bkv, s_ptb, s_ob, s_oh, s_os, s_lb, s_lh,
                             lg_ptr, sel_ptr, s_pth, s_selb, s_selh, hb_ptr, hbase, s_hp, s_hkv,
                             NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                             SCALE_OFF: tl.constexpr, WINDOW: tl.constexpr, DIRECT: tl.constexpr,
                             UPCAST: tl.constexpr, SPARSE: tl.constexpr, RULE_LOADS: tl.constexpr,
                             COMPACT: tl.constexpr, HOST: tl.constexpr, FAST: tl.constexpr = False,
                             BULK: tl.constexpr = False, LEAN: tl.constexpr = 0, BULK_N: tl.constexpr = 64,
                             PDL: tl.constexpr = False):
    # FAST (RULE_LOADS only): blocks read wholly in FP8 take a branch without the full-precision loads.
    # LEAN > 0 (dense, no window / host rows): the general half of a split launch (``triton_decode_fp8_lean``),
    # NUM_SPLITS = LEAN + 2 programs: splits < LEAN redo the lean kernel's bulk parts whose pages lag the rule
    # (the same check; else nothing), split LEAN reads the sink blocks [0, fa), split LEAN + 1 the rest [fb, n)
    pdl.release(PDL)        # (``tierserve.pdl``: fires once every program has started)
    pdl.wait(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    p = seq_len - 1                                 # the query's position
    n = seq_len                                     # tokens this program's row reads (compacted if SPARSE)
    if SPARSE:      # selected pages only: table and logical page index per (sequence, KV head)
        n = tl.load(sel_ptr + b * s_selb + kvh * s_selh)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seq_len - WINDOW, 0)
    lo_blk = lo // BLOCK_N * BLOCK_N                # blocks start on page boundaries
    per = tl.cdiv(tl.cdiv(n - lo_blk, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo_blk + split * per
    end = tl.minimum(start + per, n)
    row_ids = pt_ptr + b * s_ptb + kvh * s_pth
    if LEAN > 0:
        fa, fb = bulk_bounds(n, keep_sink, keep_recent, BULK_N)
        if split < LEAN:
            start, end = bulk_part(fa, fb, split, LEAN, BULK_N)
            if not lagging(row_ids, flag_ptr, start // PAGE, end // PAGE):
                end = start
        elif split == LEAN:
            start = fa * 0
            end = fa
        else:
            start = fb
            end = n
    row_lg = lg_ptr + b * s_ptb + kvh * s_pth
    kp, vp, hk, hv = kv_ptr, kv_ptr + s_kv, hb_ptr, hb_ptr + s_hkv
    kb, vb = kvb_ptr, kvb_ptr + s_bkv
    q, heads, g_mask, d = load_group_q(q_ptr, b, kvh, s_qb, s_qh, GROUP, GROUP_PAD, HEAD_DIM, UPCAST)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    ar = tl.arange(0, BLOCK_N)
    m1 = end       # BULK: [m1, m2) holds the blocks the rule reads wholly in FP8 by position alone (past the sink
    m2 = end       # pages, before the recent ones): a loop of straight-line loads the compiler can pipeline
    if BULK:
        fa, fb = bulk_bounds(n, keep_sink, keep_recent, BLOCK_N)
        m1 = tl.minimum(tl.maximum(fa, start), end)
        m2 = tl.minimum(tl.maximum(fb, m1), end)
        if lagging(row_ids, flag_ptr, m1 // PAGE, m2 // PAGE):     # storage behind the rule: the general loop
            m2 = m1
    for t0 in range(start, m1, BLOCK_N):
        m_i, l_i, acc = _general_block(
            t0 + ar, q, d, kvh, n, p, lo, keep_sink, keep_recent, cbase, hbase, qk_scale, row_ids, row_lg, flag_ptr,
            kp, vp, kb, vb, hk, hv, s_p, s_t, s_h, s_bp, s_hp, m_i, l_i, acc, PAGE, BLOCK_N, SCALE_OFF, SPARSE,
            COMPACT, HOST, RULE_LOADS, FAST)
    if BULK:
        for t0 in range(m1, m2, BLOCK_N):
            m_i, l_i, acc = bulk_block(t0 + ar, q, d, kvh, row_ids, kb, vb, cbase, s_t, s_h, s_bp, lo, qk_scale, m_i,
                                       l_i, acc, PAGE, SCALE_OFF, COMPACT)
        for t0 in range(m2, end, BLOCK_N):
            m_i, l_i, acc = _general_block(
                t0 + ar, q, d, kvh, n, p, lo, keep_sink, keep_recent, cbase, hbase, qk_scale, row_ids, row_lg,
                flag_ptr, kp, vp, kb, vb, hk, hv, s_p, s_t, s_h, s_bp, s_hp, m_i, l_i, acc, PAGE, BLOCK_N, SCALE_OFF,
                SPARSE, COMPACT, HOST, RULE_LOADS, FAST)
    if LEAN > 0:    # (a bulk part the lean kernel read: its slot is the lean kernel's)
        if (end > start) | (split >= LEAN):
            store_split(o_ptr, lse_ptr, acc, m_i, l_i, b, heads, split, g_mask, d, s_ob, s_oh, s_os, s_lb, s_lh,
                        DIRECT)
    else:
        store_split(o_ptr, lse_ptr, acc, m_i, l_i, b, heads, split, g_mask, d, s_ob, s_oh, s_os, s_lb, s_lh, DIRECT)


_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def scale_offset(page_size: int, num_kv_heads: int, head_dim: int, elem_size: int, rows: int) -> int:
    """Byte offset of the per-head scales in a quantised (page, K/V) block (as in quant/fp8_kv.py)."""
    n_codes = page_size * num_kv_heads * head_dim
    off = -(-n_codes // 4) * 4
    assert off + 4 * num_kv_heads <= rows * num_kv_heads * head_dim * elem_size, \
        "no room for FP8 codes + scales in a page"
    return off


def paged_decode_fp8(q: torch.Tensor, kv_layer: torch.Tensor, quantised: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, page_size: int, keep_sink: int, keep_recent: int,
                     num_splits: int, sliding_window: int | None = None, out: torch.Tensor | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                     selection: tuple[torch.Tensor, torch.Tensor] | None = None,
                     rule_loads: bool = True, compact: tuple[torch.Tensor, int] | None = None,
                     host: tuple[torch.Tensor, int] | None = None, fast: bool = False, bulk: bool = False,
                     lean: bool = False) -> torch.Tensor:
    """q [B, Hq, D]; kv_layer [N, 2, rows, Hkv, D] (one layer of the page-major KV storage, K at [:, 0],
    V at [:, 1]; each (page, K/V) block contiguous, rows >= page_size); quantised [N] bool (device);
    page_table [B, max_pages]; seq_lens [B] (>= 1; the query sits at seq_len - 1). Returns [B, Hq, D].
    ``selection`` (sparse attention): (logical page index [B, Hkv, K], tokens [B, Hkv]) of the pages in
    ``page_table`` [B, Hkv, K] (``compact_selection``): only those are read, each under the read rule of
    its real position. ``rule_loads``: see ``read_folded`` (False only to compare on the GPU).
    ``compact`` (FP8 part 2): (this layer's compact pool [S, 2, slot_bytes] uint8, first compact page id):
    page ids >= it are read from that pool's slots (codes + scales at the same offsets as in place).
    ``host`` (KV tiers): (this layer's CPU-RAM store of spilled pages as compact rows [S, 2, slot_bytes] uint8,
    pinned -- or a staged copy on the device; first host page id, after the compact range): page ids >= it are
    read from that store in place (zero-copy on CUDA) and are always FP8; in ``page_table`` they may sit
    anywhere, also in a selection. ``fast``: blocks read wholly in FP8 skip the full-precision loads
    (``read_folded``'s ``FAST``; the same bits; with ``rule_loads`` only). (A ``prefetch`` option -- page ids
    loaded a block ahead -- was timed on the H200 in stops 18-19 without gain and removed.)
    ``bulk`` (dense steps without host rows; ignored otherwise): the blocks the rule reads wholly in FP8 by
    position (between the sink and the recent pages) go through a loop of unmasked code loads (``bulk_block``)
    that the compiler pipelines; the same bits. ``lean`` (dense steps without host rows or a sliding window;
    ignored otherwise): a split launch (``triton_decode_fp8_lean``) -- those blocks in ``num_splits`` parts by a
    kernel that reads nothing else (``block_n`` / ``num_warps`` / ``num_stages`` are its settings), then this
    kernel over the sink and recent blocks and any part whose pages lag (64-token blocks or the page, 4 warps,
    ``fast``), ``num_splits + 2`` splits merged: the same values up to the order of the split sums."""
    B, Hq, D = q.shape
    _, two, rows, Hkv, _ = kv_layer.shape
    assert two == 2 and rows >= page_size and q.stride(-1) == 1
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == D and kv_layer.stride(2) == Hkv * D, \
        "each (page, K/V) block must be contiguous"
    if q.dtype == torch.float32 and q.is_cuda:
        # fp32 (the GPU tests): Triton 3.6 on the H200 failed to compile (TritonGPURemoveLayoutConversions)
        # the earlier kernel with 128-token blocks; 32-token blocks compiled (this one: ptxas spills less)
        # (the engine's 64-token default included: fp32 blocks are capped at 32 tokens / the page)
        block_n, num_warps = min(block_n or 32, 32) if page_size <= 32 else page_size, num_warps or 4
    # ptxas for sm_90 (compiled offline, bf16, Llama-8B shapes): 64-token blocks with 8 warps use 210
    # registers and spill nothing; with 4 warps they spill (255 registers), except with ``fast`` (the engine's
    # dense default: 255 registers, no spills); 128-token blocks spill
    block_n, num_warps = block_n or max(page_size, 64), num_warps or 8
    assert rule_loads or not fast, "fast=True needs rule_loads=True"
    assert block_n % page_size == 0 and block_n >= 16 and block_n & (block_n - 1) == 0
    scale_off = scale_offset(page_size, Hkv, D, kv_layer.element_size(), rows)
    kv_bytes = kv_layer.view(torch.uint8)                         # same storage, byte strides
    cbase = 0
    if compact is not None:                                       # codes and scales from the compact pool
        kv_bytes, cbase = compact
        assert kv_bytes.dtype == torch.uint8 and kv_bytes.shape[0] >= 1 and kv_bytes.stride(-1) == 1
    flags = quantised.view(torch.uint8)
    hb, hbase = (host[0], host[1]) if host is not None else (kv_bytes, 1 << 62)
    if host is not None:
        assert hb.dtype == torch.uint8 and hb.stride(-1) == 1 and hbase >= quantised.shape[0]
        if q.is_cuda and hb.device.type == "cpu" and not torch.cuda.is_current_stream_capturing() \
                and not hb.is_pinned():
            raise ValueError("host=: the CPU-RAM store of spilled FP8 rows must be pinned (page-locked) for the "
                             "GPU kernel to read it in place")
    group = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if selection is not None:
        logical, sel_lens = selection
        assert page_table.dim() == 3 and logical.stride() == page_table.stride() and sliding_window is None
        sel = (logical, sel_lens, page_table.stride(1), sel_lens.stride(0), sel_lens.stride(1))
    else:
        sel = (page_table, seq_lens, 0, 0, 0)
    lean = lean and rule_loads and selection is None and host is None and not sliding_window
    general = dict(BLOCK_N=block_n, FAST=fast, BULK=bulk and rule_loads and selection is None and host is None)
    splits, launch = num_splits + 2 * lean, dict(num_warps=num_warps, num_stages=num_stages)
    direct = splits == 1
    part, lse, s_part, s_lse = split_buffers(out, splits)
    if lean:
        parts = num_splits
        launch_bulk(q, kv_bytes, flags, page_table, seq_lens, part, lse, s_part, s_lse, scale * _LOG2E, keep_sink,
                    max(keep_recent, 1), cbase, compact is not None, parts, Hkv, page_size, block_n, scale_off,
                    kv_layer.stride(2), kv_layer.stride(3), num_warps, num_stages, _INTERPRET)
        gen_bn = min(max(page_size, 64 if not (q.dtype == torch.float32 and q.is_cuda) else 32), block_n)
        general = dict(BLOCK_N=gen_bn, FAST=True, BULK=False, LEAN=parts, BULK_N=block_n)
        launch = dict(num_warps=4, num_stages=2)
    _fp8_decode_split_kernel[(B, Hkv, splits)](
        q, kv_layer, kv_bytes, flags, page_table, seq_lens, part, lse, scale * _LOG2E, keep_sink, max(keep_recent, 1),
        cbase,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        kv_bytes.stride(0), kv_bytes.stride(1), page_table.stride(0), *s_part, *s_lse, *sel,
        hb, hbase, hb.stride(0), hb.stride(1),
        NUM_SPLITS=splits, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16),
        HEAD_DIM=D, PAGE=page_size, SCALE_OFF=scale_off, WINDOW=sliding_window or 0,
        DIRECT=direct, UPCAST=_INTERPRET, SPARSE=selection is not None, RULE_LOADS=rule_loads,
        COMPACT=compact is not None, HOST=host is not None, PDL=pdl.active(q.device), **general, **launch,
        **pdl.dependent_options(q.device))
    if not direct:
        merge_splits(part, lse, out)
    return out
