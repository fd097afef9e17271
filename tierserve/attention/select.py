"""Top-k sparse attention: which pages each query reads.

``pages`` selector (training-free): every page keeps the per-channel minimum and maximum of its keys
(per KV head, inside the page itself, see kv/layout.py). For a query q the largest possible score of
any key in the page is  sum_d max(q_d * kmin_d, q_d * kmax_d)  -- an upper bound of q.k. Each query
(per KV-head group: the max over the query heads sharing the KV head) keeps the sink pages, the
pages of its recent window (including its own page) and the top-scoring remaining pages, up to
``topk_tokens`` tokens in all; exact attention then runs over the chosen pages only. While a
sequence is no longer than ``topk_tokens`` attention stays dense.

``indexer`` selector: a trained lightning indexer scores every cached token (attention/indexer.py);
a page scores as its best visible token, one choice shared by all KV heads; same budget and rules.

The functions here are the PyTorch reference. Sparse decode on the GPU runs the "pages" selection as two
fused Triton kernels (attention/triton_select.py: scores from the page pool, then top-k + compaction +
selection counts); ties at the cut go to the lowest page index there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTORS = ("pages", "indexer")


@dataclass(frozen=True)
class SparseConfig:
    selector: str = "pages"
    topk_tokens: int = 2048
    sink_tokens: int = 16
    recent_tokens: int = 64
    page_spread: float = 1.0        # "pages": score q.c + page_spread |q|.r (1: the upper bound)

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"sparse_attention must be one of {', '.join(SELECTORS)}; got {self.selector!r}")
        if not 0.0 <= self.page_spread <= 1.0:
            raise ValueError(f"sparse_page_spread must be in [0, 1], got {self.page_spread}")
        if self.topk_tokens < self.sink_tokens + self.recent_tokens:
            raise ValueError(f"sparse_topk_tokens must be >= {self.sink_tokens + self.recent_tokens} "
                             f"(sink + recent window), got {self.topk_tokens}")


def spread_rows(kmin: torch.Tensor, kmax: torch.Tensor, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (kmin', kmax') with relu(q).kmax' + min(q, 0).kmin' = q.c + spread |q|.r (c / r: the channels' midpoint
    / half range): kmax' = a kmax + b kmin, kmin' = a kmin + b kmax, a = (1 + spread) / 2, b = (1 - spread) / 2; the
    rows themselves at spread 1."""
    lo, hi = kmin.float(), kmax.float()
    if spread == 1.0:
        return lo, hi
    a, b = (1.0 + spread) / 2, (1.0 - spread) / 2
    return a * lo + b * hi, a * hi + b * lo


def page_upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, spread: float = 1.0) -> torch.Tensor:
    """q [B, Hq, Q, D]; kmin/kmax [B, Hkv, P, D] -> upper bound of q.k per page [B, Hkv, Q, P] (the maximum over a KV
    head's query heads); with ``spread`` < 1 the score q.c + spread |q|.r instead (``SparseConfig.page_spread``)."""
    B, hq, nq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().reshape(B, hkv, hq // hkv * nq, d)
    kmin, kmax = spread_rows(kmin, kmax, spread)
    ub = qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)
    return ub.view(B, hkv, hq // hkv, nq, -1).amax(dim=2)


def select_pages(ub: torch.Tensor, q_pos: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                 cfg: SparseConfig) -> torch.Tensor:
    """Boolean [B, Hkv, Q, P]: the pages each query may read.

    ub: page scores [B, Hkv, Q, P]; q_pos: query positions [B, Q]."""
    B, hkv, nq, P = ub.shape
    dev = ub.device
    page_start = torch.arange(P, device=dev) * page_size                       # [P]
    q_page = (q_pos // page_size)[:, :, None]                                   # [B, Q, 1]
    visible = page_start[None, None, :] <= q_pos[:, :, None]                    # causal at page level
    forced = (page_start[None, None, :] < cfg.sink_tokens) | \
             (page_start[None, None, :] + page_size > q_pos[:, :, None] - cfg.recent_tokens) | \
             (torch.arange(P, device=dev)[None, None, :] == q_page)
    forced = forced & visible                                                   # [B, Q, P]
    budget = cfg.topk_tokens // page_size
    k = max(0, min(P, budget))
    score = ub.masked_fill(~visible[:, None], float("-inf"))
    score = score.masked_fill(forced[:, None], float("inf"))                    # forced pages rank first
    top = score.topk(k, dim=-1).indices if k else None
    chosen = torch.zeros_like(ub, dtype=torch.bool)
    if top is not None:
        chosen.scatter_(-1, top, True)
    chosen &= visible[:, None]
    chosen |= forced[:, None]                  # forced pages always stay (even beyond the budget)
    dense = (q_pos + 1 <= cfg.topk_tokens)[:, None, :, None]                   # short context: dense
    return torch.where(dense, visible[:, None], chosen)


def selection_bound(cfg, page_size: int) -> int:
    """Static bound on the pages one (sequence, KV head) keeps: the budget plus the always-kept pages."""
    return cfg.topk_tokens // page_size + -(-cfg.sink_tokens // page_size) + -(-cfg.recent_tokens // page_size) + 2
