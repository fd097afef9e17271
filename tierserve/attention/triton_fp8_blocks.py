"""Per-block building blocks of the FP8 decode kernel (``triton_decode_fp8._fp8_decode_split_kernel``): a block's
page ids and per-token facts (position, read rule, storage rows), its flags, and its keys / values as
(code values or full-precision values in the model dtype, fp32 scale per token) under the read rule, with the
fix-up branch for rows where rule and storage disagree and the codes-only branch (``FAST``). Formats and the rule:
``triton_fp8_common``, ``tierserve.quant.fp8_kv``."""
from __future__ import annotations

import triton
import triton.language as tl

from tierserve.attention.triton_fp8_common import code_values, fake_fold, load_scales, softmax_update_scaled, split_ids


@triton.jit
def block_ids(row_ids, row_lg, u, lim, PAGE: tl.constexpr, SPARSE: tl.constexpr):
    """Page ids (int64) and logical pages of the tokens ``u`` of a row (entries ``u < lim`` loaded, else 0)."""
    page = tl.load(row_ids + u // PAGE, mask=u < lim, other=0).to(tl.int64)
    lg = page
    if SPARSE:
        lg = tl.load(row_lg + u // PAGE, mask=u < lim, other=0)
    return page, lg


@triton.jit
def block_meta(page, lg, u, n, p, keep_sink, keep_recent, cbase, hbase,
                PAGE: tl.constexpr, SPARSE: tl.constexpr, COMPACT: tl.constexpr, HOST: tl.constexpr):
    """Per-token facts of one block (no loads): page id (0 where invalid), valid, position, offset in its page,
    on the host, read rule, and the rows of the values / codes / host codes."""
    valid = u < n                               # whole pages are loaded (amax), masked below
    page = tl.where(valid, page, 0)
    off = (u % PAGE).to(tl.int64)
    t = u                                       # the token's position in its sequence
    if SPARSE:
        t = tl.where(valid, lg, 0) * PAGE + off
    first = t // PAGE * PAGE
    low = valid & (first >= keep_sink) & (p - (first + PAGE - 1) >= keep_recent)   # the read rule (page level;
    # keep_recent >= 1 here: the wrappers pass max(keep_recent, 1))
    ish = page < 0                              # HOST: spilled pages (ids >= hbase), always stored FP8
    vpage, cpage = split_ids(page, cbase, COMPACT)
    hpage = page * 0
    if HOST:
        ish = page >= hbase
        vpage = tl.where(ish, 0, vpage)
        cpage = tl.where(ish, 0, cpage)
        hpage = tl.where(ish, page - hbase, 0)
    return page, valid, t, off, ish, low, vpage, cpage, hpage


@triton.jit
def stored_flags(flag_ptr, page, valid, ish, HOST: tl.constexpr):
    """The pages' stored-as-FP8 flags (spilled pages always are)."""
    if HOST:
        return (tl.load(flag_ptr + page, mask=valid & ~ish, other=0) != 0) | ish
    return tl.load(flag_ptr + page, mask=valid, other=0) != 0


@triton.jit
def _raw_codes(cptr, hcptr, mask, ish, HOST: tl.constexpr):
    """uint8 codes at ``cptr`` (device storage) or, for rows ``ish`` (HOST: spilled pages), at ``hcptr``."""
    if HOST:
        return tl.where(ish[:, None], tl.load(hcptr, mask=mask & ish[:, None], other=0),
                        tl.load(cptr, mask=mask & ~ish[:, None], other=0))
    return tl.load(cptr, mask=mask, other=0)


@triton.jit
def _scales(sptr, hsptr, mask, ish, HOST: tl.constexpr):
    if HOST:
        return tl.where(ish, load_scales(hsptr, mask & ish), load_scales(sptr, mask & ~ish))
    return load_scales(sptr, mask)


@triton.jit
def _ptrs(ptr, bptr, hptr, vpage, cpage, hpage, off, kvh, d, s_p, s_t, s_h, s_bp, s_hp, SCALE_OFF: tl.constexpr):
    """Pointers of one K (or V) block: values [N, D], codes [N, D], scales [N], host codes, host scales."""
    rel = off[:, None] * s_t + kvh * s_h + d[None, :]          # element offset == code byte offset
    return (ptr + vpage[:, None] * s_p + rel, bptr + cpage[:, None] * s_bp + rel,
            bptr + cpage * s_bp + SCALE_OFF + 4 * kvh, hptr + hpage[:, None] * s_hp + rel,
            hptr + hpage * s_hp + SCALE_OFF + 4 * kvh)


@triton.jit
def _load_raw(vptr, cptr, sptr, hcptr, hsptr, valid, low, ish, HOST: tl.constexpr):
    """The loads of one K (or V) block under the read rule alone (``low``: FP8 codes + scale, 1 byte per value;
    else the full-precision values, 2 bytes), so they wait for the page ids only, not for the stored flags (a
    second dependent memory round trip per block); masked-off loads move no bytes. Raw: (values, uint8 codes,
    scales), converted by ``_fold``."""
    x = tl.load(vptr, mask=(valid & ~low)[:, None], other=0.0)
    return x, _raw_codes(cptr, hcptr, low[:, None], ish, HOST), _scales(sptr, hsptr, low, ish, HOST)


@triton.jit
def _fold(x, c, sc, vptr, cptr, sptr, hcptr, hsptr, valid, low, stored, ish, any_fix,
          PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, HOST: tl.constexpr):
    """[BLOCK_N, D] keys (or values) of one block as (values in DTYPE, fp32 scale per token) from ``_load_raw``'s
    loads. Rows where rule and storage disagree (``any_fix``, a scalar: one or two blocks per sequence) are
    fixed in a branch: a page read in FP8 but not stored yet is quantised on the fly from its values; a stored
    page read at full precision (the page policy never asks for it) gives its FP8 values."""
    val = tl.where(low[:, None], code_values(c, DTYPE), x.to(DTYPE))
    if any_fix:
        fake = low & ~stored
        bad = valid & ~low & stored
        x = tl.where(low[:, None], tl.load(vptr, mask=fake[:, None], other=0.0), x)   # whole pages
        val, sc = fake_fold(x, val, sc, fake, PAGE, BLOCK_N, DTYPE)
        bc = code_values(_raw_codes(cptr, hcptr, bad[:, None], ish, HOST), DTYPE)
        val = tl.where(bad[:, None], bc, val)
        sc = tl.where(bad, _scales(sptr, hsptr, bad, ish, HOST), sc)
    return val, sc


@triton.jit
def read_folded(ptr, bptr, page, cpage, off, kvh, d, valid, low, stored, any_fix, s_p, s_t, s_h, s_bp,
                hptr, hpage, ish, s_hp, all_low,
                SCALE_OFF: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                RULE_LOADS: tl.constexpr, HOST: tl.constexpr, FAST: tl.constexpr = False):
    """[BLOCK_N, D] keys (or values) of one K/V block as (values in DTYPE, fp32 scale per token): ``_load_raw``
    then ``_fold``.

    ``FAST``: a block whose every valid row the rule reads in FP8 (``all_low``, a scalar from ``block_flags``;
    the bulk of a long context) takes a branch
    with the codes' loads and conversion only (no full-precision loads and no per-value select); rows not
    stored yet are still quantised on the fly there. Same values as the general path.

    ``RULE_LOADS=False`` (kept to compare on the GPU): the loads follow the stored flags instead (codes for
    stored pages, values for the others: one more dependent round trip per block, but the fix-up only
    quantises values already loaded -- ptxas: 175 instead of 210 registers at 64 tokens / 8 warps).

    ``HOST`` (FP8 pages spilled to CPU RAM): rows ``ish`` are read from their compact rows at ``hptr`` (row
    ``hpage``, same code and scale offsets), straight from pinned host memory; they are always stored FP8."""
    vptr, cptr, sptr, hcptr, hsptr = _ptrs(ptr, bptr, hptr, page, cpage, hpage, off, kvh, d, s_p, s_t, s_h, s_bp,
                                           s_hp, SCALE_OFF)
    if not RULE_LOADS:
        x = tl.load(vptr, mask=(valid & ~stored)[:, None], other=0.0)
        c = _raw_codes(cptr, hcptr, (valid & stored)[:, None], ish, HOST)
        val = tl.where(stored[:, None], code_values(c, DTYPE), x.to(DTYPE))
        sc = _scales(sptr, hsptr, valid & stored, ish, HOST)
        if any_fix:
            val, sc = fake_fold(x, val, sc, low & ~stored, PAGE, BLOCK_N, DTYPE)
        return val, sc
    if FAST:
        if all_low:
            val = code_values(_raw_codes(cptr, hcptr, low[:, None], ish, HOST), DTYPE)
            sc = _scales(sptr, hsptr, low, ish, HOST)
            if any_fix:         # only pages read in FP8 but not stored yet (all rows are read in FP8 here)
                fake = low & ~stored
                val, sc = fake_fold(tl.load(vptr, mask=fake[:, None], other=0.0), val, sc, fake, PAGE, BLOCK_N,
                                    DTYPE)
        else:
            x, c, sc = _load_raw(vptr, cptr, sptr, hcptr, hsptr, valid, low, ish, HOST)
            val, sc = _fold(x, c, sc, vptr, cptr, sptr, hcptr, hsptr, valid, low, stored, ish, any_fix, PAGE, BLOCK_N,
                            DTYPE, HOST)
        return val, sc
    x, c, sc = _load_raw(vptr, cptr, sptr, hcptr, hsptr, valid, low, ish, HOST)
    return _fold(x, c, sc, vptr, cptr, sptr, hcptr, hsptr, valid, low, stored, ish, any_fix, PAGE, BLOCK_N, DTYPE,
                 HOST)


@triton.jit
def block_flags(valid, low, stored, RULE_LOADS: tl.constexpr, FAST: tl.constexpr):
    """Two scalars of a block: ``any_fix`` (some row's rule and storage disagree: the fix-up branch) and, with
    FAST, ``all_low`` (every valid row is read in FP8: the codes-only branch)."""
    if RULE_LOADS:
        fix = valid & (low != stored)
    else:
        fix = low & ~stored
    all_low = False
    if FAST:
        all_low = tl.sum((valid & ~low).to(tl.int32), axis=0) == 0
    return tl.sum(fix.to(tl.int32), axis=0) > 0, all_low


@triton.jit
def bulk_codes(bptr, cpage, rel, kvh, s_bp, SCALE_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """[BLOCK_N, D] keys (or values) of a block whose every row is valid, read in FP8 and stored as FP8 (element
    offsets ``rel`` in their code rows ``cpage``) as (code values in DTYPE, fp32 scale per token): unmasked loads
    the compiler can pipeline across blocks."""
    val = code_values(tl.load(bptr + cpage[:, None] * s_bp + rel), DTYPE)
    return val, tl.load((bptr + cpage * s_bp + SCALE_OFF + 4 * kvh).to(tl.pointer_type(tl.float32)))


@triton.jit
def attend(q, k, ks, v, vs, valid, t, lo, qk_scale, m_i, l_i, acc):
    # scales folded into the scores and the probabilities (powers of two: exact)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * (ks * qk_scale)[None, :]      # [G, N], log2 units
    s = tl.where((valid & (t >= lo))[None, :], s, float("-inf"))
    return softmax_update_scaled(s, v, vs, m_i, l_i, acc)


@triton.jit
def lagging(row_ids, flag_ptr, j0, j1, CHUNK: tl.constexpr = 256):
    """Whether any page of the row's entries [j0, j1) is not stored as FP8 yet (ids and flags in chunks: two
    dependent loads per program instead of one per block)."""
    lag = 0
    for c0 in range(j0, j1, CHUNK):
        j = c0 + tl.arange(0, CHUNK)
        m = j < j1
        page = tl.load(row_ids + j, mask=m, other=0)
        lag += tl.sum((m & (tl.load(flag_ptr + page, mask=m, other=1) == 0)).to(tl.int32), axis=0)
    return lag > 0


@triton.jit
def bulk_bounds(n, keep_sink, keep_recent, BULK_N: tl.constexpr):
    """Dense step of a sequence of ``n`` tokens (query at n - 1): [fa, fb), the blocks of BULK_N tokens the read rule
    reads wholly in FP8 by position (past the sink pages, before the recent ones; ``keep_recent`` >= 1), within
    [0, n]; [0, fa) and [fb, n) hold the rest."""
    fa = tl.cdiv(keep_sink, BULK_N) * BULK_N
    fb = tl.maximum(tl.maximum(n - keep_recent, 0) // BULK_N * BULK_N, fa)
    return tl.minimum(fa, n), tl.minimum(fb, n)


@triton.jit
def bulk_part(fa, fb, part, PARTS: tl.constexpr, BULK_N: tl.constexpr):
    """[start, end) of part ``part`` of ``PARTS`` of the bulk range [fa, fb), in whole blocks."""
    per = tl.cdiv(tl.cdiv(fb - fa, PARTS), BULK_N) * BULK_N
    start = tl.minimum(fa + part * per, fb)
    return start, tl.minimum(start + per, fb)


@triton.jit
def bulk_block(u, q, d, kvh, row_ids, kb, vb, cbase, s_t, s_h, s_bp, lo, qk_scale, m_i, l_i, acc,
               PAGE: tl.constexpr, SCALE_OFF: tl.constexpr, COMPACT: tl.constexpr):
    """One block of tokens ``u`` (every one valid, read in FP8 and stored as FP8): page ids, codes and scales
    (``bulk_codes``; K at ``kb``, V at ``vb``), then the online softmax update."""
    cpage = split_ids(tl.load(row_ids + u // PAGE).to(tl.int64), cbase, COMPACT)[1]
    rel = (u % PAGE).to(tl.int64)[:, None] * s_t + kvh * s_h + d[None, :]
    k, ks = bulk_codes(kb, cpage, rel, kvh, s_bp, SCALE_OFF, q.dtype)
    v, vs = bulk_codes(vb, cpage, rel, kvh, s_bp, SCALE_OFF, q.dtype)
    return attend(q, k, ks, v, vs, u >= 0, u, lo, qk_scale, m_i, l_i, acc)
