"""Slots and CUDA graphs of the DeepSeek-V4 decode step for the StatefulRunner.

``SlotDecoder`` keeps the decode state of up to ``slots`` requests in a ``StaticState`` (fixed device
buffers, ``models/deepseek_v4/static_state.py``) and runs ``decode_static`` on rows ``0..n-1``: with
``use_graphs`` (CUDA, ``enforce_eager`` off) as a CUDA graph captured once per batch-size bucket
(``cuda_graphs.buckets``; padding rows run on free slots and write only to the scratch page) and
context limit (``context_limits``: the step reads the entries of the smallest limit that holds its
longest row), else eagerly (the CPU tests run exactly this code). The graph also takes the greedy token
on the device (``next_tokens``).

With ``num_pages`` the compressed entries and indexer keys live in page pools of that many pages
(``models/deepseek_v4/paged_state.py``) addressed by the engine's page ids: a request's page table
(``KVManager.page_table``) is copied into its slot's row of ``StaticState.page_table`` when it joins and
extended in place (the new page ids only, before the step) as the KV manager hands it pages; a slot that
is freed points at the scratch page. Without ``num_pages`` the state owns a pool of ``max_len`` tokens
per slot (tests, and the runner's fallback shapes).

Bookkeeping, all on the host: the requests in slots occupy ``0..n-1``; a request joins at slot ``n``
(``admit``: its ``SequenceState`` is copied in, the entries into its pages), one that leaves (``evict``:
finished, preempted, a chunk that needs the per-request path, or not decoding this step) is optionally
exported back to a ``SequenceState`` and the last slot is moved into its place (its page-table row; pages
stay where they are), so a steady batch never moves anything. A batch's rows are ordered by slot; ``step``
maps them back to the caller's order.
"""
from __future__ import annotations

import logging

import torch

from tierserve.models.deepseek_v4.paged_state import PagePools
from tierserve.models.deepseek_v4.static_decode import decode_static
from tierserve.models.deepseek_v4.static_state import StaticState
from tierserve.runner.cuda_graphs import buckets, collected_then_no_gc
from tierserve.runner.sampler import argmax_rows

log = logging.getLogger("tierserve")


def context_limits(max_len: int, first: int = 4096, factor: int = 8) -> list[int]:
    """The decode step's context buckets: ``first``, ``first * factor``, ... below ``max_len``, then
    ``max_len``. A step reads the entries of the smallest limit that holds its longest row."""
    out, lim = [], first
    while lim < max_len:
        out.append(lim)
        lim *= factor
    return out + [max_len]


class InSlot:
    """Stands in the runner's ``states`` dict for a request whose state lives in a slot."""

    def __init__(self, dec: SlotDecoder, rid: str) -> None:
        self.dec, self.rid = dec, rid

    @property
    def num_tokens(self) -> int:
        return self.dec.ntok[self.dec.slot_of[self.rid]]

    def nbytes(self) -> int:
        """Bytes the equivalent ``SequenceState`` would hold (the slot itself is preallocated)."""
        return self.dec.state.bytes_for(self.num_tokens)


