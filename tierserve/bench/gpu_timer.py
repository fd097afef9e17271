"""Kernel timing on CUDA for the micro-benchmark scripts: ``reps`` calls captured in one CUDA graph (no launch
gaps), replayed ``runs`` times; the median per call in microseconds."""
from __future__ import annotations

import torch


def cuda_or_interpreter(smoke: bool) -> bool:
    """For a micro-benchmark script: True on a CUDA GPU; else, with ``smoke`` (tiny sizes to check the script),
    False and Triton kernels run in its CPU interpreter; else exit with a message."""
    import os
    import sys

    if torch.cuda.is_available():
        return True
    if not smoke:
        sys.exit("needs a CUDA GPU (or --smoke)")
    os.environ["TRITON_INTERPRET"] = "1"
    return False


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


def device_kernels(prof, kinds: list[tuple[str, tuple[str, ...]]], per: float = 1.0) -> tuple[list[dict], dict]:
    """A finished ``torch.profiler`` run's device kernels: ([{kernel, kind, us, calls}] by time, descending;
    {kind: us}), times and call counts divided by ``per`` (e.g. the steps profiled). ``kinds``: (kind, name
    substrings) in order of precedence; a kernel matching none is "other"."""
    rows: dict[str, dict] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        low = ev.name.lower()
        kind = next((k for k, keys in kinds if any(s in low for s in keys)), "other")
        r = rows.setdefault(ev.name, {"kernel": ev.name[:120], "kind": kind, "us": 0.0, "calls": 0.0})
        r["us"] += ev.time_range.elapsed_us() / per          # a kernel event's interval on the device
        r["calls"] += 1 / per
    out = sorted(rows.values(), key=lambda r: -r["us"])
    by_kind: dict[str, float] = {}
    for r in out:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["us"]
    return out, dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
