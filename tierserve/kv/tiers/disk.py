"""Disk tier: one file per page under a directory, written asynchronously, verified on every read.

Files are named ``<hash hex>.kvp`` (the index is the directory itself, scanned at start). A write goes
to a unique temporary name and is renamed into place, so processes sharing a directory never see a
partial file. Pages arrive as CPU tensors; the writer threads (io.AsyncWriter, several: the CRC-32 and
file writes release the GIL) take the bytes view, checksum and write them, and room is reserved before a
write so that concurrent writers stay within the capacity. At most io.MAX_QUEUED_BYTES wait for a writer;
past that pages are not persisted (one warning, ``write_dropped`` in stats). A block that fails
verification (checksum, fingerprint, hash, tokens) is logged, deleted and treated as a miss. A read first
asks the kernel for the whole file (``POSIX_FADV_WILLNEED``), so a cold block's I/O is queued at once
rather than in growing read-ahead windows. A directory that cannot be written (read-only, disk full)
disables the tier with a warning; the engine carries on without it.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from tierserve.kv.tiers import codec, flush_at_exit
from tierserve.kv.tiers.io import AsyncWriter

log = logging.getLogger("tierserve.kv.disk")
SUFFIX = ".kvp"
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class DiskTier:
    name = "disk"

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, fingerprint: str) -> None:
        self.dir = Path(directory).expanduser()
        self.capacity = capacity_bytes
        self.fingerprint = fingerprint
        self.enabled = True
        self.index: dict[bytes, int] = {}
        self.num_corrupt = 0
        self._lock = threading.Lock()
        self._room_lock = threading.Lock()       # serialises capacity reservations of the writer threads
        self._reserved = 0                       # bytes of writes under way (room made, not yet indexed)
        self._writer = AsyncWriter("disk", self._write)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            self._disable(f"cannot write to {self.dir}: {e}")
            return
        for f in self.dir.glob("*" + SUFFIX):
            try:
                self.index[bytes.fromhex(f.stem)] = f.stat().st_size
            except (ValueError, OSError):
                continue
        flush_at_exit(self)

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("disk KV tier disabled: %s; continuing without it", why)
        self.enabled = False

    def path_of(self, block_hash: bytes) -> Path:
        """The file that holds (or would hold) the page ``block_hash``."""
        return self.dir / (block_hash.hex() + SUFFIX)

    _path = path_of

    def contains(self, block_hash: bytes) -> bool:
        return self.enabled and block_hash in self.index

    # ---- read -----------------------------------------------------------------------------------
    def read(self, block_hash: bytes, tokens: tuple[int, ...]) -> memoryview | None:
        """The page payload (a view into a fresh writable buffer), or None on a miss or a bad block
        (which is then removed). Thread-safe: the synchronous path reads a hit's pages in parallel."""
        if not self.contains(block_hash):
            return None
        path = self._path(block_hash)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if _WILLNEED is not None:        # the whole block's reads queued at once, not window by window
                    os.posix_fadvise(f.fileno(), 0, size, _WILLNEED)
                blob = np.empty(size, dtype=np.uint8)   # not zero-filled
                got = f.readinto(blob)
            if got != len(blob):
                blob = blob[:got]
        except OSError:
            with self._lock:
                self.index.pop(block_hash, None)
            return None
        try:
            payload = codec.decode(blob, self.fingerprint, block_hash, tokens)
        except codec.CorruptBlock as e:
            with self._lock:
                self.num_corrupt += 1
            log.warning("disk KV block %s rejected (%s); removed, will recompute", path.name, e)
            with self._lock:
                self.index.pop(block_hash, None)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)           # recency for capacity eviction
        except OSError:
            pass
        return payload

    # ---- write ----------------------------------------------------------------------------------
    def write_async(self, block_hash: bytes, tokens: tuple[int, ...], payload) -> bool:
        """Queue a page (a CPU tensor the caller no longer writes to, or bytes) for writing; False if it
        was not queued (tier off, already stored, or the writers' backlog is full)."""
        if not self.enabled or block_hash in self.index:
            return False
        return self._writer.submit(block_hash, codec.as_buffer(payload).nbytes, block_hash, tokens, payload)

    def _write(self, block_hash: bytes, tokens: tuple[int, ...], payload) -> None:
        if not self.enabled or block_hash in self.index:
            return
        parts = codec.encode_parts(self.fingerprint, block_hash, tokens, payload)
        size = sum(memoryview(p).nbytes for p in parts)
        final = self._path(block_hash)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._make_room(size)
        try:
            with open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, final)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            with self._lock:
                self._reserved -= size
            self._disable(f"write to {self.dir} failed: {e}")
            return
        with self._lock:
            self._reserved -= size
            self.index[block_hash] = size

    def _make_room(self, need: int) -> None:
        """Reserve ``need`` bytes, evicting the least recently used files past the capacity."""
        with self._room_lock:
            with self._lock:
                used = sum(self.index.values()) + self._reserved
                self._reserved += need
            if used + need <= self.capacity:
                return
            files = sorted(self.dir.glob("*" + SUFFIX), key=lambda f: f.stat().st_mtime)
            for f in files:
                if used + need <= self.capacity:
                    break
                try:
                    size = f.stat().st_size
                    f.unlink()
                except OSError:
                    continue
                used -= size
                with self._lock:
                    self.index.pop(bytes.fromhex(f.stem), None)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued writes are on disk."""
        self._writer.flush(timeout)

    # ---- maintenance ----------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"dir": str(self.dir), "enabled": self.enabled, "blocks": len(self.index),
                "bytes": sum(self.index.values()), "capacity_bytes": self.capacity,
                "corrupt_removed": self.num_corrupt, **self._writer.stats()}


def scan(directory: str | os.PathLike) -> dict:
    """Stats of a disk cache directory without loading a model (`tierserve cache stats`)."""
    d = Path(directory).expanduser()
    files = list(d.glob("*" + SUFFIX)) if d.is_dir() else []
    sizes = [f.stat().st_size for f in files]
    return {"dir": str(d), "exists": d.is_dir(), "blocks": len(files), "bytes": sum(sizes)}


def clear(directory: str | os.PathLike) -> int:
    d = Path(directory).expanduser()
    n = 0
    for f in list(d.glob("*" + SUFFIX)) + list(d.glob(".*.tmp")) if d.is_dir() else []:
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n
