"""Triton building blocks shared by the FP8-KV kernels (decode, prefill, page quantisation).

The FP8 page format is ``tierserve.quant.fp8_kv``: per (page, layer, K/V) block, ``page_size*Hkv*D`` e4m3
codes in token-major order (so a code's byte offset equals the element offset of the value it replaced),
then ``Hkv`` fp32 power-of-two scales at a 4-byte aligned offset. ``dequant = code * scale``.

Scales are *folded*: a kernel reads an FP8 key/value as its code value (exact in bf16 / fp16 / fp32: e4m3
has 4 significant bits) plus a per-token scale, and applies the scale to the [rows, tokens] scores / the
probabilities instead of the [tokens, D] values. Because the scale is a power of two, every product and
partial sum is scaled exactly, so the result is bit-identical to multiplying the values first.

Quantising on the fly (a page that must be read in FP8 but is still stored at full precision) gives the
same numbers as storage: per (page, head) amax over the page's rows, the smallest power of two
>= amax / 448 as scale (``_scale_exp``, from the exponent bits), round-to-nearest-even e4m3 of
``x / scale`` (on the GPU the hardware conversion, ``cvt.rn.satfinite`` e4m3 pairs; under the CPU interpreter
``_e4m3_round``, integer rounding on the fp32 bits, subnormals included; |x / scale| <= 448, so saturation never
applies and both equal torch's ``.to(torch.float8_e4m3fn)``).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# the hardware fp32 -> e4m3 conversion (sm_89+); the interpreter rounds on the bits instead. In stop 20 the emulated
# rounding of a whole [64, 128] block made the one program with a page quantised on the fly take ~13 us longer than
# the others (the 2k decode launch 23 us instead of 10.5 on the H200)
HW_E4M3 = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


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
def _e4m3_bits(y):
    """The float8_e4m3fn byte (as int32) of an fp32 ``y`` that is exactly an e4m3 value (sign kept)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    e = (bits >> 23) & 0xFF
    normal = ((e - 120) << 3) | ((bits >> 20) & 7)
    sub = (tl.abs(y) * 512.0).to(tl.int32)                      # y = k * 2**-9 below 2**-6
    return sign | tl.where(e >= 121, normal, sub)


