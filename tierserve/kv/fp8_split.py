"""FP8 KV part 2: a compact pool beside the full-precision pool (bookkeeping only; bytes: runner/kv_fp8.py).

Page ids ``[0, num_full)`` are full-precision slots (the ``BlockPool`` the scheduler allocates from), id
``num_full`` is the runner's scratch page, and ids ``[base, base + num_compact)`` are compact FP8 slots
(``base = num_full + 1``). Quantising a page moves it: a compact slot is taken, every table holding the
page (all at the same index: a shared page is a shared prefix), its ref count and its prefix-cache hash
move to it, and the full-precision slot is freed at once (the runner copies before anything can write
it: the copy runs at the end of the step, before the next step's writes). KV tiers (refused with FP8
for now) would spill a compact slot as its ``slot_bytes`` rows -- half the bytes of a bf16 page.
"""
from __future__ import annotations

from tierserve.kv.block_pool import BlockPool


class CompactPool:
    def __init__(self, num_slots: int, base: int, enable_caching: bool) -> None:
        self.base = base
        self.pool = BlockPool(num_slots, enable_caching=enable_caching)

    def owns(self, pid: int) -> bool:
        return pid >= self.base

    def local(self, pid: int) -> int:
        return pid - self.base

    def lookup(self, block_hash: bytes, tokens: tuple[int, ...]) -> int | None:
        i = self.pool.lookup(block_hash, tokens)
        return None if i is None else i + self.base

    def adopt(self, full: BlockPool, pid: int) -> int | None:
        """Move full-precision page ``pid`` (in use) to a compact slot; returns the new id, or None if
        the compact pool is full (the page then stays full precision: it reads the same numbers)."""
        if self.pool.num_free < 1:
            return None
        m = full.meta[pid]
        ref, block_hash, tokens = m.ref_count, m.block_hash, m.tokens
        if block_hash is not None:
            full._by_hash.pop(block_hash, None)
            m.block_hash = m.tokens = None
        m.ref_count = 1                     # the last reference: release() frees the slot
        full.release([pid])
        slot = self.pool.allocate(1)[0]
        self.pool.meta[slot].ref_count = ref
        if block_hash is not None:
            self.pool.register(slot, block_hash, tokens)
        return slot + self.base


    def move(self, full: BlockPool, tables: list[list[int]], i: int, pid: int) -> int | None:
        """``adopt`` page ``pid`` (index ``i`` of every table holding it: sharing is by prefix) and point
        those tables at the new id; None if the compact pool is full."""
        new = self.adopt(full, pid)
        if new is not None:
            for pages in tables:
                if len(pages) > i and pages[i] == pid:
                    pages[i] = new
        return new


def split_pages(budget_bytes: float, full_page_bytes: int, compact_page_bytes: int, page_size: int,
                max_num_seqs: int, max_batched_tokens: int, keep_sink: int, keep_recent: int) -> tuple[int, int]:
    """(full-precision pages, compact pages) for a memory budget.

    Full-precision slots cover what is read at full precision at once: per running request its sink
    pages, its recent window plus the page straddling it and the page being written, plus one chunk of
    prefill (whose pages are written at full precision before they can move). The rest is compact. A
    budget below that rule keeps at least one chunk plus one request's worth in full precision."""
    def cdiv(a, b):
        return -(-a // b)
    per_seq = cdiv(keep_sink, page_size) + cdiv(keep_recent, page_size) + 2
    chunk = cdiv(max_batched_tokens, page_size)
    want = max_num_seqs * per_seq + chunk
    fit = int(budget_bytes // full_page_bytes)
    n_full = want if want <= fit else min(fit, max(per_seq + chunk, fit // 2))
    n_full = max(1, n_full)
    rest = budget_bytes - n_full * full_page_bytes
    return n_full, max(0, int(rest // compact_page_bytes))
