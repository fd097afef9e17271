"""MODEL1: DeepSeek-V4's FP8 storage of compressed K=V entries (and FP8 indexer keys).

One compressed entry of ``D`` = head_dim channels, the last ``r`` of them rope channels (``D = 512``,
``r = 64`` in V4), is stored as one row of ``D - r + 2r + pad8(ceil((D - r) / 64))`` bytes (584 for V4,
``kv_bytes.entry_bytes(D, r, "model1")``), array-of-structs, one row per entry:

=================  ==========================================================================
bytes              content
=================  ==========================================================================
``[0, D-r)``        the non-rope channels as FP8 e4m3 (``float8_e4m3fn``) codes, round to nearest
``[D-r, D+r)``      the rope channels as BF16 (little-endian, as stored in memory)
``[D+r, D+r+k)``    ``k = ceil((D - r) / 64)`` UE8M0 scales, one per 64 FP8 codes: byte ``b`` means
                    ``2 ** (b - 127)``; 7 for V4
then                zero padding to a multiple of 8 scale bytes (1 byte for V4)
=================  ==========================================================================

The scale of a 64-value block is the smallest power of two >= amax / 448 (``tierserve.quant.fp8_kv
.pow2_scale``; 1 for an all-zero block), clamped to UE8M0's range ``2**-127 .. 2**127``; dividing by a
power of two is exact, so the codes are exactly round-to-nearest e4m3 of ``x / scale`` and
``dequant = code * scale``. A last block of fewer than 64 values (tiny test configs) gets its own scale.

Indexer keys (``Di`` channels, no bf16 part) are stored as ``Di`` e4m3 codes followed by one fp32 scale
per 128 values (also a power of two): ``Di + 4 * ceil(Di / 128)`` bytes (132 for ``Di = 128``), the
``kv_bytes.index_key_bytes(Di, "model1")`` figure.

All functions work on any leading shape ``[..., C]`` and keep the leading shape; stored rows are
``uint8``. Zero rows (padding of a batch) dequantise to zeros.
"""
from __future__ import annotations

import torch

from tierserve.models.deepseek_v4.kv_bytes import entry_bytes, index_key_bytes
from tierserve.quant.fp8_kv import E4M3_MAX, pow2_scale

ENTRY_BLOCK = 64      # FP8 values per UE8M0 scale in a K=V entry
KEY_BLOCK = 128       # FP8 values per fp32 scale in an indexer key


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., C]`` (fp32) -> (codes ``[..., C]`` float8_e4m3fn, exponents ``[..., nb]`` int32) with one
    power-of-two scale ``2 ** exponent`` per ``block`` values."""
    *lead, C = x.shape
    nb = -(-C // block)
    padded = torch.nn.functional.pad(x, (0, nb * block - C)).view(*lead, nb, block)
    scale = pow2_scale(padded.abs().amax(dim=-1))                          # [..., nb] powers of two
    exp = torch.frexp(scale)[1].to(torch.int32) - 1                       # scale = 2 ** exp exactly
    exp = exp.clamp(-127, 127)
    scale = torch.ldexp(torch.ones_like(scale), exp)
    codes = (padded / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.view(*lead, nb * block)[..., :C], exp


def _expand(scale: torch.Tensor, block: int, C: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-1)[..., :C]


def quantise_entries(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """``x [..., D]`` compressed K=V entries (rope channels last) -> ``uint8 [..., entry_bytes]`` rows."""
    *lead, D = x.shape
    nope = D - rope_dim
    E = entry_bytes(D, rope_dim, "model1")
    codes, exp = _blocks(x[..., :nope].float(), ENTRY_BLOCK)
    out = torch.zeros(*lead, E, dtype=torch.uint8, device=x.device)
    out[..., :nope] = codes.view(torch.uint8)
    rope = x[..., nope:].to(torch.bfloat16).contiguous()
    out[..., nope:nope + 2 * rope_dim] = rope.view(torch.uint8).reshape(*lead, 2 * rope_dim)
    k = exp.shape[-1]
    out[..., D + rope_dim:D + rope_dim + k] = (exp + 127).to(torch.uint8)
    return out


def dequantise_entries(rows: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``uint8 [..., entry_bytes]`` -> ``[..., D]`` in ``dtype``: ``code * 2**(ue8m0 - 127)`` and the bf16 rope."""
    *lead, E = rows.shape
    nope = head_dim - rope_dim
    if E != entry_bytes(head_dim, rope_dim, "model1") or rows.dtype != torch.uint8:
        raise ValueError(f"MODEL1 rows of D={head_dim}, rope={rope_dim} must be uint8 [..., "
                         f"{entry_bytes(head_dim, rope_dim, 'model1')}], got {rows.dtype} [..., {E}]")
    k = -(-nope // ENTRY_BLOCK)
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    scale = torch.exp2(rows[..., head_dim + rope_dim:head_dim + rope_dim + k].float() - 127.0)
    rope = rows[..., nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16)
    return torch.cat([(codes * _expand(scale, ENTRY_BLOCK, nope)).to(dtype), rope.to(dtype)], dim=-1)


def quantise_index_keys(x: torch.Tensor) -> torch.Tensor:
    """``x [..., Di]`` -> ``uint8 [..., Di + 4 * ceil(Di / 128)]``: e4m3 codes, then fp32 scales."""
    *lead, Di = x.shape
    codes, exp = _blocks(x.float(), KEY_BLOCK)
    scale = torch.ldexp(torch.ones(exp.shape, device=x.device), exp).contiguous()
    out = torch.empty(*lead, index_key_bytes(Di, "model1"), dtype=torch.uint8, device=x.device)
    out[..., :Di] = codes.view(torch.uint8)
    out[..., Di:] = scale.view(torch.uint8).reshape(*lead, 4 * exp.shape[-1])
    return out


def dequantise_index_keys(rows: torch.Tensor, index_head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    Di = index_head_dim
    *lead, E = rows.shape
    if E != index_key_bytes(Di, "model1") or rows.dtype != torch.uint8:
        raise ValueError(f"FP8 index keys of Di={Di} must be uint8 [..., {index_key_bytes(Di, 'model1')}], "
                         f"got {rows.dtype} [..., {E}]")
    codes = rows[..., :Di].contiguous().view(torch.float8_e4m3fn).float()
    scale = rows[..., Di:].contiguous().view(torch.float32)
    return (codes * _expand(scale, KEY_BLOCK, Di)).to(dtype)
