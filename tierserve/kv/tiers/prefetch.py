"""Prefetch: a waiting request's prefix pages are read from the disk / remote tiers in the background.

When a request is added, ``KVManager.prefetch`` lists the pages of its prompt that neither the GPU pool
nor CPU RAM holds, and ``Prefetcher.submit`` reads them on a small thread pool (one job per page,
verified exactly as the synchronous path verifies them: ``TierManager._read_lower`` is the one reader,
so a corrupt block is warned about, removed and treated as a miss there). A page lands in a free slot of
the host tier (pinned when CUDA exists; staged slots never evict cached pages and take at most
``host_share`` of the tier; a live page that must spill and finds no room takes one back, its page then
moving to a buffer), else in a plain ``bytes`` buffer. Pages held are bounded by ``max_bytes``; pages
past the budget are left to the synchronous path.

At admission ``TierManager._find_one`` asks ``get`` for each page of the chain:
- read finished: served from the prefetched copy (only a host -> device copy is left);
- read running: waited for (one page read, which the synchronous path would pay anyway);
- read still queued: taken over (cancelled in the pool, read synchronously by the engine thread), so
  the engine thread reads alongside the pool, in chain order, instead of waiting behind the queue.
- read missed or failed: the synchronous path decides (a removed corrupt block is then a plain miss).
Pages are keyed by page hash, so requests sharing a prefix share one read. ``claim`` hands a served
page's host slot to the step's transfers (freed after the copy); ``release`` drops what a request no
longer needs (admitted, finished, aborted); reads still running then are reaped once they end.

Everything here except ``_work`` runs on the engine thread; the host tier is only touched from it,
apart from a worker filling the slot it was given.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import thread as _cf_thread
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("tierserve")


@dataclass
class Fetched:
    source: str                    # "disk" | "remote"
    seconds: float                 # read + verify time (feeds the tier's bandwidth estimate)
    payload: bytes | memoryview | None = None   # None: the page is in the host slot the read was given


@dataclass
class _Page:
    tokens: tuple[int, ...]
    future: Future
    slot: int | None
    owners: set[str] = field(default_factory=set)


class _Chain:
    """Pages after a miss cannot be part of a hit: a submission's later reads skip once one misses."""
    __slots__ = ("miss_at",)

    def __init__(self) -> None:
        self.miss_at: int | None = None


