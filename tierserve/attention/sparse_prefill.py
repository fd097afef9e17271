"""Top-k sparse attention in prefill chunks (``pages`` / ``indexer`` selectors), as DeepSeek's DSA does it:
each query attends to its own chunk causally (dense) and to a top-k subset of the cached context before it.

Selection granularity: the queries of one block of ``PREFILL_BLOCK`` positions (absolute, so the blocks do not
depend on how a prompt is chunked) share one choice per KV head -- the pages with the largest upper bound of
q.k over any query of the block (the max of the per-query page scores), plus the always-kept sink pages and
the pages of the recent window before the block's first query, ``topk_tokens // page_size`` pages in all.
Only the context's full pages (those before the page holding the chunk's first token) are candidates; the
partial page before the chunk and the chunk itself are always read. While the context has no more full
pages than the budget the chunk attends densely. Decode steps keep one choice per query (attention/select.py).

``prefill_selection`` is the reference rule (torch_ref masks with it); ``sparse_chunk_attention`` computes the
same attention with gathers and attention calls merged by log-sum-exp (flash attention on CUDA): one batched
call over every block's selected pages (GQA heads and the block's queries folded into the query length), one
causal call over the chunk's own keys.
"""
from __future__ import annotations

import torch

from tierserve.attention.flash_prefix import attend_lse, merge_lse
from tierserve.attention.select import page_upper_bounds

PREFILL_BLOCK = 64          # queries (absolute positions) sharing one selection in prefill
_UB_BYTES = 1 << 28         # memory for one group of page scores in sparse_chunk_attention


