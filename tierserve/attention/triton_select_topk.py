"""Top-k of the page scores + compaction + selection counts, one Triton program per (sequence, KV head).

Finds the ``budget``-th largest score by a search over the scores' order-preserving int32 keys, two bits
a step (the counts at three thresholds packed in one reduction), keeps the pages scoring above it, the
lowest-index ties at it (deterministic) and every +inf page, and writes the compacted page table the
decode kernels read (``triton_decode.compact_selection``'s contract with ``logical=True``); adds one per
chosen page to the tiers' page heat (``backend.count_selection``) with atomics.

Two kernels: ``_topk_kernel`` holds a whole row in registers (page tables up to ``MAX_BLOCK`` pages; with
``RADIX`` it finds the threshold by a radix select, four histograms of 8-bit digits, ``_radix_threshold``);
``_topk_wide_kernel`` takes rows of any width: the first ``REG`` pages' keys held in registers as
``_topk_kernel`` does, the pages past them streamed in chunks (each search step re-reads them from cache). The
engine's page tables cover ``max_model_len`` and a 128k context plus its new tokens is just past 8192 pages:
only the few pages past ``REG`` are re-read.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tierserve import pdl

# widest page table held in registers; ptxas for sm_90 at 16 warps: 8192 pages spill 32 bytes a thread,
# 16384 pages ~700 (the streaming kernel, 8192-page chunks, spills none)
MAX_BLOCK = 8192
# read once (per layer per step): "two-level" (triton_select_two_level, which triton_select.fused_select uses for
# tables it fits; the default since H200 timings: 17 / 22 / 31 us at 8192 / 8448 / 65536 pages against 31 / 46 /
# 461 us for "search", benchmarks/results/sparse-select*-h200.json) or "search" / "radix" (topk_compact's kernels)
DEFAULT_METHOD = os.environ.get("TIERSERVE_TOPK", "two-level")


@triton.jit
def _keys(s, valid):
    """Order-preserving int32 keys of fp32 scores (-0.0 ties with +0.0); invalid lanes the smallest key."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(s == 0.0, 0, key)
    return tl.where(valid, key, -2147483647 - 1)


@triton.jit
def _packed_counts(key, lo, quarter: tl.constexpr):
    """Counts of keys >= lo + j * quarter for j = 1, 2, 3, packed in 21-bit fields of one int64 sum."""
    m1 = (lo + quarter).to(tl.int32)
    m2 = (lo + 2 * quarter).to(tl.int32)
    m3 = (lo + 3 * quarter).to(tl.int32)
    packed = (key >= m1).to(tl.int64) + ((key >= m2).to(tl.int64) << 21) + ((key >= m3).to(tl.int64) << 42)
    return tl.sum(packed, axis=0)


@triton.jit
def _step(lo, tot, quarter: tl.constexpr, BUDGET: tl.constexpr):
    passed = ((tot & 0x1FFFFF) >= BUDGET).to(tl.int64) + (((tot >> 21) & 0x1FFFFF) >= BUDGET).to(tl.int64) \
        + ((tot >> 42) >= BUDGET).to(tl.int64)
    return lo + passed * quarter


@triton.jit
def _emit(chosen, rank, p, pt_row, table_row, logical_row, heat_ptr, hheat_ptr, n_dev, h_base, n_hheat,
          K_OUT: tl.constexpr, HEAT: tl.constexpr, HOST_HEAT: tl.constexpr):
    """Store the chosen pages of one block at their slots ``rank`` and count them in the page heat."""
    page = tl.load(pt_row + p, mask=chosen, other=0).to(tl.int64)     # only the chosen entries are read
    keep = chosen & (rank < K_OUT)
    tl.store(table_row + rank, page, mask=keep)
    tl.store(logical_row + rank, p.to(tl.int64), mask=keep)
    if HEAT:
        ones = tl.full(p.shape, 1.0, tl.float32)
        tl.atomic_add(heat_ptr + tl.where(page < n_dev, page, 0), ones, mask=chosen & (page < n_dev))
        if HOST_HEAT:
            slot = page - h_base
            ok = chosen & (slot >= 0) & (slot < n_hheat)
            tl.atomic_add(hheat_ptr + tl.where(ok, slot, 0), ones, mask=ok)


@triton.jit
def _finish(n_sel, seq_len, P, pt_row, table_row, logical_row, lens_ptr,
            K_OUT: tl.constexpr, K_PAD: tl.constexpr, PAGE: tl.constexpr):
    """Unused slots get the row's last entry (never read); the length in tokens of the selection."""
    j = tl.arange(0, K_PAD)
    rest = (j >= n_sel) & (j < K_OUT)
    last = tl.load(pt_row + P - 1).to(tl.int64)
    tl.store(table_row + j, tl.zeros([K_PAD], tl.int64) + last, mask=rest)
    tl.store(logical_row + j, tl.zeros([K_PAD], tl.int64) + (P - 1), mask=rest)
    tail = seq_len - (seq_len - 1) // PAGE * PAGE
    tl.store(lens_ptr, (n_sel - 1) * PAGE + tail)


