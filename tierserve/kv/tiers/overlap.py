"""CPU-RAM hit loads overlapped with the forward pass: a step's hit pages are copied into their GPU pages
layer by layer on a side CUDA stream, one event per layer, and layer i's attention waits for event i only
(``KVCache.layer(i)`` calls ``LayerReady.wait(i)``), so the copies of later layers run while earlier layers
compute. The copies are the same bytes into the same pages as the synchronous path (they are only
reordered), so outputs are bit-identical.

Layout: the KV storage is page-major ``[pages, layers, 2, rows, heads, dim]``, so layer i of one page is
one contiguous part of it (2 x rows x heads x dim elements, 64 KiB for Llama-3.1-8B's shape). A layer's
parts of every hit page are copied by one launch of the zero-copy gather (zero_copy.py: the kernel reads
pinned host memory itself, no staging and no CPU gather), so there are ``num_layers`` launches per step,
each of (pages x 64 KiB).

Safety: the side stream first waits for the compute stream (pages read out earlier in the step, before a
hit reuses them); the host slots being read must not be rewritten until the copies are done, so the tier
manager settles a load (host sync on its last event) before anything may write host slots again: at the
start of the next ``apply``, in ``flush`` and before staged (prefetched) slots are freed. Whatever layer the
model did not wait for is waited for at the end of the forward pass (``KVCache.settle``), so CUDA graphs
and any later reader see the pages whole.

``Streams`` wraps the CUDA calls; ``DeferredStreams`` is the CPU stand-in the tests use: work "on the side
stream" is queued and runs only when an event recorded after it is waited for, so a layer read before its
wait sees stale pages and the outputs differ.
"""
from __future__ import annotations

from typing import Callable

import torch


class Streams:
    """The side stream of one device and the calls a load needs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    def begin(self) -> None:
        self.side.wait_stream(torch.cuda.current_stream(self.device))

    def launch(self, fn: Callable[[], None]) -> None:
        with torch.cuda.stream(self.side):
            fn()

    def record(self, timing: bool = False):
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self.side)
        return ev

    def wait(self, ev) -> None:
        torch.cuda.current_stream(self.device).wait_event(ev)

    def sync(self, ev) -> None:
        ev.synchronize()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3


class DeferredStreams:
    """CPU stand-in for tests: launched work is queued until an event after it is waited for."""

    def __init__(self) -> None:
        self.queue: list[Callable[[], None]] = []
        self.done = 0
        self.waits: list[int] = []          # queue positions waited for, in order

    def begin(self) -> None:
        pass

    def launch(self, fn: Callable[[], None]) -> None:
        self.queue.append(fn)

    def record(self, timing: bool = False) -> int:
        return len(self.queue)

    def wait(self, ev: int) -> None:
        self.waits.append(ev)
        while self.done < ev:
            self.queue[self.done]()
            self.done += 1

    sync = wait

    def elapsed(self, a, b) -> float:
        return 0.0


class LayerReady:
    """Readiness of the KV storage's layers while a load runs on the side stream. Events are recorded in
    layer order on one stream, so event i done means layers 0..i are."""

    def __init__(self, streams, events: list, start, end, pages: int) -> None:
        self.streams, self.events, self.start, self.end, self.pages = streams, events, start, end, pages
        self.waited = -1                    # highest layer the compute stream waits for
        self.settled = False

    def wait(self, i: int) -> None:
        """The compute stream waits for layer ``i``'s copies (called before the layer reads its KV)."""
        if i > self.waited:
            self.streams.wait(self.events[min(i, len(self.events) - 1)])
            self.waited = i

    def wait_all(self) -> None:
        self.wait(len(self.events) - 1)

    def settle(self) -> float:
        """Host waits until every copy is done (its host slots may be rewritten after this); the copy
        time in seconds (side-stream events)."""
        self.streams.sync(self.end)
        self.settled = True
        return self.streams.elapsed(self.start, self.end)


def load_layers(streams, num_layers: int, copy_layer: Callable[[int], None], pages: int = 0) -> LayerReady:
    """Issue ``copy_layer(i)`` for every layer on the side stream, after the compute stream's work so far
    (pages read out earlier in the step), an event after each."""
    streams.begin()
    start = streams.record(timing=True)
    events = []
    for i in range(num_layers):
        streams.launch(lambda i=i: copy_layer(i))
        events.append(streams.record())
    return LayerReady(streams, events, start, streams.record(timing=True), pages)
