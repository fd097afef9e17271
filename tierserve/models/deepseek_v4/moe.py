"""DeepSeek-V4 MoE: hash-routed (first layers) or top-k routed experts, plus a shared expert.

* Scores: ``score_fn(x @ gate.weight.T)`` with ``sqrtsoftplus`` = sqrt(softplus(.)) (or sigmoid /
  softmax).
* Which experts: top-k of ``scores + gate.bias`` (the bias only steers selection), or, in
  ``hash_moe`` layers, the fixed table ``gate.tid2eid[token_id]``.
* Weights: the selected *scores*, normalised to sum 1, times ``routed_scaling_factor``.
* Every expert (and the shared expert) is a SwiGLU ``w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))``
  with ``L = swiglu_limit``.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.models.deepseek_v4.config import HASH_MOE, DeepseekV4Config

log = logging.getLogger("tierserve")
GROUPED_MM = hasattr(torch, "_grouped_mm") and os.environ.get("TIERSERVE_V4_GROUPED_MOE", "1") != "0"
_GROUPED_OFF: set = set()          # (device type, dtype) where torch._grouped_mm refused


class Expert(nn.Module):
    def __init__(self, hidden_size: int, inter: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(hidden_size, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router. ``bias`` (top-k layers) or ``tid2eid`` (hash layers) as in the checkpoint."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool) -> None:
        super().__init__()
        self.hashed, self.topk, self.score_func = hashed, cfg.num_experts_per_tok, cfg.scoring_func
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.score_func == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[N, D]`` -> (weights ``[N, k]``, expert ids ``[N, k]``)."""
        scores = self.scores(F.linear(x, self.weight))
        if self.hashed:
            idx = self.tid2eid[token_ids].long()
        else:
            idx = torch.topk(scores + self.bias.to(scores.dtype), self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling, idx


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.gate = Gate(cfg, hashed=cfg.mlp_layer_types[layer] == HASH_MOE)
        inter, limit = cfg.moe_intermediate_size, cfg.swiglu_limit
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, inter, limit) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (Expert(cfg.hidden_size, inter * cfg.n_shared_experts, limit)
                               if cfg.n_shared_experts else None)

        self.host_experts = False      # routed experts in CPU RAM, computed there (``experts_to_host``)
        self._stacked: tuple[torch.Tensor, ...] | None = None     # (w1, w3, w2) of ``stacked``

    def experts_to_host(self, pin: bool) -> None:
        """Replace the routed experts' weights by copies in CPU RAM (page-locked when ``pin``), so the
        compute-device copies are freed (weights already there, locked if ``pin``, stay); ``forward`` then runs
        the routed experts on the CPU."""
        for expert in self.experts:
            for lin in (expert.w1, expert.w2, expert.w3):
                w = lin.weight.detach()
                if w.device.type == "cpu" and (w.is_pinned() or not pin):
                    continue                                        # already where it belongs
                host = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin).copy_(w)
                lin.weight = nn.Parameter(host, requires_grad=False)
        self.host_experts = True

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' weights stacked, ``w1 / w3 [E, I, D]`` and ``w2 [E, D, I]``; the experts'
        own weights become views into them (built once, an expert at a time, so the extra memory is
        transient; rebuilt if the weights were replaced since, e.g. by ``place``)."""
        st, ex = self._stacked, self.experts
        if st is not None and all(st[j][i].data_ptr() == getattr(ex[i], w).weight.data_ptr()
                                  for i in (0, len(ex) - 1) for j, w in enumerate(("w1", "w3", "w2"))):
            return st
        out = []
        for w in ("w1", "w3", "w2"):
            first = getattr(ex[0], w).weight
            buf = torch.empty((len(ex), *first.shape), dtype=first.dtype, device=first.device)
            for i, e in enumerate(ex):
                lin = getattr(e, w)
                buf[i].copy_(lin.weight.detach())
                lin.weight.data = buf[i]
            out.append(buf)
        self._stacked = tuple(out)
        return self._stacked

    def forward_decode(self, x: torch.Tensor, token_ids: torch.Tensor, use_triton: bool | None = None
                       ) -> torch.Tensor:
        """``forward`` without host syncs or data-dependent shapes (CUDA-graph safe), for a few rows:
        the Triton kernels of ``moe_triton.py`` (``use_triton``; default: on the GPU), else a gather of
        the selected experts. Not for ``host_experts``."""
        from tierserve.models.deepseek_v4.moe_triton import routed_gather, routed_triton, triton

        weights, idx = self.gate(x, token_ids)
        w1, w3, w2 = self.stacked()
        if use_triton is None:
            use_triton = x.is_cuda and triton is not None
        fn = routed_triton if use_triton else routed_gather
        out = fn(x.contiguous(), weights, idx, w1, w3, w2, self.experts[0].limit)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """``routed`` as grouped GEMMs (moe_grouped.py) where ``torch._grouped_mm`` takes these tensors
        (None: it does not; then ``routed``). A refusal is remembered per (device type, dtype)."""
        from tierserve.models.deepseek_v4.moe_grouped import routed_grouped

        key = (x.device.type, x.dtype)
        if not GROUPED_MM or key in _GROUPED_OFF or x.shape[0] == 0:
            return None
        w1, w3, w2 = self.stacked()
        if not (w1.dtype == x.dtype and w1.device == x.device and w1.is_floating_point()):
            return None
        try:
            return routed_grouped(x, weights, idx, w1, w3, w2, self.experts[0].limit)
        except (RuntimeError, NotImplementedError) as e:
            log.info("grouped expert GEMMs are off for %s %s (%s); one expert at a time", *key, e)
            _GROUPED_OFF.add(key)
            return None

    def routed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum of the selected experts' outputs, weighted; all on the device of the expert weights."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x, token_ids)
        if self.host_experts:      # tokens to the host, experts there, the sum back (no-ops on the CPU)
            out = self.routed(x.to("cpu"), weights.to("cpu"), idx.to("cpu")).to(x.device)
        else:
            out = self._routed_grouped(x, weights, idx)
            if out is None:
                out = self.routed(x, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
