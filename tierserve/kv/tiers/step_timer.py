"""Time engine steps for the recompute cost model (cost.py) without a host sync.

A prefill chunk that samples nothing returns to the host as soon as its kernels are queued, so the host's wall
time of such a step is its launch time, and the final chunk of a long prompt absorbs the GPU time of all the
queued ones (measured on the H200: the cost model then priced a 128k recompute at 5.4 s against 18.3 s
measured, and chose recompute over a 12.9 s disk load). On CUDA each step is bracketed by two CUDA events on
the compute stream; the step's GPU time is read once its end event has completed (polled at later steps, never
waited for). Elsewhere the host's wall time is the step's time (the CPU runs synchronously).
"""
from __future__ import annotations

import time
from collections import deque

import torch

MAX_PENDING = 64          # steps in flight whose time is not known yet (older ones are dropped)


class StepTimer:
    def __init__(self) -> None:
        self._start = None
        self._cuda: torch.device | None = None
        self._pending: deque = deque()

    def start(self, device: torch.device | str | None) -> None:
        """A step begins on ``device`` (the runner's compute device)."""
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
            self._cuda = dev
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(dev))
        else:
            self._cuda, self._start = None, time.perf_counter()

    def stop(self, info, keep: bool = True) -> list[tuple[float, object]]:
        """The step has been issued (``start`` not called for it: it is not timed); ``info`` rides along with its time (``keep`` False: not timed). Returns
        ``(seconds, info)`` of every kept step whose time is known now, oldest first."""
        start, self._start = self._start, None
        if start is None:               # not timed: earlier steps' times may have arrived meanwhile
            return self.ready()
        if self._cuda is None:
            return [(time.perf_counter() - start, info)] if keep else []
        if keep:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self._cuda))
            self._pending.append((start, end, info))
            while len(self._pending) > MAX_PENDING:
                self._pending.popleft()
        return self.ready()

    def ready(self) -> list[tuple[float, object]]:
        """Times of the kept steps that have completed on the device (no wait)."""
        out = []
        while self._pending and self._pending[0][1].query():
            start, end, info = self._pending.popleft()
            out.append((start.elapsed_time(end) / 1e3, info))
        return out
