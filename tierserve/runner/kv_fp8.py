"""Runner side of the FP8 KV cache: per-page "stored as FP8" flags, in-place quantisation, and the
two-precision attention inputs the torch reference reads (see tierserve/quant/fp8_kv.py for the
format and the read rule, tierserve/kv/fp8_pages.py for when a page is quantised)."""
from __future__ import annotations

import logging

import torch

from tierserve.memory.pinned import ids_to
from tierserve.quant.fp8_compact import (compact_summary, dequant_compact, slot_bytes, slot_offsets, store_compact_,
                                         summary_views)
from tierserve.quant.fp8_kv import dequant_pages, fp8_read_mask, quantise_pages_, split_precision

log = logging.getLogger("tierserve")


class Fp8Pages:
    """``compact``: None (part 1: pages quantised in place) or the compact pool ``[S, L, 2, slot_bytes]``
    uint8 whose slot s is page id ``num_pages + s`` (``num_pages`` counts the scratch page).

    KV tiers (``cpu_kv_gb``): live pages spilled to CPU RAM are held there as compact rows (the pool's row
    format, ``quant.fp8_compact``), whatever the device storage; in a step's page tables host slot s is page id
    ``end + s`` (after the compact range). ``host_rows`` / ``restore`` convert on the way down / up."""

    def __init__(self, num_pages: int, page_size: int, keep_sink: int, keep_recent: int,
                 device: torch.device, compact: torch.Tensor | None = None) -> None:
        self.page_size, self.keep_sink, self.keep_recent = page_size, keep_sink, keep_recent
        self.compact, self.base = compact, num_pages
        n = num_pages + (compact.shape[0] if compact is not None else 0)
        self.end = n                                # first host id (spilled pages, KV tiers)
        self.quantised = torch.zeros(n, dtype=torch.bool, device=device)
        self.quantised[num_pages:] = True          # a compact slot only ever holds FP8 codes

    def quantise(self, kv_data: torch.Tensor, pids: list[int]) -> None:
        """Convert complete pages that no query reads at full precision any more to FP8 in place (every
        layer at once; the KV manager hands each page over once). On CUDA: one Triton launch and one indexed
        copy, page ids up through pinned memory -- no host sync, so a multi-step window queued behind keeps
        the GPU busy (``tierserve.attention.triton_fp8_quant``)."""
        if not pids:
            return
        if self.compact is not None:          # (full-precision id, compact id) pairs: move into the pool
            ids = torch.tensor(pids, dtype=torch.int64).t().contiguous()          # [2, n]: sources, slots
            if kv_data.is_cuda:                 # no host sync (a multi-step window may be queued behind)
                ids = ids.pin_memory().to(kv_data.device, non_blocking=True)
            src, dst = ids[0], ids[1]
            store_compact_(kv_data, self.compact, src, dst - self.base, self.page_size)
            return
        idx = torch.tensor(sorted(pids), dtype=torch.int64)
        if kv_data.is_cuda:
            from tierserve.attention.triton_fp8_quant import quantise_pages_triton
            idx = idx.pin_memory().to(kv_data.device, non_blocking=True)
            quantise_pages_triton(kv_data, idx, self.page_size)
        else:
            idx = idx.to(kv_data.device)
            assert not bool(self.quantised[idx].any()), "page quantised twice"
            quantise_pages_(kv_data, idx, self.page_size)
        self.quantised.index_fill_(0, idx, True)

    def on_write(self, slot_pages: torch.Tensor) -> None:
        """Pages written this step hold full-precision tokens (a recycled page starts over). Only full-precision
        pages are written; an id in the compact range (a clamped lookup past a table) keeps its flag (it is
        mapped to the scratch page, whose flag is never set)."""
        if self.compact is not None:
            slot_pages = slot_pages.clamp(max=self.base - 1)
        # index_fill_ takes the value as a kernel argument; ``t[idx] = False`` copies a CPU scalar tensor to the
        # device first, a pageable copy that synchronises the stream (and so stalls the windows queued behind)
        self.quantised.index_fill_(0, slot_pages.reshape(-1), False)

    def kernel_pool(self, layer_idx: int):
        """For the Triton FP8 kernels: None (in place) or (layer ``layer_idx`` of the compact pool, first compact id)."""
        return None if self.compact is None else (self.compact[:, layer_idx], self.base)

    def summaries(self, pt: torch.Tensor, kv_layer: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """``[*pt.shape, 2, Hkv, D]`` (``kv_layer``'s dtype): the key min / max summary row of each compact page
        in ``pt`` (rows for ids outside the compact range are some slot's: callers select). Sparse "pages" selection."""
        rows = self.compact[(pt - self.base).clamp(0, self.compact.shape[0] - 1), layer_idx]   # [..., 2, bytes]
        h, d = kv_layer.shape[-2:]
        return compact_summary(rows, 1, h, d, self.page_size, kv_layer.dtype)[..., 0, :, :]

    def summary_views(self, layer_idx: int, kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[slots, Hkv, D]`` (``kv_layer``'s dtype) of the compact slots' key min / max rows of layer
        ``layer_idx``, read in place by the fused sparse selection (``attention.triton_select``)."""
        h, d = kv_layer.shape[-2:]
        return summary_views(self.compact[:, layer_idx], h, d, self.page_size, kv_layer.dtype)

    def flags(self, pt: torch.Tensor) -> torch.Tensor:
        """``quantised`` of page ids ``pt``; host ids (spilled pages, >= ``end``) are always FP8."""
        return torch.where(pt >= self.end, True, self.quantised[pt.clamp(max=self.end - 1)])

    def _rows(self, ids: torch.Tensor, layer_idx: int, meta) -> torch.Tensor:
        """``[n, 2, slot_bytes]`` uint8 (on ``ids``' device): layer ``layer_idx``'s compact rows of page ids
        ``ids`` (all >= ``base``): compact slots from the pool, host ids from the step's CPU-RAM store."""
        host = meta.host_kv[0][1] if meta.host_kv is not None else None
        assert meta.host_kv is None or len(meta.host_kv) == 1, "FP8 pages spill to CPU RAM only"
        nb = host.shape[-1] if host is not None else self.compact.shape[-1]
        out = torch.empty(ids.numel(), 2, nb, dtype=torch.uint8, device=ids.device)
        on_host = ids >= self.end
        if self.compact is not None:
            c = ~on_host
            out[c] = self.compact[ids[c] - self.base, layer_idx]
        if host is not None and bool(on_host.any()):
            slots = (ids[on_host] - self.end).cpu()
            out[on_host] = host[slots, layer_idx].to(ids.device)
        return out

    def gather(self, kv_layer: torch.Tensor, meta, layer_idx: int) -> torch.Tensor:
        """``[B*P, 2, rows, H, D]``: the step's pages of one layer; a compact or spilled page's token rows are
        zeros (its values come from ``attention_inputs``) and its summary rows are copied from its compact row."""
        flat = meta.page_table.reshape(-1)
        sel = flat >= self.base
        out = torch.index_select(kv_layer, 0, torch.where(sel, 0, flat))
        if bool(sel.any()):
            ps, (rows, h, d) = self.page_size, kv_layer.shape[2:]
            out[sel] = 0
            if rows > ps:
                slots = self._rows(flat[sel], layer_idx, meta)                      # [n, 2, bytes]
                out[sel, :, ps:] = compact_summary(slots, rows - ps, h, d, ps, kv_layer.dtype)
        return out

    def attention_inputs(self, kv: torch.Tensor, meta, prep: dict, layer_idx: int = 0):
        """``kv [B, P, 2, rows, H, D]`` gathered pages -> ([B, 2P, 2, page, H, D] fp32 keys/values:
        full precision then FP8 readings, mask [B, 1, Q, 2L]) so one softmax covers each key once."""
        ps = self.page_size
        pt = meta.page_table
        quantised = self.flags(pt)
        deq = None
        if bool(quantised.any()):
            h, d = kv.shape[-2:]
            sel = pt >= self.base                              # compact slots and spilled pages: compact rows
            in_rows = sel[quantised]
            deq = torch.empty(int(in_rows.numel()), 2, ps, h, d, dtype=torch.float32, device=kv.device)
            if bool(in_rows.any()):
                deq[in_rows] = dequant_compact(self._rows(pt[sel], layer_idx, meta), ps, h, d)
            if not bool(in_rows.all()):                       # in place: codes + scales inside the page
                deq[~in_rows] = dequant_pages(kv[quantised & ~sel], ps)
        full, low = split_precision(kv, quantised, ps, deq)
        use_low = fp8_read_mask(prep["q_pos"], prep["kv_pos"], ps, self.keep_sink, self.keep_recent)
        mask = prep["mask"]
        both = torch.cat([mask & ~use_low, mask & use_low], dim=-1)[:, None]
        return torch.cat([full, low], dim=1), both

    # ---- KV tiers: spilled live pages as compact rows in CPU RAM -----------------------------------
    def row_bytes(self, kv_data: torch.Tensor) -> int:
        """Bytes of one (layer, K/V) compact row for pages of ``kv_data [N, L, 2, rows, H, D]``."""
        rows, h, d = kv_data.shape[3:]
        return slot_bytes(self.page_size, h, d, rows - self.page_size, kv_data.element_size())

    def _layout(self, kv_data: torch.Tensor):
        L, _, rows, h, d = kv_data.shape[1:]
        _, _, soff = slot_offsets(self.page_size, h, d)
        token_bytes = self.page_size * h * d * kv_data.element_size()       # where a page's summary rows start
        summ_bytes = (rows - self.page_size) * h * d * kv_data.element_size()
        return L, rows, h, d, soff, token_bytes, summ_bytes

    def host_rows(self, kv_data: torch.Tensor, pids: list[int]) -> torch.Tensor:
        """``[n, L, 2, slot_bytes]`` uint8 on the device: the compact rows of pages ``pids`` about to spill --
        a compact slot's row as it is, a page quantised in place re-packed (its codes + scales are the row's
        prefix; its summary rows move up), a page still at full precision (the read rule reads it in FP8 from
        now on) quantised exactly as ``store_compact_`` would. No host sync: a full-size page's rows are made both
        ways and its ``quantised`` flag picks one on the device (a multi-step window may be queued)."""
        L, rows, h, d, soff, tb, sb = self._layout(kv_data)
        dev = kv_data.device
        out = torch.zeros(len(pids), L, 2, self.row_bytes(kv_data), dtype=torch.uint8, device=dev)
        comp = [i for i, p in enumerate(pids) if p >= self.base]
        full = [i for i, p in enumerate(pids) if p < self.base]
        if comp:
            out[ids_to(comp, dev)] = self.compact[ids_to([pids[i] - self.base for i in comp], dev)]
        if full:
            ids = ids_to([pids[i] for i in full], dev)
            blob = kv_data[ids].view(torch.uint8).reshape(len(full), L, 2, -1)
            inpl = torch.zeros(len(full), L, 2, out.shape[-1], dtype=torch.uint8, device=dev)
            inpl[..., :soff] = blob[..., :soff]
            inpl[..., soff:soff + sb] = blob[..., tb:tb + sb]
            raw = torch.zeros_like(inpl)
            store_compact_(kv_data, raw, ids, torch.arange(len(full), device=dev), self.page_size)
            out[ids_to(full, dev)] = torch.where(self.quantised[ids].view(-1, 1, 1, 1), inpl, raw)
        return out

    def restore(self, kv_data: torch.Tensor, rows: torch.Tensor, pids: list[int]) -> None:
        """Spilled pages come back: ``rows [n, L, 2, slot_bytes]`` (device) into pages ``pids`` -- a compact id's
        slot takes the row as it is, a full-size page gets the in-place FP8 layout (codes + scales, zeros,
        then its summary rows) and its ``quantised`` flag."""
        L, nrows, h, d, soff, tb, sb = self._layout(kv_data)
        dev = kv_data.device
        comp = [i for i, p in enumerate(pids) if p >= self.base]
        full = [i for i, p in enumerate(pids) if p < self.base]
        if comp:
            self.compact[ids_to([pids[i] - self.base for i in comp], dev)] = rows[ids_to(comp, dev)]
        if full:
            r = rows[ids_to(full, dev)]
            page_bytes = nrows * h * d * kv_data.element_size()
            if soff > tb:
                raise ValueError("a full-size page has no room for FP8 codes + scales")
            blob = torch.zeros(len(full), L, 2, page_bytes, dtype=torch.uint8, device=dev)
            blob[..., :soff] = r[..., :soff]
            blob[..., tb:tb + sb] = r[..., soff:soff + sb]
            ids = ids_to([pids[i] for i in full], dev)
            kv_data[ids] = blob.view(kv_data.dtype).view(len(full), L, 2, nrows, h, d)
            self.quantised[ids] = True

    def summaries_of(self, kv_data: torch.Tensor, pids: list[int]) -> torch.Tensor:
        """``[n, L, 2, summary rows, H, D]``: the summary rows of pages ``pids`` (full-size or compact ids), the
        bytes their compact rows carry."""
        L, rows, h, d, *_ = self._layout(kv_data)
        ps, dev = self.page_size, kv_data.device
        out = torch.empty(len(pids), L, 2, rows - ps, h, d, dtype=kv_data.dtype, device=dev)
        comp = [i for i, p in enumerate(pids) if p >= self.base]
        full = [i for i, p in enumerate(pids) if p < self.base]
        if full:
            out[ids_to(full, dev)] = kv_data[ids_to([pids[i] for i in full], dev)][:, :, :, ps:]
        if comp:
            r = self.compact[ids_to([pids[i] - self.base for i in comp], dev)]
            out[ids_to(comp, dev)] = compact_summary(r, rows - ps, h, d, ps, kv_data.dtype)
        return out


def plan_compact(config, layout, budget_pages: int, page_bytes: int) -> tuple[int, int]:
    """``kv_fp8_storage="compact"``: split the memory of ``budget_pages`` model-dtype pages (``page_bytes``
    each) into (full-precision pages, compact FP8 slots); see ``kv.fp8_split.split_pages``."""
    from tierserve.kv.fp8_split import split_pages
    elem = torch.empty((), dtype=layout.dtype).element_size()
    cbytes = 2 * layout.num_layers * slot_bytes(layout.page_size, layout.num_kv_heads, layout.head_dim,
                                                layout.summary_rows, elem)
    return split_pages(budget_pages * page_bytes, page_bytes, cbytes, layout.page_size, config.max_num_seqs,
                       config.max_num_batched_tokens, config.kv_fp8_keep_sink, config.kv_fp8_keep_recent)


MIN_COMPACT_GAIN = 1.25     # "auto" takes the compact pool only where it holds at least 25% more tokens


def plan_storage(config, layout, budget_pages: int, page_bytes: int, use_index: bool) -> tuple[int, int]:
    """(full-precision pages, compact FP8 slots) for ``kv_dtype="fp8"`` in the memory of ``budget_pages``
    model-dtype pages: ``inplace`` (or no room for compact slots) keeps every page full-size; ``auto`` also keeps
    in-place pages with the indexer selector (its keys are paged by full-precision page id) and with sparse
    attention (compact + sparse runs the same fused selection and CUDA graphs, reading compact slots' summaries
    from their rows, but is not yet measured on a GPU) and where the split would hold less than ``MIN_COMPACT_GAIN``
    x the budget's pages (a small compact pool fills up; the pages past it stay at full precision and the decode
    kernel quantises them on every read); ``compact`` refuses the indexer."""
    storage = config.kv_fp8_storage
    if storage == "inplace":
        return budget_pages, 0
    if use_index:
        if storage == "compact":
            raise ValueError("kv_fp8_storage='compact' cannot be combined with the indexer selector yet")
        return budget_pages, 0
    if storage == "auto" and config.sparse_attention is not None:
        return budget_pages, 0
    full, slots = plan_compact(config, layout, budget_pages, page_bytes)
    if slots == 0:                  # no room beyond the full-precision pages: part 1's storage
        log.warning("FP8 KV: the KV budget (%d pages) leaves no room for compact pages; quantising in place "
                    "(no memory saved)", budget_pages)
        return budget_pages, 0
    if storage == "auto" and full + slots < MIN_COMPACT_GAIN * budget_pages:
        # a pool that adds little room fills up: pages left at full precision past it are then quantised by the
        # decode kernel on every read (stop 26: section a's FP8 KV decode ~6% slower with 10 compact slots)
        log.info("FP8 KV: the KV budget (%d pages) holds only %d compact slots beside %d full-precision pages; "
                 "quantising in place (no memory saved)", budget_pages, slots, full)
        return budget_pages, 0
    log.info("FP8 KV (compact): the memory of %d %s pages holds %d full-precision + %d FP8 pages = %d tokens "
             "(%.2fx)", budget_pages, layout.dtype, full, slots, (full + slots) * layout.page_size,
             (full + slots) / budget_pages)
    return full, slots


def make_fp8_pages(config, layout, num_pages: int, num_compact: int, device) -> Fp8Pages:
    """The runner's FP8 page state over ``num_pages`` full-precision pages (+ the scratch page) and, with
    ``num_compact`` > 0, a compact pool of that many slots."""
    pool = None
    if num_compact:
        from tierserve.quant.fp8_compact import new_compact_pool
        pool = new_compact_pool(num_compact, layout.num_layers, layout.page_size, layout.num_kv_heads,
                                layout.head_dim, layout.summary_rows, layout.dtype, device)
    return Fp8Pages(num_pages + 1, config.page_size, config.kv_fp8_keep_sink, config.kv_fp8_keep_recent, device,
                    compact=pool)
