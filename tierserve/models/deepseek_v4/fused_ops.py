"""Triton RMS norms and rope for the graph decode step (``static_decode.py``): one launch each.

At batch-1 decode on a GPU, inside a CUDA graph, the step is bound by the number of tiny kernels, not by
bytes: ``RMSNorm`` is ~8 element-wise / reduction kernels and ``apply_rope`` ~12, called a dozen times per
layer. These kernels do the same operations with the same roundings to the activation dtype:

* ``rms_norm(x, weight, eps)``: ``RMSNorm`` (fp32 normalise, round, times the weight, round) when
  ``weight`` is given, else ``rms_unweighted`` (fp32 inverse RMS rounded to the dtype, times ``x``, round);
* ``rope(x, cos, sin, inverse)``: ``apply_rope`` (pairs on the trailing ``2 * cos.shape[-1]`` channels,
  fp32 math, the leading channels copied).

Only the reduction order of the mean differs (fp32). References: ``norm.py`` and ``rope.py``; tests:
tests/models/test_deepseek_v4_fused_ops.py.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:           # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _rms_kernel(x_ptr, w_ptr, out_ptr, N, eps, s_x, s_o, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * s_x + n, mask=n < N, other=0.0).to(tl.float32)
            ss += x * x
        r = tl.math.rsqrt(tl.sum(ss, axis=0) / N + eps)
        dt = out_ptr.dtype.element_ty
        if not WEIGHTED:
            r = r.to(dt).to(tl.float32)
        for n0 in range(0, N, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            m = n < N
            x = tl.load(x_ptr + row * s_x + n, mask=m, other=0.0).to(tl.float32)
            y = (x * r).to(dt)
            if WEIGHTED:
                w = tl.load(w_ptr + n, mask=m, other=0.0).to(tl.float32)
                y = (w * y.to(tl.float32)).to(dt)
            tl.store(out_ptr + row * s_o + n, y, mask=m)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, M, D, HALF, s_c, SIGN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)          # one [D] vector; its position is row // M
        p = row // M
        base = row * D
        nope = D - 2 * HALF
        for n0 in range(0, nope, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + base + n, tl.load(x_ptr + base + n, mask=n < nope), mask=n < nope)
        h = tl.arange(0, BLOCK_H)
        hm = h < HALF
        c = tl.load(cos_ptr + p * s_c + h, mask=hm, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + p * s_c + h, mask=hm, other=0.0).to(tl.float32) * SIGN
        a = tl.load(x_ptr + base + nope + 2 * h, mask=hm, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + base + nope + 2 * h + 1, mask=hm, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + base + nope + 2 * h, (a * c - b * s).to(dt), mask=hm)
        tl.store(out_ptr + base + nope + 2 * h + 1, (b * c + a * s).to(dt), mask=hm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``RMSNorm`` (``weight`` given) or ``rms_unweighted`` over the last dim of ``x``, one launch."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(N), 2048)
    if x2.shape[0]:
        _rms_kernel[(x2.shape[0],)](x2, weight if weight is not None else x2, out, N, float(eps), x2.stride(0),
                                    out.stride(0), WEIGHTED=weight is not None, BLOCK=block,
                                    num_warps=4 if block >= 1024 else 2)
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``apply_rope(x, cos, sin, inverse)``: ``x [S, ..., D]``, ``cos / sin [S, half]``, one launch."""
    half = cos.shape[-1]
    x = x.contiguous()
    S, D = x.shape[0], x.shape[-1]
    M = x.numel() // max(S * D, 1)
    out = torch.empty_like(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    if x.numel():
        _rope_kernel[(S * M,)](x, cos, sin, out, M, D, half, cos.stride(0), SIGN=-1.0 if inverse else 1.0,
                               BLOCK_N=256, BLOCK_H=max(2, triton.next_power_of_2(half)), num_warps=1)
    return out