@triton.jit
def _topk_kernel(score_ptr, pt_ptr, seqlen_ptr, table_ptr, logical_ptr, lens_ptr, heat_ptr, hheat_ptr,
                 P, n_dev, h_base, n_hheat, s_sb, s_sh, s_ptb, s_tb, s_th, s_lb, s_lh,
                 K_OUT: tl.constexpr, K_PAD: tl.constexpr, BUDGET: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK: tl.constexpr, HEAT: tl.constexpr, HOST_HEAT: tl.constexpr, RADIX: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, BLOCK)
    in_row = p < P
    seq_len = tl.load(seqlen_ptr + b)
    visible = in_row & (p * PAGE <= seq_len - 1)
    s = tl.load(score_ptr + b * s_sb + h * s_sh + p, mask=in_row, other=float("-inf"))
    chosen = visible & (s == float("inf"))
    if BUDGET > 0:
        key = _keys(s, in_row)
        if RADIX:
            t, room = _radix_threshold(key, BUDGET)
        else:
            t, room = _search_threshold(key, BUDGET)
        chosen = chosen | (_top(key, t, room) & visible)
    pt_row = pt_ptr + b * s_ptb
    table_row, logical_row = table_ptr + b * s_tb + h * s_th, logical_ptr + b * s_tb + h * s_th
    _emit_all(chosen, p, seq_len, P, pt_row, table_row, logical_row, lens_ptr + b * s_lb + h * s_lh, heat_ptr,
              hheat_ptr, n_dev, h_base, n_hheat, K_OUT, K_PAD, PAGE, HEAT, HOST_HEAT)


@triton.jit
def _search_threshold(key, BUDGET: tl.constexpr):
    """(t, room): the largest t with >= BUDGET keys >= t (two bits a step, 16 reductions over the lanes) and
    how many lanes equal to t are taken."""
    lo = tl.full([], -2147483648, tl.int64)
    for i in tl.static_range(16):
        lo = _step(lo, _packed_counts(key, lo, 1 << (30 - 2 * i)), 1 << (30 - 2 * i), BUDGET)
    t = lo.to(tl.int32)
    return t, BUDGET - tl.sum((key > t).to(tl.int32), axis=0)


@triton.jit
def _sort_threshold(key, BUDGET: tl.constexpr, K_POW: tl.constexpr):
    """``_search_threshold``'s (t, room) from a bitonic top-``K_POW`` of the lanes (``tl.topk``, K_POW the power of two
    >= BUDGET, at most the lanes): t is its BUDGET-th value. The same result."""
    top = tl.topk(key, K_POW)
    t = tl.sum(tl.where(tl.arange(0, K_POW) == BUDGET - 1, top, 0), axis=0)
    return t, BUDGET - tl.sum((key > t).to(tl.int32), axis=0)


@triton.jit
def _threshold(key, BUDGET: tl.constexpr, SORT_K: tl.constexpr):
    """(t, room) by the two-bit search (``SORT_K`` 0) or a bitonic top-``SORT_K`` (``_sort_threshold``)."""
    if SORT_K > 0:
        t, room = _sort_threshold(key, BUDGET, SORT_K)
    else:
        t, room = _search_threshold(key, BUDGET)
    return t, room


@triton.jit
def _top(key, t, room):
    """Lanes above the threshold, and the first ``room`` lanes equal to it (ties: the lowest page indices)."""
    tie = (key == t).to(tl.int32)
    return (key > t) | ((tie > 0) & (tl.cumsum(tie, axis=0) <= room))


@triton.jit
def _emit_all(chosen, p, seq_len, P, pt_row, table_row, logical_row, lens_row, heat_ptr, hheat_ptr, n_dev, h_base,
              n_hheat, K_OUT: tl.constexpr, K_PAD: tl.constexpr, PAGE: tl.constexpr, HEAT: tl.constexpr,
              HOST_HEAT: tl.constexpr):
    """``_emit`` + ``_finish`` for a selection held in one block of lanes."""
    c = chosen.to(tl.int32)
    _emit(chosen, tl.cumsum(c, axis=0) - 1, p, pt_row, table_row, logical_row, heat_ptr, hheat_ptr, n_dev,
          h_base, n_hheat, K_OUT, HEAT, HOST_HEAT)
    _finish(tl.sum(c, axis=0), seq_len, P, pt_row, table_row, logical_row, lens_row, K_OUT, K_PAD, PAGE)


