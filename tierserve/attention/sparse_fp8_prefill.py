"""Top-k sparse attention of a prefill chunk over FP8 KV pages (``--sparse-attention pages --kv-dtype fp8``) through
flash attention (``flash_prefix.attend_lse``: plain attention where flash does not run, e.g. fp32): the rule of ``sparse_prefill`` (the queries of each ``PREFILL_BLOCK``-position block attend to
their top-k context pages per KV head, chosen from the pages' key min / max summaries, plus the partial page before
the chunk and the chunk itself, causally) read under the FP8 read rule of ``fp8_flash_prefill`` (the query at p
reads a page in FP8 iff it starts at or after the sink and before hi(p), every other visible key at full precision).

Three parts, merged by their log-sum-exps:

- the keys from the first context page that is not a full one (Pc * page, Pc = start // page): the partial page
  and the chunk, causally -- ``fp8_chunk_attention`` from there on (flash + its masked band);
- the selected context pages of the blocks whose selected pages all start before hi(b0), b0 the block's first
  query (every block but those within about keep_recent of the chunk's start): read the same way by all the
  block's queries (FP8 past the sink, full in it), one batched flash call over every such block's gathered keys,
  the query heads of a KV group and the block's rows folded together;
- the other blocks (at most a few): a masked attention over both readings of their selected pages.

The same selection, softmax and values as the reference (``TorchRefBackend`` with both settings), summed in another
order. Pages in place or in compact slots; a step over spilled pages (staged host rows) passes them as ``host``.
"""
from __future__ import annotations

import torch

from tierserve.attention.flash_prefix import attend_lse, merge_lse
from tierserve.attention.fp8_flash_prefill import (_hi, _masked_lse, fp8_chunk_attention, page_kinds,
                                                    page_readings)
from tierserve.attention.sparse_prefill import PREFILL_BLOCK, block_selection
from tierserve.quant.fp8_compact import compact_summary

_GATHER_BYTES = 1 << 28         # the chosen pages' keys + values gathered for one flash call (a group of blocks)


