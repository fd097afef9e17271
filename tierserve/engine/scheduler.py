"""Scheduler: one rule -- a token budget per step; each request's computed tokens catch up to its total.

Running requests are served first (decodes and unfinished prefill chunks), then waiting ones are
admitted while budget, ``max_num_seqs`` and KV pages allow. When a running request cannot get a
page, the most recently admitted running request is preempted: its pages are released and it
restarts later by recompute (its full pages usually come back as prefix-cache hits).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tierserve.engine.request import Request, Status
from tierserve.kv.manager import KVManager, PrefixHit


@dataclass
class _StateHit(PrefixHit):
    """A prefix hit on a runner-held state snapshot: no pages to share, ``tokens`` on the device."""
    tokens: int = 0

    def tokens_by_tier(self, page_size: int) -> dict[str, int]:
        return {"gpu": self.tokens} if self.tokens else {}


@dataclass
class ScheduledRequest:
    request: Request
    start: int            # tokens already computed (first position of this chunk)
    num_tokens: int       # tokens computed in this step
    page_table: list[int]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so the next one is sampled."""
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVManager, max_num_batched_tokens: int, max_num_seqs: int,
                 state_prefix: Callable[[str, Sequence[int], int], int] | None = None) -> None:
        self.kv = kv
        # runners with per-request state instead of pages (DeepSeek-V4): (request id, token ids, max tokens)
        # -> tokens of a stored prefix the runner continues from; replaces the KV manager's page index
        self.state_prefix = state_prefix
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        if req.params.prompt_logprobs is None:      # as in schedule(): its prefix may be a hit, read it ahead
            self.kv.prefetch(req.request_id, req.all_token_ids, req.num_tokens - 1)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            want = min(req.num_tokens - req.num_computed_tokens, budget)
            n = self._fit(req, want)
            ok = True
            while not n:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    ok = False
                    break
                n = self._fit(req, want)
            if not ok:
                break
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n,
                                                  self.kv.page_table(req.request_id)))
            scheduled_ids.add(req.request_id)
            budget -= n
            i += 1
        if out.preempted:
            # drop entries for requests preempted after they were scheduled this step
            out.scheduled = [s for s in out.scheduled if s.request.status is Status.RUNNING]
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            prefix = None
            if req.num_computed_tokens == 0 and req.params.prompt_logprobs is None:
                # keep at least one token to compute so the request gets logits
                prefix = self._find_prefix(req)
            n = self._fit(req, min(req.num_tokens - req.num_computed_tokens, budget), prefix)
            if not n:
                req.num_computed_tokens = 0
                break
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = req.num_computed_tokens
                if prefix is not None:
                    req.cached_tokens_by_tier = prefix.tokens_by_tier(self.kv.page_size)
            if prefix is not None:
                self.kv.record_hit(prefix)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n,
                                                  self.kv.page_table(req.request_id)))
            budget -= n
        return out

    def _fit(self, req: Request, n: int, prefix: PrefixHit | None = None) -> int:
        """Allocate pages for a chunk of at most ``n`` tokens of ``req``; returns its size (0: no room). With
        KV tiers a chunk whose pages cannot all be on the GPU at once (the pool is smaller than the chunk, or
        held by other requests' pages that cannot spill) is halved until it fits: a prompt longer than the GPU
        pool is prefilled in chunks whose earlier pages spill, instead of waiting for room that never
        comes. Without tiers the chunk is all or nothing (running requests then preempt others)."""
        while n > 0:
            if self.kv.allocate(req.request_id, req.num_computed_tokens + n, prefix):
                return n
            if self.kv.tiers is None or n == 1:
                return 0
            n //= 2
        return 0

    def _find_prefix(self, req: Request) -> PrefixHit:
        """Set ``req.num_computed_tokens`` to its prefix-cache hit; returns the hit."""
        if self.state_prefix is None:
            prefix = self.kv.find_prefix(req.all_token_ids, req.num_tokens - 1)
            req.num_computed_tokens = prefix.num_pages * self.kv.page_size
            return prefix
        # the runner holds the state of those tokens; their pages are fresh (bookkeeping only), so the
        # hit carries no pages and is counted here
        n = self.state_prefix(req.request_id, req.all_token_ids, req.num_tokens - 1)
        req.num_computed_tokens = n
        self.kv.pool.queries += 1
        if n:
            self.kv.pool.hits += 1
        return _StateHit(tokens=n)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free its pages."""
        self.kv.free(req.request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
