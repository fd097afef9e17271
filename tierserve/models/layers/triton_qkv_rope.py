"""The q/k/v projection's split-K sum, rotary and KV write in one Triton kernel (batch-1 FP8 decode).

A batch-1 FP8 decode step ran, per layer, the q/k/v row GEMV's partials (``fp8_gemv_rows``), their fixed-order sum
(``_splitk_reduce_kernel``) and then ``triton_fused._rope_kv_kernel`` (one program rotating every head and writing
the new K/V). Here one program per (token, head) sums that head's partials in split order (+ bias), rounds to the
activation dtype as the reduce kernel's store does, rotates q / k heads with the same rounding steps as
``_rotate``, stores q / k / v into the projection's output and writes k / v (and the page's key min / max
summary row) into the KV pages as ``_rope_kv_kernel`` does: the same bits, one launch less a layer.
Reference: ``fp8_gemv_rows`` + ``rope_write_kv`` (tests/kernels/test_qkv_rope.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.models.layers.triton_fused import _rotate, fold_summary


@triton.jit
def _reduce_rope_kv_kernel(p_ptr, b_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, page_ptr, off_ptr,
                           num_splits, s_ps, s_pm, s_om, s_cp, s_kcp, s_kco, s_kch, s_vcp, s_vco, s_vch,
                           HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                           WRITE_KV: tl.constexpr, SUMMARY_ROW: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    c = h * (2 * HALF) + d                       # this head's first half of columns; + HALF the second
    a1 = tl.zeros([HALF], dtype=tl.float32)
    a2 = tl.zeros([HALF], dtype=tl.float32)
    for s in range(num_splits):                  # split order, as _splitk_reduce_kernel
        a1 += tl.load(p_ptr + s * s_ps + t * s_pm + c)
        a2 += tl.load(p_ptr + s * s_ps + t * s_pm + c + HALF)
    if HAS_BIAS:
        a1 += tl.load(b_ptr + c).to(tl.float32)
        a2 += tl.load(b_ptr + c + HALF).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y1, y2 = a1.to(dt), a2.to(dt)
    if h < HQ + HKV:                             # q and k heads rotate
        pos = tl.load(pos_ptr + t)
        c1 = tl.load(cos_ptr + pos * s_cp + d).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * s_cp + HALF + d).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * s_cp + d).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * s_cp + HALF + d).to(dt).to(tl.float32)
        y1, y2 = _rotate(y1, y2, c1, c2, s1, s2)
    tl.store(out_ptr + t * s_om + c, y1)
    tl.store(out_ptr + t * s_om + c + HALF, y2)
    if WRITE_KV and h >= HQ:
        page = tl.load(page_ptr + t)
        off = tl.load(off_ptr + t)
        kv = h >= HQ + HKV                        # a v head
        hk = tl.where(kv, h - HQ - HKV, h - HQ)
        base = tl.where(kv, vc_ptr + page * s_vcp + off * s_vco + hk * s_vch,
                        kc_ptr + page * s_kcp + off * s_kco + hk * s_kch)
        e1, e2 = y1.to(kc_ptr.dtype.element_ty), y2.to(kc_ptr.dtype.element_ty)
        tl.store(base + d, e1)
        tl.store(base + HALF + d, e2)
        if SUMMARY_ROW > 0 and h < HQ + HKV:     # the page's key min (K half) / max (V half) row
            fold_summary(kc_ptr + page * s_kcp + SUMMARY_ROW * s_kco + hk * s_kch + d,
                         vc_ptr + page * s_vcp + SUMMARY_ROW * s_vco + hk * s_vch + d, e1, e2, off == 0, d < HALF,
                         HALF)


def reduce_rope_write_kv(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, num_heads: int,
                         num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                         kv_layer: torch.Tensor | None = None, slot_pages: torch.Tensor | None = None,
                         slot_offsets: torch.Tensor | None = None, page_size: int | None = None) -> None:
    """``partials [S, T, (Hq + 2 Hkv) D]`` fp32 (``fp8_gemv_rows(..., partials_only=True)``) -> ``out [T, (Hq + 2 Hkv)
    D]`` holding q and k rotated at ``positions`` and v, as the reduce kernel then ``rope_write_kv`` leave it; with
    ``kv_layer`` ([N, 2, rows, Hkv, D]) k and v are also written at the slots and (rows > ``page_size``) folded into
    the pages' key min / max rows (decode steps only: one token a page)."""
    S, T, n = partials.shape
    H = num_heads + 2 * num_kv_heads
    D = n // H
    assert n == H * D and D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0, "head_dim / 2 must be a power of two"
    assert partials.stride(2) == 1 and out.stride(1) == 1 and tuple(out.shape) == (T, n) and cos.is_contiguous()
    write = kv_layer is not None
    kc = kv_layer[:, 0] if write else out
    vc = kv_layer[:, 1] if write else out
    ks = (kc.stride(0), kc.stride(1), kc.stride(2)) if write else (0, 0, 0)
    vs = (vc.stride(0), vc.stride(1), vc.stride(2)) if write else (0, 0, 0)
    _reduce_rope_kv_kernel[(T, H)](
        partials, bias if bias is not None else partials, out, cos, sin, positions, kc, vc,
        slot_pages if write else positions, slot_offsets if write else positions, S, partials.stride(0),
        partials.stride(1), out.stride(0), cos.stride(0), *ks, *vs, HQ=num_heads, HKV=num_kv_heads, HALF=D // 2,
        HAS_BIAS=bias is not None, WRITE_KV=write,
        SUMMARY_ROW=page_size if write and page_size is not None and kv_layer.shape[2] > page_size else 0,
        PDL=pdl.active(out.device), num_warps=1, **pdl.dependent_options(out.device))
