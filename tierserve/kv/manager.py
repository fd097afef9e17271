"""KVManager: per-request page tables over one BlockPool, plus prefix caching.

The scheduler talks to this class only; it never sees page storage. A request's pages are listed in
order (page i holds tokens [i*page_size, (i+1)*page_size)). Attention may read any subset of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from tierserve.kv.block_pool import BlockPool
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.kv.fp8_split import CompactPool
from tierserve.kv.page_list import PageList
from tierserve.kv.prefix import hash_page
from tierserve.kv.spill_placement import SpillPlacement
from tierserve.kv.tiers.manager import TierHit, TierManager


@dataclass
class PrefixHit:
    pages: list[int] = field(default_factory=list)        # hits in the GPU pool
    hashes: list[bytes] = field(default_factory=list)
    tier_hits: list[TierHit] = field(default_factory=list)   # the chain continued in lower tiers

    @property
    def num_pages(self) -> int:
        return len(self.pages) + len(self.tier_hits)

    def tokens_by_tier(self, page_size: int) -> dict[str, int]:
        out = {"gpu": len(self.pages) * page_size} if self.pages else {}
        for h in self.tier_hits:
            out[h.source] = out.get(h.source, 0) + page_size
        return out


@dataclass
class _Table:
    pages: PageList = field(default_factory=PageList)      # a list of page ids; ``array()`` cached until it changes
    hashes: list[bytes] = field(default_factory=list)   # hashes of the leading full, registered pages
    computed: int = 0     # tokens whose K/V are written (pages below computed // page_size are complete)
    fp8_next: int = 0     # FP8 KV: first page index not yet considered for quantisation


class KVManager(SpillPlacement):
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 tiers: TierManager | None = None, fp8: Fp8PagePolicy | None = None,
                 compact_slots: int = 0) -> None:
        self.page_size = page_size
        self.fp8 = fp8                     # FP8 KV cache: which pages may be stored quantised
        self.quantised: set[int] = set()   # pages whose storage holds FP8 codes (see fp8_pages.py)
        self._to_quantise: list[int] = []
        self.pool = BlockPool(num_pages, enable_caching=enable_prefix_caching)
        # FP8 part 2: quantised pages move to compact slots (ids >= num_pages + 1, see fp8_split.py)
        self.compact = CompactPool(compact_slots, num_pages + 1, enable_prefix_caching) \
            if (fp8 is not None and compact_slots > 0) else None
        self.enable_prefix_caching = enable_prefix_caching
        self.tiers = tiers if (tiers is not None and tiers.enabled) else None
        # FP8 KV pages: the CPU tier holds spilled live pages only (compact FP8 rows); evicted prefix pages are
        # not demoted to it (a cached page would have to carry its precision: not done yet)
        if self.tiers is not None and enable_prefix_caching and fp8 is None:
            self.pool.on_evict = self.tiers.on_evict
        self._tables: dict[str, _Table] = {}
        # pids -> how often sparse attention chose each page (set by the engine when the runner counts)
        self.page_heat: Callable[[list[int]], list[float]] | None = None
        self.slot_heat: Callable[[list[int]], list[float]] | None = None     # the same for CPU-RAM slots
        # the k most chosen CPU-RAM slots as (slots, counts), from the device counts (no scan of the tables), and
        # the reset of released slots' counts (set with slot_heat; spill_placement.py)
        self.slot_top: Callable[[int], tuple[list[int], list[float]]] | None = None
        self.slot_clear: Callable[[list[int]], None] | None = None
        self._spilled_at: dict[int, tuple[_Table, int]] = {}    # spilled slot -> (table, index) holding it
        self.host_ram_slots = 0
        self.num_promoted = 0
        self.num_demoted = 0               # device pages spilled by demote_cold to make room for hotter ones
        self.hit_tokens = {"gpu": 0, "cpu": 0, "disk": 0, "remote": 0}   # prefix-cache tokens served per tier
        self.num_spilled = 0

    def record_hit(self, prefix: PrefixHit) -> None:
        for tier, n in prefix.tokens_by_tier(self.page_size).items():
            self.hit_tokens[tier] += n

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- prefix cache ---------------------------------------------------------------------------
    def find_prefix(self, token_ids: Sequence[int], max_tokens: int) -> PrefixHit:
        """Longest run of cached full pages covering at most ``max_tokens`` leading tokens."""
        hit = PrefixHit()
        if not self.enable_prefix_caching:
            return hit
        self.pool.queries += 1
        parent = None
        ps = self.page_size
        for i in range(max_tokens // ps):
            toks = tuple(token_ids[i * ps:(i + 1) * ps])
            h = hash_page(parent, toks)
            pid = self.pool.lookup(h, toks)
            if pid is None and self.compact is not None:
                pid = self.compact.lookup(h, toks)
            if pid is None:
                break
            hit.pages.append(pid)
            hit.hashes.append(h)
            parent = h
        if self.fp8 is not None:
            k = self.fp8.usable_hit(hit.pages, self.quantised)
            hit.pages, hit.hashes = hit.pages[:k], hit.hashes[:k]
            parent = hit.hashes[-1] if k else None
        if self.tiers is not None and len(hit.pages) < max_tokens // ps:
            hit.tier_hits = self.tiers.find(token_ids, ps, len(hit.pages), max_tokens // ps, parent)
        if hit.num_pages:
            self.pool.hits += 1
        return hit

    def prefetch(self, req_id: str, token_ids: Sequence[int], max_tokens: int) -> None:
        """A request waits: start reading the pages of its prefix that are not in the GPU pool from the
        disk/remote tiers in the background (tiers/prefetch.py); ``find_prefix`` then finds them in CPU RAM.
        Released when the request is admitted or freed."""
        if self.tiers is None or self.tiers.prefetcher is None or not self.enable_prefix_caching:
            return
        ps, parent, pages = self.page_size, None, []
        for i in range(max_tokens // ps):
            toks = tuple(token_ids[i * ps:(i + 1) * ps])
            parent = hash_page(parent, toks)
            if pages or self.pool.lookup(parent, toks) is None:      # after the leading GPU-pool hits
                pages.append((i, parent, toks))
        self.tiers.prefetch(req_id, pages)

    # ---- allocation -----------------------------------------------------------------------------
    def allocate(self, req_id: str, num_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Make ``req_id``'s table cover ``num_tokens`` tokens. All-or-nothing; False if no room."""
        table = self._tables.get(req_id)
        new_table = table is None
        if new_table:
            table = _Table()
        hit_pages = prefix.pages if (new_table and prefix) else []
        tier_hits = prefix.tier_hits if (new_table and prefix) else []
        need = self.pages_for(num_tokens) - len(table.pages) - len(hit_pages)   # tier hits need GPU pages too
        # hit pages that are evictable stop being free once acquired
        reclaim = sum(1 for p in hit_pages if not self._is_compact(p) and self.pool.meta[p].ref_count == 0)
        short = need - (self.pool.num_free - reclaim)
        if short > 0 and self._spill(short, exclude=set(hit_pages)) < short:
            return False
        if hit_pages:
            self.pool.acquire([p for p in hit_pages if not self._is_compact(p)])
            if self.compact is not None:
                self.compact.pool.acquire([self.compact.local(p) for p in hit_pages if self._is_compact(p)])
            table.pages.extend(hit_pages)
            table.hashes.extend(prefix.hashes)
        if need > 0:
            new = self.pool.allocate(need)
            self.quantised.difference_update(new)      # fresh pages are written at full precision
            for pid, th in zip(new, tier_hits):      # lower-tier hits: load into fresh pages this step
                self.pool.register(pid, th.block_hash, th.tokens)
                table.hashes.append(th.block_hash)
                self.tiers.schedule_onload(pid, th)
            table.pages.extend(new)
        self._tables[req_id] = table
        if new_table and self.tiers is not None:       # admitted: what it did not use is not needed
            self.tiers.prefetch_release(req_id)
        return True

    def commit(self, req_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Record progress; register the full pages among the first ``num_computed`` tokens for reuse."""
        table = self._tables[req_id]
        table.computed = num_computed
        if self.fp8 is not None:
            self._fp8_commit(table)
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        parent = table.hashes[-1] if table.hashes else None
        for i in range(len(table.hashes), num_computed // ps):
            toks = tuple(token_ids[i * ps:(i + 1) * ps])
            parent = hash_page(parent, toks)
            table.hashes.append(parent)
            if table.pages[i] < 0:          # spilled to CPU RAM: not shareable through the GPU index
                continue
            if self._is_compact(table.pages[i]):
                self.compact.pool.register(self.compact.local(table.pages[i]), parent, toks)
            elif self.pool.register(table.pages[i], parent, toks) and self.tiers is not None:
                self.tiers.on_register(table.pages[i], parent, toks)

    def fp8_commit_ahead(self, req_id: str, next_pos: int) -> None:
        """Queue the pages of ``req_id`` that no query at a position >= ``next_pos`` reads at full precision (the
        engine's multi-step windows: before queuing a window whose first query is at ``next_pos`` while the
        tokens of the window ahead of it are not read yet; every earlier read is queued before the conversion)."""
        if self.fp8 is not None:
            self._fp8_commit(self._tables[req_id], next_pos)

    def _fp8_commit(self, table: _Table, next_pos: int | None = None) -> None:
        """Queue the pages that left every holder's full-precision set for quantisation."""
        upto = table.computed if next_pos is None else max(next_pos, table.computed)
        i = max(table.fp8_next, -(-self.fp8.keep_sink // self.page_size))    # sink pages stay full
        while i < len(table.pages) and not self.fp8.needs_full(i, upto):
            pid = table.pages[i]
            if pid < 0 or pid in self.quantised:
                pass
            elif self.pool.meta[pid].ref_count > 1 and any(
                    t is not table and len(t.pages) > i and t.pages[i] == pid and self.fp8.needs_full(i, t.computed)
                    for t in self._tables.values()):
                pass                        # a sharer still reads it at full precision; it queues it later
            elif self.compact is not None:
                new = self.compact.move(self.pool, [t.pages for t in self._tables.values()], i, pid)
                if new is None:             # compact pool full: stays full precision, retried next commit
                    break
                self.quantised.add(new)
                self._to_quantise.append((pid, new))
            else:
                self.quantised.add(pid)
                self._to_quantise.append(pid)
            i += 1
        table.fp8_next = i

    def _is_compact(self, pid: int) -> bool:
        return self.compact is not None and self.compact.owns(pid)

    def _release(self, pids: list[int]) -> None:
        self.pool.release([p for p in pids if p >= 0 and not self._is_compact(p)])
        if self.compact is not None:
            self.compact.pool.release([self.compact.local(p) for p in pids if self._is_compact(p)])

    def take_quantise(self) -> list:
        """Pages the runner must convert to FP8 before the next step (each page once): page ids (in place,
        part 1) or (full-precision id, compact id) pairs (compact pool)."""
        out, self._to_quantise = self._to_quantise, []
        return out

    def free(self, req_id: str) -> None:
        if self.tiers is not None:                     # finished or aborted while waiting: drop its reads
            self.tiers.prefetch_release(req_id)
        table = self._tables.pop(req_id, None)
        if table is not None:
            self._release(table.pages)
            slots = [-p - 1 for p in table.pages if p < 0]
            for slot in slots:
                self.tiers.spill_release(slot)
                del self._spilled_at[slot]
            if slots and self.slot_clear is not None:
                self.slot_clear(slots)

    def page_table(self, req_id: str) -> list[int]:
        return self._tables[req_id].pages

    def has(self, req_id: str) -> bool:
        return req_id in self._tables

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    # ---- live sequences beyond the GPU pool --------------------------------------------------
    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs: dict[int, int] = {}
        spilled = 0
        for t in self._tables.values():
            for i, p in enumerate(t.pages):
                if p < 0:
                    at = self._spilled_at.get(-p - 1)
                    assert at is not None and at[0] is t and at[1] == i, (-p - 1, i, at)
                    spilled += 1
                    continue
                refs[p] = refs.get(p, 0) + 1
        assert spilled == len(self._spilled_at), (spilled, len(self._spilled_at))
        for pid, m in enumerate(self.pool.meta):
            assert m.ref_count == refs.get(pid, 0), (pid, m.ref_count, refs.get(pid, 0))
        if self.compact is not None:
            # the FP8 kernels read every id below the compact pool as full precision (stop 26's wrong fix broke it)
            assert all(self._is_compact(p) for p in self.quantised), "a full-size page quantised beside a compact pool"
            self.compact.pool.check_invariants()
            for i, m in enumerate(self.compact.pool.meta):
                pid = i + self.compact.base
                assert m.ref_count == refs.get(pid, 0), (pid, m.ref_count, refs.get(pid, 0))
                if m.ref_count or m.block_hash is not None:
                    assert pid in self.quantised, pid
            assert all(p < self.pool.num_pages or self._is_compact(p) for p in refs), "page id out of range"