def page_summaries(kv_layer: torch.Tensor, ids: torch.Tensor, page_size: int,
                   compact: tuple[torch.Tensor, int] | None = None,
                   host: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The key min / max summary rows ``[n, Hkv, D]`` of pages ``ids`` (in place at row ``page_size``, or in a
    compact slot's / staged host row's summary bytes)."""
    N, _, rows, h, d = kv_layer.shape
    kmin = kv_layer[ids.clamp(max=N - 1), 0, page_size]
    kmax = kv_layer[ids.clamp(max=N - 1), 1, page_size]
    for src in (compact, host):
        if src is None:
            continue
        sel = ids >= src[1]
        if src is compact and host is not None:
            sel &= ids < host[1]
        r = src[0][(ids - src[1]).clamp(0, src[0].shape[0] - 1)]                 # [n, 2, slot bytes]
        summ = compact_summary(r, rows - page_size, h, d, page_size, kv_layer.dtype)[:, :, 0]   # [n, 2, H, D]
        kmin = torch.where(sel[:, None, None], summ[:, 0], kmin)
        kmax = torch.where(sel[:, None, None], summ[:, 1], kmax)
    return kmin, kmax


def sparse_fp8_chunk_attention(q: torch.Tensor, kv_layer: torch.Tensor, quantised: torch.Tensor,
                               table_row: torch.Tensor, start: int, scale: float, page_size: int, cfg,
                               keep_sink: int, keep_recent: int, compact: tuple[torch.Tensor, int] | None = None,
                               host: tuple[torch.Tensor, int] | None = None, block: int = PREFILL_BLOCK,
                               slice_rows: int | None = None) -> torch.Tensor:
    """q [n, Hq, D] of a chunk at ``start`` whose context is sparse (``sparse_prefill.sparse_context``; its K/V in
    the pages of ``table_row``) -> [n, Hq, D]. kv_layer [N, 2, rows, Hkv, D] with the summary row at ``page_size``;
    ``cfg`` the sparse settings; ``keep_sink`` / ``keep_recent`` the FP8 ones; ``compact`` / ``host`` as in
    ``fp8_flash_prefill.page_readings``."""
    n, hq, d = q.shape
    h, ps, dev = kv_layer.shape[3], page_size, q.device
    g = hq // h
    Pc = start // ps
    sink, recent = -(-keep_sink // ps) * ps, max(keep_recent, 1)
    o_tail, l_tail = fp8_chunk_attention(q, kv_layer, quantised, table_row, start, scale, ps, keep_sink,
                                         keep_recent, compact, host, slice_rows, key_from=Pc * ps, with_lse=True)
    ctx = table_row[:Pc]
    idx, first_pos, qb, off = block_selection(q, *page_summaries(kv_layer, ctx, ps, compact, host), start, ps, cfg,
                                              block)
    nb = idx.shape[0]
    # readings of the chosen pages: FP8 past the sink, full in it ("mixed": what a query before hi reads), and the
    # full readings of the chosen pages from hi(start) on (some query reads them at full precision)
    uniq, pos = torch.unique(idx, return_inverse=True)                           # context indices, sorted
    ids = ctx[uniq]
    kinds = page_kinds(kv_layer, quantised, ids, compact, host)
    full_len = uniq.numel() * ps
    mixed = page_readings(kv_layer, quantised, ids, full_len, ps, True, compact, host, kinds)
    pstart = uniq * ps
    n_sink = int((pstart < sink).sum())                                          # sorted: the first ones
    if n_sink:
        mixed[:n_sink] = page_readings(kv_layer, quantised, ids[:n_sink], n_sink * ps, ps, False, compact, host,
                                       kinds[:n_sink])
    h_start = int(_hi(torch.tensor(start), sink, recent, ps))
    late = int((pstart < h_start).sum())                                         # pages from ``late`` on: full too
    fulls = page_readings(kv_layer, quantised, ids[late:], (uniq.numel() - late) * ps, ps, False, compact, host,
                          kinds[late:]) if late < uniq.numel() else None
    h_first = _hi(first_pos, sink, recent, ps)                                   # [nb] hi of each block's first row
    last_pos = (first_pos // block + 1) * block - 1                              # each block's last position
    uniform = (idx.amax(dim=(1, 2)) * ps < h_first).tolist()                     # every chosen page before hi(b0)
    heads = torch.arange(h, device=dev)[None, :, None]
    qf = qb.view(nb, block, h, g, d).permute(0, 2, 3, 1, 4).reshape(nb, h, g * block, d)
    o_ctx = torch.empty(nb, h, g * block, d, dtype=q.dtype, device=dev)
    l_ctx = torch.empty(nb, h, g * block, dtype=torch.float32, device=dev)
    ub_ = [b for b in range(nb) if uniform[b]]
    per = max(1, _GATHER_BYTES // max(1, 2 * idx[0].numel() * ps * d * mixed.element_size()))
    for i in range(0, len(ub_), per):             # blocks in groups: the gathered keys stay within _GATHER_BYTES
        sel = torch.tensor(ub_[i:i + per], device=dev)
        keys = mixed[:, 0][pos[sel], :, heads].flatten(2, 3)                     # [m, Hkv, k * page, D]
        vals = mixed[:, 1][pos[sel], :, heads].flatten(2, 3)
        o_ctx[sel], l_ctx[sel] = attend_lse(qf[sel], keys, vals, scale, causal=False)
    for b in (b for b in range(nb) if not uniform[b]):
        p = torch.arange(int(first_pos[b]) - (off if b == 0 else 0), int(last_pos[b]) + 1, device=dev)
        rows_hi = _hi(p, sink, recent, ps)                                       # [block]
        page_pos = pos[b]                                                        # [Hkv, k] into uniq
        kstart = (uniq[page_pos] * ps)[:, None, :]                               # [Hkv, 1, k]
        use_mixed = kstart < rows_hi[None, :, None]                              # [Hkv, block, k]
        fi = (page_pos - late).clamp(min=0)
        k_a = mixed[:, 0][page_pos, :, heads[0]]                                 # [Hkv, k, page, D]
        v_a = mixed[:, 1][page_pos, :, heads[0]]
        if fulls is not None:
            k_b, v_b = fulls[:, 0][fi, :, heads[0]], fulls[:, 1][fi, :, heads[0]]
        else:                                    # no page is read at full precision past the sink: never used
            k_b, v_b = k_a, v_a
        mk = torch.cat([k_a.flatten(1, 2), k_b.flatten(1, 2)], dim=1)           # [Hkv, 2 * k * page, D]
        mv = torch.cat([v_a.flatten(1, 2), v_b.flatten(1, 2)], dim=1)
        mask = torch.cat([use_mixed, ~use_mixed], dim=2).repeat_interleave(ps, dim=2)      # [Hkv, block, 2 k page]
        mask = mask[:, None].expand(h, g, block, mask.shape[-1]).reshape(h, g * block, -1)
        o_b, l_b = _masked_lse(qf[b], mk, mv, mask, scale)
        o_ctx[b], l_ctx[b] = o_b.to(q.dtype), l_b
    o_ctx = o_ctx.view(nb, h, g, block, d).permute(0, 3, 1, 2, 4).reshape(nb * block, hq, d)[off:off + n]
    l_ctx = l_ctx.view(nb, h, g, block).permute(0, 3, 1, 2).reshape(nb * block, hq)[off:off + n]
    out = merge_lse(o_ctx.transpose(0, 1), l_ctx.transpose(0, 1), o_tail.transpose(0, 1), l_tail)
    return out.transpose(0, 1).to(q.dtype)
