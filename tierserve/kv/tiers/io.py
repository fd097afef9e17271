"""Bulk page I/O of the tier manager: bounded device -> host read-outs, the shared reader pool, payload
copies into staging memory and the asynchronous writer (byte-bounded backlog) of the disk tier.

- ``read_out``: pages leaving the device pool are gathered and copied to the host in groups of at most
  ``GROUP_BYTES`` (one gather, one non-blocking copy into fresh pinned memory and one sync per group on
  CUDA; on the CPU the gather is the copy), never as one temporary of the whole set.
- ``read_pool``: disk/remote hits of one request are read and verified on ``READ_WORKERS`` threads
  (file reads and the CRC-32 release the GIL); ``read_chain`` keeps them all busy.
- ``warm_up``: the one-time costs of the first hit (Triton compile and check of the zero-copy gather,
  the first pinned staging group, the reader threads) paid at engine start.
- ``AsyncWriter``: persisted pages are handed over as CPU tensors; the bytes view, encoding, checksum and
  file write happen on its threads. At most ``MAX_QUEUED_BYTES`` wait: past that a page is not persisted
  (one warning, counted) rather than blocking the engine or exhausting RAM.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

log = logging.getLogger("tierserve")

GROUP_BYTES = 256 << 20          # largest device temporary / host staging buffer of one transfer group
READ_WORKERS = min(16, max(2, os.cpu_count() or 2))  # threads reading + verifying disk/remote hits
WRITE_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))   # disk writers; a core stays with the engine
MAX_QUEUED_BYTES = 2 << 30       # persisted pages waiting for a writer, beyond which pages are dropped

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def group_pages(page_bytes: int) -> int:
    return max(1, GROUP_BYTES // max(1, page_bytes))


def read_out(kv_data: torch.Tensor, pids: list[int], page_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset into ``pids``, CPU copy of those pages) group by group. Each group's tensor is fresh
    (pinned on CUDA), so it may be handed to writer threads."""
    dev = kv_data.device
    n = group_pages(page_bytes)
    for start in range(0, len(pids), n):
        idx = torch.tensor(pids[start:start + n], device=dev)
        if dev.type == "cuda":
            buf = torch.empty((len(idx), *kv_data.shape[1:]), dtype=kv_data.dtype, pin_memory=True)
            buf.copy_(kv_data.index_select(0, idx), non_blocking=True)
            torch.cuda.current_stream(dev).synchronize()
        else:
            buf = kv_data.index_select(0, idx).to("cpu")
        yield start, buf


def offload(entries: list, kv_data: torch.Tensor, page_bytes: int, host, keep: set[int], writers: list) -> None:
    """Read out ``entries`` ((GPU page, hash, tokens, to CPU RAM, persist)) group by group: into the host
    tier (``host.store_many``, sparing slots in ``keep``) and / or to each writer's ``write_async`` as CPU
    tensors. Persisted pages come first, so that groups held by the writers hold no CPU-RAM-only page."""
    todo = sorted(entries, key=lambda o: not o[4])
    for at, pages in read_out(kv_data, [o[0] for o in todo], page_bytes):
        grp = todo[at:at + len(pages)]
        rows = [i for i, o in enumerate(grp) if o[3]]
        if host is not None and rows:
            sel = pages if len(rows) == len(grp) else pages[torch.tensor(rows)]
            host.store_many([grp[i][1:3] for i in rows], sel, keep)
        for i, (_, h, toks, _, persist) in enumerate(grp):
            for w in writers if persist else ():
                w.write_async(h, toks, pages[i])


def spill(pairs: list[tuple[int, int]], kv_data: torch.Tensor, store: torch.Tensor) -> None:
    """Live pages (GPU page, row of ``store``) -> ``store`` (CPU RAM or the spill file), group by group."""
    page_bytes = kv_data[0].numel() * kv_data.element_size()
    for at, pages in read_out(kv_data, [p for p, _ in pairs], page_bytes):
        store[torch.tensor([s for _, s in pairs[at:at + len(pages)]])] = pages


