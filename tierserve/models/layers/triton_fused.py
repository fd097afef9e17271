"""Fused Triton kernels for the small per-layer ops of a decode step (GPU path).

Each kernel reproduces the rounding of its plain-PyTorch reference step by step (add in fp32 then
round to the activation dtype, normalise in fp32, round, scale by the weight, round), so on the GPU
the fused model gives the same tokens as the plain one. References: ``RMSNorm.forward`` and a
bf16 residual add (``add_rmsnorm``), ``F.silu(gate) * up`` (``silu_mul``), ``RotaryEmbedding.apply``
followed by ``write_kv`` (``rope_write_kv``). Tests compare them on random inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve import pdl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)        # the next kernel (a projection, ``tierserve.pdl``) may be scheduled now
    pdl.wait(PDL)           # (launched early itself: x and the residual come from the kernel before)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + row * N + c, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * N + c, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)        # the residual add, rounded
        tl.store(res_ptr + row * N + c, x, mask=m)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    h = (h * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(out_ptr + row * N + c, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=m)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """Returns (rmsnorm(residual + x) * weight, residual + x); with ``residual=None`` the sum is x."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x)
    res = torch.empty_like(x) if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, res, eps, N=n,
                                 BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None,
                                 PDL=pdl.active(x.device), num_warps=8 if n >= 4096 else 4,
                                 **pdl.dependent_options(x.device))
    return out, res


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(x_ptr + row * 2 * I + c, mask=m, other=0.0)
    u = tl.load(x_ptr + row * 2 * I + I + c, mask=m, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * I + c, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first) -> silu(gate) * up, [T, I]."""
    gate_up = gate_up.contiguous()
    T, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(T, i, dtype=gate_up.dtype, device=gate_up.device)
    block = min(512, triton.next_power_of_2(i))     # enough programs to spread one row over the GPU
    _silu_mul_kernel[(T, triton.cdiv(i, block))](gate_up, out, I=i, BLOCK=block, PDL=pdl.active(out.device),
                                                 num_warps=4, **pdl.dependent_options(out.device))
    return out


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """x * cos + rotate_half(x) * sin, rounding to x's dtype after each op as the reference does."""
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = ((f1 * c1).to(dt).to(tl.float32) + (-(f2 * s1).to(dt).to(tl.float32))).to(dt)
    y2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, page_ptr, off_ptr,
                    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cp, s_kcp, s_kco, s_kch, s_vcp, s_vco, s_vch,
                    HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                    HALF: tl.constexpr, WRITE_KV: tl.constexpr, SUMMARY_ROW: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)        # one token: every head at once, loads issued together
    d = tl.arange(0, HALF)[None, :]
    hq = tl.arange(0, HQ_PAD)[:, None]
    hk = tl.arange(0, HKV_PAD)[:, None]
    mq, mk = hq < HQ, hk < HKV
    qb = q_ptr + t * s_qt + hq * s_qh + d
    kb = k_ptr + t * s_kt + hk * s_kh + d
    q1, q2 = tl.load(qb, mask=mq), tl.load(qb + HALF, mask=mq)
    k1, k2 = tl.load(kb, mask=mk), tl.load(kb + HALF, mask=mk)
    pos = tl.load(pos_ptr + t)
    dt = q1.dtype
    # cos / sin rounded to the activation dtype first, as the reference's table.to(dtype)
    c1 = tl.load(cos_ptr + pos * s_cp + d).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * s_cp + HALF + d).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * s_cp + d).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * s_cp + HALF + d).to(dt).to(tl.float32)
    y1, y2 = _rotate(q1, q2, c1, c2, s1, s2)
    tl.store(qb, y1, mask=mq)
    tl.store(qb + HALF, y2, mask=mq)
    y1, y2 = _rotate(k1, k2, c1, c2, s1, s2)
    tl.store(kb, y1, mask=mk)
    tl.store(kb + HALF, y2, mask=mk)
    if WRITE_KV:
        page = tl.load(page_ptr + t)
        off = tl.load(off_ptr + t)
        vb = v_ptr + t * s_vt + hk * s_vh + d
        v1, v2 = tl.load(vb, mask=mk), tl.load(vb + HALF, mask=mk)
        kd = kc_ptr + page * s_kcp + off * s_kco + hk * s_kch + d
        vd = vc_ptr + page * s_vcp + off * s_vco + hk * s_vch + d
        tl.store(kd, y1.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(kd + HALF, y2.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(vd, v1.to(vc_ptr.dtype.element_ty), mask=mk)
        tl.store(vd + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mk)
        if SUMMARY_ROW > 0:     # the page's key min (K half) / max (V half) row; its first token starts it over
            fold_summary(kc_ptr + page * s_kcp + SUMMARY_ROW * s_kco + hk * s_kch + d,
                         vc_ptr + page * s_vcp + SUMMARY_ROW * s_vco + hk * s_vch + d,
                         y1.to(kc_ptr.dtype.element_ty), y2.to(kc_ptr.dtype.element_ty), off == 0, mk, HALF)


@triton.jit
def fold_summary(mn, mx, a1, a2, first, mask, HALF: tl.constexpr):
    """A new key's halves ``a1`` / ``a2`` into its page's key min row (``mn``) and max row (``mx``); ``first`` (the
    page's first token) starts them over."""
    m1, m2 = tl.load(mn, mask=mask), tl.load(mn + HALF, mask=mask)
    x1, x2 = tl.load(mx, mask=mask), tl.load(mx + HALF, mask=mask)
    tl.store(mn, tl.where(first, a1, tl.minimum(m1, a1)), mask=mask)
    tl.store(mn + HALF, tl.where(first, a2, tl.minimum(m2, a2)), mask=mask)
    tl.store(mx, tl.where(first, a1, tl.maximum(x1, a1)), mask=mask)
    tl.store(mx + HALF, tl.where(first, a2, tl.maximum(x2, a2)), mask=mask)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, kv_layer: torch.Tensor | None = None,
                  slot_pages: torch.Tensor | None = None, slot_offsets: torch.Tensor | None = None,
                  page_size: int | None = None) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (cos/sin: fp32 tables [max_pos, D] indexed by
    ``positions``); with ``kv_layer`` ([N, 2, rows, Hkv, D]) also writes the rotated k and v at the
    slots, as ``write_kv`` does: pages with a key min / max summary row (rows > ``page_size``) fold the new
    keys into it (``backend.update_page_summary``) -- only for steps whose tokens write distinct pages
    (decode: one token per sequence), as programs of one page would race."""
    T, hq, D = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos.is_contiguous()
    write = kv_layer is not None
    kc = kv_layer[:, 0] if write else q
    vc = kv_layer[:, 1] if write else q
    ks = (kc.stride(0), kc.stride(1), kc.stride(2)) if write else (0, 0, 0)
    vs = (vc.stride(0), vc.stride(1), vc.stride(2)) if write else (0, 0, 0)
    _rope_kv_kernel[(T,)](
        q, k, v, cos, sin, positions, kc, vc, slot_pages if write else positions,
        slot_offsets if write else positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), cos.stride(0), *ks, *vs, HQ=hq, HKV=hkv, HQ_PAD=triton.next_power_of_2(hq),
        HKV_PAD=triton.next_power_of_2(hkv), HALF=D // 2, WRITE_KV=write,
        SUMMARY_ROW=page_size if write and page_size is not None and kv_layer.shape[2] > page_size else 0,
        PDL=pdl.active(q.device), num_warps=4, **pdl.dependent_options(q.device))