@triton.jit
def page_scale_exp(x, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``x [BLOCK_N, D]`` (pages of PAGE consecutive rows, masked rows 0) -> [BLOCK_N] int32: each row's
    page scale exponent (per-page amax over PAGE x D, as one reduction per row and one per page)."""
    rmax = tl.max(tl.abs(x.to(tl.float32)), axis=1)
    pmax = tl.max(tl.reshape(rmax, (BLOCK_N // PAGE, PAGE)), axis=1)
    return tl.reshape(tl.broadcast_to(_scale_exp(pmax)[:, None], (BLOCK_N // PAGE, PAGE)), (BLOCK_N,))


@triton.jit
def code_values(c, DTYPE: tl.constexpr):
    """uint8 e4m3 codes -> their values in DTYPE (exact). Through fp32: on sm_90 e4m3 -> bf16 compiles to a
    packed e4m3 -> f16 conversion and then one F2F per value (a quarter-rate pipe); f16 -> f32 -> packed bf16
    stays on full-rate pipes (the decode kernel's SASS, stop 19: docs/fp8.md)."""
    return c.to(tl.float8e4nv, bitcast=True).to(tl.float32).to(DTYPE)


@triton.jit
def load_codes(ptr, mask, DTYPE: tl.constexpr):
    """FP8 codes at the uint8 pointers ``ptr`` (masked -> 0) as DTYPE code values."""
    return code_values(tl.load(ptr, mask=mask, other=0), DTYPE)


@triton.jit
def load_scales(ptr, mask):
    """fp32 scales at the uint8 pointers ``ptr`` (4-byte aligned; masked -> 1)."""
    return tl.load(ptr.to(tl.pointer_type(tl.float32)), mask=mask, other=1.0)


@triton.jit
def fake_fold(x, val, sc, fake, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """Rows ``fake`` of ``x [BLOCK_N, D]`` (pages still at full precision that are read in FP8) quantised on
    the fly into (code values, scales) -- replacing those rows of ``val`` / ``sc``. Whole pages of x needed."""
    es = page_scale_exp(x, PAGE, BLOCK_N)
    y = x.to(tl.float32) * _exp2i(-es)[:, None]
    if HW_E4M3:
        fq = y.to(tl.float8e4nv).to(tl.float32)
    else:
        fq = _e4m3_round(y)
    return tl.where(fake[:, None], fq.to(DTYPE), val), tl.where(fake, _exp2i(es), sc)


@triton.jit
def quant_block_head(src, dst, n_valid, h, s_t, s_h, n_heads, PAGE: tl.constexpr, PAGE_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, SCALE_OFF: tl.constexpr):
    """Quantise head ``h`` of one (page, K/V) block: ``src`` points at the block's first value ([rows, H, D]
    with row stride s_t, head stride s_h), rows >= ``n_valid`` count as 0; writes the e4m3 codes of rows
    < PAGE into the byte block ``dst`` at their element offsets and the head's scale at SCALE_OFF + 4h."""
    r = tl.arange(0, PAGE_PAD)
    d = tl.arange(0, HEAD_DIM)
    m = (r < n_valid)[:, None]
    x = tl.load(src + r[:, None] * s_t + h * s_h + d[None, :], mask=m, other=0.0).to(tl.float32)
    es = _scale_exp(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    y = x * _exp2i(-es)
    # the sign from y itself: rounding to zero keeps it (-0 is 0x80, as in torch); tl's negation is 0 - x
    code = ((y.to(tl.int32, bitcast=True) >> 24) & 0x80) | (_e4m3_bits(_e4m3_round(y)) & 0x7F)
    rel = r[:, None] * (n_heads * HEAD_DIM) + h * HEAD_DIM + d[None, :]
    tl.store(dst + rel, code.to(tl.uint8), mask=(r < PAGE)[:, None])
    tl.store((dst + SCALE_OFF + 4 * h).to(tl.pointer_type(tl.float32)), _exp2i(es))


@triton.jit
def copy_block_head(src, dst, h, n_heads, PAGE: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SCALE_OFF: tl.constexpr):
    """Copy head ``h``'s codes and scale of one stored (page, K/V) byte block ``src`` to ``dst``."""
    r = tl.arange(0, PAGE_PAD)
    rel = r[:, None] * (n_heads * HEAD_DIM) + h * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(dst + rel, tl.load(src + rel, mask=(r < PAGE)[:, None]), mask=(r < PAGE)[:, None])
    sc = tl.load((src + SCALE_OFF + 4 * h).to(tl.pointer_type(tl.float32)))
    tl.store((dst + SCALE_OFF + 4 * h).to(tl.pointer_type(tl.float32)), sc)


@triton.jit
def softmax_update_scaled(s, v, vs, m_i, l_i, acc):
    """``triton_decode.softmax_update`` with per-token value scales ``vs`` [N] folded into the probabilities
    (``p * vs`` rounded to v's dtype equals ``p`` rounded times the power-of-two scale)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def split_ids(page, cbase, COMPACT: tl.constexpr):
    """Page ids -> (row in the full-precision storage, row in the FP8 code storage). With a compact pool
    (``COMPACT``; ids >= ``cbase`` are its slots, the codes' base pointer is the pool) a compact page's values
    and a full page's codes point at row 0: such loads are masked off or replaced (never read as data)."""
    vpage = page
    cpage = page
    if COMPACT:
        isc = page >= cbase
        vpage = tl.where(isc, 0, page)
        cpage = tl.where(isc, page - cbase, 0)
    return vpage, cpage