def read_chain(read: Callable, hits: list, ks: list[int], keep_going: Callable | None = None,
               every: int = 64) -> tuple[int | None, dict[str, int], float]:
    """Read ``hits[k]`` for k in ``ks`` (ascending) on the read pool, all submitted at once (no barrier
    between windows, so every reader stays busy); ``read(hash, tokens)`` -> (tier, payload, s) | None.
    Fill their source and payload up to the first miss, whose later reads are cancelled (or, if already
    running, left to finish and be dropped). Every ``every`` pages ``keep_going(bytes read, pages left,
    seconds)`` may stop the chain there (the same as a miss). Returns (first missed / stopped k or None,
    bytes read per tier, wall seconds until the pages kept were read)."""
    t0 = time.perf_counter()
    if len(ks) > 1:
        pool = read_pool()
        futs = [pool.submit(read, hits[k].block_hash, hits[k].tokens) for k in ks]
    else:
        futs = None
    nbytes: dict[str, int] = {}
    for j, k in enumerate(ks):
        g = futs[j].result() if futs is not None else read(hits[k].block_hash, hits[k].tokens)
        stop = g is None or (keep_going is not None and j and j % every == 0
                             and not keep_going(sum(nbytes.values()), len(ks) - j, time.perf_counter() - t0))
        if stop:
            for f in futs[j:] if futs is not None else ():
                f.cancel()
            return k, nbytes, time.perf_counter() - t0
        hits[k].source, hits[k].payload = g[0], g[1]
        nbytes[g[0]] = nbytes.get(g[0], 0) + len(g[1])
    return None, nbytes, time.perf_counter() - t0


def from_host(host_data: torch.Tensor, slots: list[int], pids: list[int], kv_data: torch.Tensor) -> None:
    """Host rows ``slots`` -> device pages ``pids`` through (pinned) staging, group by group."""
    dev = kv_data.device
    pin = dev.type == "cuda"
    n = group_pages(kv_data[0].numel() * kv_data.element_size())
    for at in range(0, len(slots), n):
        idx = torch.tensor(slots[at:at + n])
        staging = torch.empty((len(idx), *kv_data.shape[1:]), dtype=kv_data.dtype, pin_memory=pin)
        torch.index_select(host_data, 0, idx, out=staging)
        kv_data[torch.tensor(pids[at:at + n], device=dev)] = staging.to(dev, non_blocking=pin)


def gather_zero_copy(host_data: torch.Tensor, slots: torch.Tensor, pids: torch.Tensor, kv_data: torch.Tensor,
                     check: bool) -> bool:
    """CPU-RAM pages read by a GPU kernel straight from pinned memory (zero_copy.py); with ``check`` the
    first page is compared with the host copy. False (with a warning) on any failure."""
    try:
        from tierserve.kv.tiers.zero_copy import gather_pages

        s, p = slots.cpu(), pids.to(kv_data.device)
        gather_pages(host_data, s.to(kv_data.device), kv_data, p)
        if check and not torch.equal(kv_data[p[:1]].cpu().view(torch.uint8), host_data[s[:1]].view(torch.uint8)):
            raise RuntimeError("gathered page differs from the host page")
        return True
    except Exception as e:        # no Triton, or pinned memory the device cannot address
        log.warning("zero-copy read of CPU-RAM KV pages is off (%s: %s); using a staging copy",
                    type(e).__name__, e)
        return False


def warm_up(host_data: torch.Tensor | None, page_shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> bool | None:
    """Pay the first hit's one-time costs now: start the reader threads and, on CUDA, cache one pinned
    staging group in torch's host allocator and compile + check the zero-copy gather on a scratch page
    (same kernel specialisation as the pool's pages). Returns whether zero-copy works (None: no CPU tier
    or not CUDA)."""
    read_pool()
    if device.type != "cuda":
        return None
    torch.empty(GROUP_BYTES, dtype=torch.uint8, pin_memory=True)      # freed into the host allocator's cache
    if host_data is None:
        return None
    scratch = torch.empty((1, *page_shape), dtype=dtype, device=device)
    ok = gather_zero_copy(host_data, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64, device=device),
                          scratch, check=True)
    if ok and len(page_shape) > 1:       # the per-layer variant of the overlapped loads (overlap.py)
        try:
            from tierserve.kv.tiers.zero_copy import gather_pages

            idx = torch.zeros(1, dtype=torch.int64, device=device)
            gather_pages(host_data, idx, scratch, idx, layer=0)
        except Exception as e:
            log.warning("per-layer zero-copy gather failed to build (%s: %s)", type(e).__name__, e)
    torch.cuda.current_stream(device).synchronize()
    return ok


