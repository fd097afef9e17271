"""Kernel timing on CUDA for the micro-benchmark scripts: ``reps`` calls captured in one CUDA graph (no launch
gaps), replayed ``runs`` times; the median per call in microseconds."""
from __future__ import annotations

import torch


def graph_time_us(fn, reps: int = 16, runs: int = 7) -> float:
    fn()                                         # compile / autotune outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]
