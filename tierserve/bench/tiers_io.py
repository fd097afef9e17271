"""Raw bandwidths for `bench tiers`, measured in the same run: pinned host -> device copy, and local-disk
write / read of a fresh file in the disk tier's directory with its page cache dropped (fsync, then
``posix_fadvise(DONTNEED)``; ``resident_fraction`` checks with ``mincore`` that it is gone), read
sequentially in 16 MiB requests by one thread and in 2 MiB pieces by the tier's reader count -- the
shape of a disk-tier hit. ``drop_page_cache`` does the same to the tier's page files before a disk hit,
so the hit reads the disk, as the bandwidth it is compared with does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_libc = None


def _drop(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_page_cache(files: list[Path]) -> None:
    """Write back (one ``sync`` for all: a per-file fsync would commit the journal per file) and evict the
    page cache of ``files`` (best effort: a file system may ignore it; ``resident_fraction`` tells)."""
    if not hasattr(os, "posix_fadvise"):
        return
    os.sync()
    for f in files:
        try:
            _drop(f)
        except OSError:
            pass


def resident_fraction(files: list[Path], sample: int = 64) -> float | None:
    """Share of the pages of (a sample of) ``files`` held in the page cache; None where mincore is missing."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _libc.mmap.restype = ctypes.c_void_p
            _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    step = max(1, len(files) // sample)
    total = resident = 0
    for f in files[::step]:
        size = f.stat().st_size
        if not size:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            rc = _libc.mincore(addr, size, vec)
            _libc.munmap(addr, size)
            if rc != 0:
                return None
            total += pages
            resident += sum(b & 1 for b in vec.raw)
        finally:
            os.close(fd)
    return resident / total if total else None


def _read_seq(path: Path, block: int = 16 << 20) -> int:
    n = 0
    buf = bytearray(block)
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(buf)):
            n += got
    return n


def _read_parallel(path: Path, workers: int, piece: int = 2 << 20) -> int:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def one(off: int) -> int:
        return len(os.pread(fd, piece, off))
    try:
        with ThreadPoolExecutor(workers) as ex:
            return sum(ex.map(one, range(0, size, piece)))
    finally:
        os.close(fd)


def raw_read_files(files: list[Path], workers: int) -> dict:
    """Plain reads (no checksum, no copy) of ``files`` with their page cache dropped, ``workers`` files at a
    time: the disk's bandwidth for exactly the bytes a disk hit reads, measured right after it (a short
    probe file may see a faster disk than a long chain does: burst credits, caches in front of the device)."""
    files = [f for f in files if f.exists()]
    drop_page_cache(files)
    resident = resident_fraction(files)
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        got = sum(ex.map(_read_seq, files))
    dt = time.perf_counter() - t
    return {"raw_files_GBps": got / dt / 1e9 if dt > 0 else None, "raw_files_bytes": got,
            "raw_files_resident_before": resident}


def disk_bandwidth(disk_dir: str, nbytes: int, workers: int) -> dict:
    """Write ``nbytes`` (fsync'd) to a fresh file, then read it twice with its page cache dropped."""
    path = Path(disk_dir) / f".bw-{os.getpid()}.bin"
    block = os.urandom(1 << 20)
    out = {}
    try:
        t = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(max(1, nbytes >> 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        n = path.stat().st_size
        out["disk_write_GBps"] = n / (time.perf_counter() - t) / 1e9
        for name, read in (("disk_read_seq_GBps", _read_seq),
                           ("disk_read_parallel_GBps", lambda p: _read_parallel(p, workers))):
            drop_page_cache([path])
            out["disk_cache_resident_before_read"] = resident_fraction([path])
            t = time.perf_counter()
            got = read(path)
            out[name] = got / (time.perf_counter() - t) / 1e9
        out["disk_bandwidth_GBps"] = max(out["disk_read_seq_GBps"], out["disk_read_parallel_GBps"])
        out["disk_bandwidth_file_bytes"] = n
    finally:
        path.unlink(missing_ok=True)
    return out


def host_to_device(dev: torch.device, nbytes: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(host)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(host, non_blocking=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def measure_bandwidths(dev: torch.device, disk_dir: str, disk_bytes: int, workers: int) -> dict:
    out = {"host_to_device_GBps": host_to_device(dev, 256 << 20)}
    out.update(disk_bandwidth(disk_dir, disk_bytes, workers))
    return out


class Budget:
    """Seconds left of a run's time budget; ``skip`` says why a step that needs ``need`` s does not run."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def skip(self, need: float, what: str, reserve: float = 0.0) -> str | None:
        left = self.left() - reserve
        if left >= need:
            return None
        kept = f" ({reserve:.0f} s kept for later steps)" if reserve else ""
        return f"time budget: {max(left, 0):.0f} s left of {self.seconds:.0f}{kept}, {what} needs ~{need:.0f} s"
