"""Block-scaled FP8 (e4m3) weights and per-token activation scales, DeepSeek checkpoint format.

A weight ``W [N, K]`` is stored as ``qweight`` (``torch.float8_e4m3fn``, same shape) and
``scale_inv`` (fp32, ``[ceil(N / bn), ceil(K / bk)]``, default block ``(bn, bk) = (128, 128)``);
``dequant(W)[i, j] = qweight[i, j] * scale_inv[i // bn, j // bk]``. Edge blocks are partial (a
shape need not be a multiple of the block). Quantising: ``scale_inv = amax(|block|) / 448``,
optionally rounded *up* to a power of two (``pow2_scale``: the "ue8m0" scale format that
DeepSeek-V3.1 / V3.2 / V4 checkpoints declare as ``"scale_fmt": "ue8m0"``; V3 and R1 have no
``scale_fmt`` and use plain fp32 ``amax / 448``). Activations: one scale per token per 128
channels (block ``(1, 128)``), the layout ``torch.nn.functional.scaled_mm`` calls BlockWise1x128.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                      # largest finite e4m3fn value
DEFAULT_BLOCK = (128, 128)
_AMAX_FLOOR = 1e-12                  # an all-zero block gets a tiny (finite, nonzero) scale


@dataclass(frozen=True)
class Fp8Format:
    """What a checkpoint's ``quantization_config`` says about its FP8 weights."""
    block_size: tuple[int, int] = DEFAULT_BLOCK
    pow2_scale: bool = False          # scale_fmt == "ue8m0"
    activation_scheme: str = "dynamic"


def fp8_format_from_hf(config: dict) -> Fp8Format | None:
    """``Fp8Format`` for a HF config.json whose quantization_config is block-scaled e4m3, else None."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt must be 'e4m3', got {q.get('fmt')!r}")
    block = q.get("weight_block_size")
    if block is None or len(block) != 2 or min(block) < 1:
        raise ValueError("quantization_config.weight_block_size must be two positive ints (e.g. [128, 128]) "
                         f"for block-scaled FP8; got {block!r}")
    fmt = q.get("scale_fmt")
    if fmt not in (None, "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt must be absent or 'ue8m0', got {fmt!r}")
    return Fp8Format(tuple(int(b) for b in block), fmt == "ue8m0", q.get("activation_scheme", "dynamic"))


def scale_shape(shape: tuple[int, int], block_size: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    return -(-shape[0] // block_size[0]), -(-shape[1] // block_size[1])


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), exactly (frexp, no log rounding)."""
    m, e = torch.frexp(x)                         # x = m * 2**e, m in [0.5, 1)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(x), e)