@triton.jit
def _radix_threshold(key, BUDGET: tl.constexpr):
    """(t, room): the ``BUDGET``-th largest of the int32 ``key`` lanes and how many lanes equal to it are
    taken (``BUDGET`` - the lanes above it) -- what the two-bits-a-step search of ``_topk_kernel`` finds, as a
    radix select: four 8-bit digits from the top, each one histogram of the lanes that share the digits
    found so far (``tl.histogram``; lanes that do not share them go to bins past 255)."""
    u = (key ^ -2147483648).to(tl.uint32, bitcast=True)      # order-preserving as unsigned 32-bit
    bins = tl.arange(0, 512)
    need = tl.full([], BUDGET, tl.int32)
    prefix = tl.zeros([], tl.uint32)
    for r in tl.static_range(4):
        digit = ((u >> (24 - 8 * r)) & 255).to(tl.int32)
        if r > 0:
            digit = tl.where((u >> (32 - 8 * r)) == prefix, digit, 256)
        h = tl.histogram(digit, 512)
        h = tl.where(bins < 256, h, 0)
        ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h          # lanes whose digit >= each bin
        d = tl.sum(((ge >= need) & (bins < 256)).to(tl.int32), axis=0) - 1
        need -= tl.sum(tl.where(bins == d + 1, ge, 0), axis=0)
        prefix = (prefix << 8) | d.to(tl.uint32)
    return prefix.to(tl.int32, bitcast=True) ^ -2147483648, need


