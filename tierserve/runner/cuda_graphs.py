"""CUDA graphs for pure decode steps, captured once per batch-size bucket.

Inputs live in static device buffers; a step copies its (small) metadata in, pads the batch to the
bucket (padding rows read and write a scratch page no request owns) and replays the graph, which
runs the whole model, the LM head and the greedy token; sampling runs after the replay, on the device.

The graph also feeds its greedy token back into its own inputs (next position, slot from the page
table), so ``num_scheduler_steps`` greedy steps are consecutive replays with no host work between.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch

from tierserve.attention import fp8_decode_config
from tierserve.attention.backend import AttnMetadata, choose_splits
from tierserve.attention.select import selection_bound
from tierserve.runner.sampler import argmax_rows

# decode split-K for sparse attention: "context" (max_model_len, as dense steps) or "selection" (the tokens a
# step reads at most: the selection bound). Opt-in until timed on the H200 (read once: per step).
SPARSE_SPLITS = os.environ.get("TIERSERVE_SPARSE_SPLITS", "context")


@contextlib.contextmanager
def collected_then_no_gc():
    """Collect garbage, then keep the collector off while graphs are captured: a finalizer run mid-capture (say an
    engine dropped earlier unlocking its CPU KV tier) would call a CUDA API that a capture forbids, invalidating
    the capture and leaving the memory locked after it is freed."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def buckets(max_bs: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if b < max_bs]
    return out + [max_bs]


def decode_splits(bs: int, num_kv_heads: int, max_len: int, max_bs: int, num_sms: int, sparse=None,
                  page_size: int = 16, fp8: bool = False) -> int:
    """Split-K factor of a pure decode step of ``bs`` rows, the same with or without CUDA graphs (the
    graph's: its bucket's batch and the engine's max_model_len), so that eager, multi-step and graph
    decode steps add up every key in the same order and give bit-identical outputs. With sparse attention
    and ``TIERSERVE_SPARSE_SPLITS=selection``, sized by the tokens a step reads at most instead. With FP8 KV
    (``fp8``) the FP8 kernel's rule (``fp8_decode_config.SPLITS``: more, shorter splits)."""
    b = next((x for x in buckets(max_bs) if x >= bs), bs)
    if sparse is not None and SPARSE_SPLITS == "selection":
        max_len = min(max_len, selection_bound(sparse, page_size) * page_size)
    return choose_splits(b, num_kv_heads, max_len, num_sms, **(fp8_decode_config.SPLITS if fp8 else {}))


