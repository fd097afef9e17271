"""Which KV pages may be stored in FP8 (bookkeeping only; the bytes are converted by the runner).

The read rule (``tierserve.quant.fp8_kv.fp8_read_mask``, page level): a query at position p reads page i
(positions i*ps .. last) at full precision iff ``i*ps < keep_sink`` or ``p - last < max(keep_recent, 1)``.
Page i is therefore still needed at full precision by some query at a position >= n iff the same holds
for p = n; once that is false for every live request holding the page, it can be quantised in storage
-- exactly when the next query starts reading it in FP8. A prefix-cache hit is used only
as far as every page the new request's first query reads at full precision is still full precision
(a cached page is reused in the precision it was stored in), so hits never change an output token.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp8PagePolicy:
    page_size: int
    keep_sink: int
    keep_recent: int

    def needs_full(self, page_index: int, next_pos: int) -> bool:
        """Is page ``page_index`` read at full precision by some query at a position >= ``next_pos``?"""
        ps = self.page_size
        last = (page_index + 1) * ps - 1
        return page_index * ps < self.keep_sink or next_pos - last < max(self.keep_recent, 1)

    def steps_to_crossing(self, q_pos: int) -> int:
        """Queries from ``q_pos`` until the next one (after it) that starts reading another page in FP8: a page
        ending at l is read in FP8 from query l + max(keep_recent, 1) on, one page every ``page_size`` positions.
        A multi-step window of at most this many steps starting at ``q_pos`` reads no page that becomes FP8
        inside it, so storage can convert every page the window reads in FP8 before it is queued."""
        ps, kr = self.page_size, max(self.keep_recent, 1)
        return (kr - 1 - q_pos) % ps or ps

    def usable_hit(self, pages: list[int], quantised: set[int]) -> int:
        """Number of leading hit pages usable: the first new query (at k*page_size) must find every
        page it reads at full precision still stored at full precision."""
        k = len(pages)
        while k > 0 and any(p in quantised and self.needs_full(i, k * self.page_size)
                            for i, p in enumerate(pages[:k])):
            k -= 1
        return k
