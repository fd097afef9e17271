"""Decode state of DeepSeek-V4 in fixed device buffers, one row ("slot") per sequence (for CUDA graphs).

The immutable ``SequenceState`` of a request (``state.py``) is what prefill, chunked prefill and the prefix
cache use; the graph-captured decode step (``static_decode.py``) needs the same state at fixed addresses
and fixed shapes instead, updated in place at positions computed on the device. ``StaticState`` holds, for
``slots`` sequences of at most ``max_len`` tokens (``D`` = head_dim, ``m`` = compress ratio, ``W`` = window):

* ``positions [slots]``: tokens seen (the next token's position);
* per layer a window ring ``[slots, W, D]`` (position ``p`` at row ``p % W``);
* per compressor (CSA / HCA, and the CSA indexer's): the open window ``[slots, m, C]`` x 2 (position ``p``
  at row ``p % m``; gates without ``ape``), for overlapping compressors the Ca half of the last closed
  window ``[slots, m, dim]`` x 2 (zeros / ``-inf`` before the first), and the entries in their stored form
  ``[slots, max_len // m + 1, ...]`` (the last row is a scratch row that non-closing rows write to).

``load`` puts a ``SequenceState`` into a slot, ``export`` reads one back out (both on the host's knowledge
of the sequence length), ``move`` copies a slot to another: the runner keeps the rows of a decode batch in
slots ``0..B-1``.
"""
from __future__ import annotations

import torch

from tierserve.models.deepseek_v4.state import CompressorState, LayerState, SequenceState


class CompBuffers:
    """One compressor's state for all slots."""

    def __init__(self, comp, attn, store, slots: int, max_len: int, device, dtype) -> None:
        self.ratio, self.dim, self.overlap = comp.ratio, comp.dim, comp.overlap
        width = 2 * comp.dim if comp.overlap else comp.dim
        z = dict(device=device)
        self.pend_kv = torch.zeros(slots, comp.ratio, width, dtype=dtype, **z)
        self.pend_gate = torch.zeros(slots, comp.ratio, width, dtype=dtype, **z)
        self.prev_kv = self.prev_gate = None
        if comp.overlap:      # the gate half carries ``ape`` (fp32 like ``ape``)
            self.prev_kv = torch.zeros(slots, comp.ratio, comp.dim, dtype=dtype, **z)
            self.prev_gate = torch.full((slots, comp.ratio, comp.dim), float("-inf"),
                                        dtype=torch.promote_types(dtype, comp.ape.dtype), **z)
        self.capacity = max_len // comp.ratio
        row = store(torch.zeros(1, comp.dim, dtype=dtype))[0]       # the stored form of one entry
        self.entries = torch.zeros(slots, self.capacity + 1, *row.shape, dtype=row.dtype, **z)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pend_kv, self.pend_gate, self.prev_kv, self.prev_gate, self.entries) if t is not None]

    def load(self, slot: int, st: CompressorState, entries: torch.Tensor) -> None:
        n = entries.shape[0]
        if n > self.capacity:
            raise ValueError(f"a state of {n} compressed entries does not fit the static buffers "
                             f"({self.capacity} entries of ratio {self.ratio})")
        k = st.num_pending
        self.pend_kv[slot, :k] = st.pending_kv
        self.pend_gate[slot, :k] = st.pending_gate
        if self.overlap:
            if st.prev_kv is None:
                self.prev_kv[slot].zero_()
                self.prev_gate[slot].fill_(float("-inf"))
            else:
                self.prev_kv[slot] = st.prev_kv
                self.prev_gate[slot] = st.prev_gate
        self.entries[slot, :n] = entries

    def export(self, slot: int, num_tokens: int) -> tuple[CompressorState, torch.Tensor]:
        n, k = divmod(num_tokens, self.ratio)
        pk, pg = self.pend_kv[slot, :k].clone(), self.pend_gate[slot, :k].clone()
        prev = (None, None)
        if self.overlap and n:
            prev = (self.prev_kv[slot].clone(), self.prev_gate[slot].clone())
        return CompressorState(pk, pg, prev[0], prev[1], n), self.entries[slot, :n].clone()


