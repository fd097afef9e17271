"""FP8 page quantisation in Triton: pages into storage, and a prefill chunk's FP8 readings into a scratch.

* ``quantise_pages_triton(data, pids, page_size)``: the Triton twin of ``quant.fp8_kv.quantise_pages_``
  (byte-identical result): every layer and K/V block of pages ``pids`` converted in place to e4m3 codes +
  power-of-two scales. One quantisation launch over (page x layer, K/V, head) into a zeroed byte buffer
  and one indexed copy into the pages (a program per head cannot convert in place: a head's codes land
  on bytes other heads still have to read). No host sync (the page ids go up through pinned memory).
* ``prefill_scratch(...)``: for each prefill chunk, the FP8 reading (codes + scales, the page format) of
  every page from the first one any of its queries reads in *both* precisions (the keep_recent edge before
  the chunk) to its last page -- the pages that are still at full precision while some query reads them in
  FP8 (the chunk's own pages and the recent ones before it). Computed once per layer and step instead of
  once per query block; pages already stored as FP8 are copied as they are, so the attention kernel takes
  every FP8 reading from that range out of the scratch without looking at the stored flags first.
  Scratch page ``off[c] + k`` holds logical page ``scratch_first_page(c) + k`` of chunk c.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.attention.triton_fp8_common import copy_block_head, quant_block_head, split_ids


def scale_offset(page_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Byte offset of the per-head fp32 scales after the codes of one (page, K/V) block."""
    return -(-(page_size * num_kv_heads * head_dim) // 4) * 4


@triton.jit
def scratch_first_page(c0, keep_recent, PAGE: tl.constexpr):
    """First logical page whose tokens some query at a position >= c0 reads at full precision while
    another reads them in FP8 (or that is not complete before c0): pages before it are read the same way by
    every query of a chunk starting at c0."""
    return tl.maximum(c0 - tl.maximum(keep_recent, 1), 0) // PAGE


@triton.jit
def _store_quant_kernel(src_ptr, dst_ptr, pid_ptr, s_np, s_nl, s_nkv, s_t, s_h, s_di, s_dkv, n_layers, n_heads,
                        PAGE: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        SCALE_OFF: tl.constexpr):
    i = tl.program_id(0)
    kv = tl.program_id(1)
    h = tl.program_id(2)
    page = tl.load(pid_ptr + i // n_layers).to(tl.int64)
    src = src_ptr + page * s_np + (i % n_layers).to(tl.int64) * s_nl + kv * s_nkv
    quant_block_head(src, dst_ptr + i.to(tl.int64) * s_di + kv * s_dkv, PAGE, h, s_t, s_h, n_heads,
                     PAGE, PAGE_PAD, HEAD_DIM, SCALE_OFF)


def quantise_pages_triton(data: torch.Tensor, pids: torch.Tensor, page_size: int, group: int = 64) -> None:
    """Quantise pages ``pids`` (int64, on data's device) of ``data [N, L, 2, rows, H, D]`` in place, ``group``
    pages at a time (the staging blob is ``group`` pages: a 8192-token prefill chunk frees 512 at once)."""
    N, L, two, _, h, d = data.shape
    nbytes = page_size * h * d * data.element_size()
    off = scale_offset(page_size, h, d)
    if off + 4 * h > nbytes:
        raise ValueError(f"a page of {page_size} tokens in {data.dtype} has no room for FP8 codes + scales")
    assert data.is_contiguous()
    for i in range(0, pids.numel(), group):
        ids = pids[i:i + group]
        n = ids.numel()
        blob = torch.zeros(n, L, two, nbytes, dtype=torch.uint8, device=data.device)
        _store_quant_kernel[(n * L, two, h)](
            data, blob, ids, data.stride(0), data.stride(1), data.stride(2), data.stride(3), data.stride(4),
            two * nbytes, nbytes, L, h, PAGE=page_size, PAGE_PAD=triton.next_power_of_2(page_size),
            HEAD_DIM=d, SCALE_OFF=off, num_warps=4)
        data.view(torch.uint8).view(N, L, two, -1)[ids, :, :, :nbytes] = blob


@triton.jit
def _offsets_kernel(qlen_ptr, seqlen_ptr, off_ptr, C, keep_recent, PAGE: tl.constexpr, C_PAD: tl.constexpr):
    """off[c]: first scratch page of chunk c (the chunks' page counts laid end to end), one program."""
    c = tl.arange(0, C_PAD)
    seq_len = tl.load(seqlen_ptr + c, mask=c < C, other=0)
    n = tl.cdiv(seq_len, PAGE) - scratch_first_page(seq_len - tl.load(qlen_ptr + c, mask=c < C, other=0),
                                                    keep_recent, PAGE)
    tl.store(off_ptr + c, tl.cumsum(n, axis=0) - n, mask=c < C)


@triton.jit
def _scratch_kernel(kv_ptr, kvb_ptr, dst_ptr, off_ptr, flag_ptr, pt_ptr, qlen_ptr, seqlen_ptr, keep_recent, cbase, SP,
                    s_p, s_kv, s_t, s_h, s_bp, s_bkv, s_ptb, s_di, s_dkv, n_heads, hb_ptr, hbase, s_hp, s_hkv,
                    PAGE: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE_OFF: tl.constexpr,
                    COMPACT: tl.constexpr, HOST: tl.constexpr):
    c = tl.program_id(0) // SP
    k = tl.program_id(0) % SP
    kv = tl.program_id(1)
    h = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + c)
    lp = scratch_first_page(seq_len - tl.load(qlen_ptr + c), keep_recent, PAGE) + k
    if lp * PAGE < seq_len:
        page = tl.load(pt_ptr + c * s_ptb + lp).to(tl.int64)
        dst = dst_ptr + (tl.load(off_ptr + c) + k).to(tl.int64) * s_di + kv * s_dkv
        ish = page < 0                  # (HOST) ids >= hbase: compact rows of pages spilled to CPU RAM (staged)
        hp = page
        if HOST:
            ish = page >= hbase
            hp = page - hbase
            page = tl.where(ish, 0, page)
        stored = (tl.load(flag_ptr + page) != 0) | ish
        page, cpage = split_ids(page, cbase, COMPACT)
        src = kvb_ptr + cpage * s_bp + kv * s_bkv
        if HOST:
            src = tl.where(ish, hb_ptr + hp * s_hp + kv * s_hkv, src)
        if stored:       # stored as FP8: its codes as they are
            copy_block_head(src, dst, h, n_heads, PAGE, PAGE_PAD, HEAD_DIM, SCALE_OFF)
        else:
            quant_block_head(kv_ptr + page * s_p + kv * s_kv, dst, tl.minimum(seq_len - lp * PAGE, PAGE), h,
                             s_t, s_h, n_heads, PAGE, PAGE_PAD, HEAD_DIM, SCALE_OFF)


def scratch_pages_per_chunk(max_q_len: int, page_size: int, keep_recent: int) -> int:
    """Upper bound of the pages from ``scratch_first_page`` to a chunk's last page."""
    return -(-(max_q_len + max(keep_recent, 1) + page_size - 1) // page_size)


def prefill_scratch(kv_layer: torch.Tensor, quantised: torch.Tensor, page_table: torch.Tensor,
                    q_len: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int, total_q: int, page_size: int,
                    keep_recent: int, compact: tuple[torch.Tensor, int] | None = None,
                    host: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_layer [N, 2, rows, Hkv, D]; per chunk c: page_table [C, P], q_len / seq_lens [C] (device);
    ``max_q_len`` / ``total_q``: host bounds of the largest and the summed q_len. Returns (scratch uint8
    [pages, 2, block bytes], first scratch page of each chunk [C]): chunk c's scratch pages follow each other
    from there (sized by the tokens, not by C x the longest chunk). ``host``: (compact rows [U, 2, slot bytes],
    first id): ids >= it are read from those rows (``paged_prefill_fp8``). Nothing is synced with the host."""
    _, two, _, h, d = kv_layer.shape
    C = q_len.shape[0]
    sp = scratch_pages_per_chunk(max_q_len, page_size, keep_recent)
    # sum over chunks of ceil((q_len + R + ps - 1) / ps) <= (total_q + C (R + 2 ps - 2)) / ps
    total = min(C * sp, (total_q + C * (max(keep_recent, 1) + 2 * page_size - 2)) // page_size + 1)
    offs = torch.empty(C, dtype=torch.int64, device=kv_layer.device)
    _offsets_kernel[(1,)](q_len, seq_lens, offs, C, keep_recent, PAGE=page_size,
                          C_PAD=max(triton.next_power_of_2(C), 16), num_warps=1)
    off = scale_offset(page_size, h, d)
    scratch = torch.empty(total, two, off + 4 * h, dtype=torch.uint8, device=kv_layer.device)
    kv_bytes, cbase = (kv_layer.view(torch.uint8), 0) if compact is None else compact
    hb, hbase = host if host is not None else (kv_bytes, 1 << 62)
    _scratch_kernel[(C * sp, two, h)](
        kv_layer, kv_bytes, scratch, offs, quantised.view(torch.uint8), page_table, q_len, seq_lens, keep_recent,
        cbase, sp, kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), kv_bytes.stride(0),
        kv_bytes.stride(1), page_table.stride(0),
        scratch.stride(0), scratch.stride(1), h, hb, hbase, hb.stride(0), hb.stride(1),
        PAGE=page_size, PAGE_PAD=triton.next_power_of_2(page_size),
        HEAD_DIM=d, SCALE_OFF=off, COMPACT=compact is not None, HOST=host is not None, num_warps=4)
    return scratch, offs