def read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="tierserve-kv-read")
        return _pool


def load_payloads(kv_data: torch.Tensor, pids: list[int], payloads: list) -> None:
    """Verified payloads (bytes-like) -> device pages ``pids``, in groups of at most GROUP_BYTES. On CUDA
    each group is copied (on the read pool) into one pinned staging tensor, then to the device in one copy;
    on the CPU straight into the pages."""
    dev = kv_data.device
    pin = dev.type == "cuda"
    n = group_pages(kv_data[0].numel() * kv_data.element_size())
    for at in range(0, len(pids), n):
        grp = payloads[at:at + n]
        idx = torch.tensor(pids[at:at + n])
        dst = torch.empty((len(grp), *kv_data.shape[1:]), dtype=kv_data.dtype, pin_memory=pin) \
            if dev.type != "cpu" else None
        rows = dst.view(len(grp), -1) if dst is not None else kv_data.view(kv_data.shape[0], -1)
        flat = rows.view(torch.uint8).numpy()
        where = list(range(len(grp))) if dst is not None else idx.tolist()

        def put(i: int) -> None:
            flat[where[i]] = np.frombuffer(grp[i], dtype=np.uint8)
        list(read_pool().map(put, range(len(grp)))) if len(grp) > 1 else put(0)
        if dst is not None:
            kv_data[idx.to(dev)] = dst.to(dev, non_blocking=pin)
    if pin and pids:
        torch.cuda.current_stream(dev).synchronize()


class AsyncWriter:
    """Writer threads over one queue, bounded in queued bytes; ``write(*args)`` runs on them."""

    def __init__(self, name: str, write: Callable[..., None], workers: int = WRITE_WORKERS) -> None:
        self.name, self._write, self.workers = name, write, workers
        self.max_bytes = MAX_QUEUED_BYTES
        self.queued_bytes = 0
        self.num_dropped = 0
        self._warned = False
        self._keys: set = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    def submit(self, key, nbytes: int, *args) -> bool:
        """Queue a write; False (and not queued) when the backlog would pass ``max_bytes``."""
        with self._lock:
            if key in self._keys:
                return True
            if self.queued_bytes + nbytes > self.max_bytes:
                self.num_dropped += 1
                warn, self._warned = not self._warned, True
            else:
                warn = None
                self.queued_bytes += nbytes
                self._keys.add(key)
        if warn is not None:
            if warn:
                log.warning("%s KV writer is %.1f GiB behind; pages are not persisted until it catches up "
                            "(counted in stats: write_dropped)", self.name, self.queued_bytes / 2**30)
            return False
        if not self._threads:
            for i in range(self.workers):
                t = threading.Thread(target=self._run, name=f"tierserve-{self.name}-kv-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        self._queue.put((key, nbytes, args))
        return True

    def _run(self) -> None:
        while True:
            key, nbytes, args = self._queue.get()
            try:
                self._write(*args)
            except Exception as e:          # a failed write loses one cached page, never the engine
                log.warning("%s KV write failed (%s: %s)", self.name, type(e).__name__, e)
            finally:
                with self._lock:
                    self.queued_bytes -= nbytes
                    self._keys.discard(key)
                self._queue.task_done()

    def queued(self, key) -> bool:
        return key in self._keys

    def flush(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def stats(self) -> dict:
        return {"write_queued_bytes": self.queued_bytes, "write_dropped": self.num_dropped}
