"""Routed experts of a prefill chunk as three grouped GEMMs (``torch._grouped_mm``), no host sync.

The ``N x k`` (token, expert) pairs are sorted by expert (stable: tokens in order within an expert), the
tokens' rows gathered in that order, and each projection runs once over all experts' row groups
(``offs``: the groups' cumulative ends). The outputs go back to (token, slot) order and are summed over the
k slots with the routing weights, as the decode path (``moe_triton.routed_gather``) does. ``MoE.routed``
(one launch group per expert with a host sync for the expert list) is the reference.

``torch._grouped_mm`` takes bf16 on CUDA (sm90+) and bf16 / fp32 on the CPU, with 16-byte aligned strides;
``MoE.forward`` falls back to ``MoE.routed`` where it refuses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_grouped(x: torch.Tensor, wts: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor, limit: float) -> torch.Tensor:
    """x [N, D]; wts / idx [N, k] (routing weights, expert ids); w1 / w3 [E, I, D], w2 [E, D, I] -> [N, D]."""
    N, k = idx.shape
    E = w1.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                       # pairs grouped by expert
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    xs = x[order // k]                                             # [N k, D]
    gate = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs).clamp(max=limit)
    up = torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs).clamp(min=-limit, max=limit)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)        # [N k, D], expert order
    y = torch.empty_like(y).index_copy_(0, order, y).view(N, k, -1)               # back to (token, slot)
    return (y * wts[..., None].to(y.dtype)).sum(dim=1).to(x.dtype)
