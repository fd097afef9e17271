"""Triton routed-expert SwiGLU for decode rows (few tokens): graph-safe, no host sync.

For ``N`` tokens with ``k`` routed slots each (expert ids ``idx [N, k]``, combine weights ``wts [N, k]``)
and the routed experts stacked as ``w1, w3 [E, I, D]`` and ``w2 [E, D, I]`` (``MoE.stacked``):

* ``_gate_up_kernel``: one program per (token, slot) pair and ``BLOCK_I`` intermediate rows reads that
  expert's w1 / w3 rows by index and writes ``h = silu(min(w1 x, L)) * clamp(w3 x, -L, L)``;
* ``_down_kernel``: one program per token and ``BLOCK_D`` output columns sums ``wts[t, s] * w2[e] h`` over
  the token's slots (no atomics: deterministic).

Only the selected experts' weights are read; every shape is fixed by ``N``, ``k`` and the weights, so the
kernels can be captured in a CUDA graph. Products accumulate in fp32 and are rounded to the activation
dtype where the per-expert reference (``Expert.forward``) rounds (after each projection, after the
activation, after the weighting); the slot sum accumulates in fp32 and is rounded once (the reference
adds in the activation dtype, expert by expert), so bf16 results differ from the reference by rounding
only. The reference is ``MoE.routed`` (a per-expert loop with a host sync); ``routed_gather`` below is a
plain-PyTorch graph-safe version (used where Triton is not: the CPU). Weights are always dense here:
FP8 / FP4 expert checkpoints are dequantised on load (``weights.py``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:           # pragma: no cover - triton ships with torch on Linux
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def routed_gather(x: torch.Tensor, wts: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor, limit: float) -> torch.Tensor:
    """Plain-PyTorch, graph-safe routed sum: gathers the ``N * k`` selected experts' weights (a copy of
    ``N * k`` experts: fine for a few rows, the Triton kernels avoid it on the GPU)."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    xs = x[:, None, None, :].expand(N, k, 1, x.shape[-1]).reshape(N * k, 1, -1)
    gate = torch.bmm(xs, w1[flat].transpose(1, 2)).clamp(max=limit)                  # [Nk, 1, I]
    up = torch.bmm(xs, w3[flat].transpose(1, 2)).clamp(min=-limit, max=limit)
    y = torch.bmm(F.silu(gate) * up, w2[flat].transpose(1, 2)).view(N, k, -1)         # [N, k, D]
    return (y * wts[..., None].to(y.dtype)).sum(dim=1).to(x.dtype)


if triton is not None:
    @triton.jit
    def _gate_up_kernel(x_ptr, idx_ptr, w1_ptr, w3_ptr, h_ptr, D, I, K, limit,
                        s_xn, s_we, s_wi, s_hp, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
        pair = tl.program_id(0)
        tok = pair // K
        e = tl.load(idx_ptr + pair).to(tl.int64)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_mask = i < I
        acc1 = tl.zeros([BLOCK_I], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_I], dtype=tl.float32)
        base = e * s_we + i.to(tl.int64)[:, None] * s_wi
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            x = tl.load(x_ptr + tok * s_xn + d, mask=d_mask, other=0.0).to(tl.float32)
            m = i_mask[:, None] & d_mask[None, :]
            w1 = tl.load(w1_ptr + base + d[None, :], mask=m, other=0.0).to(tl.float32)
            w3 = tl.load(w3_ptr + base + d[None, :], mask=m, other=0.0).to(tl.float32)
            acc1 += tl.sum(w1 * x[None, :], axis=1)
            acc3 += tl.sum(w3 * x[None, :], axis=1)
        dt = h_ptr.dtype.element_ty
        gate = tl.minimum(acc1.to(dt).to(tl.float32), limit)
        up = tl.minimum(tl.maximum(acc3.to(dt).to(tl.float32), -limit), limit)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
        tl.store(h_ptr + pair * s_hp + i, (act * up).to(dt), mask=i_mask)

    @triton.jit
    def _down_kernel(h_ptr, idx_ptr, wts_ptr, w2_ptr, out_ptr, D, I, K,
                     s_hp, s_we, s_wd, s_on, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
        tok = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(0, K):
            pair = tok * K + s
            e = tl.load(idx_ptr + pair).to(tl.int64)
            wt = tl.load(wts_ptr + pair).to(tl.float32)
            base = e * s_we + d.to(tl.int64)[:, None] * s_wd
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for i0 in range(0, I, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                i_mask = i < I
                h = tl.load(h_ptr + pair * s_hp + i, mask=i_mask, other=0.0).to(tl.float32)
                w = tl.load(w2_ptr + base + i[None, :], mask=d_mask[:, None] & i_mask[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(w * h[None, :], axis=1)
            total += (acc.to(dt).to(tl.float32) * wt).to(dt).to(tl.float32)
        tl.store(out_ptr + tok * s_on + d, total.to(dt), mask=d_mask)


def routed_triton(x: torch.Tensor, wts: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor, limit: float, block_i: int | None = None, block_d: int | None = None
                  ) -> torch.Tensor:
    """``x [N, D]``, ``wts / idx [N, k]``, ``w1 / w3 [E, I, D]``, ``w2 [E, D, I]`` -> ``[N, D]``: the
    weighted sum of the selected experts' SwiGLU outputs (two kernel launches)."""
    if triton is None:
        raise RuntimeError("routed_triton needs triton")
    N, D = x.shape
    k = idx.shape[1]
    E, I, _ = w1.shape
    assert w1.shape == w3.shape and w2.shape == (E, D, I) and w1.shape[2] == D
    assert x.stride(1) == 1 and w1.stride(2) == 1 and w3.stride() == w1.stride() and w2.stride(2) == 1
    idx = idx.reshape(-1).contiguous()
    wts = wts.reshape(-1).contiguous()
    h = torch.empty(N * k, I, dtype=x.dtype, device=x.device)
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    bi = block_i or (16 if I >= 512 else 8)
    bd = block_d or 16
    _gate_up_kernel[(N * k, triton.cdiv(I, bi))](
        x, idx, w1, w3, h, D, I, k, float(limit), x.stride(0), w1.stride(0), w1.stride(1), h.stride(0),
        BLOCK_I=bi, BLOCK_D=128 if D >= 128 else 32, num_warps=4)
    _down_kernel[(N, triton.cdiv(D, bd))](
        h, idx, wts, w2, out, D, I, k, h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_D=bd, BLOCK_I=128 if I >= 128 else 32, num_warps=4)
    return out
