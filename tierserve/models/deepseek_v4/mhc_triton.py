"""Triton kernels of mHC (``mhc.py``) for the graph decode step: each piece in one launch.

``mhc.sinkhorn`` on ``[N, hc, hc]`` logits is ``2 * iters + 3`` tiny element-wise / reduction kernels
(~45 with the release's 20 iterations, twice per layer): at batch-1 decode on a GPU, inside a CUDA
graph, their launch gaps cost more than the whole MoE. Here one program per matrix keeps it in
registers for all iterations. Same operations in the same order per element (row softmax, ``+ eps``,
then alternating column / row normalisation); sums over ``hc`` values may round differently from torch's
(fp32, ~1e-7). Reference: ``mhc.sinkhorn``; test: tests/models/test_deepseek_v4_mhc_triton.py.

Around it, ``hyper_connection`` is ``HyperConnection.forward`` in four launches (the fused RMS norm, the
``fn`` product, ``_coeff_kernel``: ``pre`` / ``post`` / Sinkhorn of ``comb`` from the mixes, and
``_stream_sum_kernel``: the sub-layer input ``sum_j pre_j h_j``) instead of ~15, and ``merge`` is
``HyperConnection.merge`` in one (was 5), with the reference's roundings to the activation dtype.
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
        tl.store(out_ptr + offs, _sinkhorn_rows(x, mask, iters, eps), mask=mask)


if triton is not None:
    @triton.jit
    def _sinkhorn_rows(x, mask, iters, eps):
        mx = tl.max(x, axis=1)
        e = tl.where(mask, tl.exp(x - mx[:, None]), 0.0)
        m = tl.where(mask, e / tl.sum(e, axis=1)[:, None] + eps, 0.0)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
        for _ in range(iters - 1):
            m = m / (tl.sum(m, axis=1)[:, None] + eps)
            m = m / (tl.sum(m, axis=0)[None, :] + eps)
        return m

    @triton.jit
    def _coeff_kernel(mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, iters, hc_eps,
                      HC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        W = (2 + HC) * HC
        j = tl.arange(0, BLOCK)
        jm = j < HC
        s_pre = tl.load(scale_ptr).to(tl.float32)
        s_post = tl.load(scale_ptr + 1).to(tl.float32)
        s_comb = tl.load(scale_ptr + 2).to(tl.float32)
        pw = tl.load(mix_ptr + row * W + j, mask=jm, other=0.0)
        pb = tl.load(base_ptr + j, mask=jm, other=0.0).to(tl.float32)
        tl.store(pre_ptr + row * HC + j, tl.sigmoid(pw * s_pre + pb) + hc_eps, mask=jm)
        qw = tl.load(mix_ptr + row * W + HC + j, mask=jm, other=0.0)
        qb = tl.load(base_ptr + HC + j, mask=jm, other=0.0).to(tl.float32)
        tl.store(post_ptr + row * HC + j, 2 * tl.sigmoid(qw * s_post + qb), mask=jm)
        i2 = tl.arange(0, BLOCK)[:, None]
        j2 = tl.arange(0, BLOCK)[None, :]
        m2 = (i2 < HC) & (j2 < HC)
        cw = tl.load(mix_ptr + row * W + 2 * HC + i2 * HC + j2, mask=m2, other=0.0)
        cb = tl.load(base_ptr + 2 * HC + i2 * HC + j2, mask=m2, other=0.0).to(tl.float32)
        x = tl.where(m2, cw * s_comb + cb, float("-inf"))
        tl.store(comb_ptr + row * HC * HC + i2 * HC + j2, _sinkhorn_rows(x, m2, iters, hc_eps), mask=m2)

    @triton.jit
    def _stream_sum_kernel(pre_ptr, h_ptr, out_ptr, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(HC):
            p = tl.load(pre_ptr + row * HC + j)
            acc += p * tl.load(h_ptr + (row * HC + j) * D + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + d, acc.to(out_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _merge_kernel(out_ptr, post_ptr, comb_ptr, h_ptr, new_ptr, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        dt = new_ptr.dtype.element_ty
        o = tl.load(out_ptr + row * D + d, mask=dm, other=0.0).to(tl.float32)
        for k in range(HC):
            p = tl.load(post_ptr + row * HC + k).to(dt).to(tl.float32)
            a = (p * o).to(dt).to(tl.float32)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in range(HC):
                c = tl.load(comb_ptr + row * HC * HC + j * HC + k).to(dt).to(tl.float32)
                acc += c * tl.load(h_ptr + (row * HC + j) * D + d, mask=dm, other=0.0).to(tl.float32)
            y = (a + acc.to(dt).to(tl.float32)).to(dt)
            tl.store(new_ptr + (row * HC + k) * D + d, y, mask=dm)


def hyper_connection(mod, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HyperConnection.forward(h)`` of ``mod`` in four launches."""
    from tierserve.models.deepseek_v4.fused_ops import rms_norm

    S, hc, D = h.shape
    h = h.contiguous()
    mixes = torch.nn.functional.linear(rms_norm(h.view(S, hc * D).float(), None, mod.norm_eps), mod.fn.float())
    pre = torch.empty(S, hc, dtype=torch.float32, device=h.device)
    post = torch.empty_like(pre)
    comb = torch.empty(S, hc, hc, dtype=torch.float32, device=h.device)
    x = torch.empty(S, D, dtype=h.dtype, device=h.device)
    if S:
        _coeff_kernel[(S,)](mixes.contiguous(), mod.base.float().contiguous(), mod.scale.float().contiguous(), pre,
                            post, comb, mod.iters, float(mod.hc_eps), HC=hc,
                            BLOCK=max(2, triton.next_power_of_2(hc)), num_warps=1)
        _stream_sum_kernel[(S, triton.cdiv(D, 256))](pre, h, x, D, HC=hc, BLOCK_D=256, num_warps=2)
    return x, post, comb


def merge(out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``HyperConnection.merge`` in one launch."""
    S, hc, D = h.shape
    h, out = h.contiguous(), out.contiguous()
    new = torch.empty_like(h)
    if S:
        _merge_kernel[(S, triton.cdiv(D, 256))](out, post.contiguous(), comb.contiguous(), h, new, D, HC=hc,
                                                BLOCK_D=256, num_warps=2)
    return new


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
