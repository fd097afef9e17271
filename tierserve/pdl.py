"""Programmatic dependent launch (PDL, sm_90+) for the decode step's chain of small kernels (on by default on
sm_90+; ``TIERSERVE_PDL=0`` turns it off. H200, stop 21, section a at 2k: FP8 weights 313.6 against 297.7 tok/s,
FP8 weights + KV 294.1 against 279.5; bf16 unchanged).

In a batch-1 decode step every kernel is short, so each boundary (the next grid launched only after the previous
one has drained) costs a few microseconds of idle HBM. With PDL a *dependent* kernel, launched with
``launch_pdl=True``, may be scheduled as soon as every program of the kernel before it has called
``release`` (or exited); it must call ``wait`` before it reads anything that kernel wrote (``wait`` returns once
that kernel has completed and its writes are visible). Work before ``wait`` may touch only data no earlier kernel
of the step writes (weights, scales).

Used by: the FP8 row GEMV (``quant/triton_fp8_gemv_rows``) and its split-K reduce, ``add_rmsnorm``, ``silu_mul``,
``rope_write_kv``, the BF16 and FP8 paged decode kernels and their split merge: each is launched as a dependent,
calls ``release`` at its start (the next kernel may be scheduled while it runs) and ``wait`` before its first
read of earlier output. Waiting is transitive: a kernel past its ``wait`` knows the kernel before it completed,
which itself had passed its own ``wait``. A kernel compiled without the flag behaves as before; ``release`` is
harmless before a dependent launched without PDL (that one waits for the whole grid as usual), and a dependent
after a kernel that never releases is scheduled when that kernel's programs have exited. The trigger fires only
once every program of the releasing kernel has started, so early dependents never take SM room from programs
of it that are still waiting for a slot. Under the CPU
interpreter (no inline assembly) both are compiled out.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:                                     # older Triton: no PDL
    gdc_wait = gdc_launch_dependents = None

ENABLED = os.environ.get("TIERSERVE_PDL", "1") == "1" and os.environ.get("TRITON_INTERPRET") != "1" \
    and gdc_wait is not None


@triton.jit
def wait(PDL: tl.constexpr):
    """Dependent kernel: block until the kernel before it has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def release(PDL: tl.constexpr):
    """Primary kernel: let the next kernel (if launched with PDL) be scheduled now."""
    if PDL:
        gdc_launch_dependents()


@functools.cache
def _hopper(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def active(device: torch.device) -> bool:
    """PDL for kernels on ``device``: enabled, CUDA, compute capability >= 9 (asked once per device: this runs at
    every launch)."""
    return ENABLED and device.type == "cuda" and _hopper(device.index)


def dependent_options(device: torch.device) -> dict:
    """Launch options of a dependent kernel (``kernel[grid](..., **dependent_options(dev))``)."""
    return {"launch_pdl": True} if active(device) else {}
