"""GPU backend: Triton paged decode (split-K) for decode rows; prefill chunks through SDPA (fresh prompts)
or the Triton paged prefill kernel (continued chunks, prefix hits); see attention/mixed.py.

FP8 KV pages in pure decode steps go through the dequantising kernel (attention/triton_decode_fp8.py; the FP8
steps live in attention/triton_fp8_steps.py, a mixin of this class).
Pages spilled to CPU RAM are read in place by both kernels (``_host``); FP8 pages spilled to CPU RAM (compact
rows) by the FP8 decode kernel in pure decode steps. Pages spilled to disk, spilled FP8 pages in steps with
prefill, FP8 pages in steps with prefill and sparse selection in steps with prefill fall back to the torch
reference.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from tierserve.attention.backend import AttnMetadata, count_selection, host_base, write_kv
from tierserve.attention.flash_prefix import chunk_attention, flash_ok, gather_context
from tierserve.attention.host_check import check_subset
from tierserve.attention.indexer import indexer_page_scores
from tierserve.attention import fp8_flash_prefill
from tierserve.attention.mixed import decode_meta, is_fresh, packed_chunks, prefill_chunk, split_step
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.attention.select import page_upper_bounds, select_pages, selection_bound
from tierserve.attention.sparse_prefill import sparse_chunk_attention, sparse_context
from tierserve.attention.triton_decode import compact_selection, paged_decode
from tierserve.attention.triton_fp8_steps import Fp8Steps
from tierserve.attention.triton_prefill import paged_prefill
from tierserve.attention.triton_prefill import supported as prefill_supported
from tierserve.attention.triton_select import fused_select, use_fused_selection
from tierserve.attention.triton_stage import stage_layer

log = logging.getLogger("tierserve")
_FUSED_OFF: list = []          # non-empty once the fused selection kernels failed (then the PyTorch chain)


def _select_pages(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata, layer_idx: int = 0,
                  logical: bool = False):
    page = meta.page_size
    compact = meta.kv_fp8.kernel_pool(layer_idx) if meta.kv_fp8 is not None else None
    if meta.sparse.selector == "pages" and use_fused_selection(q.device) and not _FUSED_OFF:
        try:                                   # two kernels (triton_select.py)
            return fused_select(q, kv_layer, meta, layer_idx, logical)
        except Exception as e:      # a kernel that fails to build must not take the engine down
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            log.warning("fused sparse page selection is off (%s: %s); using the PyTorch chain", type(e).__name__, e)
            _FUSED_OFF.append(True)
    # the PyTorch chain: the "indexer" selector, and the reference of the fused kernels
    if meta.sparse.selector == "indexer":
        B, P = meta.page_table.shape
        visible = torch.arange(P * page, device=q.device)[None, None, :] < meta.seq_lens[:, None, None]
        ub = indexer_page_scores(meta, layer_idx, torch.arange(B, device=q.device)[:, None], visible)
        ub = ub.expand(-1, kv_layer.shape[3], -1, -1)
    else:
        pt, n_dev = meta.page_table, kv_layer.shape[0]
        hb = host_base(meta, n_dev)
        summ = kv_layer[pt.clamp(max=n_dev - 1), :, page]         # [B, P, 2, Hkv, D]: key min / max
        if compact is not None:         # FP8 compact pages: their summaries sit in their slots
            summ = torch.where((pt >= compact[1])[..., None, None, None], meta.kv_fp8.summaries(pt, kv_layer, layer_idx),
                               summ)
        if meta.host_kv is not None:    # spilled pages: their summaries stayed on the GPU
            host = meta.host_summaries[(pt - hb).clamp(min=0), layer_idx, :, 0]
            summ = torch.where((pt >= hb)[..., None, None, None], host, summ)
        ub = page_upper_bounds(q[:, :, None, :], summ[:, :, 0].transpose(1, 2), summ[:, :, 1].transpose(1, 2),
                               meta.sparse.page_spread)
    chosen = select_pages(ub, (meta.seq_lens - 1)[:, None], meta.seq_lens, page, meta.sparse)[:, :, 0]
    count_selection(meta, chosen, kv_layer.shape[0])
    bound = selection_bound(meta.sparse, page)    # the top-k budget plus the always-kept pages
    return compact_selection(chosen, meta.page_table, meta.seq_lens, page, max_selected=bound, logical=logical)


class TritonBackend(Fp8Steps):
    name = "triton"

    def __init__(self) -> None:
        self._ref = TorchRefBackend()
        self.host_reads: bool | None = None    # decode reads spilled pages from CPU RAM (None: not yet checked)
        self.fp8_host_reads: bool | None = None  # the same for FP8 pages (compact rows in CPU RAM)
        self.fp8_prefill: bool | None = None   # steps with prefill over FP8 pages use their kernel (False: failed)
        # the same over spilled FP8 pages (their rows staged per layer first); its own switch, so that a staging
        # failure leaves the kernel on for every other prefill
        self.fp8_staged_prefill: bool | None = None
        # CUDA, bf16/fp16: chunks over cached context as two flash-attention calls merged by LSE
        # (attention/flash_prefix.py) rather than the paged prefill kernel
        self.flash_prefix = True
        self._warned_fp8_sparse_prefill = False

    _select = staticmethod(_select_pages)

    def forward(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float,
                sliding_window: int | None = None, layer_idx: int = 0, kv_written: bool = False) -> torch.Tensor:
        # sparse prefill over FP8 pages (the pages selector; pages on the device, or spilled to CPU RAM and staged
        # per layer; on CUDA flash attention for bf16 / fp16, plain attention for fp32): attention/sparse_fp8_prefill.py
        # through ``_mixed_fp8``
        sparse_fp8_prefill = meta.sparse is not None and meta.kv_fp8 is not None and not meta.decode_only \
            and meta.sparse.selector == "pages" and sliding_window is None \
            and (meta.host_kv is None or (meta.host_ram_only and self.fp8_prefill is not False
                                          and self.fp8_staged_prefill is not False)) \
            and (not q.is_cuda or fp8_flash_prefill.ENABLED)
        sparse_ok = meta.sparse is None or (sliding_window is None and meta.decode_only) or sparse_fp8_prefill
        # FP8 KV pages: pure decode steps through the dequantising kernel, other steps the torch reference
        fp8_ok = meta.kv_fp8 is None or meta.decode_only or prefill_supported(q.shape[-1])
        host_sparse_ok = meta.sparse is None or (meta.sparse.selector == "pages" and sliding_window is None
                                                 and meta.host_summaries is not None)
        if meta.host_kv is not None and meta.host_ram_only and host_sparse_ok and meta.kv_fp8 is None \
                and (meta.decode_only or meta.sparse is None) and self.host_reads is not False:
            return self._host(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, kv_written)
        if meta.sparse is not None and not meta.decode_only and sliding_window is None and meta.host_kv is None \
                and meta.kv_fp8 is None and meta.sparse.selector == "pages":
            return self._sparse_prefill(q, k, v, kv_layer, meta, scale, kv_written, layer_idx)
        if meta.sparse is not None and meta.kv_fp8 is not None and not meta.decode_only and q.is_cuda \
                and fp8_ok and self.fp8_prefill is not False and not sparse_fp8_prefill:
            # elsewhere (the indexer selector, pages on disk, flash off) the chunks attend densely on the GPU: the
            # masked reference would need O(chunk x context)
            if not self._warned_fp8_sparse_prefill:
                log.warning("sparse attention over FP8 KV pages: here prefill chunks attend densely on the GPU "
                            "(the sparse FP8 prefill path needs the pages selector, pages in GPU or CPU RAM and "
                            "TIERSERVE_FP8_FLASH_PREFILL on); decode steps stay sparse")
                self._warned_fp8_sparse_prefill = True
            meta = dataclasses.replace(meta, sparse=None)
        compact = meta.kv_fp8.kernel_pool(layer_idx) if meta.kv_fp8 is not None else None
        # FP8 pages spilled to CPU RAM: pure decode steps read their compact rows in the FP8 decode kernel
        fp8_host = meta.host_kv is not None and meta.kv_fp8 is not None and meta.decode_only and meta.host_ram_only \
            and host_sparse_ok and self.fp8_host_reads is not False
        # steps with prefill over them: those rows staged on the device per layer, the FP8 prefill kernel
        fp8_host_prefill = meta.host_kv is not None and meta.kv_fp8 is not None and not meta.decode_only \
            and meta.host_ram_only and self.fp8_prefill is not False and self.fp8_staged_prefill is not False
        if (meta.host_kv is not None and not (fp8_host or fp8_host_prefill)) or \
                (not sparse_ok and meta.sparse is not None) or not fp8_ok:
            return self._ref.forward(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, kv_written)
        if not kv_written:
            write_kv(k, v, kv_layer, meta)
        page = meta.page_size
        if meta.kv_fp8 is not None and meta.decode_only:
            return self._fp8_decode(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, compact)
        if not meta.decode_only:
            if meta.kv_fp8 is not None:
                return self._fp8_prefill(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx, compact)
            return self._mixed(q, k, v, kv_layer, meta, scale, sliding_window)
        if meta.sparse is not None:       # read only the selected pages of each (sequence, KV head)
            table, lens = self._select(q, kv_layer, meta, layer_idx)
            return paged_decode(q, kv_layer[:, 0, :page], kv_layer[:, 1, :page], table, lens, scale,
                                num_splits=meta.num_splits)
        return paged_decode(q, kv_layer[:, 0, :page], kv_layer[:, 1, :page], meta.page_table, meta.seq_lens, scale,
                            num_splits=meta.num_splits, sliding_window=sliding_window)

    def _check(self, out, q, k, v, kv_layer, meta: AttnMetadata, scale, window, layer_idx) -> None:
        """Raise unless ``out`` matches the reference (a fast path's first read of pages in CPU RAM). A pure decode
        step: a few rows over the columns they use (attention/host_check.py; a graph warm-up is 128 x 8200 pages)."""
        if meta.decode_only and meta.index_keys is None:
            rows, meta = check_subset(meta, kv_layer.shape[0])
            out, q, k, v = out[rows], q[rows], k[rows], v[rows]
        want = self._ref.forward(q, k, v, kv_layer, meta, scale, window, layer_idx, kv_written=True)
        tol = 1e-3 if q.dtype == torch.float32 else 3e-2
        if not torch.allclose(out.float(), want.float(), atol=tol, rtol=tol):
            raise RuntimeError("differs from the reference")

    def _host(self, q, k, v, kv_layer, meta: AttnMetadata, scale, window, layer_idx, kv_written):
        """Attention over pages partly spilled to CPU RAM: the decode and prefill kernels read those
        straight from (pinned) host memory, no gather. Checked once against the reference; any failure
        turns it off (reference)."""
        if not kv_written:
            write_kv(k, v, kv_layer, meta)
        page = meta.page_size
        store = meta.host_kv[0][1]
        table, lens = meta.page_table, meta.seq_lens
        if meta.sparse is not None:     # scored from summaries on the GPU; only chosen pages are read
            table, lens = self._select(q, kv_layer, meta, layer_idx)
        host = (store[:, layer_idx, 0, :page], store[:, layer_idx, 1, :page])
        try:
            if meta.decode_only:
                out = paged_decode(q, kv_layer[:, 0, :page], kv_layer[:, 1, :page], table, lens,
                                   scale, num_splits=meta.num_splits, sliding_window=window,
                                   host_cache=host, num_device_pages=kv_layer.shape[0])
            else:       # prefill: this layer's host pages staged on the device once (not once per query block)
                slots, staged_meta = self._staged_meta(meta, kv_layer.shape[0])
                staged = stage_layer(store[:, layer_idx], slots, page)
                out = self._mixed(q, k, v, kv_layer, staged_meta, scale, window,
                                  host_cache=(staged[:, 0], staged[:, 1]))
            if self.host_reads is None:
                self._check(out, q, k, v, kv_layer, meta, scale, window, layer_idx)
                self.host_reads = True
            return out
        except Exception as e:      # pinned memory the device cannot address, or a wrong read
            log.warning("attention reading spilled KV pages from CPU RAM is off (%s: %s); gathering them instead",
                        type(e).__name__, e)
            self.host_reads = False
            return self._ref.forward(q, k, v, kv_layer, meta, scale, window, layer_idx, kv_written=True)

    def _sparse_prefill(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float, kv_written: bool,
                        layer_idx: int) -> torch.Tensor:
        """A step with prefill chunks and sparse attention: decode rows as in pure decode steps (each its
        own top-k pages); each chunk causal over itself plus its context, dense while the context is within
        the budget, else the blocks' top-k pages (attention/sparse_prefill.py)."""
        if not kv_written:
            write_kv(k, v, kv_layer, meta)
        page = meta.page_size
        out = torch.empty_like(q)
        kc, vc = kv_layer[:, 0, :page], kv_layer[:, 1, :page]
        split = split_step(meta, kv_layer.shape[3])
        if split.dec_tokens is not None:
            dmeta = decode_meta(meta, split)
            qd = q[split.dec_tokens]
            table, lens = self._select(qd, kv_layer, dmeta, layer_idx)
            out[split.dec_tokens] = paged_decode(qd, kc, vc, table, lens, scale, num_splits=split.dec_splits)
        for seq, t0, t1, start in split.prefills:
            if sparse_context(start, page, meta.sparse):
                out[t0:t1] = sparse_chunk_attention(q[t0:t1], k[t0:t1], v[t0:t1], kv_layer, meta.page_table[seq],
                                                    start, scale, meta.sparse, page)
            else:
                ctx = gather_context(kc, vc, meta.page_table[seq], start) if start else (None, None)
                out[t0:t1] = chunk_attention(q[t0:t1], k[t0:t1], v[t0:t1], *ctx, scale)
        return out

    def _mixed(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float, window: int | None,
               host_cache=None) -> torch.Tensor:
        page = meta.page_size
        split = split_step(meta, kv_layer.shape[3])
        out = torch.empty_like(q)
        kc, vc = kv_layer[:, 0, :page], kv_layer[:, 1, :page]
        host = dict(host_cache=host_cache, num_device_pages=kv_layer.shape[0]) if host_cache else {}
        if split.dec_tokens is not None:
            out[split.dec_tokens] = paged_decode(q[split.dec_tokens], kc, vc, split.dec_table, split.dec_lens, scale,
                                                 num_splits=split.dec_splits, sliding_window=window, **host)
        if self.flash_prefix and window is None and flash_ok(q):
            try:
                for seq, t0, t1, start in split.prefills:    # context gathered once, two flash calls merged by LSE
                    ctx = gather_context(kc, vc, meta.page_table[seq], start, host_cache) if start else (None, None)
                    out[t0:t1] = chunk_attention(q[t0:t1], k[t0:t1], v[t0:t1], *ctx, scale)
                return out
            except RuntimeError as e:     # this torch build's flash op refused: the paged prefill kernel instead
                log.warning("flash prefill over cached context is off (%s); using the paged prefill kernel", e)
                self.flash_prefix = False
        kernel = prefill_supported(q.shape[-1])
        chunks = packed_chunks(meta, split, window)
        if chunks is not None and kernel:               # chunks that read cached context: the prefill kernel
            paged_prefill(q, kc, vc, *chunks, scale, sliding_window=window, out=out, **host)
        for seq, t0, t1, start in split.prefills:
            fresh = is_fresh(t1 - t0, start, window)
            if fresh or not kernel:                     # own keys only (flash SDPA); else gather + masked SDPA
                assert fresh or host_cache is None, "host pages need the prefill kernel"
                out[t0:t1] = prefill_chunk(q[t0:t1], k[t0:t1], v[t0:t1], kv_layer, meta, seq, start, scale, window)
        return out
