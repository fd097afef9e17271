"""Zero-copy row gather: a Triton kernel that reads table rows straight from pinned host memory.

With unified addressing the pointer of a pinned host tensor is valid on the GPU (Triton's launcher asks the
driver for the device pointer of every tensor argument), so the kernel reads only the requested rows across
PCIe, with no CPU gather and no staging copy (51 GB/s for scattered 4-64 KiB pieces on the H200, DESIGN.md).
Rows are copied as raw words (int32/int16/uint8 views), so the result is bit-identical to
``gather_rows_ref`` for every dtype, FP8 codes and scales included.

Reference: ``gather_rows_ref`` (``index_select``); the test runs the kernel on the CPU under
TRITON_INTERPRET=1. Not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, n_idx, ROW: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_idx
    rows = tl.load(idx_ptr + r, mask=r_mask, other=0).to(tl.int64)
    dst = r.to(tl.int64) * ROW
    for c0 in range(0, ROW, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = r_mask[:, None] & (c[None, :] < ROW)
        v = tl.load(src_ptr + rows[:, None] * ROW + c[None, :], mask=m)
        tl.store(out_ptr + dst[:, None] + c[None, :], v, mask=m)


def _word_dtype(row_bytes: int) -> torch.dtype:
    return torch.int32 if row_bytes % 4 == 0 else torch.int16 if row_bytes % 2 == 0 else torch.uint8


def gather_rows_ref(table: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, row_ids.to(table.device).view(-1))


def gather_rows_zero_copy(table: torch.Tensor, row_ids: torch.Tensor, device: torch.device | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``table[row_ids]`` ([N, W]) into a tensor on ``device`` (default: the device of ``row_ids``).

    ``table`` [R, W] contiguous, on the GPU or in pinned host memory (or any CPU tensor under the Triton
    interpreter); ``row_ids`` int64/int32 on ``device``. Row ids are not bounds-checked."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError("zero-copy gather needs a contiguous 2-D table")
    device = row_ids.device if device is None else torch.device(device)
    idx = row_ids.reshape(-1).to(device)
    n = idx.numel()
    W = table.shape[1]
    if out is None:
        out = torch.empty(n, W, dtype=table.dtype, device=device)
    elif out.shape != (n, W) or out.dtype != table.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {W}] {table.dtype} tensor")
    if n == 0:
        return out
    wdt = _word_dtype(W * table.element_size())
    src, dst = table.view(wdt), out.view(wdt)
    row = src.shape[1]
    block_c = min(triton.next_power_of_2(row), 256)
    block_r = max(1, min(64, 2048 // block_c))
    _gather_rows_kernel[(triton.cdiv(n, block_r),)](src, idx, dst, n, ROW=row, BLOCK_R=block_r, BLOCK_C=block_c)
    return out
