"""Triton paged decode over FP8 KV pages: each key/value read at full precision or in FP8, per token.

Same scheme as ``triton_decode.py`` (one query token per sequence; grid (batch, kv_head, split); the
query heads sharing a KV head padded to 16 rows for ``tl.dot``; online softmax in base 2; the splits
merged by their log-sum-exp with that module's ``_merge_kernel``), but every token is read in the
precision the FP8 read rule (``tierserve.quant.fp8_kv``) gives it. For the query at p = seq_len - 1,
token j is read in FP8 iff ``j >= keep_sink``, ``p - j >= keep_recent`` and j's page is complete before
p; otherwise at full precision. A page is read from one of three sources:

* ``quantised[page]`` set: the page's bytes for this (layer, K/V) hold ``page_size*Hkv*D`` e4m3 codes
  (token-major, so a code's byte offset equals the element offset of the value it replaced) and ``Hkv``
  fp32 power-of-two scales at a 4-byte aligned offset; the kernel reads ``code * scale``. The policy
  never lets the rule ask such a page for full precision, so every token of it reads the FP8 values.
* not quantised, token read in FP8 (a page that became old enough but is not converted yet, e.g. during
  the later steps of a multi-step decode): the page is fake-quantised on the fly, bit-exactly like
  ``fake_quant`` / ``quantise_pages_``: per (page, head) amax over the page's ``page_size`` rows, the
  smallest power of two >= amax/448 as scale (from the exponent bits, no division), round-to-nearest-even
  e4m3 of ``x / scale`` (integer rounding on the fp32 bits, subnormals included), times the scale. So a
  page gives the same numbers whether it was quantised in storage or not.
* otherwise: the stored full-precision values.

Keys are processed in blocks of ``BLOCK_N`` tokens, a multiple of the page size, aligned to page
boundaries (also with a sliding window and across splits), so every page lies inside one block and its
per-head amax is one reduction over the block reshaped to [pages, page_size*D]. Fake quantisation runs
only in blocks that need it (a scalar branch on the device).

CUDA-graph safe: the flags, page tables, sequence lengths and scales are read on the device; the
wrapper does no host sync, and keep_sink / keep_recent are plain kernel arguments fixed per engine.
On the GPU the keys/values enter ``tl.dot`` in the model dtype, converted like the reference's
``.to(q.dtype)`` (exact for bf16: FP8 values have 4 significant bits); under the CPU interpreter (``TRITON_INTERPRET=1``) they are kept in fp32 (its bf16
dot is unreliable). Reference: ``TorchRefBackend`` with ``meta.kv_fp8`` (tests/kernels/test_triton_decode_fp8.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve.attention.triton_decode import load_group_q, merge_splits, softmax_update, split_buffers, store_split


@triton.jit
def _exp2i(e):
    """2**e in fp32 for an integer e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_exp(amax):
    """Exponent of the smallest power of two >= amax / 448 (0 for amax == 0), like ``pow2_scale``:
    amax = 1.m * 2**e needs 2**(e-8) when 1.m <= 1.75, else 2**(e-7); at least 2**-126."""
    bits = amax.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    es = tl.maximum(e - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32), -126)
    return tl.where(amax > 0, es, 0)


