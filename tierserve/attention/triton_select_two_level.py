"""Two-level exact top-k of the page scores: groups of ``GROUP`` pages first, then the pages of the chosen groups.

``triton_select_topk._topk_kernel`` searches the threshold over every page of a row (8192 lanes at 128k tokens;
on the H200 the search takes ~15 us and the compaction ~11 us of its ~31 us a layer, one program per sequence and
KV head). Here the score kernel also writes each group's score, the maximum of its pages' (``page_scores(...,
group=G)``), and one program per (sequence, KV head):

1. finds the ``budget`` best groups (plus every +inf group) over P / G lanes,
2. writes the chosen groups in index order to a scratch row and reads their pages back: at most ``K_PAD`` groups
   of G pages,
3. finds the ``budget`` best of those pages (plus every +inf page) and compacts them as ``_topk_kernel`` does.

Exact, with the same ties (the lowest page index): let T be the ``budget``-th largest page score. Every page above
T lies in a group whose maximum is above T, and there are fewer than ``budget`` such pages, so fewer such groups;
the pages equal to T that are taken are the lowest-index ones, and each group whose maximum is T holds at least one
of them, so the first of those groups by index (the ones step 1 takes at its tie) hold them. +inf groups hold the
always-kept pages and have the largest keys, so step 1's ``budget`` best groups include them (unless there are more
of them than ``budget``): the chosen groups number at most max(budget, +inf groups) (``group_capacity``), within
the selection bound.

Group size (``group_size``): the power of two with the fewest lanes over both steps. Tables just past a power of
two (an engine's max_model_len is the context plus its new tokens) pad the group row to twice its width: stop 21
found 1M + 256 tokens (65,552 pages) falling back to the one-level streaming kernel (519 us a layer on the H200)
and stop 22's 128k profile a 4096-lane group row for 8208 pages (24 us a layer). Past 2M tokens the one-level
kernels run.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl
from tierserve.attention.triton_select_topk import _emit, _finish, _keys, _threshold, _top

MAX_GROUP_ROW = 8192       # widest group row held in registers (when the chosen pages need smaller groups)
MAX_LANES = 4096           # most pages of the chosen groups held in registers (K_PAD * GROUP)
# how each step finds its cut: "search" (two bits a reduction, 16 reductions), "sort" (bitonic top-k, tl.topk) or
# "auto": sort where the budget's power of two is at most SORT_MAX_K (H200, stop 26, top-2048 tokens at 128k: 5.4
# against 11.9 us at 32 pages of 64 tokens, 9.8 against 13.9 at 64 pages of 32 tokens; 19.3 against 18.4 at 128
# pages of 16 tokens, so the search there)
THRESHOLD = os.environ.get("TIERSERVE_TOPK_THRESHOLD", "auto")
SORT_MAX_K = int(os.environ.get("TIERSERVE_TOPK_SORT_MAX_K", "64"))


@triton.jit
def _topk_two_level_kernel(score_ptr, group_ptr, scratch_ptr, pt_ptr, seqlen_ptr, table_ptr, logical_ptr, lens_ptr,
                           heat_ptr, hheat_ptr, P, S, n_dev, h_base, n_hheat, s_sb, s_sh, s_gb, s_gh, s_xb, s_xh,
                           s_ptb, s_tb, s_th, s_lb, s_lh,
                           K_OUT: tl.constexpr, K_PAD: tl.constexpr, BUDGET: tl.constexpr, PAGE: tl.constexpr,
                           GROUP: tl.constexpr, S_BLOCK: tl.constexpr, HEAT: tl.constexpr, HOST_HEAT: tl.constexpr,
                           G_PAD: tl.constexpr, PDL: tl.constexpr = False, SORT_K1: tl.constexpr = 0,
                           SORT_K2: tl.constexpr = 0):
    # G_PAD: most groups step 1 keeps (``group_capacity``); K_PAD: the output row's padded width
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seqlen_ptr + b)
    n_vis = tl.minimum((seq_len - 1) // PAGE + 1, P)
    g = tl.arange(0, S_BLOCK)
    g_vis = g * GROUP < n_vis
    gs = tl.load(group_ptr + b * s_gb + h * s_gh + g, mask=g_vis, other=float("-inf"))
    gkey = _keys(gs, g_vis)
    pick = g_vis & (gs == float("inf"))
    if BUDGET > 0:
        t1, room1 = _threshold(gkey, BUDGET, SORT_K1)
        pick = pick | (_top(gkey, t1, room1) & g_vis)
    c1 = pick.to(tl.int32)
    n_groups = tl.sum(c1, axis=0)
    rank = tl.cumsum(c1, axis=0) - 1
    scratch = scratch_ptr + b * s_xb + h * s_xh
    tl.store(scratch + rank, g, mask=pick & (rank < G_PAD))
    tl.debug_barrier()                 # the chosen group ids, written by every thread, read back by others
    j = tl.arange(0, G_PAD)
    gid = tl.load(scratch + j, mask=j < n_groups, other=0)
    p = tl.reshape(gid[:, None] * GROUP + tl.arange(0, GROUP)[None, :], [G_PAD * GROUP])
    valid = tl.reshape(tl.broadcast_to((j < n_groups)[:, None], [G_PAD, GROUP]), [G_PAD * GROUP]) & (p < n_vis)
    s = tl.load(score_ptr + b * s_sb + h * s_sh + p, mask=valid, other=float("-inf"))
    chosen = valid & (s == float("inf"))
    if BUDGET > 0:
        key = _keys(s, valid)
        t2, room2 = _threshold(key, BUDGET, SORT_K2)
        chosen = chosen | (_top(key, t2, room2) & valid)
    c = chosen.to(tl.int32)
    pt_row = pt_ptr + b * s_ptb
    table_row, logical_row = table_ptr + b * s_tb + h * s_th, logical_ptr + b * s_tb + h * s_th
    _emit(chosen, tl.cumsum(c, axis=0) - 1, p, pt_row, table_row, logical_row, heat_ptr, hheat_ptr, n_dev, h_base,
          n_hheat, K_OUT, HEAT, HOST_HEAT)
    _finish(tl.sum(c, axis=0), seq_len, P, pt_row, table_row, logical_row, lens_ptr + b * s_lb + h * s_lh, K_OUT,
            K_PAD, PAGE)


def group_capacity(max_selected: int, budget: int) -> int:
    """Lanes for the groups step 1 keeps: the ``budget`` best groups -- the +inf pages' groups among them, being the
    best, as long as they number at most ``budget`` -- or else just the +inf groups, of which there are at most
    ``max_selected - budget`` (the always-kept pages ``selection_bound`` adds to the budget). A power of two."""
    return triton.next_power_of_2(max(budget, max_selected - budget, 1))


def group_size(num_pages: int, max_selected: int, budget: int | None = None,
               max_groups: int = MAX_GROUP_ROW) -> int:
    """Pages per group (a power of two >= 4) for a page table this wide: the one with the fewest lanes over both
    steps (the group row, padded to a power of two, plus the chosen groups' pages), the smaller group on a tie,
    with the group row within ``max_groups`` lanes and the chosen groups' pages within ``MAX_LANES``; 0 when none
    fits (the one-level kernels run). ``budget`` (pages kept by score; default ``max_selected``, the loose bound
    of the first version) sizes the chosen groups (``group_capacity``). The engine's tables are just past a power
    of two (max_model_len = the context plus new tokens): at 128k + 256 tokens (8208 pages, budget 128 of 135)
    8-page groups, 2048 + 1024 lanes (4-page groups would take 4096 + 512); at 1M + 256, 32-page groups, 4096 +
    4096; up to 2M tokens (131,072 pages) 32-page groups in an 8192-lane row."""
    cap = group_capacity(max_selected, budget) if budget is not None else \
        triton.next_power_of_2(min(num_pages, max_selected))
    best, best_lanes = 0, None
    g = 4
    while g * cap <= MAX_LANES:
        row = triton.next_power_of_2(-(-num_pages // g))
        if row <= min(max_groups, MAX_GROUP_ROW) and (best_lanes is None or row + cap * g < best_lanes):
            best, best_lanes = g, row + cap * g
        g *= 2
    return best


def sort_sizes(threshold: str, budget: int, lanes1: int, lanes2: int) -> tuple[int, int]:
    """The bitonic top-k sizes of the two steps (0: that step searches): with ``threshold="sort"`` the power of two
    >= ``budget`` where it fits the step's lanes; ``"auto"``: the same where that power is at most ``SORT_MAX_K``."""
    if threshold not in ("search", "sort", "auto"):
        raise ValueError(f"topk_two_level: threshold must be 'search', 'sort' or 'auto', got {threshold!r}")
    k = triton.next_power_of_2(max(budget, 1))
    sort = threshold == "sort" or (threshold == "auto" and k <= SORT_MAX_K)
    return tuple(k if sort and k <= lanes else 0 for lanes in (lanes1, lanes2))


def topk_two_level(scores: torch.Tensor, group_scores: torch.Tensor, group: int, page_table: torch.Tensor,
                   seq_lens: torch.Tensor, page_size: int, budget: int, max_selected: int,
                   page_heat: torch.Tensor | None = None, host_heat: torch.Tensor | None = None,
                   num_device_pages: int = 0, host_base: int | None = None, num_warps: int | None = None,
                   capacity: str = "tight", threshold: str | None = None):
    """``triton_select_topk.topk_compact`` (same arguments and results) from the page scores [B, Hkv, P] and the
    group scores [B, Hkv, ceil(P / group)] that ``page_scores(..., group=group)`` writes. ``capacity="loose"``:
    room for as many chosen groups as the output has slots (stop 21's kernel, for timing against). ``threshold``
    (default ``TIERSERVE_TOPK_THRESHOLD``, "auto"): how each step finds its cut, the two-bit search or "sort" (a
    bitonic top-k of the lanes, ``tl.topk``, where the power of two >= the budget fits them) or "auto" (sort up to
    ``SORT_MAX_K``); the same pages."""
    B, Hkv, P = scores.shape
    S = group_scores.shape[2]
    assert S == -(-P // group) and group & (group - 1) == 0 and group_scores.stride(2) == 1
    assert scores.stride(2) == 1 and page_table.stride(1) == 1 and seq_lens.dim() == 1 and seq_lens.stride(0) == 1
    K = min(P, max_selected)
    k_pad = triton.next_power_of_2(K)
    bud = min(max(budget, 0), P)
    g_pad = k_pad if capacity == "loose" else min(group_capacity(max_selected, bud), triton.next_power_of_2(S))
    assert P < 2 ** 21 and triton.next_power_of_2(S) <= MAX_GROUP_ROW and g_pad * group <= MAX_LANES, \
        "two-level top-k: the group row and the chosen groups' pages must fit in registers"
    table = torch.empty(B, Hkv, K, dtype=page_table.dtype, device=scores.device)
    logical = torch.empty(B, Hkv, K, dtype=torch.int64, device=scores.device)
    lens = torch.empty(B, Hkv, dtype=seq_lens.dtype, device=scores.device)
    scratch = torch.empty(B, Hkv, g_pad, dtype=torch.int32, device=scores.device)
    heat = page_heat if page_heat is not None else scores
    hheat = host_heat if host_heat is not None else scores
    s_block = triton.next_power_of_2(S)
    sort_k1, sort_k2 = sort_sizes(threshold or THRESHOLD, bud, s_block, g_pad * group)
    _topk_two_level_kernel[(B, Hkv)](
        scores, group_scores, scratch, page_table, seq_lens, table, logical, lens, heat, hheat, P, S,
        num_device_pages, num_device_pages if host_base is None else host_base,
        host_heat.shape[0] if host_heat is not None else 0, scores.stride(0), scores.stride(1),
        group_scores.stride(0), group_scores.stride(1), scratch.stride(0), scratch.stride(1), page_table.stride(0),
        table.stride(0), table.stride(1), lens.stride(0), lens.stride(1),
        K_OUT=K, K_PAD=k_pad, BUDGET=bud, PAGE=page_size, GROUP=group, S_BLOCK=s_block,
        HEAT=page_heat is not None, HOST_HEAT=host_heat is not None, G_PAD=g_pad, PDL=pdl.active(scores.device),
        SORT_K1=sort_k1, SORT_K2=sort_k2,
        num_warps=num_warps or _warps(max(s_block, g_pad * group, k_pad), sorting=bool(sort_k1 or sort_k2)),
        **pdl.dependent_options(scores.device))
    return table, logical, lens


def _warps(lanes: int, sorting: bool = False) -> int:
    # ptxas sm_90: 4096 lanes use 124 registers at 16 warps (228 at 8); none of these spill. The bitonic top-k timed
    # fastest at 8 warps or more (H200, stop 26: 5.4 us at 8 warps against 6.3 at 4, 2052 pages)
    n = 16 if lanes >= 4096 else 8 if lanes >= 1024 else 4
    return max(n, 8) if sorting else n