@triton.jit
def _topk_wide_kernel(score_ptr, pt_ptr, seqlen_ptr, table_ptr, logical_ptr, lens_ptr, heat_ptr, hheat_ptr,
                      P, n_dev, h_base, n_hheat, s_sb, s_sh, s_ptb, s_tb, s_th, s_lb, s_lh,
                      K_OUT: tl.constexpr, K_PAD: tl.constexpr, BUDGET: tl.constexpr, PAGE: tl.constexpr,
                      CHUNK: tl.constexpr, HEAT: tl.constexpr, HOST_HEAT: tl.constexpr, REG: tl.constexpr,
                      PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    ar = tl.arange(0, CHUNK)
    seq_len = tl.load(seqlen_ptr + b)
    n_vis = tl.minimum((seq_len - 1) // PAGE + 1, P)      # only visible pages compete (beyond: -inf)
    row = score_ptr + b * s_sb + h * s_sh
    pt_row = pt_ptr + b * s_ptb
    table_row, logical_row = table_ptr + b * s_tb + h * s_th, logical_ptr + b * s_tb + h * s_th
    # the first REG pages' keys stay in registers; pages past them are streamed in chunks, re-read each step
    p0 = tl.arange(0, REG)
    vis0 = p0 < n_vis
    key0 = _keys(tl.load(row + p0, mask=vis0, other=0.0), vis0)
    lo = tl.full([], -2147483648, tl.int64)
    room = 0
    if BUDGET > 0:
        for i in tl.static_range(16):
            tot = _packed_counts(key0, lo, 1 << (30 - 2 * i))
            for c0 in range(REG, n_vis, CHUNK):
                p = c0 + ar
                tot += _packed_counts(_keys(tl.load(row + p, mask=p < n_vis, other=0.0), p < n_vis), lo,
                                      1 << (30 - 2 * i))
            lo = _step(lo, tot, 1 << (30 - 2 * i), BUDGET)
        n_above = tl.sum((key0 > lo.to(tl.int32)).to(tl.int32), axis=0)
        for c0 in range(REG, n_vis, CHUNK):
            p = c0 + ar
            key = _keys(tl.load(row + p, mask=p < n_vis, other=0.0), p < n_vis)
            n_above += tl.sum((key > lo.to(tl.int32)).to(tl.int32), axis=0)
        room = BUDGET - n_above
    t = lo.to(tl.int32)
    chosen = vis0 & (key0 == 0x7F800000)                  # +inf (always kept); its key is its bits
    n_tie = 0
    if BUDGET > 0:
        chosen = chosen | (_top(key0, t, room) & vis0)
        n_tie = tl.sum((key0 == t).to(tl.int32), axis=0)
    # (names below differ from the block's: a loop-carried value must keep its shape)
    c0_ = chosen.to(tl.int32)
    _emit(chosen, tl.cumsum(c0_, axis=0) - 1, p0, pt_row, table_row, logical_row, heat_ptr, hheat_ptr, n_dev,
          h_base, n_hheat, K_OUT, HEAT, HOST_HEAT)
    n_sel = tl.sum(c0_, axis=0)
    for c0 in range(REG, n_vis, CHUNK):
        p = c0 + ar
        visible = p < n_vis
        s = tl.load(row + p, mask=visible, other=float("-inf"))
        pick = visible & (s == float("inf"))
        if BUDGET > 0:
            key = _keys(s, visible)
            tie_c = (key == t).to(tl.int32)
            top = (key > t) | ((tie_c > 0) & (n_tie + tl.cumsum(tie_c, axis=0) <= room))
            n_tie += tl.sum(tie_c, axis=0)
            pick = pick | (top & visible)
        cs = pick.to(tl.int32)
        _emit(pick, n_sel + tl.cumsum(cs, axis=0) - 1, p, pt_row, table_row, logical_row, heat_ptr, hheat_ptr,
              n_dev, h_base, n_hheat, K_OUT, HEAT, HOST_HEAT)
        n_sel += tl.sum(cs, axis=0)
    _finish(n_sel, seq_len, P, pt_row, table_row, logical_row, lens_ptr + b * s_lb + h * s_lh, K_OUT, K_PAD, PAGE)


def topk_compact(scores: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                 budget: int, max_selected: int, page_heat: torch.Tensor | None = None,
                 host_heat: torch.Tensor | None = None, num_device_pages: int = 0, chunk: int | None = None,
                 method: str | None = None, host_base: int | None = None, reg: int | None = None,
                 num_warps: int | None = None):
    """scores [B, Hkv, P] (``triton_select.page_scores``) -> (table [B, Hkv, K], logical [B, Hkv, K], lens
    [B, Hkv]) as ``compact_selection(..., logical=True)`` with K = min(P, max_selected); adds 1 per chosen
    page to ``page_heat`` (device page ids < ``num_device_pages``) / ``host_heat`` (spilled slots, id -
    ``host_base``, default ``num_device_pages``; FP8 compact slots between the two are not counted).
    ``chunk``: stream rows in chunks of that many pages (default: only past ``MAX_BLOCK`` pages).
    ``method`` (rows held in registers; None: ``TIERSERVE_TOPK`` or "search"): "search" (16 reductions,
    two bits a step) or "radix" (4 histograms of 8-bit digits); the same pages either way. With ``chunk``, the
    first ``reg`` pages of a row (default ``MAX_BLOCK``, at most the table; a power of two) are held in
    registers and only the rest is streamed."""
    B, Hkv, P = scores.shape
    assert scores.stride(2) == 1 and page_table.stride(1) == 1 and seq_lens.dim() == 1 and seq_lens.stride(0) == 1
    assert P < 2 ** 21, "at most 2**21 - 1 pages per sequence"
    K = min(P, max_selected)
    table = torch.empty(B, Hkv, K, dtype=page_table.dtype, device=scores.device)
    logical = torch.empty(B, Hkv, K, dtype=torch.int64, device=scores.device)
    lens = torch.empty(B, Hkv, dtype=seq_lens.dtype, device=scores.device)
    block = triton.next_power_of_2(P)
    if chunk is None and block > MAX_BLOCK:
        chunk = 2048        # the pages past the REG (8192) held in registers
    heat = page_heat if page_heat is not None else scores
    hheat = host_heat if host_heat is not None else scores
    args = (scores, page_table, seq_lens, table, logical, lens, heat, hheat, P, num_device_pages,
            num_device_pages if host_base is None else host_base, host_heat.shape[0] if host_heat is not None else 0,
            scores.stride(0), scores.stride(1), page_table.stride(0), table.stride(0), table.stride(1),
            lens.stride(0), lens.stride(1))
    consts = dict(K_OUT=K, K_PAD=triton.next_power_of_2(K), BUDGET=min(max(budget, 0), P), PAGE=page_size,
                  HEAT=page_heat is not None, HOST_HEAT=host_heat is not None, PDL=pdl.active(scores.device),
                  **pdl.dependent_options(scores.device))
    method = method or (DEFAULT_METHOD if DEFAULT_METHOD != "two-level" else "search")
    if method not in ("search", "radix"):
        raise ValueError(f"topk_compact: method must be 'search' or 'radix', got {method!r}")
    if chunk is None:
        _topk_kernel[(B, Hkv)](*args, BLOCK=block, RADIX=method == "radix", **consts,
                               num_warps=num_warps or (16 if block >= 8192 else 8 if block >= 2048 else 4))
    else:
        _topk_wide_kernel[(B, Hkv)](*args, CHUNK=triton.next_power_of_2(chunk), **consts, num_warps=num_warps or 16,
                                    REG=min(MAX_BLOCK, block) if reg is None else reg)
    return table, logical, lens
