"""Ask L2 for a weight tensor ahead of the kernel that reads it (sm_90, opt-in: ``TIERSERVE_L2_AHEAD=1``; untimed).

In a batch-1 decode step HBM is busy during the projections and nearly idle during attention, the norms and the
small element-wise kernels (at 2k, attention reads ~4 MB a layer in ~10 us). ``prefetch_l2(w)``, launched just
before such a stretch, issues bulk L2 prefetches (``cp.async.bulk.prefetch.L2``: no registers held, no wait for
the data) of ``w``'s bytes and exits; the lines arrive while the latency-bound kernels run, and the projection
after them reads them from L2. Used for ``o_proj`` (16.8 MB at Llama-8B, FP8) before attention
(models/llama.py). The kernel is a PDL dependent that releases at once and waits for the kernel before it only at
its end, so waiting stays transitive for the kernel after it (``tierserve.pdl``). Under the CPU interpreter (no
inline assembly) or off CUDA it does nothing.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl

ENABLED = os.environ.get("TIERSERVE_L2_AHEAD") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
PIECE = 4096            # bytes one thread asks for (a multiple of 16)
_THREADS = 128          # 4 warps, one address each


@triton.jit
def bulk_l2(ptr, NBYTES: tl.constexpr):
    """Ask L2 for ``NBYTES`` from each address of ``ptr`` (one bulk prefetch per element; a hint that holds no
    registers and does not wait). Shared with the row GEMV's own prefetch (``triton_fp8_gemv_rows``)."""
    tl.inline_asm_elementwise(f"cp.async.bulk.prefetch.L2.global [$1], {NBYTES};\n mov.u32 $0, 0;", "=r,l", [ptr],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(base_ptr, nbytes, PIECE: tl.constexpr, THREADS: tl.constexpr, PDL: tl.constexpr):
    pdl.release(PDL)
    off = (tl.program_id(0) * THREADS + tl.arange(0, THREADS)).to(tl.int64) * PIECE
    ok = off + PIECE <= nbytes                      # whole pieces only (the tail is left to the reader)
    bulk_l2(base_ptr + tl.where(ok, off, 0), PIECE)
    pdl.wait(PDL)           # completes after the kernel before it: the next kernel's wait stays transitive


def prefetch_l2(t: torch.Tensor) -> None:
    """Bulk L2 prefetches of ``t``'s bytes (contiguous, CUDA, sm_90+); a no-op elsewhere."""
    if not (ENABLED and t.is_cuda and t.is_contiguous() and pdl.active(t.device)):
        return
    nbytes = t.numel() * t.element_size()
    pieces = nbytes // PIECE
    if pieces == 0:
        return
    _prefetch_kernel[(triton.cdiv(pieces, _THREADS),)](t.view(torch.uint8), nbytes, PIECE=PIECE, THREADS=_THREADS,
                                                      PDL=True, num_warps=4, **pdl.dependent_options(t.device))