class DecodeGraphs:
    def __init__(self, model, kv, page_size: int, max_bs: int, max_model_len: int, scratch_page: int,
                 device: torch.device, kv_fp8=None, engram=None, sparse=None) -> None:
        self.model, self.kv, self.page_size = model, kv, page_size
        self.engram = engram           # runner.engram_graphs: DeviceEngram (hashes in the graph) or
        #                                StaticEngramRows (rows filled before each replay)
        self.sparse = sparse           # attention.select.SparseConfig: pages chosen inside the graph
        self.kv_fp8 = kv_fp8           # runner.kv_fp8.Fp8Pages (flags on the device, read inside the graph)
        self.max_bs, self.max_len, self.device = max_bs, max_model_len, device
        self.max_pages = -(-max_model_len // page_size)
        self.scratch = scratch_page
        z = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_bs, **z)
        self.positions = torch.zeros(max_bs, **z)
        self.slot_pages = torch.full((max_bs,), scratch_page, **z)
        self.slot_offsets = torch.zeros(max_bs, **z)
        self.seq_lens = torch.ones(max_bs, **z)
        self.page_table = torch.full((max_bs, self.max_pages), scratch_page, **z)
        self.next_tokens = torch.zeros(max_bs, **z)      # greedy token of the last replay
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # with KV tiers, a second set captured with the spill stores (set_spill), for steps that read spilled
        # pages; steps with none replay the first set, whose kernels have no host-page path (faster: 99.8 vs
        # 79.5 tok/s at 128k on the H200 when the spill kernels served every step)
        self.spill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.spill_logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self.host_kv, self.spill = None, None    # set_spill: steps may read pages spilled to CPU RAM
        self.num_kv_heads = model.cfg.num_kv_heads
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count

    def set_spill(self, host_kv, spill) -> None:
        """The tiers' spill stores: ``capture`` adds a second set of graphs whose kernels read spilled pages
        straight from pinned CPU RAM (fixed addresses), scored from summaries on the device, selections
        counted in the graph; replayed (``spill=True``) for steps whose spilled pages are all in CPU RAM."""
        self.host_kv, self.spill = host_kv, spill
        self.spill_graphs.clear()
        self.spill_logits.clear()

    def reset(self) -> None:
        """Drop every captured graph (both sets) and their memory pool; ``capture`` records them again, e.g.
        after the model switched kernels (``enable_fused``): a replay runs what was captured, not the model."""
        for d in (self.graphs, self.logits, self.spill_graphs, self.spill_logits):
            d.clear()
        self.pool = None

    def meta(self, bs: int, spill: bool = False) -> AttnMetadata:
        sp = self.spill if spill else None
        spill = {} if sp is None else dict(host_kv=self.host_kv, host_ram_only=True, host_summaries=sp.summaries,
                                           page_heat=sp.page_heat, host_heat=sp.host_heat)
        return AttnMetadata(
            num_seqs=bs, num_tokens=bs, page_size=self.page_size, positions=self.positions[:bs],
            slot_pages=self.slot_pages[:bs], slot_offsets=self.slot_offsets[:bs],
            query_start_loc=torch.arange(bs + 1, device=self.device), seq_lens=self.seq_lens[:bs],
            page_table=self.page_table[:bs], query_lens_cpu=[1] * bs, seq_lens_cpu=[self.max_len] * bs,
            decode_only=True, num_splits=decode_splits(bs, self.num_kv_heads, self.max_len, self.max_bs, self.sms,
                                                       self.sparse, self.page_size, self.kv_fp8 is not None),
            max_seq_bound=self.max_len, kv_fp8=self.kv_fp8, sparse=self.sparse, **spill)

    def _forward(self, bs: int, spill: bool = False) -> torch.Tensor:
        ids = self.input_ids[:bs]
        h = self.model(ids, self.positions[:bs], self.kv, self.meta(bs, spill),
                       self.engram.begin(bs, ids) if self.engram is not None else None)
        logits = self.model.compute_logits(h)
        tok = argmax_rows(logits)
        self.next_tokens[:bs].copy_(tok)
        if self.engram is not None:       # this step's tokens join the n-gram history of the next
            self.engram.advance(bs, ids)
        # inputs of the following greedy step: its token at the next position, slot from the page table
        self.input_ids[:bs].copy_(tok)
        pos = self.positions[:bs]
        pos.add_(1)
        self.seq_lens[:bs].add_(1)
        page_idx = (pos // self.page_size).clamp_(max=self.max_pages - 1)
        self.slot_pages[:bs].copy_(self.page_table[:bs].gather(1, page_idx[:, None])[:, 0])
        self.slot_offsets[:bs].copy_(pos % self.page_size)
        return logits.float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the sets not captured yet (one memory pool for all: one replay at a time)."""
        with collected_then_no_gc():
            self._capture()

    def _capture(self) -> None:
        sets = [(False, self.graphs, self.logits)]
        if self.spill is not None:
            sets.append((True, self.spill_graphs, self.spill_logits))
        for spill, graphs, logits in sets:
            if graphs:
                continue
            for bs in reversed(buckets(self.max_bs)):
                for _ in range(2):            # warm up (Triton autotune / compile) outside the graph
                    self._forward(bs, spill)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    logits[bs] = self._forward(bs, spill)
                if self.pool is None:
                    self.pool = g.pool()
                graphs[bs] = g
        torch.cuda.synchronize(self.device)

    def bucket_for(self, bs: int) -> int | None:
        for b in sorted(self.graphs):
            if b >= bs:
                return b
        return None

    def load(self, bs: int, ids, pos, pages, offs, seq_lens, table) -> None:
        """Copy one step's inputs (device tensors of the real batch; table [bs, w], w <= max_pages) into
        the static buffers; padding rows up to the bucket get position 0 on the scratch page only."""
        b = self.bucket_for(bs)
        self.input_ids[:bs].copy_(ids)
        self.positions[:bs].copy_(pos)
        self.slot_pages[:bs].copy_(pages)
        self.slot_offsets[:bs].copy_(offs)
        self.seq_lens[:bs].copy_(seq_lens)
        self.page_table[:bs, :table.shape[1]].copy_(table)
        if b > bs:
            self.positions[bs:b].zero_()
            self.slot_pages[bs:b].fill_(self.scratch)
            self.slot_offsets[bs:b].zero_()
            self.seq_lens[bs:b].fill_(1)
            self.page_table[bs:b].fill_(self.scratch)

    def set_tables(self, bs: int, table: torch.Tensor) -> None:
        """New page tables for the fed-back inputs (the next multi-step window of the same batch): the
        slot of each row's next position is looked up again."""
        self.page_table[:bs, :table.shape[1]].copy_(table)
        idx = (self.positions[:bs] // self.page_size).clamp(max=self.max_pages - 1)
        self.slot_pages[:bs].copy_(self.page_table[:bs].gather(1, idx[:, None])[:, 0])

    def replay(self, bs: int, spill: bool = False) -> torch.Tensor:
        """One decode step on the loaded (or fed-back) inputs; returns the logits [bs, V]. ``spill``: the
        set captured with the spill stores (the step's page tables may point at spilled pages)."""
        b = self.bucket_for(bs)
        (self.spill_graphs if spill else self.graphs)[b].replay()
        return (self.spill_logits if spill else self.logits)[b][:bs]

    def run(self, bs: int, ids, pos, pages, offs, seq_lens, table, spill: bool = False) -> torch.Tensor:
        self.load(bs, ids, pos, pages, offs, seq_lens, table)
        return self.replay(bs, spill)
