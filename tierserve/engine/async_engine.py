"""AsyncEngine: one background asyncio task drives an ``Engine`` for many concurrent callers.

The ``Engine`` is not thread-safe. Only the loop task touches it: ``add``/``abort`` calls are queued and
applied by the loop *between* steps, and ``engine.step`` itself runs in a worker thread
(``asyncio.to_thread``) so the event loop keeps serving HTTP while the model computes. Every caller gets its
own stream of cumulative ``RequestOutput``s; a slow consumer sees only the newest one (outputs are
cumulative, so nothing is lost, and nothing piles up). Pure asyncio, no web dependencies.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from tierserve.engine.engine import Engine
from tierserve.engine.outputs import RequestOutput
from tierserve.sampling import SamplingParams

log = logging.getLogger("tierserve")


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or a step failed)."""


class StatsListener(Protocol):
    """Receives per-request timings (the server's Prometheus metrics implement this)."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_token(self, itl_s: float) -> None: ...
    def on_finished(self, reason: str, e2e_s: float) -> None: ...


@dataclass
class RequestStream:
    """Handle of one added request: hand it to ``AsyncEngine.stream``. It keeps the newest output even after
    the request finished, so a reader that starts late still gets it."""
    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    last: float | None = None                     # time of the latest output
    seen: int = 0                                 # tokens (longest sample) already reported
    latest: RequestOutput | None = None
    error: BaseException | None = None
    done: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncEngine:
    def __init__(self, engine: Engine, listener: StatsListener | None = None) -> None:
        self.engine = engine
        self.listener = listener
        self._streams: dict[str, RequestStream] = {}          # requests in flight
        self._ops: deque = deque()                    # ("add", id, prompt, params, future) | ("abort", id)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tierserve-engine-loop")

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    async def shutdown(self) -> None:
        """Abort whatever is still in flight, stop the loop and wait for it."""
        self._stopping = True
        for rid in list(self._streams):
            self.abort(rid)
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    # ---- requests -------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
                          ) -> RequestStream:
        """Queue a request; returns its handle once the loop has admitted it. The engine's ValueError (prompt
        too long, bad token ids, id in use) is raised here, before any output."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        fut = asyncio.get_running_loop().create_future()
        handle = self._streams[request_id] = RequestStream(request_id)
        self._ops.append(("add", request_id, prompt, params, fut))
        self._wake.set()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.abort(request_id)          # admitted, but the caller left before seeing it
            else:
                fut.cancel()                    # the loop skips a queued add whose future is done
                self._streams.pop(request_id, None)
            raise
        return handle

    async def stream(self, request: str | RequestStream) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of an added request (its handle, or its id while in flight) until it finishes.
        Leaving early (break, cancellation, client disconnect) aborts the request, which frees its pages at
        the next step boundary."""
        s = request if isinstance(request, RequestStream) else self._streams.get(request)
        if s is None:
            raise KeyError(request)
        request_id = s.request_id
        finished = False
        try:
            while True:
                await s.ready.wait()
                s.ready.clear()
                if s.error is not None:
                    raise s.error
                out, s.latest = s.latest, None
                if out is not None:
                    finished = out.finished
                    yield out
                    if finished:
                        return
                elif s.done:
                    raise EngineDeadError(f"request {request_id} was aborted")
        finally:
            if not finished and self._streams.get(request_id) is s:
                self.abort(request_id)

    async def generate(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        handle = await self.add_request(request_id, prompt, params)
        async for out in self.stream(handle):
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op for unknown or finished ones). Safe to call at any time."""
        s = self._streams.pop(request_id, None)
        if s is None:
            return
        s.done = True
        s.ready.set()
        self._ops.append(("abort", request_id))
        self._wake.set()
        if self.listener is not None:
            self.listener.on_finished("abort", time.monotonic() - s.arrival)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- the loop -------------------------------------------------------------------------------
    def _apply_ops(self) -> None:
        while self._ops:
            op = self._ops.popleft()
            if op[0] == "abort":
                try:
                    self.engine.abort_request(op[1])
                except Exception:  # noqa: BLE001 -- never let one abort stop the loop
                    log.exception("abort_request(%s) failed", op[1])
                continue
            _, rid, prompt, params, fut = op
            if fut.done():            # the caller gave up already
                continue
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # noqa: BLE001 -- bad input goes back to the caller
                fut.set_exception(e)
            else:
                fut.set_result(None)

    async def _run(self) -> None:
        while True:
            self._apply_ops()
            if self._stopping and not self._ops:
                return
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if not self._ops and not self._stopping:
                    await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # noqa: BLE001 -- fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:             # aborted while the step ran; its abort op is queued
                continue
            n = max((len(c.token_ids) for c in out.outputs), default=0)
            new, s.seen = n - s.seen, n
            if self.listener is not None:
                if s.last is None:
                    self.listener.on_first_token(now - s.arrival)
                    new -= 1
                # a multi-step output carries several tokens: each gets an equal share of the gap
                for _ in range(max(new, 0)):
                    self.listener.on_token((now - (s.last or now)) / new)
            s.last = now
            s.latest = out
            s.ready.set()
            if out.finished:
                del self._streams[out.request_id]
                if self.listener is not None:
                    reasons = [c.finish_reason or "abort" for c in out.outputs]
                    self.listener.on_finished(reasons[0], now - s.arrival)

    def _fail_all(self, err: BaseException) -> None:
        for rid, s in list(self._streams.items()):
            s.error = EngineDeadError(f"engine step failed: {err}")
            s.ready.set()
            self._streams.pop(rid, None)
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort after a failed step")
