"""The page scores of ``triton_select.page_scores`` with every KV head of a page in one program.

``_page_score_kernel`` runs one program per (sequence, KV head, block of pages): each reads, per page, the key min
and max rows of its one head -- 256-byte pieces (D=128, bf16) of rows that lie a page stride apart (the pool is
page-major: ~2.2 MB between two pages' rows at Llama-8B shapes), 2 x 8192 such pieces per head at 128k tokens. Here
one program per (sequence, block of pages) reads each page's whole ``[Hkv, D]`` min and max rows (2 KB runs at
Llama-8B shapes) and scores every head: the same bytes in 8x fewer, 8x longer pieces and 8x fewer programs.

Same scores as ``_page_score_kernel`` (the same rule and sources: pool rows, FP8 compact slots' rows, the device copy
of spilled pages' summaries; -inf invisible, +inf always kept), summed over D in the same fp32 products; the order
of the sum over D may differ (bits of the last place). Needs a power-of-two KV head count. Tests compare the two.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tierserve import pdl


@triton.jit
def _rows(ptr, page, h, d, s_p, s_h, mask):
    """[BLOCK_P, HKV, D_PAD] summary values of ``page`` (0 where masked)."""
    return tl.load(ptr + page[:, None, None] * s_p + h[None, :, None] * s_h + d[None, None, :], mask=mask, other=0.0)


@triton.jit
def _page_score_heads_kernel(q_ptr, kmin_ptr, kmax_ptr, hmin_ptr, hmax_ptr, cmin_ptr, cmax_ptr, pt_ptr, seqlen_ptr,
                             out_ptr, P, n_dev, h_base, n_host, c_base, n_comp, s_qb, s_qh, s_kp, s_kh, s_xp, s_xh,
                             s_hp, s_hh, s_gp, s_gh, s_cp, s_ch, s_yp, s_yh, s_ptb, s_ob, s_oh,
                             HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                             PAGE: tl.constexpr, BLOCK_P: tl.constexpr, TOPK: tl.constexpr, SINK: tl.constexpr,
                             RECENT: tl.constexpr, HOST: tl.constexpr, COMPACT: tl.constexpr, grp_ptr=None, n_grp=0,
                             s_rb=0, s_rh=0, PAGE_GROUP: tl.constexpr = 0, PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    seq_len = tl.load(seqlen_ptr + b)
    pos = seq_len - 1
    in_row = p < P
    start = p * PAGE
    visible = in_row & (start <= pos)
    forced = visible & ((start < SINK) | (start + PAGE > pos - RECENT) | (p == pos // PAGE) | (seq_len <= TOPK))
    need = visible & (start >= SINK) & (start + PAGE <= pos - RECENT) & (p != pos // PAGE) & (seq_len > TOPK)
    page = tl.load(pt_ptr + b * s_ptb + p, mask=in_row, other=0).to(tl.int64)
    h = tl.arange(0, HKV)
    d = tl.arange(0, D_PAD)
    dmask = (d < HEAD_DIM)[None, None, :]
    # the sources as in ``_page_score_kernel``: masked loads (0 elsewhere), added
    on_dev = page < n_dev
    dm = (need & on_dev)[:, None, None] & dmask
    dp = tl.where(on_dev, page, 0)
    kmin = _rows(kmin_ptr, dp, h, d, s_kp, s_kh, dm)
    kmax = _rows(kmax_ptr, dp, h, d, s_xp, s_xh, dm)
    if HOST:
        hp = tl.where(page >= h_base, page - h_base, 0)
        hm = (need & (page >= h_base) & (hp < n_host))[:, None, None] & dmask
        kmin += _rows(hmin_ptr, hp, h, d, s_hp, s_hh, hm)
        kmax += _rows(hmax_ptr, hp, h, d, s_gp, s_gh, hm)
    if COMPACT:
        in_c = (page >= c_base) & (page < c_base + n_comp)
        cp = tl.where(in_c, page - c_base, 0)
        cm = (need & in_c)[:, None, None] & dmask
        kmin += _rows(cmin_ptr, cp, h, d, s_cp, s_ch, cm)
        kmax += _rows(cmax_ptr, cp, h, d, s_yp, s_yh, cm)
    kmin = kmin.to(tl.float32)
    kmax = kmax.to(tl.float32)
    ub = tl.full([BLOCK_P, HKV], float("-inf"), tl.float32)
    for g in tl.static_range(GROUP):
        qg = tl.load(q_ptr + b * s_qb + (h * GROUP + g)[:, None] * s_qh + d[None, :], mask=(d < HEAD_DIM)[None, :],
                     other=0.0).to(tl.float32)                                                  # [HKV, D_PAD]
        s = tl.sum(tl.maximum(qg, 0.0)[None, :, :] * kmax + tl.minimum(qg, 0.0)[None, :, :] * kmin, axis=2)
        ub = tl.maximum(ub, s)
    score = tl.where(forced[:, None], float("inf"), tl.where(visible[:, None], ub, float("-inf")))
    tl.store(out_ptr + b * s_ob + h[None, :] * s_oh + p[:, None], score, mask=in_row[:, None])
    if PAGE_GROUP > 0:          # each group's score: the maximum of its pages' (triton_select_two_level.py)
        gmax = tl.max(tl.reshape(score, [BLOCK_P // PAGE_GROUP, PAGE_GROUP, HKV]), axis=1)
        gi = tl.program_id(1) * (BLOCK_P // PAGE_GROUP) + tl.arange(0, BLOCK_P // PAGE_GROUP)
        tl.store(grp_ptr + b * s_rb + h[None, :] * s_rh + gi[:, None], gmax, mask=(gi < n_grp)[:, None])


def launch(grid_b: int, P: int, block_p: int, num_warps: int, args: tuple, consts: dict) -> None:
    """Launch over (sequences, page blocks) with ``page_scores``' arguments (``consts`` without HKV)."""
    _page_score_heads_kernel[(grid_b, triton.cdiv(P, block_p))](*args, BLOCK_P=block_p, num_warps=num_warps,
                                                                **consts)