class Prefetcher:
    def __init__(self, read: Callable[[bytes, tuple[int, ...]], tuple[str, bytes, float] | None],
                 page_bytes: int, host=None, workers: int = 4, max_bytes: int = 1 << 30,
                 host_share: float = 0.25) -> None:
        self._read = read
        self.host = host
        self.max_pages = max(1, max_bytes // page_bytes)
        self.max_slots = int(host.num_pages * host_share) if host is not None else 0
        self.workers = workers
        self._exec: ThreadPoolExecutor | None = None      # started on first use
        self._pages: dict[bytes, _Page] = {}
        self._reqs: dict[str, list[bytes]] = {}
        self._orphans: list[_Page] = []                    # released while their read was running
        self.num_slots = 0                                 # host slots held by _pages and _orphans
        self.counts = {"submitted": 0, "hits": 0, "misses": 0, "waited": 0, "dropped": 0}
        self.wait_s = 0.0

    @property
    def num_pages(self) -> int:
        return len(self._pages) + len(self._orphans)

    # ---- engine thread --------------------------------------------------------------------------
    def submit(self, key: str, pages: list[tuple[int, bytes, tuple[int, ...]]]) -> None:
        """Start reading ``pages`` ((index in the prompt, page hash, tokens), in prompt order) for ``key``."""
        self.reap()
        chain, mine = _Chain(), self._reqs.setdefault(key, [])
        for i, h, toks in pages:
            p = self._pages.get(h)
            if p is None:
                if self.num_pages >= self.max_pages:
                    break
                slot = None
                if self.host is not None and self.num_slots < self.max_slots:
                    slot = self.host.stage()
                    if slot is not None:
                        self.num_slots += 1
                if self._exec is None:
                    self._exec = ThreadPoolExecutor(self.workers, thread_name_prefix="tierserve-kv-prefetch")
                p = self._pages[h] = _Page(toks, self._exec.submit(self._work, chain, i, h, toks, slot), slot)
                self.counts["submitted"] += 1
            if key not in p.owners:
                p.owners.add(key)
                mine.append(h)

    def get(self, h: bytes, toks: tuple[int, ...]) -> Fetched | None:
        """Whether page ``h`` has a prefetched copy (None: read it synchronously); ``claim`` takes it."""
        p = self._pages.get(h)
        if p is None or p.tokens != toks:
            return None
        if not p.future.done():
            if p.future.cancel():          # still queued: the caller reads it now, as without prefetch
                self._drop(h)
                return None
            t0 = time.perf_counter()       # running: one page read, which a synchronous read would pay too
            wait([p.future])
            self.wait_s += time.perf_counter() - t0
            self.counts["waited"] += 1
        try:
            res = p.future.result()
        except Exception as e:             # an unexpected failure in the reader: the synchronous path decides
            log.warning("KV prefetch of block %s failed (%s: %s)", h.hex(), type(e).__name__, e)
            res = None
        if res is None:
            self._drop(h)
        return res

    def claim(self, h: bytes) -> tuple[Fetched, int | None]:
        """Page ``h`` (found by ``get``) is served: forget it; its host slot, if it has one, now belongs
        to the step's transfers, which unstage it once copied."""
        p = self._pages.pop(h)
        self.counts["hits"] += 1
        if p.slot is not None:
            self.num_slots -= 1
        return p.future.result(), p.slot

    def give_back_slot(self) -> bool:
        """Live pages need CPU RAM: move one finished page from its host slot into a plain buffer."""
        for p in self._pages.values():
            if p.slot is not None and p.future.done():
                res = None if p.future.cancelled() or p.future.exception() else p.future.result()
                if res is not None:
                    res.payload = self.host.data[p.slot].view(-1).view(torch.uint8).numpy().tobytes()
                self._free(p)
                p.slot = None
                return True
        return False

    def release(self, key: str) -> None:
        """``key`` no longer needs its prefetched pages (admitted, finished or aborted)."""
        for h in self._reqs.pop(key, ()):
            p = self._pages.get(h)
            if p is not None:
                p.owners.discard(key)
                if not p.owners:
                    self.counts["dropped"] += 1
                    self._drop(h)

    def _drop(self, h: bytes) -> None:
        p = self._pages.pop(h)
        p.future.cancel()
        if p.future.done():
            self._free(p)
        else:
            self._orphans.append(p)

    def _free(self, p: _Page) -> None:
        if p.slot is not None:
            self.host.unstage(p.slot)
            self.num_slots -= 1

    def reap(self) -> None:
        """Free the host slots of released reads that have ended."""
        if self._orphans:
            for p in [p for p in self._orphans if p.future.done()]:
                self._orphans.remove(p)
                self._free(p)

    def drain(self, timeout: float | None = 30.0) -> None:
        """Wait until every read has ended (tests, ``TierManager.flush``); pages stay available."""
        futures = [p.future for p in [*self._pages.values(), *self._orphans]]
        if futures:
            wait(futures, timeout=timeout)
        self.reap()

    def stats(self) -> dict:
        return {**self.counts, "wait_s": self.wait_s, "pages_held": self.num_pages, "host_slots": self.num_slots}

    def check_invariants(self, in_transit: int = 0) -> None:
        if self.host is not None:
            assert self.host.num_staged == self.num_slots + in_transit, (self.host.num_staged, self.num_slots)
        assert all(p.owners for p in self._pages.values())

    # ---- prefetch threads -------------------------------------------------------------------------
    def _work(self, chain: _Chain, i: int, h: bytes, toks: tuple[int, ...], slot: int | None) -> Fetched | None:
        if chain.miss_at is not None and i > chain.miss_at:
            return None                    # an earlier page of this prompt missed: never part of a hit
        if getattr(_cf_thread, "_shutdown", False):
            return None                    # the interpreter exits: the pool drains its queue, skip the reads
        got = self._read(h, toks)
        if got is None:
            if chain.miss_at is None or i < chain.miss_at:
                chain.miss_at = i
            return None
        source, payload, seconds = got
        if slot is None:
            return Fetched(source, seconds, payload)
        dst = self.host.data[slot].view(-1).view(torch.uint8).numpy()
        dst[:] = np.frombuffer(payload, dtype=np.uint8)        # straight from the read buffer, one copy
        return Fetched(source, seconds)
