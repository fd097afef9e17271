"""Lightning indexer of CSA layers: picks, per query, the top-k compressed entries to attend to.

It keeps its own compressed keys (an overlapping ratio-4 compressor at ``index_head_dim``, rotated
with the compressed rope) and scores query ``t`` against key ``s`` as

    I(t, s) = sum_h  w(t, h) * ReLU(q(t, h) . k(s)) / sqrt(index_head_dim),
    w(t, h) = weights_proj(x_t)[h] / sqrt(index_n_heads),   q(t, h) = rope(wq_b(q_lora(x_t)))[h].

Keys whose window is not complete at ``t`` are excluded; a query that sees fewer than ``topk``
entries gets ``-1`` in the remaining slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.models.deepseek_v4.compressor import Compressor, visible_entries
from tierserve.models.deepseek_v4.config import DeepseekV4Config
from tierserve.models.deepseek_v4.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.ratio, self.rope = cfg.compress_ratio_csa, cfg.rope_compress
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, self.ratio, overlap=True,
                                     rope=cfg.rope_compress, eps=cfg.rms_norm_eps)

    def scores(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """fp32 ``[S, T]`` index scores of the queries ``x`` (at ``positions``) against ``keys``."""
        q = self.wq_b(q_lora).view(x.shape[0], self.n_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(positions, q.dtype)
        q = apply_rope(q, cos, sin)
        s = F.relu(torch.matmul(q.float(), keys.float().t())) * self.head_dim ** -0.5    # [S, H, T]
        w = self.weights_proj(x).float() * self.n_heads ** -0.5                         # [S, H]
        return (s * w.unsqueeze(-1)).sum(dim=1)

    def select(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[S, min(topk, T)]`` entry indices per query, ``-1`` where the query sees fewer entries."""
        T = scores.shape[-1]
        visible = visible_entries(positions, self.ratio)[:, None]
        future = torch.arange(T, device=scores.device)[None, :] >= visible
        top = scores.masked_fill(future, float("-inf")).topk(min(self.topk, T), dim=-1).indices
        return torch.where(top >= visible, torch.full_like(top, -1), top)


def selection_bias(indices: torch.Tensor, num_entries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[S, num_entries]`` bias: 0 at the selected entries, -inf elsewhere."""
    S = indices.shape[0]
    bias = torch.full((S, num_entries + 1), float("-inf"), dtype=dtype, device=indices.device)
    safe = torch.where(indices >= 0, indices, torch.full_like(indices, num_entries))
    bias.scatter_(-1, safe, 0.0)
    return bias[:, :num_entries]
