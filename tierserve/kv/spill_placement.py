"""Where the live pages of running requests sit when the GPU pool is too small for them (KV tiers): spilling
complete pages to CPU RAM / the disk spill file, and -- with sparse attention's selection counts -- promoting
the most chosen spilled pages back and demoting the least chosen device pages to make room for them.
``SpillPlacement`` is a mixin of ``KVManager`` (kv/manager.py), whose tables, pool and tier manager it uses."""
from __future__ import annotations

import os

import numpy as np


def _rebalance_every() -> int:
    v = os.environ.get("TIERSERVE_REBALANCE_EVERY", "64")
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"TIERSERVE_REBALANCE_EVERY must be an integer >= 0, got {v!r}") from None
    if n < 0:
        raise ValueError(f"TIERSERVE_REBALANCE_EVERY must be an integer >= 0, got {v!r}")
    return n


class SpillPlacement:
    # sparse attention over tiers: every this many steps, device pages chosen far less often than spilled
    # ones make room for them (``demote_cold``; 0: off). With multi-step windows over the tiers a queue of windows
    # ends (the GPU drains) about this often, so that the engine can rebalance: ``TIERSERVE_REBALANCE_EVERY``
    # trades placement freshness against those drains (64 by default since stop 25: 128k FP8 KV + FP8 weights on the
    # H200, moves inside the queue every 16 / 64 steps 126.3 / 129.7 tok/s against 127.9 moving nothing; bf16 pages,
    # whose queue drains: 84.1 / 87.3 / 91.8; benchmarks/results/stop25/)
    rebalance_every = _rebalance_every()
    _rebalance_steps = 0

    def rebalance(self, num_running: int, steps: int = 1) -> None:
        """Start of an engine step, with sparse selection counts: promote the most chosen spilled pages into
        free GPU pages (keeping two per running request, at least 4, free for their next tokens) and, every
        ``rebalance_every`` decode steps, demote device pages chosen far less often than spilled ones. ``steps``:
        the decode steps since the last call (a queue of multi-step windows runs several between two calls)."""
        if self.slot_heat is None:
            return
        reserve = max(2 * num_running, 4)
        self.promote_hot(reserve=reserve)
        before = self._rebalance_steps
        self._rebalance_steps += max(steps, 1)
        every = self.rebalance_every
        if every and before // every != self._rebalance_steps // every:
            self.demote_cold(reserve)

    def _spill(self, n: int, exclude: set[int]) -> int:
        """Move up to ``n`` complete, unshared pages of live requests to CPU RAM (then to the disk spill
        file); returns how many.

        Page-table entries of spilled pages become ``-(slot + 1)``; the copy happens at the start of
        the next step (before the freed GPU page can be overwritten). The last page of a table and
        pages not yet fully computed are never spilled. With ``page_heat`` (how often sparse attention
        chose each page, kept by the runner) the least chosen pages go first; otherwise the oldest."""
        if self.tiers is None or not self.tiers.spill_capacity:
            return 0
        cands = [(t, i, pid) for t, i, pid in self._spillable() if pid not in exclude]
        if self.page_heat is not None and len(cands) > n:
            heat = self.page_heat([pid for _, _, pid in cands])
            order = sorted(range(len(cands)), key=lambda j: heat[j])      # stable: oldest first on ties
            cands = [cands[j] for j in order]
        done = 0
        for t, i, pid in cands[:n]:
            slot = self.tiers.spill_reserve()
            if slot is None:
                return done
            self.tiers.schedule_spill(pid, slot)
            self._release([pid])
            t.pages[i] = -(slot + 1)
            self._spilled_at[slot] = (t, i)
            self.num_spilled += 1
            done += 1
        return done

    def _spillable(self):
        """(table, index, page id) of the device pages that may spill: complete, not a table's last page,
        unshared. With FP8 KV pages only pages every later query reads in FP8 (``Fp8PagePolicy.needs_full``
        false: past the sink and the recent window) -- already quantised in place, or quantised on the way down
        (the runner's ``Fp8Pages.host_rows``; compact storage: full-size pages the full compact pool could not
        take); spilled pages live in CPU RAM as compact rows. Compact slots do not spill (they free no
        full-size page; ``demote_cold`` is off with compact storage)."""
        fp8, ps, meta = self.fp8, self.page_size, self.pool.meta
        base = self.compact.base if self.compact is not None else None
        for t in self._tables.values():
            n = min(t.computed // ps, len(t.pages) - 1)
            arr = t.pages.array()[:n]
            keep = arr >= 0                   # device entries only (at 1M tokens with 10% on the device, a tenth)
            if base is not None:
                keep &= arr < base            # compact slots do not spill
            if fp8 is not None:               # past the sink and the recent window (``Fp8PagePolicy.needs_full``)
                idx = np.arange(n)
                keep &= (idx * ps >= fp8.keep_sink) & (t.computed - ((idx + 1) * ps - 1) >= max(fp8.keep_recent, 1))
            idx = np.flatnonzero(keep)
            for i, pid in zip(idx.tolist(), arr[idx].tolist()):
                if meta[pid].ref_count == 1:  # unshared
                    yield t, i, pid

    def _promote_target(self) -> int | None:
        """A free page for a promoted spilled page: a device page, or with compact FP8 storage a compact slot
        (FP8 pages never come back into full-size pages there)."""
        if self.compact is not None:
            if self.compact.pool.num_free < 1:
                return None
            pid = self.compact.pool.allocate(1)[0] + self.compact.base
        else:
            pid = self.pool.allocate(1)[0]
        if self.fp8 is not None:
            self.quantised.add(pid)
        return pid

    def promote_hot(self, reserve: int) -> int:
        """Bring the most chosen spilled pages (CPU RAM) back into free GPU pages, keeping ``reserve``
        pages free. Call at the start of a step, before scheduling (no spill is pending then); the copy
        runs first thing in the next transfer batch, so the released slot may be reused at once."""
        if self.slot_heat is None or self.tiers is None or not self.tiers.host.num_spilled:
            return 0
        budget = self.pool.num_free - reserve if self.compact is None else self.compact.pool.num_free - reserve
        if budget <= 0:
            return 0
        done = 0
        for slot, _ in self._hottest(budget):
            pid = self._promote_target()
            if pid is None:
                break
            t, i = self._spilled_at.pop(slot)
            self.tiers.schedule_unspill(slot, pid)
            self.tiers.spill_release(slot)
            t.pages[i] = pid
            self.num_promoted += 1
            done += 1
        return done

    def _hottest(self, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (slot, count) of spilled CPU-RAM slots chosen at least once, the most chosen first: from the
        device's top counts (``slot_top``: O(k) here, whatever the context length; a released slot's count is
        reset, and stale slots are skipped) or else by reading every spilled slot's count."""
        ram = self.host_ram_slots
        if self.slot_top is not None:
            want = k
            while True:
                slots, heat = self.slot_top(min(want, ram))
                out = [(s, h) for s, h in zip(slots, heat) if h > 0 and s in self._spilled_at][:k]
                if len(out) == k or want >= ram or (heat and heat[-1] <= 0):
                    return out
                want *= 4
        cands = [s for s in self._spilled_at if s < ram]
        heat = self.slot_heat(cands) if cands else []
        order = sorted((j for j in range(len(cands)) if heat[j] > 0), key=lambda j: -heat[j])[:k]
        return [(cands[j], heat[j]) for j in order]

    def demote_cold(self, reserve: int, limit: int = 64) -> int:
        """Make room for spilled pages that sparse attention chooses more often than pages on the GPU: pair the
        hottest CPU-RAM pages with the least chosen device pages (both in order) and, for the pairs where the
        spilled page's count is more than twice the device page's plus one (so pages do not bounce back and
        forth), spill that many least chosen device pages -- plus what keeps ``reserve`` pages free -- so that
        the next ``promote_hot`` brings the hot ones in. At most ``limit`` pairs. Two host syncs (the counts);
        the engine calls it every few steps. Returns the pages spilled."""
        if self.slot_heat is None or self.page_heat is None or self.tiers is None or not self.tiers.host.num_spilled \
                or self.compact is not None:       # compact FP8 storage: hot pages come back into compact slots
            return 0
        dev = [pid for _, _, pid in self._spillable()]
        hot = [h for _, h in self._hottest(limit)]        # counts > 0 only: a zero never beats 2 x cold + 1
        if not hot or not dev:
            return 0
        cold = sorted(self.page_heat(dev))[:limit]
        pairs = 0
        while pairs < min(len(hot), len(cold)) and hot[pairs] > 2 * cold[pairs] + 1:
            pairs += 1
        if not pairs:
            return 0
        done = self._spill(pairs + max(0, reserve - self.pool.num_free), exclude=set())
        self.num_demoted += done
        return done
