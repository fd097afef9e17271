"""Engram: conditional memory by hashed n-gram lookup (arXiv 2601.07372), one module per carrying layer.

For each token t the rows of its n-grams (``engram_hash``) are gathered from the layer's tables
(``engram_table``) and concatenated to e_t [E]. Then, with the residual stream h_t (hc_mult streams):

    k_t = W_K e_t (one key per stream),   v_t = W_V e_t (one value shared by the streams)
    a_t = sigmoid(signed_sqrt(RMSNorm(k_t) . RMSNorm(h_t) / sqrt(d))),   signed_sqrt(x) = sign(x) sqrt(|x|)
    u_t = a_t * v_t
    out_t = u_t + SiLU(conv(RMSNorm(u))_t)        (when conv_kernel_size > 0; else out_t = u_t)

where conv is a depthwise causal convolution of kernel K and dilation (default max order) over positions of
the same sequence, zero-initialised (identity at the start of training). The caller adds out_t to the
residual before the layer's attention: ``x = x + engram(...)``.

The conv reads the (K-1)*dilation previous conv inputs of the same sequence. They depend on hidden states, not
only on tokens, so they cannot be recomputed from look-back tokens: they are per-request state
(``conv_state`` [B, W, hc*C], zeros at a sequence start) that the caller passes in and gets back
(``new_state``) after each chunk. Without the conv, Engram is stateless apart from the token look-back.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_hash import NgramHasher, table_sizes
from tierserve.memory.engram_table import EngramTable, PrefetchHandle


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 normalise then cast then scale (as ``models.layers.norm``)."""
    h = _acc(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class StreamNorm(nn.Module):
    """One RMSNorm per hyper-connection stream: weight [hc, C], input [..., hc, C]."""

    def __init__(self, hc: int, dim: int, eps: float, **f) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hc, dim, **f))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight, self.eps)


