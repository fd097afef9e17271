"""Triton skinny GEMM for decode (M <= 16 rows): ``y = norm(x) @ W^T (+ residual)``, weights read once.

A decode step of a dense model is a chain of weight reads; cuBLAS reaches the HBM bound on the big
matrices but not on the small ones (q/k/v and o_proj at 8B: 3.2 and 2.6 TB/s on the H200, see
benchmarks/results/), and the RMSNorm before a projection and the residual add after one are
separate kernels. This kernel folds them in:

* prologue ``NORM``: each program computes the rows' RMS over K (x is a few KB, cached) and
  normalises its K tiles exactly as ``RMSNorm`` does (fp32 normalise, round, scale by the weight, round);
* epilogue ``RES``: the product is rounded to the activation dtype, then the residual is added and
  rounded again -- the plain path's ``x + linear(h)``.

Grid: one program per BLOCK_N output columns; K in BLOCK_K tiles with tensor-core products on rows
padded to 16. No host sync: CUDA-graph safe. References: ``RMSNorm``, ``F.linear`` and the bf16 add;
tests compare them on random inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 16


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, g_ptr, r_ptr, out_ptr, M, N, K, eps, s_xm, s_wn, s_rm, s_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, RES: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    m64, n64 = m.to(tl.int64), n.to(tl.int64)
    if NORM:
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xf = tl.load(x_ptr + m64[:, None] * s_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        rstd = tl.math.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m64[:, None] * s_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + n64[:, None] * s_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            g = tl.load(g_ptr + k, mask=k_mask, other=0.0)
            h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
            x = (g.to(tl.float32)[None, :] * h.to(tl.float32)).to(x.dtype)
        if UPCAST:      # the CPU interpreter's dot mishandles bf16
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    y = acc.to(out_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    if RES:
        r = tl.load(r_ptr + m64[:, None] * s_rm + n64[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m64[:, None] * s_om + n64[None, :], y, mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None, block_n: int | None = None, block_k: int = 256,
         num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] (M <= 16), weight [N, K] -> [M, N]: ``linear(rmsnorm(x) if norm_weight else x) (+ residual)``."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {M}")
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[1] == K
    if block_n is None:
        block_n = 32 if N <= 8192 else 64
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    r = residual if residual is not None else out
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, norm_weight if norm_weight is not None else weight, r, out, M, N, K, eps,
        x.stride(0), weight.stride(0), r.stride(0), out.stride(0), BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
        BLOCK_K=block_k, NORM=norm_weight is not None, RES=residual is not None, UPCAST=_INTERPRET,
        num_warps=num_warps, num_stages=num_stages)
    return out
