"""Rotary position embeddings (half-split layout, as in HF Llama) with rope scaling.

Supported ``rope_type``: default, linear, llama3, yarn. The cos/sin table is built once for all
positions up to ``max_positions`` (fp32) and indexed by the packed positions of a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, cfg: dict) -> "RopeConfig":
        """Read both the v4 layout (rope_theta + rope_scaling) and v5 (rope_parameters)."""
        rp = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        merged = {**scaling, **rp}
        rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
        if rope_type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             "(supported: default, linear, llama3, yarn)")
        return cls(theta=float(theta), rope_type=rope_type, params=merged)


def inv_freq_and_scale(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p, scale = rope.params, 1.0
    if rope.rope_type == "linear":
        inv = inv / float(p["factor"])
    elif rope.rope_type == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(mid, smoothed, scaled)
    elif rope.rope_type == "yarn":
        inv, scale = _yarn(rope, dim, max_pos)
    return inv, scale


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    p = rope.params
    factor = float(p["factor"])
    old = float(p.get("original_max_position_embeddings") or max_pos / factor)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale = p.get("attention_factor")
    if mscale is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            mscale = get_mscale(factor, float(p["mscale"])) / get_mscale(factor, float(p["mscale_all_dim"]))
        else:
            mscale = get_mscale(factor)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp
    inv = inter * (1 - extra_factor) + extra * extra_factor
    return inv, float(mscale)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope = head_dim, max_positions, rope
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device | str) -> None:
        inv, scale = inv_freq_and_scale(self.rope, self.head_dim, self.max_positions)
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step tables [T, 1, D], computed once and shared by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, Hk, D] -> rotated (same dtype); q and k rotate in one pass."""
        cos, sin = cos_sin
        hq = q.shape[1]
        qk = torch.cat((q, k), dim=1)
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :hq], qk[:, hq:]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
