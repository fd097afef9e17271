"""BlockPool: owns the KV pages of one tier -- ref counts, free list, prefix-cache index.

Page accounting invariant (checked by ``check_invariants``):
    free + cached_evictable + in_use == total
where ``free`` pages hold nothing reusable, ``cached_evictable`` pages have ref count 0 but keep a
prefix hash (reusable until evicted, least recently released first) and ``in_use`` pages have
ref count >= 1. Page ids are stable; the tensor storage for them lives in ``kv.layout``.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable


@dataclass
class PageMeta:
    ref_count: int = 0
    block_hash: bytes | None = None
    tokens: tuple[int, ...] | None = None   # tokens of the page, compared on every prefix hit


class NoFreePages(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_pages: int, enable_caching: bool = True) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.enable_caching = enable_caching
        self.meta = [PageMeta() for _ in range(num_pages)]
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # LRU order: first = oldest
        self._by_hash: dict[bytes, int] = {}
        self.num_in_use = 0
        self.hits = 0
        self.queries = 0
        # called with (page_id, block_hash, tokens) just before a cached page is evicted for reuse
        self.on_evict: Callable[[int, bytes, tuple[int, ...]], None] | None = None

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_evictable(self) -> int:
        return len(self._evictable)

    def usage(self) -> float:
        return self.num_in_use / self.num_pages

    # ---- allocation -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreePages(f"asked for {n} pages, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                pid = self._free.popleft()
            else:
                pid, _ = self._evictable.popitem(last=False)
                if self.on_evict is not None:
                    m = self.meta[pid]
                    self.on_evict(pid, m.block_hash, m.tokens)
                self._drop_hash(pid)
            m = self.meta[pid]
            m.ref_count = 1
            out.append(pid)
        self.num_in_use += n
        return out

    def acquire(self, pids: list[int]) -> None:
        """Take one more reference on pages (prefix hits)."""
        for pid in pids:
            m = self.meta[pid]
            if m.ref_count == 0:
                self._evictable.pop(pid)
                self.num_in_use += 1
            m.ref_count += 1

    def release(self, pids: list[int]) -> None:
        """Drop one reference. Released in reverse so a sequence's tail pages are evicted first."""
        for pid in reversed(pids):
            m = self.meta[pid]
            if m.ref_count <= 0:
                raise RuntimeError(f"page {pid} released more often than acquired")
            m.ref_count -= 1
            if m.ref_count == 0:
                self.num_in_use -= 1
                if m.block_hash is not None:
                    self._evictable[pid] = None
                else:
                    self._free.append(pid)

    # ---- prefix cache ---------------------------------------------------------------------------
    def lookup(self, block_hash: bytes, tokens: tuple[int, ...]) -> int | None:
        pid = self._by_hash.get(block_hash)
        if pid is None or self.meta[pid].tokens != tokens:
            return None
        return pid

    def register(self, pid: int, block_hash: bytes, tokens: tuple[int, ...]) -> bool:
        """Mark a full, computed page as reusable under ``block_hash``; True if newly registered."""
        if not self.enable_caching or block_hash in self._by_hash:
            return False
        m = self.meta[pid]
        if m.block_hash is not None:
            return False
        m.block_hash, m.tokens = block_hash, tokens
        self._by_hash[block_hash] = pid
        return True

    def _drop_hash(self, pid: int) -> None:
        m = self.meta[pid]
        if m.block_hash is not None:
            self._by_hash.pop(m.block_hash, None)
            m.block_hash = m.tokens = None

    def clear_cache(self, demote: bool = False) -> int:
        """Forget every evictable cached page (``demote``: hand each to ``on_evict`` first, i.e. move it
        to the tier below); returns how many were dropped."""
        n = len(self._evictable)
        while self._evictable:
            pid, _ = self._evictable.popitem(last=False)
            if demote and self.on_evict is not None:
                m = self.meta[pid]
                self.on_evict(pid, m.block_hash, m.tokens)
            self._drop_hash(pid)
            self._free.append(pid)
        return n

    # ---- invariants -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        in_use = sum(1 for m in self.meta if m.ref_count > 0)
        assert in_use == self.num_in_use, (in_use, self.num_in_use)
        assert len(self._free) + len(self._evictable) + in_use == self.num_pages, (
            len(self._free), len(self._evictable), in_use, self.num_pages)
        assert all(self.meta[p].ref_count == 0 and self.meta[p].block_hash is None for p in self._free)
        assert all(self.meta[p].ref_count == 0 and self.meta[p].block_hash is not None for p in self._evictable)
        for h, pid in self._by_hash.items():
            assert self.meta[pid].block_hash == h