class SlotDecoder:
    def __init__(self, model, slots: int, max_len: int, device: torch.device, use_graphs: bool,
                 num_pages: int | None = None, page_size: int = 16, limits=None) -> None:
        self.model, self.slots, self.device, self.max_len = model, slots, device, max_len
        # context limits (one graph each per batch bucket): a step reads max_tokens // m entries per row
        self.limits = sorted({min(x, max_len) for x in (limits or context_limits(max_len))} | {max_len})
        self.steps_by_limit = dict.fromkeys(self.limits, 0)
        pools = None if num_pages is None else PagePools(model, num_pages, page_size, device)
        self.state = StaticState(model, slots, max_len, pools, page_size)
        self.npages = [0] * slots      # page-table entries of each slot's row that hold the request's pages
        self.ids = torch.zeros(slots, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.int64, device=device)
        self.slot_of: dict[str, int] = {}
        self.rid_at: list[str | None] = [None] * slots
        self.ntok = [0] * slots
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}      # (batch bucket, limit) ->
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.steps = 0                 # decode steps run
        self.replays = 0               # ... of them through a graph
        if use_graphs:
            self.capture()

    @property
    def uses_graphs(self) -> bool:
        return bool(self.graphs)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens (after the step) fits the buffers."""
        return num_tokens <= self.state.max_len

    # ---- slots ----------------------------------------------------------------------------------
    @property
    def paged(self) -> bool:
        """Whether the entries live in the engine's pages (else in the state's own pool)."""
        return not self.state.owned

    def admit(self, rid: str, st, pages: list[int] | None = None) -> None:
        s = len(self.slot_of)
        self.state.load(s, st, pages if self.paged else None)
        self.slot_of[rid], self.rid_at[s], self.ntok[s] = s, rid, st.num_tokens
        self.npages[s] = len(pages) if self.paged else 0

    def set_pages(self, rid: str, pages: list[int]) -> None:
        """The request's page table grew: write the new page ids into its slot's row."""
        s = self.slot_of[rid]
        if self.paged and len(pages) > self.npages[s]:
            self.state.set_pages(s, pages, self.npages[s])
            self.npages[s] = len(pages)

    def export(self, rid: str):
        s = self.slot_of[rid]
        return self.state.export(s, self.ntok[s])

    def evict(self, rid: str, export: bool = True):
        """Take ``rid`` out of its slot; returns its ``SequenceState`` (``export``) or None."""
        st = self.export(rid) if export else None
        s = self.slot_of.pop(rid)
        last = len(self.slot_of)
        if s != last:
            self.state.move(last, s)
            moved = self.rid_at[last]
            self.slot_of[moved], self.rid_at[s], self.ntok[s] = s, moved, self.ntok[last]
            self.npages[s] = self.npages[last]
        self.state.clear(last)
        self.rid_at[last], self.npages[last] = None, 0
        return st

    # ---- one step -------------------------------------------------------------------------------
    def _forward(self, n: int, limit: int) -> torch.Tensor:
        logits = decode_static(self.model, self.state, self.ids[:n],
                               max_tokens=None if limit >= self.max_len else limit)
        self.next_tokens[:n].copy_(argmax_rows(logits))
        return logits.float()

    @torch.inference_mode()
    def capture(self) -> None:
        with collected_then_no_gc():
            self._capture()

    def _capture(self) -> None:
        pool = None
        saved = self.state.positions.clone()
        for lim in reversed(self.limits):
            for bs in reversed(buckets(self.slots)):
                for _ in range(2):        # warm up (Triton compile, cuBLAS handles) outside the graph
                    self._forward(bs, lim)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.logits[bs, lim] = self._forward(bs, lim)
                pool = g.pool() if pool is None else pool
                self.graphs[bs, lim] = g
        self.state.positions.copy_(saved)        # warm-up and capture ran on the (empty) slots
        torch.cuda.synchronize(self.device)
        log.info("DeepSeek-V4 decode: CUDA graphs captured for batch sizes %s x context limits %s",
                 buckets(self.slots), self.limits)

    def time_replay(self, bs: int = 1, reps: int = 20) -> float | None:
        """Milliseconds per replay of the bucket-``bs`` graph alone (no host work between replays), on free
        slots; None without graphs or while a request holds a slot."""
        if not self.graphs or self.slot_of:
            return None
        b = next(b for b in buckets(self.slots) if b >= bs)
        g = self.graphs[b, self.limits[-1]]                 # the whole max_len
        g.replay()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        self.state.positions.zero_()
        return start.elapsed_time(end) / reps

    def _run(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        need = max(self.ntok[:n]) + 1                       # the longest row after this step
        lim = next((x for x in self.limits if x >= need), self.limits[-1])
        self.steps_by_limit[lim] += 1
        if self.graphs:
            b = next(b for b in buckets(self.slots) if b >= n)
            self.graphs[b, lim].replay()
            self.replays += 1
            return self.logits[b, lim][:n], self.next_tokens[:n]
        return self._forward(n, lim), self.next_tokens[:n]

    def decode(self, states: dict, rids: list[str], ids: torch.Tensor,
               tables: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` for the runner: first the requests in slots that are not in ``rids`` go back to
        ``SequenceState``s in ``states``, those of ``rids`` not in a slot yet join (``states[rid]``
        becomes ``InSlot``); ``tables[i]``: the page table of ``rids[i]`` (needed when ``paged``)."""
        if self.paged and tables is None:
            raise ValueError("SlotDecoder.decode: paged slots need the requests' page tables")
        for rid in set(self.slot_of) - set(rids):
            states[rid] = self.evict(rid)
        for i, rid in enumerate(rids):
            pages = tables[i] if tables is not None else None
            if not isinstance(states[rid], InSlot):
                self.admit(rid, states[rid], pages)
                states[rid] = InSlot(self, rid)
            elif pages is not None:
                self.set_pages(rid, pages)
        return self.step(rids, ids)

    def step(self, rids: list[str], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``ids[i]`` for each request ``rids[i]`` (exactly the requests in slots); returns
        logits ``[n, V]`` (fp32) and greedy tokens ``[n]`` in the order of ``rids``."""
        n = len(rids)
        if n != len(self.slot_of) or any(r not in self.slot_of for r in rids):
            raise RuntimeError("SlotDecoder.step: the batch must be exactly the requests in slots")
        slots = [self.slot_of[r] for r in rids]
        order = None if slots == list(range(n)) else torch.tensor(slots, device=self.device)
        if order is None:
            self.ids[:n].copy_(ids)
        else:
            self.ids.index_copy_(0, order, ids)
        logits, greedy = self._run(n)
        for s in slots:
            self.ntok[s] += 1
        return (logits, greedy) if order is None else (logits[order], greedy[order])
