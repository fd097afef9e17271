"""Rotary embeddings of DeepSeek-V4: interleaved pairs on the *trailing* ``rope_dim`` channels.

V4 lays every head out as ``[nope | rope]`` and rotates consecutive channel pairs (2i, 2i+1) by
``position * inv_freq[i]`` (no half-split). Two settings exist per model:

* ``main``: plain rope with ``rope_theta`` (10000), used by sliding-window-only layers;
* ``compress``: ``compress_rope_theta`` (160000) with YaRN (factor 16 in the release), used by
  CSA / HCA layers for q, the window KV, the compressed entries and the indexer.

Because K = V, the attention output carries the keys' rotation; ``apply_rope(..., inverse=True)``
rotates it back by the query position (the conjugate rotation).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_dim: int
    rope_type: str = "default"          # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0       # multiplies cos and sin
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise ValueError(f"DeepSeek-V4 rope: rope_dim={self.rope_dim} is invalid; allowed: an even number >= 2")
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"DeepSeek-V4 rope: rope_type={self.rope_type!r} is not supported; allowed: default, yarn")
        if self.theta <= 0:
            raise ValueError(f"DeepSeek-V4 rope: rope_theta={self.theta!r} is invalid; allowed: a number > 0")
        if self.rope_type == "yarn" and (self.factor <= 0 or self.original_max_position_embeddings < 1):
            raise ValueError("DeepSeek-V4 rope: yarn needs factor > 0 and original_max_position_embeddings >= 1 "
                             f"(got {self.factor!r}, {self.original_max_position_embeddings!r})")

    @classmethod
    def from_dict(cls, d: dict, head_dim: int, max_position_embeddings: int,
                  yarn_attention_default: float | None) -> RopeSpec:
        """One ``rope_parameters`` sub-dict. ``yarn_attention_default=None`` derives YaRN's
        ``0.1 * ln(factor) + 1`` (with mscale / mscale_all_dim) when ``attention_factor`` is absent."""
        rope_type = d.get("rope_type", d.get("type", "default")) or "default"
        rope_dim = int(head_dim * float(d.get("partial_rotary_factor", 1.0)))
        theta = float(d.get("rope_theta", 10000.0))
        if rope_type != "yarn":
            return cls(theta=theta, rope_dim=rope_dim, rope_type=rope_type)
        omax = d.get("original_max_position_embeddings")
        if omax is None:
            raise ValueError("DeepSeek-V4 rope: yarn needs original_max_position_embeddings")
        factor = d.get("factor")
        factor = float(factor) if factor is not None else max_position_embeddings / float(omax)
        att = d.get("attention_factor")
        if att is None:
            att = yarn_attention_default
        if att is None:
            m, m_all = d.get("mscale"), d.get("mscale_all_dim")
            att = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
        return cls(theta=theta, rope_dim=rope_dim, rope_type="yarn", factor=factor,
                   original_max_position_embeddings=int(omax), beta_fast=float(d.get("beta_fast") or 32),
                   beta_slow=float(d.get("beta_slow") or 1), attention_factor=float(att),
                   truncate=bool(d.get("truncate", True)))

    def inv_freq(self) -> torch.Tensor:
        """[rope_dim // 2] fp32 inverse frequencies (YaRN blends interpolation and extrapolation)."""
        dim = self.rope_dim
        pos_freqs = self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        extrapolation = 1.0 / pos_freqs
        if self.rope_type == "default":
            return extrapolation
        interpolation = 1.0 / (self.factor * pos_freqs)
        low = _correction_dim(self.beta_fast, dim, self.theta, self.original_max_position_embeddings)
        high = _correction_dim(self.beta_slow, dim, self.theta, self.original_max_position_embeddings)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp                                   # 1 -> extrapolate (high frequencies)
        return interpolation * (1 - keep) + extrapolation * keep

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [len(positions), rope_dim // 2], computed in fp32."""
        freqs = positions.to(torch.float32)[:, None] * _inv_freq_on(self, positions.device)[None, :]
        return ((freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype))


@functools.lru_cache(maxsize=64)
def _inv_freq_on(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """``spec.inv_freq()`` on ``device``, computed once (it is read at every layer of every step)."""
    return spec.inv_freq().to(device)


def _mscale(scale: float, m: float | None = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * float(m or 1.0) * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x`` pairwise (fp32 math).

    ``x``: [S, ..., D]; ``cos`` / ``sin``: [S, rope_dim // 2] (broadcast over the middle axes).
    ``inverse`` rotates by the negative angle.
    """
    half = cos.shape[-1]
    nope, rope = x[..., : -2 * half], x[..., -2 * half:]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.view(shape).float(), sin.view(shape).float()
    if inverse:
        s = -s
    pairs = rope.float().unflatten(-1, (half, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
