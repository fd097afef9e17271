"""Triton FP8-weight GEMV for one activation row (batch-1 decode): ``y[1, N] = x[1, K] @ dequant(Wq[N, K])^T (+ b)``
on CUDA cores, with the reduction over K deferred to the end.

Why (stop 19): ``triton_fp8_gemv.fp8_gemm`` pads the row to 16 for ``tl.dot``, so every weight byte goes through
registers, a conversion and shared memory before the tensor cores (1.6-2.6 TB/s on the H200 at Llama-8B shapes,
``benchmarks/results/fp8-gemv-kernels-h200.json``); its CUDA-core variant reduced a [M, N, K] product over K for
every K chunk (0.6-0.8 TB/s). Here each program keeps an fp32 ``[BLOCK_N, BLOCK_K]`` accumulator: per weight only
its widening (e4m3 -> f16 pairs -> fp32: full-rate pipes, not the per-value e4m3 -> bf16 F2F) and one FMA with the
activation already multiplied by the block's scale; the K reduction (shuffles) runs once per program. A tile
may span several scale blocks of K (``BLOCK_K`` > ``SBK``): one load puts all its bytes in flight (ptxas otherwise
interleaves a second block's loads with the first one's products).

Scales: ``scale_inv[n // SBN, k // SBK]``; with ``BLOCK_N`` dividing ``SBN`` (``UNIFORM``) one scale per program and
K block multiplies the ``BLOCK_K`` activations, else each row's scale multiplies its products. Grid (N tiles, K
splits); with several K splits fp32 partials are summed in a fixed order by ``triton_fp8_gemv``'s reduce kernel
(deterministic, no atomics). No host sync: CUDA-graph safe. Reference: ``fp8_gemm_ref``; tests compare them on
random inputs (tests/unit/test_fp8_gemv.py)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.quant.fp8 import DEFAULT_BLOCK
from tierserve.quant.triton_fp8_gemv import _reduce_splits, check_weights, choose_split_k

# split-K summed in the same launch by the last program of each N tile (TIERSERVE_FP8_GEMV_FUSED=1); off by default
FUSED_REDUCE = os.environ.get("TIERSERVE_FP8_GEMV_FUSED", "0") == "1"


@triton.jit
def _wtile(w_ptr, n64, k, s_wn):
    """The fp8 weights of one whole [BLOCK_N, BLOCK_K] tile (EVEN: no masks, 16-byte loads)."""
    return tl.load(w_ptr + n64[:, None] * s_wn + k[None, :])


@triton.jit
def _tile(x_ptr, w_ptr, n, n64, n_mask, k, K, s_wn, EVEN: tl.constexpr):
    """x (fp32) and the fp8 weights of one [BLOCK_N, BLOCK_K] tile at columns ``k``. x is read in the weights'
    2-D layout (every row the same addresses: L1 hits), not as a 1-D vector broadcast through shared memory;
    EVEN (K a multiple of SBK, N of BLOCK_N): no per-value masks, so the weight loads are 16-byte vectors (a
    per-value K mask made them single-byte loads)."""
    xp = x_ptr + (n * 0)[:, None] + k[None, :]
    wp = w_ptr + n64[:, None] * s_wn + k[None, :]
    if EVEN:
        return tl.load(xp).to(tl.float32), _wtile(w_ptr, n64, k, s_wn)
    m2 = n_mask[:, None] & (k < K)[None, :]
    return tl.load(xp, mask=m2, other=0.0).to(tl.float32), tl.load(wp, mask=m2, other=0.0)


@triton.jit
def _last_split_sums(part_ptr, fin_ptr, cnt_ptr, b_ptr, n, n_mask, pid_n, num_splits, s_os, HAS_BIAS: tl.constexpr):
    """Split-K in one launch: after its partial is stored, each program counts itself in on its N tile; the last
    one sums every split's partial in split order (as ``_splitk_reduce_kernel`` does: the same bits), adds the
    bias, writes the output and resets the counter for the next launch. The barrier before the (acq_rel, gpu
    scope) count orders all of this program's partial stores before it; the partials are read from L2 (.cg)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        acc = tl.zeros(n.shape, dtype=tl.float32)
        for sp in range(num_splits):
            acc += tl.load(part_ptr + sp * s_os + n, mask=n_mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(fin_ptr + n, acc.to(fin_ptr.dtype.element_ty), mask=n_mask)
        tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _fp8_gemv_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, fin_ptr, cnt_ptr, N, K, kb_per_split, num_splits,
                          s_wn, s_sn, s_os,
                          SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          UNIFORM: tl.constexpr, EVEN: tl.constexpr, DIRECT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, FUSED_REDUCE: tl.constexpr = False, PDL: tl.constexpr = False):
    # BLOCK_K > SBK (UNIFORM only; whole tiles per split): a tile spans several scale blocks, each column's
    # activation scaled by its block's scale -- one load of the whole tile puts its bytes in flight together
    pdl.release(PDL)        # the next kernel, if launched with PDL (a norm, silu_mul), may be scheduled now
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n64 = n.to(tl.int64)
    num_kb = tl.cdiv(K, SBK)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    s_row = s_ptr + (n // SBN).to(tl.int64) * s_sn                # each row's scale row
    s_one = s_ptr + ((pid_n * BLOCK_N) // SBN).to(tl.int64) * s_sn   # UNIFORM: the program's scale row
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ar = tl.arange(0, BLOCK_K)
    pdl.wait(PDL)           # launched early (PDL): x, the counters and the output come from earlier kernels
    if BLOCK_K > SBK:
        for kb in range(kb_lo, kb_hi, BLOCK_K // SBK):
            x, w = _tile(x_ptr, w_ptr, n, n64, n_mask, kb * SBK + ar, K, s_wn, EVEN)
            sc = tl.load(s_one + kb + ar // SBK)                       # [BLOCK_K]: each column's block scale
            acc += w.to(tl.float32) * (x * sc[None, :])
    else:
        for kb in range(kb_lo, kb_hi):
            if UNIFORM:
                sc = tl.load(s_one + kb)
            else:
                sc = tl.load(s_row + kb, mask=n_mask, other=0.0)[:, None]
            for kk in tl.static_range(0, SBK, BLOCK_K):
                x, w = _tile(x_ptr, w_ptr, n, n64, n_mask, kb * SBK + kk + ar, K, s_wn, EVEN)
                # e4m3 -> f16 pairs -> fp32 (exact), no per-value F2F to bf16
                acc += w.to(tl.float32) * (x * sc)
    y = tl.sum(acc, axis=1)
    if DIRECT:
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + n, y, mask=n_mask)
    else:
        tl.store(out_ptr + pid_k * s_os + n, y, mask=n_mask)
        if FUSED_REDUCE:
            _last_split_sums(out_ptr, fin_ptr, cnt_ptr, b_ptr, n, n_mask, pid_n, num_splits, s_os, HAS_BIAS)


def row_tile(N: int, K: int) -> tuple[int, int]:
    """Default (block_k, waves) for [N, K] weights (32-row tiles, 4 warps, 1 stage). From the H200 sweep of stop 20
    (``benchmarks/results/stop20/fp8-gemv-rows-h200.json``, Llama-8B layers, every byte from HBM): long K rows
    (down, K=14336) prefer 256-column tiles, wide layers (gate_up, N=28672) 4 waves of programs, the rest
    128 columns and 8 waves: 75.0 us a layer against 74.8 for each layer's best tile and 101.4 for ``fp8_gemm``."""
    return (256 if K >= 8192 else 128), (4 if N >= 16384 else 8)


def fp8_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                  block_size: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype | None = None,
                  block_n: int = 32, block_k: int | None = None, split_k: int | None = None, num_warps: int = 4,
                  num_stages: int = 1, waves: int | None = None, fused_reduce: bool | None = None,
                  partials_only: bool = False) -> torch.Tensor | None:
    """``x [1, K]`` (bf16 / fp16 / fp32, last dim contiguous), ``qweight [N, K]`` float8_e4m3fn contiguous,
    ``scale_inv [ceil(N/bn), ceil(K/bk)]`` fp32 -> ``[1, N]`` in ``out_dtype`` (default x.dtype). ``block_k``
    may span several scale blocks (a multiple of the block, when ``block_n`` divides the scale rows and N, and
    the K blocks split evenly; else the scale block is used). ``block_k`` / ``waves`` default to ``row_tile``.
    ``fused_reduce`` (default ``FUSED_REDUCE``, off: 78.4 against 73.3 us a layer on the H200, stop 21): with
    several K splits, the last program of each N tile sums the partials in the same launch instead of a second
    reduce kernel (same bits). ``partials_only``: return the unsummed split-K partials ``[split, 1, N]`` fp32 for a
    fused epilogue to sum in split order (``models.layers.triton_qkv_rope``), or None -- nothing launched -- where
    the launch would take one split."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"fp8_gemv_rows: x must be [1, K], got {tuple(x.shape)}")
    K = x.shape[1]
    N, K2 = qweight.shape
    sbn, sbk = block_size
    if K2 != K:
        raise ValueError(f"fp8_gemv_rows: x has K={K}, qweight has K={K2}")
    kbs = check_weights("fp8_gemv_rows", qweight, scale_inv, N, K, block_size)
    tile_k, tile_waves = row_tile(N, K)
    block_k, waves = block_k or tile_k, waves or tile_waves
    uniform = sbn % block_n == 0
    if block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"fp8_gemv_rows: block_k ({block_k}) and block_n ({block_n}) must be powers of two")
    even = K % sbk == 0 and N % block_n == 0
    per_tile = block_k // sbk if block_k > sbk and block_k % sbk == 0 else 1
    if per_tile > 1 and (not uniform or not even or kbs % per_tile):
        # a wide tile needs one scale row per program and whole tiles (masked, it spills: ptxas, sm_90)
        block_k, per_tile = sbk, 1
    block_k = min(block_k, sbk) if per_tile == 1 else block_k
    if per_tile == 1 and sbk % block_k:
        raise ValueError(f"fp8_gemv_rows: block_k={block_k} must divide the scale block {sbk}")
    x = x.contiguous()
    scale_inv = scale_inv.contiguous()
    out = torch.empty(1, N, dtype=out_dtype or x.dtype, device=x.device)
    n_tiles = -(-N // block_n)
    split = split_k or choose_split_k(x.device, n_tiles, 1, kbs, waves)
    kb_per_split = -(-kbs // max(1, min(split, kbs)))
    kb_per_split = -(-kb_per_split // per_tile) * per_tile     # whole tiles in every split
    split = -(-kbs // kb_per_split)
    direct = split == 1
    if partials_only and direct:
        return None
    dst = out if direct else torch.empty(split, 1, N, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else scale_inv
    fused_reduce = False if partials_only else FUSED_REDUCE if fused_reduce is None else fused_reduce
    cnt = None if direct or not fused_reduce else split_counters(x.device, n_tiles)
    if fused_reduce and cnt is None and not direct:
        raise ValueError(f"fp8_gemv_rows: no split counters for {n_tiles} tiles (none are made during a CUDA "
                         f"graph capture; at most {MAX_TILES})")
    _fp8_gemv_rows_kernel[(n_tiles, split)](
        x, qweight, scale_inv, b, dst, out, cnt if cnt is not None else scale_inv, N, K, kb_per_split, split,
        qweight.stride(0), scale_inv.stride(0), dst.stride(0) if not direct else 0, SBN=sbn, SBK=sbk,
        BLOCK_N=block_n, BLOCK_K=block_k, UNIFORM=uniform, EVEN=even, DIRECT=direct, HAS_BIAS=bias is not None,
        FUSED_REDUCE=cnt is not None, PDL=pdl.active(x.device), num_warps=num_warps, num_stages=num_stages,
        **pdl.dependent_options(x.device))
    if partials_only:
        return dst
    if not direct and cnt is None:
        _reduce_splits(dst, b, out, bias is not None)
    return out


MAX_TILES = 1 << 16
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def split_counters(device: torch.device, n_tiles: int) -> torch.Tensor | None:
    """The per-device int32 arrival counters of the fused split-K reduction (all zero between launches: the last
    program of each tile resets its own). Made once, outside CUDA-graph capture (a buffer made inside one would
    belong to the graph's memory pool); None when there is none yet and the stream is capturing, or ``n_tiles``
    exceeds ``MAX_TILES``. Launches on one stream use them in turn."""
    key = (device.type, device.index if device.type != "cuda" or device.index is not None
           else torch.cuda.current_device())
    c = _COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        c = _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return c if n_tiles <= MAX_TILES else None
