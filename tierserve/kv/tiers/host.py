"""Host tier: KV pages in (pinned, when CUDA exists) CPU RAM.

Three uses share one pool of slots: cached pages (content-addressed by page hash, LRU, evictable),
spilled pages of live sequences that do not fit on the GPU (reserved until their request ends) and
staged pages: disk/remote blocks read ahead by the prefetcher (prefetch.py) for a waiting request.
Accounting: free + cached + spilled + staged == total.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from tierserve.memory.pinned import PinnedBuffers


class HostTier:
    name = "cpu"

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"cpu_kv_gb holds no page (need {num_pages} >= 1)")
        # page-locked at its exact size (torch's pin_memory would round it up to a power of two)
        self._pinned = PinnedBuffers()
        self.data = self._pinned.empty((num_pages, *page_shape), dtype, "CPU KV tier")
        self.num_pages = num_pages
        self._index: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()
        self._free = list(range(num_pages - 1, -1, -1))
        self._spilled: set[int] = set()
        self._staged: set[int] = set()

    def lookup(self, block_hash: bytes, tokens: tuple[int, ...]) -> int | None:
        hit = self._index.get(block_hash)
        if hit is None or hit[1] != tokens:
            return None
        self._index.move_to_end(block_hash)
        return hit[0]

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def store(self, block_hash: bytes, tokens: tuple[int, ...], page: torch.Tensor) -> None:
        if block_hash in self._index:
            self._index.move_to_end(block_hash)
            return
        if self._free:
            slot = self._free.pop()
        else:
            _, (slot, _) = self._index.popitem(last=False)
        self.data[slot].copy_(page, non_blocking=False)
        self._index[block_hash] = (slot, tokens)

    def store_many(self, entries: list[tuple[bytes, tuple[int, ...]]], pages: torch.Tensor,
                   keep: set[int] = frozenset()) -> None:
        """Cache ``pages[i]`` under ``entries[i]`` with one copy; never evicts a slot in ``keep`` (CPU-RAM
        hits of the step still to be loaded) nor one filled by this call. Pages without room are skipped."""
        keep, rows, slots = set(keep), [], []
        for i, (h, toks) in enumerate(entries):
            if h in self._index:
                self._index.move_to_end(h)
                continue
            if self._free:
                slot = self._free.pop()
            else:
                victim = next((k for k, (s, _) in self._index.items() if s not in keep), None)
                if victim is None:
                    break
                slot = self._index.pop(victim)[0]
            keep.add(slot)
            self._index[h] = (slot, toks)
            rows.append(i)
            slots.append(slot)
        if rows:
            src = pages if len(rows) == len(pages) else pages.index_select(0, torch.tensor(rows))
            self.data.index_copy_(0, torch.tensor(slots), src.to(self.data.dtype))

    def reserve(self) -> int | None:
        """A slot for a spilled live page: a free one, else the least recently used cached one."""
        if self._free:
            slot = self._free.pop()
        elif self._index:
            _, (slot, _) = self._index.popitem(last=False)
        else:
            return None
        self._spilled.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._spilled.remove(slot)
        self._free.append(slot)

    def stage(self) -> int | None:
        """A free slot for a prefetched page (never evicts a cached one), or None."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._staged.add(slot)
        return slot

    def unstage(self, slot: int) -> None:
        self._staged.remove(slot)
        self._free.append(slot)

    @property
    def num_staged(self) -> int:
        return len(self._staged)

    @property
    def num_spilled(self) -> int:
        return len(self._spilled)

    def page(self, slot: int) -> torch.Tensor:
        return self.data[slot]

    @property
    def num_used(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        """Forget cached pages (spilled pages stay)."""
        self._free.extend(slot for slot, _ in self._index.values())
        self._index.clear()

    def check_invariants(self) -> None:
        assert len(self._index) + len(self._free) + len(self._spilled) + len(self._staged) == self.num_pages
        assert len({s for s, _ in self._index.values()} | set(self._free) | self._spilled | self._staged) \
            == self.num_pages