def _seq_index(query_start_loc: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.arange(T, device=query_start_loc.device)
    seq = torch.searchsorted(query_start_loc[1:], idx, right=True).clamp_max(query_start_loc.numel() - 2)
    return idx, seq, idx - query_start_loc[seq]


class CausalConv(nn.Module):
    """Depthwise causal conv over packed sequences with carried per-sequence history (see module doc)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, **f) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size, **f))
        self.kernel_size, self.dilation = kernel_size, dilation
        self.history = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor, query_start_loc: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, Ch]; state [B, W, Ch] (inputs of the W positions before each chunk, zeros before a sequence
        start) -> (y [T, Ch], the state after the chunk [B, W, Ch])."""
        T, Ch = x.shape
        B, W = query_start_loc.numel() - 1, self.history
        if state is None:
            state = x.new_zeros(B, W, Ch)
        if tuple(state.shape) != (B, W, Ch):
            raise ValueError(f"engram conv_state must be [{B}, {W}, {Ch}], got {tuple(state.shape)}")
        buf = torch.cat([x, state.to(x.dtype).reshape(B * W, Ch)])
        idx, seq, local = _seq_index(query_start_loc, T)
        hist_base = T + seq * W + W + local
        y = torch.zeros(T, Ch, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for j in range(self.kernel_size):
            s = (self.kernel_size - 1 - j) * self.dilation
            src = torch.where(local >= s, idx - s, hist_base - s)
            y = y + _acc(buf[src]) * _acc(self.weight[:, j])
        n = query_start_loc[1:] - query_start_loc[:-1]
        e = n[:, None] + torch.arange(W, device=x.device)[None, :]
        b = torch.arange(B, device=x.device)[:, None]
        new_state = buf[torch.where(e >= W, query_start_loc[:-1, None] + e - W, T + b * W + e)]
        return y.to(x.dtype), new_state


class Engram(nn.Module):
    def __init__(self, cfg: EngramConfig, layer: int, hidden_size: int, eps: float = 1e-6, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 table_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if layer not in cfg.layers:
            raise ValueError(f"layer {layer} does not carry Engram (engram.layers = {list(cfg.layers)})")
        self.cfg, self.layer, self.hidden_size = cfg, layer, hidden_size
        f = {"device": device, "dtype": dtype}
        hc, C, E = cfg.hc_mult, hidden_size, cfg.engram_dim
        path = Path(cfg.disk_path) / f"layer{layer}" if cfg.disk_path is not None else None
        self.table = EngramTable(sum(table_sizes(cfg)[layer]), cfg.dim_per_head, placement=cfg.placement,
                                 device=device, dtype=table_dtype or dtype, fp8=cfg.fp8_rows,
                                 host_gather=cfg.host_gather, path=path, out_dtype=dtype)
        self.key_proj = nn.Linear(E, hc * C, bias=False, **f)
        self.value_proj = nn.Linear(E, C, bias=False, **f)
        self.key_norm = StreamNorm(hc, C, eps, **f)
        self.query_norm = StreamNorm(hc, C, eps, **f)
        self.conv_norm = StreamNorm(hc, C, eps, **f) if cfg.conv_kernel_size else None
        self.conv = CausalConv(hc * C, cfg.conv_kernel_size, cfg.dilation, **f) if cfg.conv_kernel_size else None

    @property
    def conv_state_shape(self) -> tuple[int, int] | None:
        """Per-request conv history [W, hc*C] (None without conv)."""
        return None if self.conv is None else (self.conv.history, self.cfg.hc_mult * self.hidden_size)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, query_start_loc: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [T, C] (or [T, hc, C]); emb [T, E] gathered rows; query_start_loc [B+1] packs the sequences
        (default: one sequence); conv_state [B, W, hc*C] or None (= sequence starts).
        Returns (output shaped like hidden, to add to the residual; the conv state after the chunk or None)."""
        hc, C = self.cfg.hc_mult, self.hidden_size
        T = hidden.shape[0]
        h = hidden.reshape(T, hc, C)
        emb = emb.to(self.value_proj.weight.dtype)
        key = self.key_proj(emb).view(T, hc, C)
        score = (_acc(self.key_norm(key)) * _acc(self.query_norm(h))).sum(-1) / math.sqrt(C)
        gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())           # [T, hc]
        value = gate.to(emb.dtype)[..., None] * self.value_proj(emb)[:, None, :]           # [T, hc, C]
        new_state = None
        if self.conv is not None:
            if query_start_loc is None:
                query_start_loc = torch.tensor([0, T], dtype=torch.int64, device=hidden.device)
            x = self.conv_norm(value).reshape(T, hc * C)
            y, new_state = self.conv(x, query_start_loc.to(torch.int64), conv_state)
            value = value + F.silu(y).view(T, hc, C)
        return value.reshape(hidden.shape).to(hidden.dtype), new_state

    # ---- weights ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, table_std: float = 1.0) -> None:
        self.table.reset_parameters(table_std, generator)
        for lin in (self.key_proj, self.value_proj):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)
        for norm in (self.key_norm, self.query_norm, self.conv_norm):
            if norm is not None:
                norm.weight.fill_(1.0)
        if self.conv is not None:
            self.conv.weight.zero_()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Relative name (under ``model.layers.N.engram.``) -> tensor, as saved."""
        out = {f"table.{n}": t for n, t in self.table.checkpoint_tensors().items()}
        out.update({n: p.detach() for n, p in self.named_parameters() if not n.startswith("table.")})
        return out

    def weight_names(self) -> list[str]:
        names = [f"table.{n}" for n in self.table.storage_shapes()]
        return sorted(names + [n for n, _ in self.named_parameters() if not n.startswith("table.")])

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name.startswith("table."):
            self.table.load_(name.removeprefix("table."), tensor)
            return
        params = dict(self.named_parameters())
        if name not in params:
            raise ValueError(f"Engram of layer {self.layer} has no weight {name!r} (has {self.weight_names()})")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for engram {name!r} of layer {self.layer}: checkpoint "
                             f"{tuple(tensor.shape)}, config expects {tuple(params[name].shape)}")
        params[name].copy_(tensor)


def engram_modules(model: nn.Module) -> dict[int, Engram]:
    """layer -> Engram module of a model, in layer order."""
    return dict(sorted((m.layer, m) for m in model.modules() if isinstance(m, Engram)))


@dataclass
class EngramStep:
    """Per-step Engram hand-off from the runner to the model (built by ``prepare_engram_step``)."""
    handles: dict[int, PrefetchHandle]                      # layer -> rows in flight
    query_start_loc: torch.Tensor | None = None             # [B+1] on the compute device
    conv_state: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> [B, W, hc*C] in
    new_conv_state: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, W, hc*C] out

    def apply(self, module: Engram, hidden: torch.Tensor) -> torch.Tensor:
        """Wait for the layer's rows and run its Engram; returns the term to add to the residual."""
        emb = module.table.wait(self.handles.pop(module.layer))
        out, state = module(hidden, emb, self.query_start_loc, self.conv_state.get(module.layer))
        if state is not None:
            self.new_conv_state[module.layer] = state
        return out


def prepare_engram_step(modules: Mapping[int, Engram], hasher: NgramHasher, token_ids: torch.Tensor,
                        query_start_loc: torch.Tensor, history: torch.Tensor,
                        conv_state: Mapping[int, torch.Tensor] | None = None) -> EngramStep:
    """Hash the step's packed tokens and start every layer's gather (earliest layer first).

    ``token_ids`` [T], ``query_start_loc`` [B+1], ``history`` [B, lookback] (raw ids, -1 before the sequence
    start, see ``engram_history``): pass them on the CPU for host placement (rows are hashed where each table
    gathers). ``conv_state``: layer -> [B, W, hc*C] on the compute device (zeros for a sequence start)."""
    rows: dict[torch.device, dict[int, torch.Tensor]] = {}
    handles: dict[int, PrefetchHandle] = {}
    qsl_dev = None
    for layer in sorted(modules):
        table = modules[layer].table
        dev = table.row_device
        if dev not in rows:
            rows[dev] = hasher.row_ids_packed(token_ids.to(dev), query_start_loc.to(dev), history.to(dev),
                                              layers=sorted(modules))
        handles[layer] = table.prefetch(rows[dev][layer])
        qsl_dev = query_start_loc.to(table.device, non_blocking=True)
    return EngramStep(handles, qsl_dev, dict(conv_state or {}))
