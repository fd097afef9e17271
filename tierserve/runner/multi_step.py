"""Multi-step greedy decode windows: ``k`` decode steps back to back on the device, each step's argmax
fed to the next, with one host sync per window -- and windows that can be queued before the previous
one is read, so the host's bookkeeping overlaps the GPU's work.

``launch`` starts a window for a pure-decode batch whose page tables cover its ``k`` positions;
``extend`` queues the next window of the same batch right behind it (new page tables, the inputs are
already on the device: the CUDA graph feeds its own static buffers, the eager path keeps the advanced
metadata); ``collect`` waits for one window only (its tokens are copied to host memory on the stream
right after its last step, before anything queued later) and returns its tokens ``[request][step]``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.runner.engram_state import history_rows
from tierserve.runner.sampler import argmax_rows


@dataclass
class Window:
    tokens: torch.Tensor                 # [B, k] on the device
    host: torch.Tensor                   # [B, k] on the host (pinned on CUDA), filled asynchronously
    done: torch.cuda.Event | None        # recorded right after the copy to ``host``
    steps: int
    graph: bool                          # replayed through the CUDA graphs (static inputs)
    meta: AttnMetadata                   # eager path: inputs of the step after the window
    ids: torch.Tensor                    # eager path: the last step's tokens


def launch(runner, so, steps: int) -> Window:
    meta, ids, _, _ = runner._prepare(so, lookahead=steps - 1)
    graph = runner._graph_kind(meta, None) == "plain"      # windows never run with spilled pages
    if runner.device_engram is not None:          # Engram rows are hashed on the device from this history
        runner.device_engram.load(meta.num_seqs, history_rows(so, runner.model_cfg.engram.lookback),
                                  runner.graphs.bucket_for(meta.num_seqs) if graph else None)
    if graph:
        runner.graphs.load(meta.num_seqs, ids, meta.positions, meta.slot_pages, meta.slot_offsets,
                           meta.seq_lens, meta.page_table)
    return _run(runner, meta, ids, steps, graph, meta.page_table)


def extend(runner, w: Window, steps: int, tables: list[list[int]]) -> Window:
    """The next ``steps`` of the same batch, queued behind ``w``; ``tables`` cover the new positions."""
    B, dev = w.meta.num_seqs, runner.device
    width = max(len(t) for t in tables)
    table = torch.zeros(B, width, dtype=torch.int64)
    for b, t in enumerate(tables):
        table[b, :len(t)] = torch.tensor(t, dtype=torch.int64)
    if dev.type == "cuda":                        # a pageable copy would wait for the queued window
        table = table.pin_memory()
    table = table.to(dev, non_blocking=True)
    meta, ps = w.meta, w.meta.page_size
    if w.graph:
        runner.graphs.set_tables(B, table)
    else:
        bound = meta.max_seq_bound + steps
        meta = dataclasses.replace(meta, page_table=table, slot_pages=_slots(table, meta.positions, ps),
                                   backend_data={}, max_seq_bound=bound,
                                   num_splits=runner.decode_splits(B))
    return _run(runner, meta, w.ids, steps, w.graph, table)


def collect(w: Window) -> list[list[int]]:
    if w.done is not None:
        w.done.synchronize()
    return w.host.tolist()


def _slots(table: torch.Tensor, pos: torch.Tensor, ps: int) -> torch.Tensor:
    idx = (pos // ps).clamp(max=table.shape[1] - 1)[:, None]       # past the table: never written
    return table.gather(1, idx)[:, 0]


def _run(runner, meta: AttnMetadata, ids: torch.Tensor, steps: int, graph: bool, table: torch.Tensor) -> Window:
    B, ps, dev = meta.num_seqs, meta.page_size, runner.device
    kind = "plain" if graph else "eager"            # decode steps by path, as ModelRunner.execute counts them
    runner.step_kinds[kind] = runner.step_kinds.get(kind, 0) + steps
    toks = torch.empty(B, steps, dtype=torch.int64, device=dev)
    if runner.fp8 is not None:          # every page the window writes holds full-precision tokens
        first = runner.graphs.positions[:B] if graph else meta.positions
        pos = first[:, None] + torch.arange(steps, device=dev)
        runner.fp8.on_write(table.gather(1, (pos // ps).clamp(max=table.shape[1] - 1)))
    if graph:
        for i in range(steps):
            runner.graphs.replay(B)
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
    return Window(toks, host, done, steps, graph, meta, ids)