def quantize_fp8_blockwise(w: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK,
                           pow2_scale: bool = False, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` (any float dtype) -> ``(qweight fp8 [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)])``.
    ``check_finite`` refuses inf / nan entries (one host sync); without it they give nan codes."""
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_blockwise expects a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    bn, bk = block_size
    nb, kb = scale_shape((N, K), block_size)
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, kb * bk - K, 0, nb * bn - N)) if (N % bn or K % bk) else wf
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    if check_finite and w.device.type != "meta" and not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantise a weight with inf/nan entries to FP8")
    scale = amax.clamp_min(_AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        scale = pow2_ceil(scale)
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(nb * bn, kb * bk)
    if N % bn or K % bk:
        q = q[:N, :K].contiguous()
    return q, scale


def expand_scales(scale_inv: torch.Tensor, shape: tuple[int, int],
                  block_size: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """Per-element fp32 scales ``[N, K]`` from per-block ones."""
    N, K = shape
    if tuple(scale_inv.shape) != scale_shape(shape, block_size):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}; a [{N}, {K}] weight with block "
                         f"{block_size} needs {scale_shape(shape, block_size)}")
    s = scale_inv.float()
    return s.repeat_interleave(block_size[0], 0)[:N].repeat_interleave(block_size[1], 1)[:, :K]


def dequantize_fp8_blockwise(q: torch.Tensor, scale_inv: torch.Tensor,
                             block_size: tuple[int, int] = DEFAULT_BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale_inv`` broadcast over blocks, computed in fp32 then cast to ``dtype`` (one rounding)."""
    N, K = q.shape
    bn, bk = block_size
    if N % bn == 0 and K % bk == 0 and tuple(scale_inv.shape) == (N // bn, K // bk):
        w = q.float().view(N // bn, bn, K // bk, bk) * scale_inv.float()[:, None, :, None]
        return w.view(N, K).to(dtype)
    return (q.float() * expand_scales(scale_inv, (N, K), block_size)).to(dtype)


def quantize_act_fp8(x: torch.Tensor, group: int = 128, pow2_scale: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, per ``group`` channels: ``x [..., K]`` -> ``(fp8 [..., K], fp32 scales [..., ceil(K/group)])``.
    ``quantize_fp8_blockwise`` without its inf/nan check (a host sync at every FP8 linear of a prefill): inf / nan
    activations give nan codes rather than an error."""
    lead, K = x.shape[:-1], x.shape[-1]
    q, s = quantize_fp8_blockwise(x.reshape(-1, K), (1, group), pow2_scale, check_finite=False)
    return q.view(*lead, K), s.view(*lead, s.shape[-1])


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor,
                   bias: torch.Tensor | None = None, block_size: tuple[int, int] = DEFAULT_BLOCK,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of the FP8-weight linear (W8A16): fp32 ``x @ dequant(W)^T + b``."""
    y = x.float() @ dequantize_fp8_blockwise(qweight, scale_inv, block_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def fp8_w8a8_ref(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor,
                 pow2_scale: bool = False) -> torch.Tensor:
    """Emulated W8A8 (activations quantised per token per 128 channels), fp32 result."""
    xq, xs = quantize_act_fp8(x, 128, pow2_scale)
    xd = dequantize_fp8_blockwise(xq, xs, (1, 128))
    return xd @ dequantize_fp8_blockwise(qweight, scale_inv).T


def scaled_mm_supported(device: torch.device, N: int, K: int) -> bool:
    """Whether ``F.scaled_mm`` with BlockWise1x128 x BlockWise128x128 scales may be tried here:
    torch exposes it only for SM90 (H100/H200) and needs N, K multiples of 128."""
    import torch.nn.functional as F

    return (device.type == "cuda" and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
            and torch.cuda.get_device_capability(device) == (9, 0) and N % 128 == 0 and K % 128 == 0)


def scaled_mm_blockwise(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor,
                        out_dtype: torch.dtype, pow2_scale: bool = False) -> torch.Tensor:
    """W8A8 prefill GEMM through cuBLAS: x is quantised per token per 128 channels, the weight
    keeps its 128x128 scales. Rows are padded to a multiple of 4 and the K-blocks of both scale
    tensors to a multiple of 4 (cuBLAS alignment). Check ``scaled_mm_supported`` first; callers
    verify the result once against ``fp8_w8a8_ref`` (see Fp8Linear) before trusting it."""
    import torch.nn.functional as F

    M, K = x.shape
    pad_m = -M % 4
    xq, xs = quantize_act_fp8(F.pad(x, (0, 0, 0, pad_m)) if pad_m else x, 128, pow2_scale)
    kb = K // 128
    pad_kb = -kb % 4
    a_scale = F.pad(xs, (0, pad_kb)) if pad_kb else xs
    b_scale = F.pad(scale_inv, (0, pad_kb)) if pad_kb else scale_inv
    a_scale = a_scale.t().contiguous().t()                      # outer-dim-major [M, kb]
    y = F.scaled_mm(xq, qweight.t(), a_scale, F.ScalingType.BlockWise1x128,
                    b_scale.t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return y[:M]
