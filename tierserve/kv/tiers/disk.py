"""Disk tier: one file per page under a directory, written asynchronously, verified on every read.

Files are named ``<hash hex>.kvp`` (the index is the directory itself, scanned at start). A write goes
to a unique temporary name and is renamed into place, so processes sharing a directory never see a
partial file. A block that fails verification (checksum, fingerprint, hash, tokens) is logged,
deleted and treated as a miss. A directory that cannot be written (read-only, disk full) disables
the tier with a warning; the engine carries on without it.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path

from tierserve.kv.tiers import codec, flush_at_exit

log = logging.getLogger("tierserve.kv.disk")
SUFFIX = ".kvp"


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
        self._queue: queue.Queue = queue.Queue()
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
        self._thread = threading.Thread(target=self._writer, name="tierserve-disk-kv", daemon=True)
        self._thread.start()
        flush_at_exit(self)

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("disk KV tier disabled: %s; continuing without it", why)
        self.enabled = False

    def _path(self, block_hash: bytes) -> Path:
        return self.dir / (block_hash.hex() + SUFFIX)

    def contains(self, block_hash: bytes) -> bool:
        return self.enabled and block_hash in self.index

    # ---- read -----------------------------------------------------------------------------------
    def read(self, block_hash: bytes, tokens: tuple[int, ...]) -> bytes | None:
        """The page payload, or None on a miss or a bad block (which is then removed)."""
        if not self.contains(block_hash):
            return None
        path = self._path(block_hash)
        try:
            blob = path.read_bytes()
        except OSError:
            with self._lock:
                self.index.pop(block_hash, None)
            return None
        try:
            payload = codec.decode(blob, self.fingerprint, block_hash, tokens)
        except codec.CorruptBlock as e:
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
    def write_async(self, block_hash: bytes, tokens: tuple[int, ...], payload: bytes) -> None:
        if self.enabled and block_hash not in self.index:
            self._queue.put((block_hash, tokens, payload))

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is not None and self.enabled:
                    self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, block_hash: bytes, tokens: tuple[int, ...], payload: bytes) -> None:
        blob = codec.encode(self.fingerprint, block_hash, tokens, payload)
        final = self._path(block_hash)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._make_room(len(blob))
            tmp.write_bytes(blob)
            os.replace(tmp, final)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._disable(f"write to {self.dir} failed: {e}")
            return
        with self._lock:
            self.index[block_hash] = len(blob)

    def _make_room(self, need: int) -> None:
        with self._lock:
            used = sum(self.index.values())
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
        if not self.enabled and self._queue.empty():
            return
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    # ---- maintenance ----------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"dir": str(self.dir), "enabled": self.enabled, "blocks": len(self.index),
                "bytes": sum(self.index.values()), "capacity_bytes": self.capacity,
                "corrupt_removed": self.num_corrupt}


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
