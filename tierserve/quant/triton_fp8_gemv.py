"""Triton FP8-weight GEMV / skinny GEMM for decode: ``y[M, N] = x[M, K] @ dequant(Wq[N, K])^T (+ b)``.

Bandwidth-oriented: each weight byte is read once per M-tile (M <= 16 is one tile), the fp8
values are widened in registers, products are summed in fp32 over one scale block of K and then
multiplied by that block's scale (``scale_inv[n // SBN, k // SBK]``, any row granularity SBN, so
per-row scales of unaligned fused layers work too). Grid: (N tiles, K splits, M tiles). With more
than one K split each program writes fp32 partials ``[split, M, N]`` and a second small kernel sums
them in a fixed order (no atomics, deterministic), adds the bias and casts. Two inner products:
``USE_DOT`` (tensor cores; bf16/fp16 activations multiply the e4m3 weights widened to their own
dtype, exactly; fp32 activations use ieee fp32 products) -- the default for every M -- and a
broadcast-multiply-reduce on CUDA cores (kept for tests; 0.6 TB/s at M=1 on the H200). No host sync: CUDA-graph safe.

Reference: ``fp8_gemm_ref`` (plain PyTorch). Tile sizes are starting points, to be tuned on the GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.quant.fp8 import DEFAULT_BLOCK, fp8_linear_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"     # the interpreter's dot mishandles bf16
DOT_MODES = {"act": 1, "f16": 2, "fp8": 3}                 # fp8_gemm's ``dot``; 0: fp32 products
DEFAULT_DOT = os.environ.get("TIERSERVE_FP8_DOT", "act")    # read once: fp8_gemm runs per layer per step


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, kb_per_split,
                     s_xm, s_wn, s_sn, s_om, s_os,
                     SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                     DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
                     TILED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    s_row = s_ptr + (n // SBN).to(tl.int64) * s_sn
    num_kb = tl.cdiv(K, SBK)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in tl.static_range(0, SBK, BLOCK_K):
            k = kb * SBK + kk + tl.arange(0, BLOCK_K)
            k_mask = k < K
            x = tl.load(x_ptr + m64[:, None] * s_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if TILED:           # tile_weight's layout: this program's [BLOCK_N, SBK] block is contiguous
                tile = w_ptr + (pid_n.to(tl.int64) * num_kb + kb) * (BLOCK_N * SBK)
                w = tl.load(tile + tl.arange(0, BLOCK_N)[:, None] * SBK + (kk + tl.arange(0, BLOCK_K))[None, :])
            else:
                w = tl.load(w_ptr + n64[:, None] * s_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0)
            if USE_DOT:
                if DOT_MODE == 1:    # e4m3 -> bf16/fp16 is exact: tensor-core products in the activation dtype
                    part += tl.dot(x, tl.trans(w.to(x.dtype)))
                elif DOT_MODE == 2:  # fp16 products: e4m3 -> fp16 is one conversion; x scaled by 2^-e into range
                    xf = x.to(tl.float32)
                    amax = tl.max(tl.abs(xf), axis=1)
                    e = tl.maximum(tl.ceil(tl.log2(tl.maximum(amax, 1e-30))) - 15.0, 0.0)
                    xs = tl.exp2(e)
                    part += tl.dot((xf / xs[:, None]).to(tl.float16), tl.trans(w.to(tl.float16))) * xs[:, None]
                elif DOT_MODE == 3:  # fp8 x fp8 products: x quantised per row over this K chunk (lossy)
                    xf = x.to(tl.float32)
                    amax = tl.max(tl.abs(xf), axis=1)
                    xs = tl.where(amax > 0, amax / 448.0, 1.0)
                    xq = (xf / xs[:, None]).to(tl.float8e4nv, fp_downcast_rounding="rtne")
                    part += tl.dot(xq, tl.trans(w)) * xs[:, None]
                else:
                    part += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PREC)
            else:
                part += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        scale = tl.load(s_row + kb, mask=n_mask, other=0.0)
        acc += part * scale[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m64[:, None] * s_om + n64[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_k * s_os + m64[:, None] * s_om + n64[None, :], acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, out_ptr, N, num_splits, s_ps, s_pm, s_om,
                          BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``) launched as a dependent of the GEMV whose partials it sums
    pdl.wait(PDL)
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(p_ptr + s * s_ps + row * s_pm + n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * s_om + n, y, mask=mask)


def check_weights(name: str, qweight: torch.Tensor, scale_inv: torch.Tensor, N: int, K: int,
                  block_size: tuple[int, int]) -> int:
    """Raise ValueError unless ``qweight`` is a contiguous float8_e4m3fn [N, K] tensor and ``scale_inv`` fp32
    [ceil(N/bn), ceil(K/bk)]; returns the number of scale blocks along K."""
    if qweight.dtype != torch.float8_e4m3fn or qweight.stride(-1) != 1 or qweight.stride(0) != K:
        raise ValueError(f"{name}: qweight must be a contiguous float8_e4m3fn [N, K] tensor")
    nb, kbs = -(-N // block_size[0]), -(-K // block_size[1])
    if tuple(scale_inv.shape) != (nb, kbs) or scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}: scale_inv must be fp32 [{nb}, {kbs}], got {scale_inv.dtype} "
                         f"{tuple(scale_inv.shape)}")
    return kbs


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split_k(device: torch.device, n_tiles: int, m_tiles: int, num_kb: int, waves: int = 4) -> int:
    """Enough programs for ``waves`` x the SM count; never more splits than scale blocks of K."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = -(-waves * sms // (n_tiles * m_tiles))
    return max(1, min(num_kb, want))


