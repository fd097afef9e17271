"""Manifold-constrained hyper-connections (mHC): ``hc_mult`` residual streams instead of one.

The residual of every token is ``h: [hc, D]``. Around each sub-layer (attention, MoE) a
``HyperConnection`` reads all streams (flattened, RMS-normalised, fp32) and produces

* ``pre``  [hc]     = sigmoid(.) + eps        -> the sub-layer input is ``sum_j pre_j h_j``;
* ``post`` [hc]     = 2 sigmoid(.)            -> where the sub-layer output goes;
* ``comb`` [hc, hc] = Sinkhorn(softmax(.))    -> a doubly-stochastic mix of the old streams;

and the new residual is ``h'_k = post_k * out + sum_j comb[j, k] h_j``. The model's final
``HyperHead`` collapses the streams with its own ``pre`` weights before the last norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.models.deepseek_v4.norm import rms_unweighted


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax, then alternate column / row normalisation (``iters`` column passes in total)."""
    m = logits.softmax(dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + hc_mult) * hc_mult, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + hc_mult) * hc_mult))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, h: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h``: ``[S, hc, D]`` -> (sub-layer input ``[S, D]``, post ``[S, hc]``, comb ``[S, hc, hc]``).
        ``fused``: four Triton-side launches (``mhc_triton.hyper_connection``; the graph decode step)."""
        if fused:
            from tierserve.models.deepseek_v4.mhc_triton import hyper_connection
            return hyper_connection(self, h)
        hc = self.hc
        flat = rms_unweighted(h.flatten(start_dim=1).float(), self.norm_eps)
        pre_w, post_w, comb_w = F.linear(flat, self.fn.float()).split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([hc, hc, hc * hc])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = sinkhorn(comb_w.view(-1, hc, hc) * s_comb + comb_b.view(hc, hc), self.iters, self.hc_eps)
        x = (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
        return x, post, comb

    @staticmethod
    def merge(out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, h: torch.Tensor,
              fused: bool = False) -> torch.Tensor:
        """New streams ``post_k * out + sum_j comb[j, k] h_j`` (``[S, hc, D]``); ``fused``: one Triton
        launch (``mhc_triton.merge``)."""
        if fused:
            from tierserve.models.deepseek_v4.mhc_triton import merge
            return merge(out, post, comb, h)
        dtype = h.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), h)


class HyperHead(nn.Module):
    """Final collapse of the ``hc`` streams into one hidden state."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros(hc_mult, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.zeros(hc_mult))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = rms_unweighted(h.flatten(start_dim=1).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.fn.float()) * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
