"""FP8 Engram rows: e4m3 codes with one power-of-two (UE8M0) scale per 32 consecutive values of a row.

``quantize_rows(x)`` -> (codes uint8 [R, D], scales uint8 [R, D/32]); value = e4m3(code) * 2^(scale - 127).
The scale of a block is the smallest power of two s with amax / s <= 448 (the largest e4m3 value), so no code
saturates; the error of a value is at most 2^-4 of its magnitude (3 mantissa bits, round to nearest) or
2^-10 * s for values in the e4m3 subnormal range. Rows are gathered as raw bytes (codes and scales) and
dequantised on the compute device, so an FP8 row crosses PCIe in ~half the bytes of a bf16 row.
"""
from __future__ import annotations

import torch

from tierserve.memory.engram_config import FP8_BLOCK

E4M3_MAX = 448.0
_BIAS = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    R, D = x.shape
    if D % FP8_BLOCK:
        raise ValueError(f"FP8 rows need a width that is a multiple of {FP8_BLOCK}, got {D}")
    blocks = x.float().reshape(R, D // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(-1)
    mant, exp = torch.frexp(amax / E4M3_MAX)                 # amax/448 = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)               # ceil(log2(amax / 448))
    e = torch.where(amax > 0, e, torch.full_like(e, -_BIAS)).clamp(-_BIAS, _BIAS)
    scaled = torch.ldexp(blocks, (-e).float()[..., None]).clamp(-E4M3_MAX, E4M3_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(R, D)
    return codes, (e + _BIAS).to(torch.uint8)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes uint8 [..., D], scales uint8 [..., D/32] -> values [..., D] in ``dtype`` (computed in fp32)."""
    D = codes.shape[-1]
    vals = codes.view(torch.float8_e4m3fn).float().reshape(*codes.shape[:-1], D // FP8_BLOCK, FP8_BLOCK)
    exp = scales.to(torch.int32) - _BIAS
    return torch.ldexp(vals, exp.float()[..., None]).reshape(codes.shape).to(dtype)