@triton.jit
def _e4m3_round(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3fn value (ties to even, subnormals included)
    and return it in fp32: the mantissa is rounded at the e4m3 quantum 2**max(E-3, -9) on the bits."""
    bits = y.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF                                     # biased fp32 exponent
    m = (bits & 0x7FFFFF) | 0x800000                            # 24-bit significand
    shift = tl.minimum(tl.maximum(141 - e, 20), 31)            # quantum / ulp(y), as a bit count
    r = (m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift
    mag = r.to(tl.float32) * _exp2i(tl.maximum(e - 130, -9))
    mag = tl.where(e == 0, 0.0, mag)
    return tl.where(bits < 0, -mag, mag)


@triton.jit
def _read_kv(ptr, bptr, page, off, kvh, d, valid, stored, low, s_p, s_t, s_h, s_bp,
             SCALE_OFF: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[BLOCK_N, D] fp32 keys (or values) of one K/V block: full precision, stored FP8, or fake FP8."""
    rel = off[:, None] * s_t + kvh * s_h + d[None, :]          # element offset == code byte offset
    x = tl.load(ptr + page[:, None] * s_p + rel, mask=(valid & ~stored)[:, None], other=0.0).to(tl.float32)
    codes = tl.load(bptr + page[:, None] * s_bp + rel, mask=(valid & stored)[:, None], other=0)
    sc_ptr = (bptr + page * s_bp + SCALE_OFF + 4 * kvh).to(tl.pointer_type(tl.float32))
    sc = tl.load(sc_ptr, mask=valid & stored, other=1.0)
    out = tl.where(stored[:, None], codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, None], x)
    fake = low & ~stored
    if tl.sum(fake.to(tl.int32), axis=0) > 0:    # FP8 reading of a page still at full precision
        amax = tl.max(tl.reshape(tl.abs(x), (BLOCK_N // PAGE, PAGE * HEAD_DIM)), axis=1)   # per page
        es = tl.reshape(tl.broadcast_to(_scale_exp(amax)[:, None], (BLOCK_N // PAGE, PAGE)), (BLOCK_N,))
        fq = _e4m3_round(x * _exp2i(-es)[:, None]) * _exp2i(es)[:, None]
        out = tl.where(fake[:, None], fq, out)
    return out


@triton.jit
def _fp8_decode_split_kernel(q_ptr, kv_ptr, kvb_ptr, flag_ptr, pt_ptr, seqlen_ptr, o_ptr, lse_ptr,
                             qk_scale, keep_sink, keep_recent,
                             s_qb, s_qh, s_p, s_kv, s_t, s_h, s_bp, s_bkv, s_ptb, s_ob, s_oh, s_os, s_lb, s_lh,
                             lg_ptr, sel_ptr, s_pth, s_selb, s_selh,
                             NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                             SCALE_OFF: tl.constexpr, WINDOW: tl.constexpr, DIRECT: tl.constexpr,
                             UPCAST: tl.constexpr, SPARSE: tl.constexpr):
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
    q, heads, g_mask, d = load_group_q(q_ptr, b, kvh, s_qb, s_qh, GROUP, GROUP_PAD, HEAD_DIM, UPCAST)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        u = t0 + tl.arange(0, BLOCK_N)
        valid = u < n                               # whole pages are loaded (amax), masked below
        page = tl.load(pt_ptr + b * s_ptb + kvh * s_pth + u // PAGE, mask=valid, other=0).to(tl.int64)
        off = (u % PAGE).to(tl.int64)
        t = u                                       # the token's position in its sequence
        if SPARSE:
            t = tl.load(lg_ptr + b * s_ptb + kvh * s_pth + u // PAGE, mask=valid, other=0) * PAGE + off
        stored = tl.load(flag_ptr + page, mask=valid, other=0) != 0
        last = (t // PAGE + 1) * PAGE - 1
        low = valid & (t >= keep_sink) & (p - t >= keep_recent) & (last < p)     # the read rule
        k = _read_kv(kv_ptr, kvb_ptr, page, off, kvh, d, valid, stored, low, s_p, s_t, s_h, s_bp,
                     SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM)
        v = _read_kv(kv_ptr + s_kv, kvb_ptr + s_bkv, page, off, kvh, d, valid, stored, low, s_p, s_t, s_h,
                     s_bp, SCALE_OFF, PAGE, BLOCK_N, HEAD_DIM)
        k = k.to(q.dtype)       # as the reference's .to(q.dtype); exact for bf16 / fp32
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale          # [G, N], log2 units
        s = tl.where((valid & (t >= lo))[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc)
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
                     block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                     selection: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [B, Hq, D]; kv_layer [N, 2, rows, Hkv, D] (one layer of the page-major KV storage, K at [:, 0],
    V at [:, 1]; each (page, K/V) block contiguous, rows >= page_size); quantised [N] bool (device);
    page_table [B, max_pages]; seq_lens [B] (>= 1; the query sits at seq_len - 1). Returns [B, Hq, D].
    ``selection`` (sparse attention): (logical page index [B, Hkv, K], tokens [B, Hkv]) of the pages in
    ``page_table`` [B, Hkv, K] (``compact_selection``): only those are read, each under the read rule of
    its real position."""
    B, Hq, D = q.shape
    N, two, rows, Hkv, _ = kv_layer.shape
    assert two == 2 and rows >= page_size and q.stride(-1) == 1
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == D and kv_layer.stride(2) == Hkv * D, \
        "each (page, K/V) block must be contiguous"
    if block_n is None:
        block_n = max(page_size, 128 if num_splits == 1 else 64)
        if q.dtype == torch.float32 and q.is_cuda:
            # Triton 3.6 on the H200 failed to compile (TritonGPURemoveLayoutConversions) the fp32 kernel
            # with 128-token blocks of 16-token pages; 32-token blocks compiled and matched the reference
            block_n = max(page_size, 32)
    assert block_n % page_size == 0 and block_n >= 16 and block_n & (block_n - 1) == 0
    scale_off = scale_offset(page_size, Hkv, D, kv_layer.element_size(), rows)
    kv_bytes = kv_layer.view(torch.uint8)                         # same storage, byte strides
    flags = quantised.view(torch.uint8)
    group = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    direct = num_splits == 1
    part, lse, s_part, s_lse = split_buffers(out, num_splits)
    if selection is not None:
        logical, sel_lens = selection
        assert page_table.dim() == 3 and logical.stride() == page_table.stride() and sliding_window is None
        sel = (logical, sel_lens, page_table.stride(1), sel_lens.stride(0), sel_lens.stride(1))
    else:
        sel = (page_table, seq_lens, 0, 0, 0)
    _fp8_decode_split_kernel[(B, Hkv, num_splits)](
        q, kv_layer, kv_bytes, flags, page_table, seq_lens, part, lse, scale * _LOG2E, keep_sink, keep_recent,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        kv_bytes.stride(0), kv_bytes.stride(1), page_table.stride(0), *s_part, *s_lse, *sel,
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16),
        HEAD_DIM=D, PAGE=page_size, BLOCK_N=block_n, SCALE_OFF=scale_off, WINDOW=sliding_window or 0,
        DIRECT=direct, UPCAST=_INTERPRET, SPARSE=selection is not None, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        merge_splits(part, lse, out)
    return out
