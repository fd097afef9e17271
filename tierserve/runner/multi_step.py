"""Multi-step greedy decode windows: ``k`` decode steps back to back on the device, each step's argmax
fed to the next, with one host sync per window -- and windows that can be queued before the previous
one is read, so the host's bookkeeping overlaps the GPU's work.

``launch`` starts a window for a pure-decode batch whose page tables cover its ``k`` positions;
``extend`` queues the next window of the same batch right behind it (new page tables, the inputs are
already on the device: the CUDA graph feeds its own static buffers, the eager path keeps the advanced
metadata); ``collect`` waits for one window only (its tokens are copied to host memory on the stream
right after its last step, before anything queued later) and returns its tokens ``[request][step]``.

With KV tiers (default; ``TIERSERVE_TIERED_MULTI_STEP=0`` turns it off): windows may also read pages
spilled to CPU RAM (the spill CUDA graphs, or the eager path with the spill stores); a window whose next tables
hold a page the window's path cannot read (a spilled page in a window that started with none, or one in the disk
spill file under the spill graphs) is not queued (``extend`` returns None) and the engine goes on step by step.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.runner.engram_state import history_rows
from tierserve.runner.sampler import argmax_rows
from tierserve.runner.step_inputs import host_id_base, kernel_table, page_array

# default since stop 23 (H200, section c, FP8 KV + FP8 weights, the warm-up's queued window untimed): 128k 120.3 and
# 118.4 tok/s with windows against 116.6 and 110.0 step by step (two runs), 1M 61.3 against 60.5 (stop 22).
# TIERSERVE_TIERED_MULTI_STEP=0 goes step by step over the tiers.
TIERED = os.environ.get("TIERSERVE_TIERED_MULTI_STEP", "1") == "1"


@dataclass
class Window:
    tokens: torch.Tensor                 # [B, k] on the device
    host: torch.Tensor                   # [B, k] on the host (pinned on CUDA), filled asynchronously
    done: torch.cuda.Event | None        # recorded right after the copy to ``host``
    steps: int
    graph: bool                          # replayed through the CUDA graphs (static inputs)
    meta: AttnMetadata                   # eager path: inputs of the step after the window
    ids: torch.Tensor                    # eager path: the last step's tokens
    spill: bool = False                  # replayed through the spill graphs (tables may hold spilled pages)


def launch(runner, so, steps: int) -> Window:
    meta, ids, _, _ = runner._prepare(so, lookahead=steps - 1)
    kind = runner._graph_kind(meta, None)
    graph = kind == "plain" or (kind == "spill" and TIERED)     # else eager (also over spilled pages)
    if runner.device_engram is not None:          # Engram rows are hashed on the device from this history
        runner.device_engram.load(meta.num_seqs, history_rows(so, runner.model_cfg.engram.lookback),
                                  runner.graphs.bucket_for(meta.num_seqs) if graph else None)
    if graph:
        runner.graphs.load(meta.num_seqs, ids, meta.positions, meta.slot_pages, meta.slot_offsets,
                           meta.seq_lens, meta.page_table)
    return _run(runner, meta, ids, steps, graph, meta.page_table, spill=graph and kind == "spill")


def extend(runner, w: Window, steps: int, tables: list[list[int]]) -> Window | None:
    """The next ``steps`` of the same batch, queued behind ``w``; ``tables`` cover the new positions. None (nothing
    queued) when the tables hold a spilled page the window's path cannot read."""
    B, dev = w.meta.num_seqs, runner.device
    width = max(len(t) for t in tables)
    arr, n_dev, top = np.zeros((B, width), dtype=np.int64), host_id_base(runner), -1
    for b, t in enumerate(tables):
        row, row_top = kernel_table(page_array(t), n_dev)
        arr[b, :len(row)], top = row, max(top, row_top)
    ram = runner.spill.ram_slots if runner.spill is not None else 0
    if top >= 0:
        if (w.graph and not w.spill) or (not w.graph and w.meta.host_kv is None) or (w.graph and top >= ram):
            return None
    table = torch.from_numpy(arr)
    if dev.type == "cuda":                        # a pageable copy would wait for the queued window
        table = table.pin_memory()
    table = table.to(dev, non_blocking=True)
    meta, ps = w.meta, w.meta.page_size
    if w.graph:
        runner.graphs.set_tables(B, table)
    else:
        bound = meta.max_seq_bound + steps
        meta = dataclasses.replace(meta, page_table=table, slot_pages=_slots(table, meta.positions, ps),
                                   backend_data={}, max_seq_bound=bound, num_splits=runner.decode_splits(B),
                                   host_ram_only=top < ram if meta.host_kv is not None else meta.host_ram_only)
    return _run(runner, meta, w.ids, steps, w.graph, table, spill=w.spill)


def collect(w: Window) -> list[list[int]]:
    if w.done is not None:
        w.done.synchronize()
    return w.host.tolist()


def _slots(table: torch.Tensor, pos: torch.Tensor, ps: int) -> torch.Tensor:
    idx = (pos // ps).clamp(max=table.shape[1] - 1)[:, None]       # past the table: never written
    return table.gather(1, idx)[:, 0]


def _run(runner, meta: AttnMetadata, ids: torch.Tensor, steps: int, graph: bool, table: torch.Tensor,
         spill: bool = False) -> Window:
    B, ps, dev = meta.num_seqs, meta.page_size, runner.device
    kind = ("spill" if spill else "plain") if graph else "eager"   # decode steps by path, as execute counts them
    runner.step_kinds[kind] = runner.step_kinds.get(kind, 0) + steps
    toks = torch.empty(B, steps, dtype=torch.int64, device=dev)
    if runner.fp8 is not None:          # every page the window writes holds full-precision tokens
        first = runner.graphs.positions[:B] if graph else meta.positions
        pos = first[:, None] + torch.arange(steps, device=dev)
        runner.fp8.on_write(table.gather(1, (pos // ps).clamp(max=table.shape[1] - 1)))
    if graph:
        for i in range(steps):
            runner.graphs.replay(B, spill)
            toks[:, i] = runner.graphs.next_tokens[:B]
    else:
        eng = runner.device_engram
        for i in range(steps):
            hidden = runner.model(ids, meta.positions, runner.kv, meta, eng.begin(B, ids) if eng else None)
            if eng is not None:
                eng.advance(B, ids)
            ids = argmax_rows(runner.model.compute_logits(hidden).float())
            toks[:, i] = ids
            pos = meta.positions + 1
            meta = dataclasses.replace(meta, positions=pos, seq_lens=meta.seq_lens + 1,
                                       slot_pages=_slots(meta.page_table, pos, ps), slot_offsets=pos % ps,
                                       seq_lens_cpu=[n + 1 for n in meta.seq_lens_cpu], backend_data={})
    done = None
    if dev.type == "cuda":
        host = torch.empty(B, steps, dtype=torch.int64, pin_memory=True)
        host.copy_(toks, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host = toks
    return Window(toks, host, done, steps, graph, meta, ids, spill)