def sparse_context(start: int, page: int, cfg) -> bool:
    """Whether a chunk starting at position ``start`` reads a subset of its context: more full context
    pages than the budget, and the always-kept pages fit in it."""
    k = cfg.topk_tokens // page
    forced = -(-cfg.sink_tokens // page) + -(-cfg.recent_tokens // page) + 1
    return start // page > k and forced <= k


def block_topk(ub: torch.Tensor, first_pos: torch.Tensor, page: int, cfg) -> torch.Tensor:
    """ub [..., nb, Pc] block page scores over the full context pages, first_pos [nb] each block's first
    query position -> page indices [..., nb, k]: sink and recent-window pages first, then the best."""
    Pc = ub.shape[-1]
    pstart = torch.arange(Pc, device=ub.device) * page
    forced = (pstart[None, :] < cfg.sink_tokens) | (pstart[None, :] + page > first_pos[:, None] - cfg.recent_tokens)
    return ub.masked_fill(forced, float("inf")).topk(cfg.topk_tokens // page, dim=-1).indices


def _blocks(start: int, n: int, block: int):
    """Query index ranges of the chunk's blocks and their first positions."""
    first = start // block
    out = []
    for b in range(first, (start + n - 1) // block + 1):
        i0, i1 = max(b * block, start) - start, min((b + 1) * block, start + n) - start
        out.append((i0, i1))
    return out


def prefill_selection(ub: torch.Tensor, start: int, n: int, page: int, cfg,
                      block: int = PREFILL_BLOCK) -> torch.Tensor:
    """Reference rule. ub [Hkv, n, P] per-query page scores of a chunk of ``n`` queries at positions
    ``start ..`` -> bool [Hkv, n, P], the pages each query may read (key-level causality is the caller's)."""
    hkv, _, P = ub.shape
    pstart = torch.arange(P, device=ub.device) * page
    visible = (pstart[None, :] <= start + torch.arange(n, device=ub.device)[:, None])[None].repeat(hkv, 1, 1)
    if not sparse_context(start, page, cfg):
        return visible
    Pc = start // page
    visible[..., :Pc] = False
    for i0, i1 in _blocks(start, n, block):
        idx = block_topk(ub[:, i0:i1, :Pc].amax(1)[:, None], torch.tensor([start + i0], device=ub.device),
                         page, cfg)[:, 0]
        chosen = torch.zeros(hkv, Pc, dtype=torch.bool, device=ub.device).scatter_(-1, idx, True)
        visible[:, i0:i1, :Pc] = chosen[:, None]
    return visible


def block_selection(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, start: int, page: int, cfg,
                    block: int = PREFILL_BLOCK):
    """The chunk's queries q [n, Hq, D] (at ``start``) padded into whole blocks, and each block's top-k context pages
    per KV head from the context pages' key min / max summaries ``[Pc, Hkv, D]``: (indices into the context
    ``[nb, Hkv, k]``, each block's first query position ``[nb]``, the padded queries ``[nb * block, Hq, D]``, the
    chunk's offset in them)."""
    n, hq, d = q.shape
    hkv, Pc = kmin.shape[1], kmin.shape[0]
    dev = q.device
    off = start % block
    nb = -(-(off + n) // block)
    qb = q.new_zeros(nb * block, hq, d)
    qb[off:off + n] = q
    valid = torch.zeros(nb * block, dtype=torch.bool, device=dev)
    valid[off:off + n] = True
    first_pos = torch.tensor([max(start - off + b * block, start) for b in range(nb)], device=dev)
    lo = kmin.transpose(0, 1)[None].float()                                         # [1, Hkv, Pc, D]
    hi = kmax.transpose(0, 1)[None].float()
    per = max(1, _UB_BYTES // max(1, 8 * hq * block * Pc))                        # blocks per score group
    idx = []
    for b0 in range(0, nb, per):
        rows = slice(b0 * block, min(nb, b0 + per) * block)
        ub = page_upper_bounds(qb[rows].transpose(0, 1)[None], lo, hi, cfg.page_spread)[0]        # [Hkv, m, Pc]
        ub = ub.masked_fill(~valid[rows][None, :, None], float("-inf"))
        ubb = ub.view(hkv, -1, block, Pc).amax(2)                                 # [Hkv, blocks, Pc]
        idx.append(block_topk(ubb, first_pos[b0:b0 + per], page, cfg))
    return torch.cat(idx, dim=1).transpose(0, 1), first_pos, qb, off


def sparse_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                           pages: torch.Tensor, start: int, scale: float, cfg, page: int,
                           block: int = PREFILL_BLOCK) -> torch.Tensor:
    """q [n, Hq, D], the chunk's own k/v [n, Hkv, D] (already in the pages), kv_layer [N, 2, rows, Hkv, D]
    (``page`` token rows, then the key min / max summary row), ``pages`` the sequence's page-table row; the chunk
    starts at ``start`` and ``sparse_context`` holds -> [n, Hq, D] under the ``prefill_selection`` rule."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    Pc, r = start // page, start % page
    qh = q.transpose(0, 1)
    o_own, lse_own = attend_lse(qh, k.transpose(0, 1).repeat_interleave(g, 0),
                                v.transpose(0, 1).repeat_interleave(g, 0), scale, causal=True)
    ctx = pages[:Pc]
    idx, _, qb, off = block_selection(q, kv_layer[ctx, 0, page], kv_layer[ctx, 1, page], start, page, cfg, block)
    nb = idx.shape[0]
    sel = ctx[idx]                                                                 # [nb, Hkv, kk] page ids
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    keys = kv_layer[:, 0, :page][sel, :, heads].flatten(2, 3)                      # [nb, Hkv, kk*page, D]
    vals = kv_layer[:, 1, :page][sel, :, heads].flatten(2, 3)
    if r:                                  # the partial page before the chunk: read by every query
        tail = pages[Pc]
        keys = torch.cat([keys, kv_layer[tail, 0, :r].transpose(0, 1)[None].expand(nb, -1, -1, -1)], dim=2)
        vals = torch.cat([vals, kv_layer[tail, 1, :r].transpose(0, 1)[None].expand(nb, -1, -1, -1)], dim=2)
    qf = qb.view(nb, block, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(nb, hkv, g * block, d)
    o_ctx, lse_ctx = attend_lse(qf, keys.to(q.dtype), vals.to(q.dtype), scale, causal=False)
    o_ctx = o_ctx.view(nb, hkv, g, block, d).permute(0, 3, 1, 2, 4).reshape(nb * block, hq, d)[off:off + n]
    lse_ctx = lse_ctx.view(nb, hkv, g, block).permute(0, 3, 1, 2).reshape(nb * block, hq)[off:off + n]
    out = merge_lse(o_ctx.transpose(0, 1), lse_ctx.transpose(0, 1), o_own, lse_own)
    return out.transpose(0, 1)