class LayerBuffers:
    def __init__(self, attn, slots: int, max_len: int, device, dtype) -> None:
        self.window = attn.window
        self.ring = torch.zeros(slots, attn.window, attn.head_dim, dtype=dtype, device=device)
        self.comp = self.index = None
        if attn.compressor is not None:
            self.comp = CompBuffers(attn.compressor, attn, attn.store_entries, slots, max_len, device, dtype)
        if attn.indexer is not None:
            self.index = CompBuffers(attn.indexer.compressor, attn, attn.store_keys, slots, max_len, device, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ring] + [t for c in (self.comp, self.index) if c is not None for t in c.tensors()]

    def load(self, slot: int, st: LayerState) -> None:
        n, L = st.num_tokens, st.window.shape[0]
        rows = (torch.arange(L, device=self.ring.device) + n - L) % self.window
        self.ring[slot, rows] = st.window
        if self.comp is not None:
            self.comp.load(slot, st.compressor, st.compressed)
        if self.index is not None:
            self.index.load(slot, st.indexer, st.index_keys)

    def export(self, slot: int, n: int) -> LayerState:
        L = min(n, self.window)
        rows = (torch.arange(L, device=self.ring.device) + n - L) % self.window
        window = self.ring[slot, rows]
        cst = comp = ist = keys = None
        if self.comp is not None:
            cst, comp = self.comp.export(slot, n)
        if self.index is not None:
            ist, keys = self.index.export(slot, n)
        return LayerState(n, window, comp, cst, keys, ist)


class StaticState:
    """The decode state of ``slots`` sequences (at most ``max_len`` tokens each) of ``model``."""

    def __init__(self, model, slots: int, max_len: int) -> None:
        dev, dt = model.device, model.dtype
        self.slots, self.max_len = slots, max_len
        self.positions = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.layers = [LayerBuffers(b.attn, slots, max_len, dev, dt) for b in model.layers]

    @staticmethod
    def estimate_bytes(model, slots: int, max_len: int) -> int:
        """Bytes ``StaticState(model, slots, max_len)`` would take (built on the meta device)."""
        layers = [LayerBuffers(b.attn, slots, max_len, "meta", model.dtype) for b in model.layers]
        return sum(t.numel() * t.element_size() for lb in layers for t in lb.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.positions] + [t for lb in self.layers for t in lb.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_for(self, n: int) -> int:
        """Bytes the ``SequenceState`` of an ``n``-token sequence holds (``SequenceState.nbytes``)."""
        def row(t: torch.Tensor) -> int:
            return t[0, 0].numel() * t.element_size()

        total = 0
        for lb in self.layers:
            total += min(n, lb.window) * row(lb.ring)
            for c in (lb.comp, lb.index):
                if c is None:
                    continue
                e, k = divmod(n, c.ratio)
                total += k * (row(c.pend_kv) + row(c.pend_gate)) + e * row(c.entries)
                if c.overlap and e:
                    total += c.ratio * (row(c.prev_kv) + row(c.prev_gate))
        return total

    def load(self, slot: int, st: SequenceState) -> None:
        if st.num_tokens + 1 > self.max_len:
            raise ValueError(f"a state of {st.num_tokens} tokens does not fit the static buffers (max {self.max_len})")
        self.positions[slot] = st.num_tokens
        for lb, ls in zip(self.layers, st.layers):
            lb.load(slot, ls)

    def export(self, slot: int, num_tokens: int) -> SequenceState:
        """The slot's state as a ``SequenceState`` of ``num_tokens`` tokens (the host's count; copies)."""
        return SequenceState(num_tokens, tuple(lb.export(slot, num_tokens) for lb in self.layers))

    def move(self, src: int, dst: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]
