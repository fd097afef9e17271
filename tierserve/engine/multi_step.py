"""Engine side of multi-step greedy decode (``num_scheduler_steps``), pipelined.

While every running request is a plain greedy decode and nothing waits, the engine hands the runner a
window of k decode steps (runner/multi_step.py) and, before reading its tokens, queues the next window
of the same batch behind it; then it reads the first window and does the host work (stop checks,
detokenising, prefix-cache bookkeeping) while the GPU runs the second. A request that stops inside a
window still occupies its row of the window queued behind (those tokens are dropped; the pages it wrote
are freed with the request and only reused by work queued later on the same stream). The queue ends
when a request finishes, a request waits, or a budget (max_tokens, max_model_len) gets short.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

from tierserve.engine.outputs import RequestOutput
from tierserve.engine.scheduler import SchedulerOutput
from tierserve.runner import multi_step
from tierserve.runner.sampler import plain_greedy


# KV tiers: place pages (promote / demote) inside a queue of windows from a snapshot of the counts, where the moves
# need no host sync; TIERSERVE_MOVES_IN_QUEUE=0 ends the queue every ``rebalance_every`` steps instead (stop 23)
MOVES_IN_QUEUE = os.environ.get("TIERSERVE_MOVES_IN_QUEUE", "1") != "0"


@dataclass
class EngineWindow:
    so: SchedulerOutput
    bases: list[int]          # per request: tokens in the KV cache after the window's first step
    handle: object            # runner.multi_step.Window
    steps: int
    queued: int = 0           # steps of the windows queued back to back before this one


class MultiStepDecoder:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.inflight: EngineWindow | None = None
        self.steps_read = 0           # decode steps of the windows read since ``take_steps``

    def take_steps(self) -> int:
        """Decode steps since the last call: those of the windows read meanwhile, or 1 (one ordinary step)."""
        n, self.steps_read = self.steps_read, 0
        return max(n, 1)

    def plan(self, so: SchedulerOutput) -> int:
        """Steps this freshly scheduled batch can run back to back (1: one ordinary step). Allocates
        the pages of the extra positions."""
        e = self.engine
        k = e.config.num_scheduler_steps
        if k < 2 or e.scheduler.waiting or so.preempted or not e.runner.supports_multi_step() \
                or (e.kv.tiers is not None and not multi_step.TIERED):
            return 1
        for s in so.scheduled:
            req = s.request
            if s.num_tokens != 1 or not s.samples or not plain_greedy(req.params) or \
                    req.prompt_logprobs is not None:
                return 1
            k = min(k, self._room(req, 0))
        k = self._fp8_aligned(k, [s.end - 1 for s in so.scheduled])
        if k < 2 or not self._allocate(so, [s.end for s in so.scheduled], k):
            return 1
        return k

    def start(self, so: SchedulerOutput, k: int) -> list[RequestOutput]:
        bases = [s.end for s in so.scheduled]
        self._transfers()
        self._snapshot()
        self.inflight = EngineWindow(so, bases, self.engine.runner.launch_multi(so, k), k)
        return self.advance()

    def _transfers(self) -> None:
        """KV tiers: pages the window's allocation spilled leave the device before the window is queued (the
        transfers wait for the work queued before them)."""
        tiers = self.engine.kv.tiers
        if tiers is not None:
            self.engine.runner.tiers_apply(tiers.take_transfers())

    def advance(self) -> list[RequestOutput]:
        """Queue the next window behind the one in flight, then read the one in flight."""
        w = self.inflight
        self.inflight = self._extend(w)
        outputs = self._collect(w)
        if self.inflight is not None and all(s.request.is_finished for s in self.inflight.so.scheduled):
            self.inflight = None             # nothing left to read in it
        return outputs

    def _room(self, req, ahead: int) -> int:
        """Steps left for ``req`` after ``ahead`` steps not yet read: max_tokens and max_model_len."""
        e = self.engine
        return min(req.max_tokens - len(req.output_token_ids), e.max_model_len - req.num_tokens) - ahead

    def _allocate(self, so: SchedulerOutput, bases: list[int], k: int) -> bool:
        kv = self.engine.kv
        for s, base in zip(so.scheduled, bases):
            if not kv.allocate(s.request.request_id, base + k - 1):
                return False
            s.page_table = kv.page_table(s.request.request_id)
        return True

    def _extend(self, w: EngineWindow) -> EngineWindow | None:
        e = self.engine
        if e.scheduler.waiting or any(s.request.is_finished for s in w.so.scheduled):
            return None
        spill = self._placement()
        if spill is None:
            # KV tiers whose moves need a host sync: the queue ends after about ``rebalance_every`` steps, so that
            # the next step's start moves hot spilled pages back in (the engine rebalances between windows)
            if e.kv.tiers is not None and w.queued + w.steps >= max(e.kv.rebalance_every, 2 * w.steps):
                return None
        k = min([e.config.num_scheduler_steps] + [self._room(s.request, w.steps) for s in w.so.scheduled])
        bases = [b + w.steps for b in w.bases]
        first = [b - 1 for b in bases]               # each request's first query of the new window
        k = self._fp8_aligned(k, first)
        # placement decisions read the counts' last snapshot, not the device
        with spill.frozen() if spill is not None else nullcontext():
            if spill is not None:
                steps, self.steps_read = self.steps_read, 0
                e.kv.rebalance(len(e.scheduler.running), steps)
            ok = k >= 2 and self._allocate(w.so, bases, k)
        if not ok:
            if spill is not None:    # the moves chosen above happen now, as the tables say (no window follows)
                self._transfers()
            return None
        self._fp8_ahead(w.so, first)
        self._transfers()
        self._snapshot()
        handle = e.runner.extend_multi(w.handle, k, [s.page_table for s in w.so.scheduled])
        if handle is None:           # the tables hold a spilled page the window's path cannot read
            return None
        return EngineWindow(w.so, bases, handle, k, w.queued + w.steps)

    def _moves_in_queue(self):
        """The runner's ``SpillState`` where pages may move inside a queue of windows (KV tiers whose page moves
        queue with no host sync, ``moves_without_sync``), else None."""
        e = self.engine
        spill = getattr(e.runner, "spill", None)
        if e.kv.tiers is None or spill is None or not MOVES_IN_QUEUE \
                or not e.kv.tiers.moves_without_sync(e.runner.kv.data):
            return None
        return spill

    def _placement(self):
        """``_moves_in_queue``'s ``SpillState`` once it has a snapshot of the counts: its ``frozen`` counts are what
        the KV manager places pages by while windows stay queued (promotions, demotions and the allocation's spills
        go in the next window's transfers); else None."""
        spill = self._moves_in_queue()
        return spill if spill is not None and spill.has_snapshot else None

    def _snapshot(self) -> None:
        """Queue a host copy of the selection counts behind the transfers just queued (read by the next
        ``_extend``, by when the window in flight has been read: the copy has landed or is about to); only where
        pages may move inside the queue."""
        spill = self._moves_in_queue()
        if spill is not None:
            spill.snapshot()

    def _fp8_aligned(self, k: int, first_queries: list[int]) -> int:
        """FP8 KV: a window's steps, cut so that no page becomes FP8-read inside it after its first step, when the
        batch's requests cross page edges in step (batch 1): then ``_fp8_ahead`` stores every page the window
        reads in FP8 before it is queued, and the decode kernel never quantises a page on the fly (stop 20, H200:
        15 against 10.4 us a layer at 2k). Requests out of phase keep ``k`` (cutting would leave tiny windows)."""
        fp8 = self.engine.kv.fp8
        if fp8 is None:
            return k
        dist = {fp8.steps_to_crossing(q) for q in first_queries}
        return min(k, dist.pop()) if len(dist) == 1 else k

    def _fp8_ahead(self, so: SchedulerOutput, first_queries: list[int]) -> None:
        """FP8 KV: convert the pages the next window's first queries read in FP8 before queuing it (its requests'
        tokens of the window ahead are not read yet, so the engine's commits have not queued them)."""
        e = self.engine
        if e.kv.fp8 is None:
            return
        for s, q in zip(so.scheduled, first_queries):
            e.kv.fp8_commit_ahead(s.request.request_id, q)
        e.runner.fp8.quantise(e.runner.kv.data, e.kv.take_quantise())
        for s in so.scheduled:
            s.page_table = e.kv.page_table(s.request.request_id)

    def _collect(self, w: EngineWindow) -> list[RequestOutput]:
        e = self.engine
        tokens = e.runner.collect_multi(w.handle)
        self.steps_read += w.steps
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for s, base, row in zip(w.so.scheduled, w.bases, tokens):
            req = s.request
            if req.is_finished:              # stopped in an earlier window, or aborted meanwhile
                continue
            for i, tok in enumerate(row):
                e._accept(req, base + i, tok, None, now)
                if req.is_finished:
                    break
            e._emit(req, outputs)
        return outputs
