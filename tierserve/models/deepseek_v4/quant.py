"""Checkpoint weight formats of DeepSeek-V4 and their exact dequantisation.

* FP8: ``float8_e4m3fn`` weight, one scale per 128 x 128 block (partial edge blocks allowed) under
  ``<name>.weight_scale_inv`` (transformers' name) or ``<name>.scale`` (the release's name). The
  scale multiplies: ``w = q * scale``. Scales may be fp32 / bf16, ``float8_e8m0fnu`` (UE8M0) or raw
  UE8M0 exponent bytes (``uint8``, value ``2 ** (byte - 127)``).
* FP4 (routed experts of V4-Flash): e2m1 values packed two per byte (``int8``/``uint8`` or
  ``float4_e2m1fn_x2``; the element with the even column index in the low nibble), one UE8M0 scale
  per 1 x 32 values.

The quantisers are here for tests and tooling (they write exactly these layouts).
"""
from __future__ import annotations

import torch

from tierserve.quant.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise

FP4_GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # magnitude codes 0..7; bit 3 is the sign


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def is_fp4(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.int8, torch.uint8) or weight.dtype == getattr(torch, "float4_e2m1fn_x2", None)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 ``[R, C]`` from an FP8 weight and its ``[ceil(R/bm), ceil(C/bn)]`` block scales (any scale dtype)."""
    return dequantize_fp8_blockwise(weight, scale_to_float(scale), block)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``float8_e4m3fn`` weight, fp32 block scales; powers of two when ``ue8m0``)."""
    return quantize_fp8_blockwise(w, block, pow2_scale=ue8m0)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., 2C]`` e2m1 values from ``[..., C]`` packed bytes."""
    u8 = packed.contiguous().view(torch.uint8)
    mags = torch.tensor(E2M1, dtype=torch.float32, device=packed.device)
    lut = torch.cat([mags, -mags])
    lo, hi = lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """fp32 ``[R, 2C]`` from packed e2m1 ``[R, C]`` and ``[R, 2C / group]`` UE8M0 scales."""
    vals = unpack_fp4(packed)
    R, C2 = vals.shape
    if tuple(scale.shape) != (R, C2 // group) or C2 % group:
        raise ValueError(f"FP4 weight of {R}x{C2} values needs {group}-wide scales of shape {(R, C2 // group)}, "
                         f"got {tuple(scale.shape)}")
    return vals * scale_to_float(scale).repeat_interleave(group, dim=1)


def quantize_fp4(w: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed ``int8`` ``[R, C/2]``, ``float8_e8m0fnu`` scales ``[R, C/group]``); round to nearest."""
    R, C = w.shape
    if C % group:
        raise ValueError(f"FP4 quantisation needs the input dim ({C}) to be a multiple of {group}")
    g = w.float().view(R, C // group, group)
    amax = g.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 6.0))), torch.ones_like(amax))
    x = (g / scale).view(R, C)
    mags = torch.tensor(E2M1, dtype=torch.float32, device=w.device)
    code = (x.abs()[..., None] - mags).abs().argmin(dim=-1)
    code = code + 8 * ((x < 0) & (code > 0)).long()
    pairs = code.view(R, C // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.view(R, C // group).to(torch.float8_e8m0fnu)
