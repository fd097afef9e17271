"""Decode state of DeepSeek-V4 in fixed device buffers, one row ("slot") per sequence (for CUDA graphs).

The immutable ``SequenceState`` of a request (``state.py``) is what prefill, chunked prefill and the prefix
cache use; the graph-captured decode step (``static_decode.py``) needs the same state at fixed addresses
and fixed shapes instead, updated in place at positions computed on the device. ``StaticState`` holds, for
``slots`` sequences of at most ``max_len`` tokens (``D`` = head_dim, ``m`` = compress ratio, ``W`` = window):

* ``positions [slots]``: tokens seen (the next token's position);
* per layer a window ring ``[slots, W, D]`` (position ``p`` at row ``p % W``);
* per compressor (CSA / HCA, and the CSA indexer's): the open window ``[slots, m, C]`` x 2 (position ``p``
  at row ``p % m``; gates without ``ape``), for overlapping compressors the Ca half of the last closed
  window ``[slots, m, dim]`` x 2 (zeros / ``-inf`` before the first). These are the fixed-size part of a
  request's state, its "state page": they do not grow with the context;
* ``page_table [slots, max_len / page_size]``: the page ids of each slot's request (the engine's
  ``KVManager`` page table; the scratch page past its length), updated in place;
* the growing part, the compressed entries and indexer keys in their stored form, in ``PagePools``
  (``paged_state.py``) addressed through ``page_table``.

``load`` puts a ``SequenceState`` into a slot (its entries into the request's pages), ``export`` reads one
back out (both on the host's knowledge of the sequence length), ``move`` moves a slot to another (the
page-table row, not the pages): the runner keeps the rows of a decode batch in slots ``0..B-1``.
"""
from __future__ import annotations

import torch

from tierserve.models.deepseek_v4.paged_state import EntryPool, PagePools
from tierserve.models.deepseek_v4.state import CompressorState, LayerState, SequenceState


class CompBuffers:
    """One compressor's fixed per-slot state (open window, Ca half); its entries live in ``pool``."""

    def __init__(self, comp, pool: EntryPool | None, slots: int, max_len: int, device, dtype) -> None:
        self.ratio, self.dim, self.overlap, self.pool = comp.ratio, comp.dim, comp.overlap, pool
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
        self.entry_bytes = None if pool is None else pool.row * pool.data.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pend_kv, self.pend_gate, self.prev_kv, self.prev_gate) if t is not None]

    def load(self, slot: int, st: CompressorState, entries: torch.Tensor, pages: list[int]) -> None:
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
        self.pool.write(pages, entries)

    def export(self, slot: int, num_tokens: int, pages: list[int]) -> tuple[CompressorState, torch.Tensor]:
        n, k = divmod(num_tokens, self.ratio)
        pk, pg = self.pend_kv[slot, :k].clone(), self.pend_gate[slot, :k].clone()
        prev = (None, None)
        if self.overlap and n:
            prev = (self.prev_kv[slot].clone(), self.prev_gate[slot].clone())
        return CompressorState(pk, pg, prev[0], prev[1], n), self.pool.read(pages, n)


class LayerBuffers:
    def __init__(self, attn, slots: int, max_len: int, device, dtype, comp_pool=None, index_pool=None) -> None:
        self.window = attn.window
        self.ring = torch.zeros(slots, attn.window, attn.head_dim, dtype=dtype, device=device)
        self.comp = self.index = None
        if attn.compressor is not None:
            self.comp = CompBuffers(attn.compressor, comp_pool, slots, max_len, device, dtype)
        if attn.indexer is not None:
            self.index = CompBuffers(attn.indexer.compressor, index_pool, slots, max_len, device, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ring] + [t for c in (self.comp, self.index) if c is not None for t in c.tensors()]

    def load(self, slot: int, st: LayerState, pages: list[int]) -> None:
        n, L = st.num_tokens, st.window.shape[0]
        rows = (torch.arange(L, device=self.ring.device) + n - L) % self.window
        self.ring[slot, rows] = st.window
        if self.comp is not None:
            self.comp.load(slot, st.compressor, st.compressed, pages)
        if self.index is not None:
            self.index.load(slot, st.indexer, st.index_keys, pages)

    def export(self, slot: int, n: int, pages: list[int]) -> LayerState:
        L = min(n, self.window)
        rows = (torch.arange(L, device=self.ring.device) + n - L) % self.window
        window = self.ring[slot, rows]
        cst = comp = ist = keys = None
        if self.comp is not None:
            cst, comp = self.comp.export(slot, n, pages)
        if self.index is not None:
            ist, keys = self.index.export(slot, n, pages)
        return LayerState(n, window, comp, cst, keys, ist)


