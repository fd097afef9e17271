"""The lean half of a split launch of the dense FP8 decode (``triton_decode_fp8.paged_decode_fp8(lean=True)``).

The FP8 decode kernel carries every case of the read rule (full-precision sink / recent pages, pages still waiting
to be stored as FP8, quantising them on the fly, host rows, selections), and its registers (~250 a thread on sm_90)
leave an SM one or two programs: at 128k it reads its half of bf16's bytes at ~1 TB/s, latency-bound (stop 27). In a
dense step almost every block lies between the sink and the recent pages and is read in FP8 from pages stored as FP8
(``bulk_bounds``). This kernel reads only those blocks -- codes and scales, unmasked loads the compiler pipelines --
in ``PARTS`` parts per (sequence, KV head) and writes their partial outputs to split slots [0, PARTS); the general
kernel, launched next over PARTS + 2 slots, reads the sink and recent blocks and redoes any part whose pages lag the
rule (the same ``lagging`` check: this kernel then leaves its slot empty); the splits are merged as usual. The same
values as one launch up to the order of the split sums. Reference: ``TorchRefBackend`` with ``meta.kv_fp8``
(tests/kernels/test_triton_decode_fp8.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tierserve import pdl
from tierserve.attention.triton_decode import load_group_q, store_split
from tierserve.attention.triton_fp8_blocks import bulk_block, bulk_bounds, bulk_part, lagging


@triton.jit
def _fp8_bulk_kernel(q_ptr, kvb_ptr, flag_ptr, pt_ptr, seqlen_ptr, o_ptr, lse_ptr, qk_scale, keep_sink, keep_recent,
                     cbase, s_qb, s_qh, s_t, s_h, s_bp, s_bkv, s_ptb, s_ob, s_oh, s_os, s_lb, s_lh,
                     PARTS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAGE: tl.constexpr, BULK_N: tl.constexpr, SCALE_OFF: tl.constexpr, COMPACT: tl.constexpr,
                     UPCAST: tl.constexpr, PDL: tl.constexpr = False):
    pdl.release(PDL)        # (``tierserve.pdl``)
    pdl.wait(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    n = tl.load(seqlen_ptr + b)
    fa, fb = bulk_bounds(n, keep_sink, keep_recent, BULK_N)
    start, end = bulk_part(fa, fb, part, PARTS, BULK_N)
    row_ids = pt_ptr + b * s_ptb
    if lagging(row_ids, flag_ptr, start // PAGE, end // PAGE):      # the general kernel reads this part
        end = start
    q, heads, g_mask, d = load_group_q(q_ptr, b, kvh, s_qb, s_qh, GROUP, GROUP_PAD, HEAD_DIM, UPCAST)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    ar = tl.arange(0, BULK_N)
    kb, vb = kvb_ptr, kvb_ptr + s_bkv
    for t0 in range(start, end, BULK_N):
        m_i, l_i, acc = bulk_block(t0 + ar, q, d, kvh, row_ids, kb, vb, cbase, s_t, s_h, s_bp, 0, qk_scale, m_i, l_i,
                                   acc, PAGE, SCALE_OFF, COMPACT)
    store_split(o_ptr, lse_ptr, acc, m_i, l_i, b, heads, part, g_mask, d, s_ob, s_oh, s_os, s_lb, s_lh, False)


def launch_bulk(q, kv_bytes, flags, page_table, seq_lens, part, lse, s_part, s_lse, qk_scale: float, keep_sink: int,
                keep_recent: int, cbase: int, compact: bool, parts: int, num_kv_heads: int, page_size: int,
                bulk_n: int, scale_off: int, s_t: int, s_h: int, num_warps: int, num_stages: int,
                upcast: bool) -> None:
    """Grid (B, Hkv, parts) over the split slots [0, parts) of ``part`` / ``lse`` (``split_buffers``); ``s_t`` /
    ``s_h``: the values' token / head element strides in a page (the codes' byte offsets)."""
    B, Hq, D = q.shape
    group = Hq // num_kv_heads
    _fp8_bulk_kernel[(B, num_kv_heads, parts)](
        q, kv_bytes, flags, page_table, seq_lens, part, lse, qk_scale, keep_sink, keep_recent, cbase,
        q.stride(0), q.stride(1), s_t, s_h, kv_bytes.stride(0), kv_bytes.stride(1), page_table.stride(0), *s_part,
        *s_lse, PARTS=parts, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), HEAD_DIM=D,
        PAGE=page_size, BULK_N=bulk_n, SCALE_OFF=scale_off, COMPACT=compact, UPCAST=upcast,
        PDL=pdl.active(q.device), num_warps=num_warps, num_stages=num_stages, **pdl.dependent_options(q.device))
