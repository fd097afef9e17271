"""A lightning indexer for dense models: a small per-layer scorer that picks the pages a query reads.

As in DeepSeek-V3.2's DSA, each layer has ``heads`` small query heads and one key per token, all of
``dim`` dimensions, computed from the layer's normalised input ``h``; the score of key t for a query is
``sum_h w_h * relu(q_h . k_t) / sqrt(dim)`` with per-token head weights ``w = W_w h``. Query and key get the
model's rotary embedding (``dim`` = the model's head dim, so the model's table is reused). A page's score
is the best score of its tokens visible to the query; ``attention.select.select_pages`` then keeps the
sink, recent and own pages and the top pages up to the token budget, shared by all KV heads.

The keys live in a paged tensor beside the KV pages (``[pages, layers, page_size, dim]``, same page ids,
so prefix-cache hits share them). Trained by ``tierserve train-indexer`` (train/indexer.py): distilled
from the frozen model's attention by KL divergence, the dense warm-up of DeepSeek-V3.2.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHTS, CONFIG = "indexer.safetensors", "indexer.json"


@dataclass(frozen=True)
class IndexerConfig:
    num_layers: int
    hidden_size: int
    heads: int = 4
    dim: int = 64          # = the model's head dim (rotary table shared)

    def save(self, out: Path, extra: dict | None = None) -> None:
        (out / CONFIG).write_text(json.dumps({**asdict(self), **(extra or {})}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "IndexerConfig":
        f = Path(path) / CONFIG
        if not f.is_file():
            raise FileNotFoundError(f"no {CONFIG} in {path} (train one with `tierserve train-indexer`)")
        raw = json.loads(f.read_text())
        try:
            return cls(int(raw["num_layers"]), int(raw["hidden_size"]), int(raw["heads"]), int(raw["dim"]))
        except KeyError as e:
            raise ValueError(f"{f} is missing {e.args[0]!r}") from None


class Indexer(nn.Module):
    def __init__(self, hidden: int, heads: int, dim: int, **f) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.wq = nn.Linear(hidden, heads * dim, bias=False, **f)
        self.wk = nn.Linear(hidden, dim, bias=False, **f)
        self.ww = nn.Linear(hidden, heads, bias=False, **f)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [T, hidden]; cos/sin [T, dim] -> q [T, heads, dim], k [T, dim], w [T, heads] (fp32)."""
        T = h.shape[0]
        q = self.wq(h).view(T, self.heads, self.dim).float()
        k = self.wk(h).float()
        c, s = cos.float(), sin.float()
        return _rotate(q, c[:, None], s[:, None]), _rotate(k, c, s), self.ww(h).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def token_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [..., Q, H, d], w [..., Q, H], keys [..., L, d] -> [..., Q, L] = sum_h w_h relu(q_h.k) / sqrt(d)."""
    s = torch.einsum("...qhd,...ld->...qhl", q, keys.float()).clamp_min(0)
    return torch.einsum("...qhl,...qh->...ql", s, w) / q.shape[-1] ** 0.5


def page_scores(scores: torch.Tensor, visible: torch.Tensor, page_size: int) -> torch.Tensor:
    """[..., Q, P*page] token scores and visibility -> [..., Q, P]: each page's best visible token."""
    s = scores.masked_fill(~visible, float("-inf"))
    return s.unflatten(-1, (-1, page_size)).amax(-1)


def indexer_page_scores(meta, layer_idx: int, q_index: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Page scores [B, 1, Q, P] of this step's queries from the layer's indexer outputs (left in
    ``meta.backend_data[("index_q", layer)]`` by the attention layer) and the paged index keys.
    q_index [B, Q]: packed token of each query row; visible [B, Q, P*page]: causal / length mask."""
    q, w = meta.backend_data[("index_q", layer_idx)]
    B, P = meta.page_table.shape
    keys = meta.index_keys[meta.page_table, layer_idx].reshape(B, P * meta.page_size, -1)
    scores = token_scores(q[q_index], w[q_index], keys)                     # [B, Q, L]
    return page_scores(scores, visible, meta.page_size)[:, None]


class IndexerSet(nn.Module):
    """One indexer per layer, saved as ``indexer.safetensors`` + ``indexer.json`` in a directory."""

    def __init__(self, cfg: IndexerConfig, **f) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Indexer(cfg.hidden_size, cfg.heads, cfg.dim, **f) for _ in range(cfg.num_layers))

    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        self.cfg.save(out, extra)
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
             ) -> "IndexerSet":
        from safetensors.torch import load_file

        cfg = IndexerConfig.load(Path(path))
        f = Path(path) / WEIGHTS
        if not f.is_file():
            raise FileNotFoundError(f"no {WEIGHTS} in {path}")
        s = cls(cfg)
        state = load_file(str(f))
        missing = set(s.state_dict()) - set(state)
        unexpected = set(state) - set(s.state_dict())
        if missing or unexpected:
            raise ValueError(f"{f}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        s.load_state_dict(state)
        return s.to(device=device, dtype=dtype).eval()
