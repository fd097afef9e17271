"""Fused top-k page selection for sparse decode ("pages" selector), two Triton kernels.

1. ``_page_score_kernel`` grid (batch, KV head, page block): reads each page's key min / max summary row
   straight from the page pool (row ``page_size`` of the page; spilled pages' rows from the device copy
   of the host summaries) and writes the page's score, the upper bound
   max over the group's query heads of  sum_d relu(q_d) * kmax_d + min(q_d, 0) * kmin_d,
   as fp32 [B, Hkv, P] (with ``SparseConfig.page_spread`` < 1: max over the heads of q.c + spread |q|.r instead,
   c / r the channels' midpoint / half range): -inf for pages the query cannot see, +inf for the pages always kept (sink pages,
   the recent window, the query's own page; every visible page while the context fits the budget).
   Only the pages that compete are read.
2. ``triton_select_topk.topk_compact`` grid (batch, KV head) (or, with ``TIERSERVE_TOPK=two-level``, the
   exact two-level ``triton_select_two_level.topk_two_level``, from groups of pages first): keeps the
   ``budget`` best pages (ties at the cut: the lowest page index, deterministic) plus every +inf page,
   writes the compacted page table the decode kernels read (same contract as
   ``triton_decode.compact_selection``) and adds the selection counts to the tiers' page heat
   (``backend.count_selection``) with atomics.

No host sync and no data-dependent shape: capturable in CUDA graphs. Reference: the PyTorch chain
``select.page_upper_bounds`` -> ``select.select_pages`` -> ``compact_selection`` (tests compare them).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.attention.backend import host_base
from tierserve.attention.select import selection_bound
from tierserve.attention import triton_select_topk
from tierserve.attention.triton_select_topk import topk_compact
from tierserve.attention.triton_select_two_level import group_size, topk_two_level


@triton.jit
def _page_score_kernel(q_ptr, kmin_ptr, kmax_ptr, hmin_ptr, hmax_ptr, cmin_ptr, cmax_ptr, pt_ptr, seqlen_ptr,
                       out_ptr, P, n_dev, h_base, n_host, c_base, n_comp, s_qb, s_qh, s_kp, s_kh, s_xp, s_xh,
                       s_hp, s_hh, s_gp, s_gh, s_cp, s_ch, s_yp, s_yh, s_ptb, s_ob, s_oh,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_P: tl.constexpr, TOPK: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
                       HOST: tl.constexpr, COMPACT: tl.constexpr, grp_ptr=None, n_grp=0, s_rb=0, s_rh=0,
                       PAGE_GROUP: tl.constexpr = 0, PDL: tl.constexpr = False, SPREAD: tl.constexpr = 1.0):
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    seq_len = tl.load(seqlen_ptr + b)
    pos = seq_len - 1
    in_row = p < P
    start = p * PAGE
    visible = in_row & (start <= pos)
    forced = visible & ((start < SINK) | (start + PAGE > pos - RECENT) | (p == pos // PAGE) | (seq_len <= TOPK))
    # the pages that compete (the negation of ``forced`` among the visible ones, spelled out)
    need = visible & (start >= SINK) & (start + PAGE <= pos - RECENT) & (p != pos // PAGE) & (seq_len > TOPK)
    # (masked by the row only, so that this load need not wait for seq_len: one latency less)
    page = tl.load(pt_ptr + b * s_ptb + p, mask=in_row, other=0).to(tl.int64)
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    # ids < n_dev: the summary row of the page in the pool; (COMPACT) ids in [c_base, c_base + n_comp): FP8
    # compact slots, whose rows carry it; (HOST) ids >= h_base: spilled pages, from the host-summary copy on the
    # device. Each source is a masked load (0 elsewhere) and they are added: one of them is the value.
    # (Spelled out per source: a shared jit helper for them hit a Triton 3.6 layout bug at 32 pages, 4 warps.)
    if HOST or COMPACT:
        on_dev = page < n_dev
        dp = tl.where(on_dev, page, 0)
        dm = (need & on_dev)[:, None] & dmask[None, :]
        kmin = tl.load(kmin_ptr + dp[:, None] * s_kp + h * s_kh + d[None, :], mask=dm, other=0.0)
        kmax = tl.load(kmax_ptr + dp[:, None] * s_xp + h * s_xh + d[None, :], mask=dm, other=0.0)
        if HOST:
            on_host = page >= h_base
            hp = tl.where(on_host, page - h_base, 0)
            hm = (need & on_host & (hp < n_host))[:, None] & dmask[None, :]
            kmin += tl.load(hmin_ptr + hp[:, None] * s_hp + h * s_hh + d[None, :], mask=hm, other=0.0)
            kmax += tl.load(hmax_ptr + hp[:, None] * s_gp + h * s_gh + d[None, :], mask=hm, other=0.0)
        if COMPACT:
            in_c = (page >= c_base) & (page < c_base + n_comp)
            cp = tl.where(in_c, page - c_base, 0)
            cm = (need & in_c)[:, None] & dmask[None, :]
            kmin += tl.load(cmin_ptr + cp[:, None] * s_cp + h * s_ch + d[None, :], mask=cm, other=0.0)
            kmax += tl.load(cmax_ptr + cp[:, None] * s_yp + h * s_yh + d[None, :], mask=cm, other=0.0)
    else:       # (ids past the device pool cannot occur here; masked rather than read out of bounds)
        m = (need & (page < n_dev))[:, None] & dmask[None, :]
        kmin = tl.load(kmin_ptr + page[:, None] * s_kp + h * s_kh + d[None, :], mask=m, other=0.0)
        kmax = tl.load(kmax_ptr + page[:, None] * s_xp + h * s_xh + d[None, :], mask=m, other=0.0)
    kmin = kmin.to(tl.float32)
    kmax = kmax.to(tl.float32)
    if SPREAD != 1.0:       # q.c + SPREAD |q|.r (``select.spread_rows``: the same two products on moved rows)
        lo = ((1.0 + SPREAD) / 2) * kmin + ((1.0 - SPREAD) / 2) * kmax
        kmax = ((1.0 + SPREAD) / 2) * kmax + ((1.0 - SPREAD) / 2) * kmin
        kmin = lo
    ub = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(GROUP):
        qg = tl.load(q_ptr + b * s_qb + (h * GROUP + g) * s_qh + d, mask=dmask, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(qg, 0.0)[None, :] * kmax + tl.minimum(qg, 0.0)[None, :] * kmin, axis=1)
        ub = tl.maximum(ub, s)
    score = tl.where(forced, float("inf"), tl.where(visible, ub, float("-inf")))
    tl.store(out_ptr + b * s_ob + h * s_oh + p, score, mask=in_row)
    if PAGE_GROUP > 0:          # each group's score: the maximum of its pages' (triton_select_two_level.py)
        gmax = tl.max(tl.reshape(score, [BLOCK_P // PAGE_GROUP, PAGE_GROUP]), axis=1)
        gi = tl.program_id(2) * (BLOCK_P // PAGE_GROUP) + tl.arange(0, BLOCK_P // PAGE_GROUP)
        tl.store(grp_ptr + b * s_rb + h * s_rh + gi, gmax, mask=gi < n_grp)


def use_fused_selection(device: torch.device) -> bool:
    """The fused kernels run on CUDA and under the Triton interpreter; TIERSERVE_SPARSE_SELECT=torch
    forces the PyTorch reference chain (for comparisons)."""
    if os.environ.get("TIERSERVE_SPARSE_SELECT", "").lower() == "torch":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def page_scores(q: torch.Tensor, kv_layer: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                page_size: int, cfg, host_summaries: torch.Tensor | None = None, block_p: int = 16,
                num_warps: int | None = None, host_base: int | None = None,
                compact: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                group: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] (one decode query per sequence at seq_len - 1); kv_layer [N, 2, rows, Hkv, D] with the
    key min / max at row ``page_size``; page_table [B, P]; ``host_summaries`` [slots, 2, rows, Hkv, D] (one
    layer) for page ids >= ``host_base`` (default N); ``compact`` (FP8 compact slots): (key min, key max)
    views [slots, Hkv, D] and the first compact page id. Returns fp32 scores [B, Hkv, P] (-inf invisible,
    +inf always kept); with ``group`` (a power of two dividing the block) also each group of that many pages'
    maximum, [B, Hkv, ceil(P / group)] (for ``triton_select_two_level``).
    Default 16 pages a program, 4 warps: no register spills at D=128 for sm_90 with any source set
    (``scripts/bench_sparse_select.py --ptxas``: 56 registers with launch-like divisibility hints);
    scripts/bench_sparse_select.py times the alternatives."""
    B, Hq, D = q.shape
    N, _, rows, Hkv, _ = kv_layer.shape
    P = page_table.shape[1]
    assert rows > page_size and q.stride(-1) == 1 and kv_layer.stride(-1) == 1 and page_table.stride(1) == 1
    assert seq_lens.dim() == 1 and seq_lens.stride(0) == 1
    kmin, kmax = kv_layer[:, 0, page_size], kv_layer[:, 1, page_size]          # [N, Hkv, D] views
    if host_summaries is not None:
        hmin, hmax, n_host = host_summaries[:, 0, 0], host_summaries[:, 1, 0], host_summaries.shape[0]
        assert hmin.stride(-1) == 1
    else:
        hmin, hmax, n_host = kmin, kmax, 0
    if compact is not None:
        cmin, cmax, c_base = compact
        assert cmin.stride(-1) == 1 and cmax.stride(-1) == 1 and cmin.dtype == kv_layer.dtype
        n_comp = cmin.shape[0]
    else:
        cmin, cmax, c_base, n_comp = kmin, kmax, 0, 0
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    block_p = min(block_p, triton.next_power_of_2(P))
    num_warps = num_warps or 4
    grp = {}
    if group:
        block_p = max(block_p, group)
        assert group & (group - 1) == 0 and block_p % group == 0
        gout = torch.empty(B, Hkv, -(-P // group), dtype=torch.float32, device=q.device)
        grp = dict(grp_ptr=gout, n_grp=gout.shape[2], s_rb=gout.stride(0), s_rh=gout.stride(1), PAGE_GROUP=group)
    _page_score_kernel[(B, Hkv, triton.cdiv(P, block_p))](
        q, kmin, kmax, hmin, hmax, cmin, cmax, page_table, seq_lens, out, P, N,
        N if host_base is None else host_base, n_host, c_base, n_comp,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmax.stride(0), kmax.stride(1),
        hmin.stride(0), hmin.stride(1), hmax.stride(0), hmax.stride(1), cmin.stride(0), cmin.stride(1),
        cmax.stride(0), cmax.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, HEAD_DIM=D, D_PAD=triton.next_power_of_2(D), PAGE=page_size, BLOCK_P=block_p,
        TOPK=cfg.topk_tokens, SINK=cfg.sink_tokens, RECENT=cfg.recent_tokens, HOST=host_summaries is not None,
        COMPACT=compact is not None, num_warps=num_warps, PDL=pdl.active(q.device), SPREAD=float(cfg.page_spread),
        **grp,
        **pdl.dependent_options(q.device))
    return (out, grp["grp_ptr"]) if group else out


def fused_select(q: torch.Tensor, kv_layer: torch.Tensor, meta, layer_idx: int = 0, logical: bool = False):
    """``triton_backend._select_pages`` for the "pages" selector: scores, top-k, compaction and the
    selection counts in two kernel launches (FP8 compact slots: their summaries read from the slots' rows)."""
    page, cfg, n_dev = meta.page_size, meta.sparse, kv_layer.shape[0]
    host = meta.host_summaries[:, layer_idx] if meta.host_kv is not None else None
    hb = host_base(meta, n_dev)
    compact = None
    if meta.kv_fp8 is not None and meta.kv_fp8.compact is not None:
        compact = (*meta.kv_fp8.summary_views(layer_idx, kv_layer), meta.kv_fp8.base)
    bound = selection_bound(cfg, page)
    G = group_size(meta.page_table.shape[1], bound, cfg.topk_tokens // page) \
        if triton_select_topk.DEFAULT_METHOD == "two-level" else 0
    scores = page_scores(q, kv_layer, meta.page_table, meta.seq_lens, page, cfg, host, host_base=hb,
                         compact=compact, group=G)
    host_heat = meta.host_heat if meta.host_kv is not None and meta.page_heat is not None else None
    args = (meta.page_table, meta.seq_lens, page, cfg.topk_tokens // page, bound,
            meta.page_heat, host_heat, n_dev)
    if G:
        table, idx, lens = topk_two_level(scores[0], scores[1], G, *args, host_base=hb)
    else:
        table, idx, lens = topk_compact(scores, *args, host_base=hb)
    return (table, idx, lens) if logical else (table, lens)
