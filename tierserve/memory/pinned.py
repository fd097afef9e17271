"""Exact-size page-locked host memory.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds every request up
to a power of two: a 40 GB CPU KV tier pins 64 GiB, and the 122 GiB a 1M-token tier needs would take 128 GiB of
a 128 GiB machine. ``host_register`` page-locks an ordinary (pageable) CPU tensor in place with
``cudaHostRegister`` (portable | mapped, so kernels can read it through unified addressing and copies from it
are asynchronous), which locks exactly its storage's bytes; ``PinnedBuffers`` keeps such tensors and unlocks them
when closed. Without CUDA nothing is locked (CPU-only runs need no pinning).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("tierserve")

_PORTABLE_MAPPED = 3            # cudaHostRegisterPortable | cudaHostRegisterMapped


def host_register(t: torch.Tensor, what: str) -> None:
    """Page-lock ``t``'s whole storage in place; RuntimeError naming ``what`` if the driver refuses.

    The storage, not just ``t``'s bytes: torch decides ``is_pinned`` (and whether a copy may run inside a CUDA
    graph capture) from the storage's first byte, which for an ``aligned_empty`` view lies before ``t``."""
    st = t.untyped_storage()
    nbytes = st.nbytes()
    err = torch.cuda.cudart().cudaHostRegister(st.data_ptr(), nbytes, _PORTABLE_MAPPED)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of the {nbytes / 2**30:.2f} GiB {what} failed (error {code})")


def host_unregister(t: torch.Tensor) -> bool:
    """Unlock ``t``'s storage; False if the driver refused (e.g. during a CUDA graph capture, where the call is not
    allowed): then the caller must keep the memory alive, since freed-but-locked memory makes a later lock of the
    same addresses fail (cudaErrorHostMemoryAlreadyRegistered)."""
    if torch.cuda.is_current_stream_capturing():
        return False
    err = torch.cuda.cudart().cudaHostUnregister(t.untyped_storage().data_ptr())
    return int(getattr(err, "value", err)) == 0


# locked tensors whose unlock had to wait (a garbage collection during a graph capture ran PinnedBuffers.__del__):
# kept alive here and unlocked at the next PinnedBuffers call outside a capture
_DEFERRED: list[torch.Tensor] = []


def unlock_all(tensors: list[torch.Tensor]) -> None:
    """Unlock every tensor in ``tensors`` (emptied); the ones the driver refuses move to ``_DEFERRED``."""
    while tensors:
        t = tensors.pop()
        if not host_unregister(t):
            _DEFERRED.append(t)


def retry_deferred() -> None:
    if _DEFERRED and not torch.cuda.is_current_stream_capturing():
        pending = _DEFERRED[:]
        _DEFERRED.clear()
        unlock_all(pending)


ALIGN = 2 << 20                 # bytes: locked buffers start on a 2 MiB boundary


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, align: int = ALIGN) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on an ``align``-byte boundary. Large ``torch.empty``
    buffers start 64 bytes into a page; GPU reads through PCIe from locked memory are done in aligned
    requests, and a buffer that starts mid-line splits every one of them."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    off = -raw.data_ptr() % align
    return raw[off:off + nbytes].view(dtype).view(shape)


class PinnedBuffers:
    """Owns exact-size page-locked CPU tensors; ``close`` (or garbage collection) unlocks them."""

    def __init__(self) -> None:
        self._locked: list[torch.Tensor] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        """An uninitialised CPU tensor, page-locked at its exact size when CUDA is available (falling back to
        torch's rounding ``pin_memory`` allocator, with a warning, if registering fails)."""
        if not torch.cuda.is_available():
            return torch.empty(shape, dtype=dtype)
        retry_deferred()
        t = aligned_empty(shape, dtype)
        if t.numel() == 0:
            return t
        try:
            host_register(t, what)
        except RuntimeError as e:
            log.warning("%s; pinning through torch's allocator instead (rounded up to a power of two)", e)
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        self._locked.append(t)
        return t

    def close(self) -> None:
        unlock_all(self._locked)
        retry_deferred()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the driver may be gone
            pass


def ids_to(values, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A host list (or CPU tensor) of ids as a tensor on ``device`` without a host sync: on CUDA through a pinned
    staging copy queued on the current stream (``torch.tensor(values, device="cuda")`` copies from pageable memory
    and waits for the stream, which drains a queue of multi-step windows)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
