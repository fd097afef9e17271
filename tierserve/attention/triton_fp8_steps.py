"""The FP8-KV paths of the Triton backend (``TritonBackend`` in attention/triton_backend.py, a mixin): pure
decode steps through the dequantising decode kernel (dense, over a sparse selection, or reading spilled pages'
compact rows from CPU RAM, checked once against the reference), and steps with prefill chunks through the FP8
decode + prefill kernels (spilled pages' rows staged on the device per layer), each with its fallback to the
torch reference when a kernel fails to build."""
from __future__ import annotations

import dataclasses
import logging

import torch

from tierserve.attention import fp8_flash_prefill
from tierserve.attention.backend import AttnMetadata
from tierserve.attention.flash_prefix import flash_ok
from tierserve.attention.fp8_decode_config import decode_config
from tierserve.attention.mixed import decode_meta, packed_chunks, split_step
from tierserve.attention.sparse_fp8_prefill import sparse_fp8_chunk_attention
from tierserve.attention.sparse_prefill import sparse_context
from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8
from tierserve.attention.triton_stage import remap_host_entries, stage_rows

log = logging.getLogger("tierserve")


class Fp8Steps:
    def _fp8_decode(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float, sliding_window: int | None,
                    layer_idx: int, compact) -> torch.Tensor:
        """A pure decode step over FP8 KV pages (K/V already written)."""
        page = meta.page_size
        f = meta.kv_fp8
        table, sel = meta.page_table, None
        if meta.sparse is not None:   # read only the selected pages, each under its position's rule
            table, logical, lens = self._select(q, kv_layer, meta, layer_idx, logical=True)
            sel = (logical, lens)
        host = (meta.host_kv[0][1][:, layer_idx], f.end) if meta.host_kv is not None else None
        cfg = decode_config(sel is not None, host is not None, page)
        cfg.setdefault("num_splits", meta.num_splits)
        try:
            out = paged_decode_fp8(q, kv_layer, f.quantised, table, meta.seq_lens, scale, page,
                                   f.keep_sink, f.keep_recent, sliding_window=sliding_window, selection=sel,
                                   compact=compact, host=host, **cfg)
            if host is not None and self.fp8_host_reads is None:     # checked once against the reference
                self._check(out, q, k, v, kv_layer, meta, scale, sliding_window, layer_idx)
                self.fp8_host_reads = True
            return out
        except Exception as e:
            if host is None:
                raise
            log.warning("FP8 decode reading spilled KV pages from CPU RAM is off (%s: %s); gathering them "
                        "instead", type(e).__name__, e)
            self.fp8_host_reads = False
            return self._ref.forward(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, kv_written=True)

    def _fp8_prefill(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float, sliding_window: int | None,
                     layer_idx: int, compact) -> torch.Tensor:
        """A step with prefill chunks over FP8 KV pages (K/V already written)."""
        staged = meta.host_kv is not None   # (only here while fp8_staged_prefill is not False)
        if self.fp8_prefill is not False:
            try:
                host, kmeta = None, meta
                if staged:      # spilled pages' compact rows, staged once per layer
                    slots, kmeta = self._staged_meta(meta, meta.kv_fp8.end)
                    host = (stage_rows(meta.host_kv[0][1][:, layer_idx], slots), meta.kv_fp8.end)
                out = self._mixed_fp8(q, kv_layer, kmeta, scale, sliding_window, compact, host, layer_idx, meta,
                                      k, v)
                if staged:
                    self.fp8_staged_prefill = True
                else:
                    self.fp8_prefill = True
                return out
            except Exception as e:      # a kernel that fails to build must not take the engine down
                if staged:
                    log.warning("FP8 prefill over spilled pages is off (%s: %s); such steps use the "
                                "reference", type(e).__name__, e)
                    self.fp8_staged_prefill = False
                else:
                    log.warning("FP8 prefill kernel is off (%s: %s); steps with prefill use the reference",
                                type(e).__name__, e)
                    self.fp8_prefill = False
        return self._ref.forward(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, kv_written=True)

    @staticmethod
    def _staged_meta(meta: AttnMetadata, n_dev: int):
        """Per step (cached): the host slots its tables read and a metadata whose tables point host entries
        at the staged copy (its own backend_data, shared by the layers)."""
        if "staged" not in meta.backend_data:
            slots, table = remap_host_entries(meta.page_table, n_dev)
            meta.backend_data["staged"] = (slots, dataclasses.replace(meta, page_table=table, backend_data={}))
        return meta.backend_data["staged"]

    def _mixed_fp8(self, q, kv_layer, meta: AttnMetadata, scale: float, window: int | None, compact=None,
                   host=None, layer_idx: int = 0, unstaged: AttnMetadata | None = None, k=None,
                   v=None) -> torch.Tensor:
        """A step with prefill chunks over FP8 KV pages: decode rows through the FP8 decode kernel, every
        chunk (fresh ones too: the read rule applies inside a chunk) through flash attention over the gathered
        readings (``fp8_flash_prefill``; CUDA, no sliding window) or the FP8 prefill kernel. ``host``:
        (staged compact rows, first host id) of pages spilled to CPU RAM, ``meta``'s tables remapped to them.
        With the pages selector (``meta.sparse``; on CUDA the backend keeps it while the FP8 flash prefill is on)
        chunks whose context is sparse go through ``sparse_fp8_prefill`` and decode rows choose their pages as in
        pure decode steps (with ``host``, from ``unstaged``: the step's own tables, whose spilled pages the decode
        kernel reads in CPU RAM)."""
        f = meta.kv_fp8
        split = split_step(meta, kv_layer.shape[3])
        out = torch.empty_like(q)
        pages_sel = meta.sparse is not None and meta.sparse.selector == "pages"
        src = unstaged if host is not None else meta
        if split.dec_tokens is not None and pages_sel and src is not None:
            t = split.dec_tokens           # (k / v: for the reference check of reads from CPU RAM)
            out[t] = self._fp8_decode(q[t], k[t] if k is not None else None, v[t] if v is not None else None,
                                      kv_layer, decode_meta(src, split_step(src, kv_layer.shape[3])), scale, window,
                                      layer_idx, compact)
        elif split.dec_tokens is not None:
            out[split.dec_tokens] = paged_decode_fp8(
                q[split.dec_tokens], kv_layer, f.quantised, split.dec_table, split.dec_lens, scale, meta.page_size,
                f.keep_sink, f.keep_recent, num_splits=split.dec_splits, sliding_window=window, compact=compact,
                host=host)
        # chunks whose context is sparse: no kernel computes that rule (flash where it runs, else its plain path)
        sparse = frozenset(seq for seq, _, _, start in split.prefills
                           if pages_sel and sparse_context(start, meta.page_size, meta.sparse))
        for seq, t0, t1, start in split.prefills:
            if seq in sparse:
                out[t0:t1] = sparse_fp8_chunk_attention(q[t0:t1], kv_layer, f.quantised, meta.page_table[seq], start,
                                                        scale, meta.page_size, meta.sparse, f.keep_sink,
                                                        f.keep_recent, compact=compact, host=host)
        dense = [c for c in split.prefills if c[0] not in sparse]
        if not dense:
            return out
        flash = fp8_flash_prefill.ENABLED and window is None and flash_ok(q) and fp8_flash_prefill.worth_it(dense)
        if flash:
            try:
                for seq, t0, t1, start in dense:   # readings gathered, flash + a masked band (module doc)
                    out[t0:t1] = fp8_flash_prefill.fp8_chunk_attention(
                        q[t0:t1], kv_layer, f.quantised, meta.page_table[seq], start, scale, meta.page_size,
                        f.keep_sink, f.keep_recent, compact=compact, host=host)
                if fp8_flash_prefill.CHECKED:
                    return out
            except Exception as e:      # (flash refused these inputs, ...) the FP8 prefill kernel from now on
                log.warning("FP8 prefill through flash is off (%s: %s); using the FP8 prefill kernel",
                            type(e).__name__, e)
                fp8_flash_prefill.ENABLED = flash = False
        chunks = packed_chunks(meta, split, window, fresh_too=True, skip=sparse)
        fast = out.clone() if flash else None
        paged_prefill_fp8(q, kv_layer, f.quantised, *chunks, scale, meta.page_size, f.keep_sink, f.keep_recent,
                          sliding_window=window, out=out, compact=compact, host=host)
        if flash:                       # its first step: checked once against the kernel
            fp8_flash_prefill.check_once(fast, out, [(t0, t1) for _, t0, t1, _ in dense])
        return out