def fp8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
             block_size: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype | None = None,
             split_k: int | None = None, use_dot: bool | None = None, block_n: int | None = None,
             block_k: int | None = None, num_warps: int = 4, num_stages: int = 4,
             waves: int = 4, dot: str | None = None, tiled: bool = False) -> torch.Tensor:
    """``x [M, K]`` (fp32/bf16/fp16, last dim contiguous), ``qweight [N, K]`` float8_e4m3fn (row-major),
    ``scale_inv [ceil(N/bn), ceil(K/bk)]`` fp32 -> ``[M, N]`` in ``out_dtype`` (default x.dtype).

    ``dot`` (tensor-core products; None: ``TIERSERVE_FP8_DOT`` or "act"): "act" widens the e4m3 weights to
    the activation dtype (exact products; bf16 costs more conversion instructions than fp16); "f16" widens
    them to fp16 and scales each x row of a K chunk by a power of two that brings it into fp16's range
    (exact products for |x| >= 2^-17, the same sums as "act" up to fp32 summation order); "fp8" quantises x
    per row and K chunk to e4m3 and multiplies fp8 x fp8 (lossy: DeepSeek-V3's 1x128 activation groups).
    fp32 activations always use fp32 products.

    ``tiled``: ``qweight`` is in ``tile_weight``'s layout for this ``block_n`` (each program's K block one
    contiguous read)."""
    M, K = x.shape
    N, K2 = (qweight.shape[0] * qweight.shape[2], K) if tiled else qweight.shape
    sbn, sbk = block_size
    block_n = block_n or (64 if use_dot is not False else 32)
    if K2 != K:
        raise ValueError(f"fp8_gemm: x has K={K}, qweight has K={K2}")
    if tiled:
        if qweight.dim() != 4 or qweight.shape[1:] != (-(-K // sbk), block_n, sbk) or N % block_n or K % sbk:
            raise ValueError("fp8_gemm: tiled=True needs tile_weight(W, block_n, block) of an [N, K] W with N a "
                             "multiple of block_n and K of the scale block")
        qweight = qweight.view(-1, K)      # (the tiles' bytes; row n is not W's row n)
        N, K2 = qweight.shape
    kbs = check_weights("fp8_gemm", qweight, scale_inv, N, K, block_size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale_inv = scale_inv.contiguous()
    out_dtype = out_dtype or x.dtype
    # tensor cores for every M (rows padded to 16): the CUDA-core product measured 0.6 TB/s at M=1 on
    # the H200 (benchmarks/results/decode-kernels-h200.json)
    use_dot = True if use_dot is None else use_dot
    low = x.dtype in (torch.bfloat16, torch.float16)
    block_m = 16 if use_dot else min(16, triton.next_power_of_2(M))
    block_k = block_k or (128 if use_dot else 64)
    block_k = min(block_k, sbk)
    if sbk % block_k or block_k & (block_k - 1):
        raise ValueError(f"fp8_gemm: block_k={block_k} must be a power of two dividing the scale block {sbk}")
    m_tiles, n_tiles = -(-M // block_m), -(-N // block_n)
    split = split_k or choose_split_k(x.device, n_tiles, m_tiles, kbs, waves)
    kb_per_split = -(-kbs // max(1, min(split, kbs)))
    split = -(-kbs // kb_per_split)
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    direct = split == 1
    dst = out if direct else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    dot_prec = "ieee" if x.dtype == torch.float32 else "tf32"
    dot = dot or DEFAULT_DOT
    if dot not in DOT_MODES:
        raise ValueError(f"fp8_gemm: dot must be one of {sorted(DOT_MODES)}, got {dot!r}")
    # the interpreter's dot mishandles bf16: fp32 products there ("act"); fp16 and fp8 modes run as asked
    mode = DOT_MODES[dot] if low and not (_INTERPRET and dot == "act") else 0
    b = bias if bias is not None else scale_inv                  # dummy pointer when there is no bias
    _fp8_gemm_kernel[(n_tiles, split, m_tiles)](
        x, qweight, scale_inv, b, dst, M, N, K, kb_per_split,
        x.stride(0), qweight.stride(0), scale_inv.stride(0), dst.stride(-2), dst.stride(0) if not direct else 0,
        SBN=sbn, SBK=sbk, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
        DOT_PREC=dot_prec, DIRECT=direct, HAS_BIAS=bias is not None,
        DOT_MODE=mode, TILED=tiled, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _reduce_splits(dst, b, out, bias is not None)
    return out


def tile_weight(qweight: torch.Tensor, block_n: int, block_size: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """``qweight [N, K]`` -> ``[N / block_n, K / bk, block_n, bk]`` contiguous: the block a program of
    ``fp8_gemm(..., block_n=block_n, tiled=True)`` reads per scale block of K is one contiguous run of bytes."""
    N, K = qweight.shape
    bk = block_size[1]
    if N % block_n or K % bk:
        raise ValueError(f"tile_weight: N={N} must be a multiple of block_n={block_n} and K={K} of {bk}")
    return qweight.view(N // block_n, block_n, K // bk, bk).transpose(1, 2).contiguous()


def _reduce_splits(dst: torch.Tensor, b: torch.Tensor, out: torch.Tensor, has_bias: bool) -> None:
    """Sum the fp32 split-K partials ``dst [split, M, N]`` in a fixed order into ``out`` (+ bias). Launched as a
    PDL dependent where that is on."""
    rb = 256
    M, N = out.shape
    _splitk_reduce_kernel[(M, -(-N // rb))](dst, b, out, N, dst.shape[0], dst.stride(0), dst.stride(1),
                                            out.stride(0), BLOCK=rb, HAS_BIAS=has_bias, PDL=pdl.active(out.device),
                                            **pdl.dependent_options(out.device))


def fp8_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor,
                 bias: torch.Tensor | None = None, block_size: tuple[int, int] = DEFAULT_BLOCK,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference: fp32 ``x @ dequant(W)^T + b`` cast to ``out_dtype``."""
    return fp8_linear_ref(x, qweight, scale_inv, bias, block_size, out_dtype)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, s_qn, s_sn, s_on,
                    SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    n64 = n.to(tl.int64)
    q = tl.load(q_ptr + n64[:, None] * s_qn + k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (n // SBN).to(tl.int64)[:, None] * s_sn + (k // SBK)[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + n64[:, None] * s_on + k[None, :], (q * s).to(out_ptr.dtype.element_ty), mask=mask)


def fp8_dequant(qweight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK,
                dtype: torch.dtype = torch.bfloat16, block: int = 64) -> torch.Tensor:
    """Triton dequantisation (one read of fp8, one write of ``dtype``); same values as
    ``tierserve.quant.fp8.dequantize_fp8_blockwise``. Used by the GPU prefill fallback."""
    N, K = qweight.shape
    scale_inv = scale_inv.contiguous()
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    _dequant_kernel[(-(-N // block), -(-K // block))](qweight, scale_inv, out, N, K, qweight.stride(0),
                                                        scale_inv.stride(0), out.stride(0), SBN=block_size[0],
                                                        SBK=block_size[1], BLOCK_N=block, BLOCK_K=block)
    return out
