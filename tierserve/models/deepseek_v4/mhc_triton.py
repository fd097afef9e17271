"""Triton Sinkhorn projection of mHC (``mhc.sinkhorn``) in one kernel launch.

``mhc.sinkhorn`` on ``[N, hc, hc]`` logits is ``2 * iters + 3`` tiny element-wise / reduction kernels
(~45 with the release's 20 iterations, twice per layer): at batch-1 decode on a GPU, inside a CUDA
graph, their launch gaps cost more than the whole MoE. Here one program per matrix keeps it in
registers for all iterations. Same operations in the same order per element (row softmax, ``+ eps``,
then alternating column / row normalisation); sums over ``hc`` values may round differently from torch's
(fp32, ~1e-7). Reference: ``mhc.sinkhorn``; test: tests/models/test_deepseek_v4_mhc_triton.py.
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
    def _sinkhorn_kernel(x_ptr, out_ptr, iters, eps, HC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK)[:, None]
        j = tl.arange(0, BLOCK)[None, :]
        mask = (i < HC) & (j < HC)
        offs = row * HC * HC + i * HC + j
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        mx = tl.max(x, axis=1)
        e = tl.where(mask, tl.exp(x - mx[:, None]), 0.0)
        m = tl.where(mask, e / tl.sum(e, axis=1)[:, None] + eps, 0.0)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
        for _ in range(iters - 1):
            m = m / (tl.sum(m, axis=1)[:, None] + eps)
            m = m / (tl.sum(m, axis=0)[None, :] + eps)
        tl.store(out_ptr + offs, m, mask=mask)


def sinkhorn_triton(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``mhc.sinkhorn(logits, iters, eps)`` for fp32 ``[..., hc, hc]`` logits, one launch."""
    hc = logits.shape[-1]
    x = logits.float().contiguous()
    out = torch.empty_like(x)
    n = x.numel() // (hc * hc)
    if n:
        _sinkhorn_kernel[(n,)](x, out, iters, float(eps), HC=hc, BLOCK=max(2, triton.next_power_of_2(hc)),
                               num_warps=1)
    return out