class StaticState:
    """The decode state of ``slots`` sequences (at most ``max_len`` tokens each) of ``model``.

    ``pools`` (``PagePools``): the page pools the slots' page tables address (the runner's, sized from
    the engine's page budget); without them the state builds its own pool of ``slots * max_pages`` pages
    of ``page_size`` tokens and gives slot ``s`` the pages ``[s * max_pages, (s + 1) * max_pages)``."""

    def __init__(self, model, slots: int, max_len: int, pools: PagePools | None = None,
                 page_size: int = 16) -> None:
        dev, dt = model.device, model.dtype
        self.slots, self.max_len = slots, max_len
        self.owned = pools is None
        page_size = page_size if pools is None else pools.page_size
        self.page_size, self.max_pages = page_size, -(-max_len // page_size)
        self.pools = PagePools(model, slots * self.max_pages, page_size, dev) if pools is None else pools
        self.positions = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.page_table = torch.full((slots, self.max_pages), self.pools.scratch, dtype=torch.int64, device=dev)
        if self.owned:
            self.page_table.copy_(torch.arange(slots * self.max_pages, device=dev).view(slots, -1))
        self.layers = [LayerBuffers(b.attn, slots, max_len, dev, dt, cp, ip)
                       for b, cp, ip in zip(model.layers, self.pools.comp, self.pools.index)]

    @staticmethod
    def estimate_bytes(model, slots: int, max_len: int) -> int:
        """Bytes of the fixed per-slot buffers ``StaticState(model, slots, max_len)`` would take (window
        rings, open compressor windows, Ca halves; not the page pools). Built on the meta device."""
        layers = [LayerBuffers(b.attn, slots, max_len, "meta", model.dtype) for b in model.layers]
        return sum(t.numel() * t.element_size() for lb in layers for t in lb.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The per-slot tensors (row ``s`` is slot ``s``), not the page table nor the pools."""
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
                total += k * (row(c.pend_kv) + row(c.pend_gate)) + e * c.entry_bytes
                if c.overlap and e:
                    total += c.ratio * (row(c.prev_kv) + row(c.prev_gate))
        return total

    def pages_of(self, slot: int, num_tokens: int) -> list[int]:
        """The slot's page ids covering ``num_tokens`` tokens (host copy of its page-table row)."""
        return self.page_table[slot, :-(-num_tokens // self.page_size)].tolist()

    def set_pages(self, slot: int, pages: list[int], start: int = 0) -> None:
        """Page-table row ``slot`` := ``pages`` (entries from ``start`` on are written; the rest of the row
        keeps what it has: the scratch page past the request's length)."""
        if self.owned:
            raise RuntimeError("a StaticState with its own pool has fixed page tables")
        if len(pages) > self.max_pages:
            raise ValueError(f"{len(pages)} pages do not fit a page table of {self.max_pages}")
        if len(pages) > start:
            self.page_table[slot, start:len(pages)] = torch.tensor(pages[start:], dtype=torch.int64)

    def clear(self, slot: int) -> None:
        """Slot ``slot`` is free: its page-table row points at the scratch page (so padding rows of a
        graph bucket write nowhere that matters)."""
        if not self.owned:
            self.page_table[slot].fill_(self.pools.scratch)

    def load(self, slot: int, st: SequenceState, pages: list[int] | None = None) -> None:
        """Put ``st`` into slot ``slot``; its entries go to ``pages`` (the request's page table, at least
        ``ceil(num_tokens / page_size)`` pages; required unless the state owns its pool)."""
        if st.num_tokens + 1 > self.max_len:
            raise ValueError(f"a state of {st.num_tokens} tokens does not fit the static buffers (max {self.max_len})")
        if pages is None:
            if not self.owned:
                raise ValueError("StaticState.load needs the request's pages")
            pages = self.pages_of(slot, self.max_len)
        else:
            self.clear(slot)
            self.set_pages(slot, pages)
        self.positions[slot] = st.num_tokens
        for lb, ls in zip(self.layers, st.layers):
            lb.load(slot, ls, pages)

    def export(self, slot: int, num_tokens: int) -> SequenceState:
        """The slot's state as a ``SequenceState`` of ``num_tokens`` tokens (the host's count; copies)."""
        pages = self.pages_of(slot, num_tokens)
        return SequenceState(num_tokens, tuple(lb.export(slot, num_tokens, pages) for lb in self.layers))

    def move(self, src: int, dst: int) -> None:
        """Slot ``dst`` takes over the state of ``src`` (its page-table row; with an own pool, the pages'
        contents)."""
        for t in self.tensors():
            t[dst] = t[src]
        if self.owned:
            src_pages, dst_pages = self.page_table[src].tolist(), self.page_table[dst].tolist()
            for p in self.pools.pools():
                p.copy_pages(src_pages, dst_pages)
        else:
            self.page_table[dst] = self.page_table[src]
            self.clear(src)
