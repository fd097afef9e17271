"""Timing pieces of `tierserve bench sparse-fp8` (sparse_fp8_run.py): the decode-step metadata capture and one
layer's attention call timed on a captured decode step."""
from __future__ import annotations

import time

import torch

from tierserve.bench.decode import _sync


class DecodeMetaCapture:
    """Keeps the AttnMetadata of the first pure decode step after ``armed`` is set (runner._prepare wrapped), or
    else of the first multi-step window queued after it (``extend_multi`` wrapped: a queue of windows over the
    tiers may run the whole decode without a new ``_prepare`` since the moves happen inside it)."""

    def __init__(self, runner) -> None:
        self.runner, self.meta, self.armed = runner, None, False
        self._saved = {k: runner.__dict__[k] for k in ("_prepare", "extend_multi") if k in runner.__dict__}
        orig, extend = runner._prepare, getattr(runner, "extend_multi", None)

        def prepare(so, *a, **kw):
            out = orig(so, *a, **kw)
            if self.armed and self.meta is None and out[0].decode_only:
                self.meta = out[0]
            return out
        runner._prepare = prepare
        if extend is not None:
            def extend_multi(window, *a, **kw):
                if self.armed and self.meta is None and window.meta.decode_only:
                    self.meta = window.meta
                return extend(window, *a, **kw)
            runner.extend_multi = extend_multi

    def close(self) -> None:
        for k in ("_prepare", "extend_multi"):
            self.runner.__dict__.pop(k, None)
        self.runner.__dict__.update(self._saved)


@torch.inference_mode()
def attention_ms(runner, meta, seconds: float = 0.2) -> tuple[float, str]:
    """ms of layer 0's attention call on a captured decode step (real pool, page table, tiers, flags), and how
    it was timed: on CUDA the call is captured in a CUDA graph and its replays timed with CUDA events
    ("graph": what a decode step through the engine's graphs pays; host launch time excluded); where it
    cannot be captured, or off CUDA, the host's wall time of eager calls ("eager": includes launch time,
    which dominates for the small kernels of a sparse step)."""
    attn, cfg, dev = runner.model.layers[0].self_attn, runner.model_cfg, runner.device
    q = torch.randn(meta.num_seqs, cfg.num_heads, cfg.head_dim, device=dev, dtype=runner.dtype)
    kv_new = torch.zeros(meta.num_seqs, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=runner.dtype)
    layer = runner.kv.layer(0)

    def call():
        attn.backend.forward(q, kv_new, kv_new, layer, meta, attn.scale, attn.window, 0, kv_written=True)
    call()
    _sync(dev)
    if dev.type == "cuda":
        ms = _graph_ms(call, dev)
        if ms is not None:
            return ms, "graph"
    t = time.perf_counter()
    call()
    _sync(dev)
    reps = max(3, min(50, int(seconds / max(time.perf_counter() - t, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        call()
    _sync(dev)
    return 1e3 * (time.perf_counter() - t) / reps, "eager"


def _graph_ms(call, dev: torch.device) -> float | None:
    """Median ms of CUDA-graph replays of ``call`` (None: it cannot be captured, e.g. it syncs the host)."""
    from tierserve.bench.gpu_timer import graph_time_us

    try:
        return graph_time_us(call, reps=1, runs=20) / 1e3
    except RuntimeError:
        torch.cuda.synchronize(dev)
        return None
