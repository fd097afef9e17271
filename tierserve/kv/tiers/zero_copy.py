"""Zero-copy page gather: a GPU kernel reads pages straight from pinned host memory into GPU pages.

With unified addressing a pinned host buffer is addressable from the device, so a kernel can gather
scattered host pages itself instead of the CPU first gathering them into a staging buffer (DESIGN.md:
2,048 scattered 64 KiB pages took 23 ms through a CPU gather + copy, 2.6 ms read by a GPU kernel). Used for
CPU-RAM prefix hits (``TierManager._onload``); when the kernel cannot run (no Triton, an allocator whose
pinned memory is not mapped) the caller falls back to the staging copy. Reference: ``index_select`` + copy;
the test compares them on random pages (on the CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(src_ptr, slot_ptr, dst_ptr, page_ptr, PAGE_STRIDE: tl.constexpr, ELEMS: tl.constexpr,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < ELEMS
    slot = tl.load(slot_ptr + i).to(tl.int64)
    page = tl.load(page_ptr + i).to(tl.int64)
    v = tl.load(src_ptr + slot * PAGE_STRIDE + c, mask=mask)
    tl.store(dst_ptr + page * PAGE_STRIDE + c, v, mask=mask)


def _flat_words(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] contiguous -> [N, words] in the widest integer type that divides a page."""
    raw = t.view(t.shape[0], -1).view(torch.uint8)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if raw.shape[1] % size == 0:
            return raw.view(dtype)
    return raw


def gather_pages(src: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, pages: torch.Tensor,
                 block: int = 4096, layer: int | None = None) -> None:
    """``dst[pages[i]] = src[slots[i]]`` for page tensors ``[N, ...]`` of the same page shape and dtype.
    ``src`` may live in pinned host memory; ``slots`` / ``pages`` are int64 on ``dst``'s device. With
    ``layer``: only ``[:, layer]`` of each page (one contiguous part of it; the hit loads overlapped with
    the forward pass copy a step's pages layer by layer, overlap.py)."""
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"page shapes differ: {tuple(src.shape[1:])} {src.dtype} vs {tuple(dst.shape[1:])} {dst.dtype}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("gather_pages needs contiguous page tensors")
    n = slots.numel()
    if n == 0:
        return
    s, d = _flat_words(src), _flat_words(dst)
    stride = elems = s.shape[1]
    if layer is not None:                  # page-major: layer ``layer`` of a page is words [a, a + elems)
        if src.dim() < 2 or not 0 <= layer < src.shape[1] or elems % src.shape[1]:
            raise ValueError(f"layer {layer}: pages of shape {tuple(src.shape[1:])} have no such layer "
                             f"of whole {s.dtype} words")
        elems = stride // src.shape[1]
        s, d = s[:, layer * elems:], d[:, layer * elems:]     # same strides, offset base pointers
    _gather_kernel[(n, triton.cdiv(elems, block))](s, slots, d, pages, PAGE_STRIDE=stride, ELEMS=elems,
                                                   BLOCK=block, num_warps=4)
