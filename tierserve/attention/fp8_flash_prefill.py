"""A prefill chunk over FP8 KV pages through flash attention (``attention/flash_prefix.py``'s kernels) instead of
the Triton FP8 prefill kernel (``triton_prefill_fp8.py``: 32-key blocks to stay within registers, ~5x slower than
flash on the H200 -- a 128k FP8 KV prefill took 72.6 s against 16.7 s in bf16, stop 21).

The read rule (``quant/fp8_kv.py``, page level): the query at p reads token j in FP8 iff j's page starts at or
after ``sink`` (keep_sink rounded up to a page) and ends at least R = max(keep_recent, 1) before p, i.e. j in
[sink, hi(p)) with hi(p) = max(floor((p - R + 1) / page) * page, sink); every other visible token (j < sink, or
hi(p) <= j <= p) at full precision. Both readings are exact in the model dtype (e4m3 codes times power-of-two
scales), so they are gathered once per layer and chunk:

- ``page_readings``: per page of the sequence, its FP8 reading (stored codes dequantised: in place, a compact slot
  or a staged host row; a page still at full precision quantised exactly as storage would) or its full reading
  (the stored values; a page stored in FP8 gives its FP8 values, as the Triton kernel and the reference do). The
  keys are the FP8 readings with the sink pages' full ones, ``[Hkv, positions, D]``; full readings are kept only
  from the first slice's band on.
- The chunk's queries go in slices of ``SLICE`` rows. For a slice starting at s0 every key before
  u = min(hi(s0), s0) is read the same way by all its rows (full below ``sink``, FP8 from it): one unmasked flash
  call over those keys, the query heads of a KV-head group folded into the rows (keys read once per KV head).
  The keys from u to the slice's end (about the slice plus R + a page) are read per (row, key) from either
  reading: a masked attention in PyTorch over both readings side by side (fp32 scores: on CUDA one half-precision
  GEMM with fp32 output, the probabilities meeting V in V's dtype as in flash). The two parts are merged by their
  log-sum-exps (``merge_lse``). One host sync per layer and chunk (where each page is stored).

The same softmax over the same values as the reference (``TorchRefBackend``), summed in another order: not
bit-identical to the Triton kernel, which stays the path for sliding windows and non-CUDA devices
(``TIERSERVE_FP8_FLASH_PREFILL=0`` keeps it everywhere). The first step through this path also runs the kernel and
compares (``check_once``). Memory: the gathered readings take about twice a layer's K/V of the sequence for the
chunk's duration (the bf16 flash path, ``gather_context``, about 1.5x).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from tierserve.attention.flash_prefix import attend_lse, merge_lse
from tierserve.quant.fp8_compact import dequant_compact
from tierserve.quant.fp8_kv import dequant_pages, fake_quant

log = logging.getLogger("tierserve")
ENABLED = os.environ.get("TIERSERVE_FP8_FLASH_PREFILL", "1") == "1"
CHECKED = False         # the first step's chunks were compared with the Triton kernel's (``check_once``)
SLICE = int(os.environ.get("TIERSERVE_FP8_FLASH_SLICE", "512"))     # query rows per slice
# steps whose prefill work (query rows x the keys each chunk sees) is below this keep the kernel: on the H200
# (stop 22, benchmarks/results/stop22/fp8-prefill-flash-h200.json) a 2048-row chunk at 2k took 5.9 ms here against
# 1.0 ms through the kernel, which is faster up to about 2e7 (the kernel grows with the work: 58.7 ms at 8192 rows
# x 32k; this path is ~5 ms at the least: 25.3 ms there, 75.0 against 265.9 at 128k)
MIN_WORK = int(os.environ.get("TIERSERVE_FP8_FLASH_MIN_WORK", str(32 * 2**20)))
_FULL, _INPLACE, _COMPACT, _HOST = 0, 1, 2, 3
_BLOCK = 1024                                                       # pages dequantised at a time


def worth_it(prefills) -> bool:
    """Whether a step's prefill chunks ``(seq, t0, t1, start)`` hold enough work for this path (``MIN_WORK``)."""
    return sum((t1 - t0) * (start + t1 - t0) for _, t0, t1, start in prefills) >= MIN_WORK


def page_readings(kv_layer: torch.Tensor, quantised: torch.Tensor, ids: torch.Tensor, length: int, page_size: int,
                  fp8: bool, compact: tuple[torch.Tensor, int] | None = None,
                  host: tuple[torch.Tensor, int] | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
    """The FP8 (``fp8``) or the full readings, ``[n, 2, page, Hkv, D]`` in ``kv_layer``'s dtype, of n consecutive
    pages ``ids`` of a sequence's table holding ``length`` tokens from the first one's start (rows past them, in
    the last page, read as zeros). kv_layer
    [N, 2, rows, Hkv, D]; ``quantised`` [>= N] the in-place flags; ``compact``: (pool rows [S, 2, slot bytes] of this
    layer, first compact id); ``host``: (staged rows [U, 2, slot bytes], first host id). A page stored in FP8 reads
    its FP8 values either way; a page at full precision is quantised for its FP8 reading as storage would."""
    N, _, _, h, d = kv_layer.shape
    n, ps, dt = ids.numel(), page_size, kv_layer.dtype
    dev_ids = ids.clamp(max=N - 1)
    if kinds is None:
        kinds = page_kinds(kv_layer, quantised, ids, compact, host)
    out = kv_layer[dev_ids, :, :ps]                                            # [n, 2, page, H, D]
    if n * ps > length:                                                        # the last page's unwritten rows
        out[n - 1, :, length - (n - 1) * ps:] = 0

    def each(k: int):                      # page indices of one kind, in blocks (bounded fp32 temporaries)
        sel = np.flatnonzero(kinds == k)
        for b in range(0, len(sel), _BLOCK):
            yield torch.from_numpy(sel[b:b + _BLOCK]).to(ids.device)

    for i in each(_INPLACE):
        out[i] = dequant_pages(kv_layer[ids[i], :, :ps], ps).to(dt)
    for k, src in ((_COMPACT, compact), (_HOST, host)):
        for i in each(k):
            out[i] = dequant_compact(src[0][ids[i] - src[1]], ps, h, d).to(dt)
    if fp8:
        for i in each(_FULL):
            out[i] = fake_quant(out[i], ps).to(dt)
    return out


def check_once(fast: torch.Tensor, kernel: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """The first step through this path: its chunks' rows against the Triton kernel's (the step returns the
    kernel's); a difference past bf16 rounding (3e-2 of the largest value) turns the path off with a warning."""
    global CHECKED, ENABLED
    CHECKED = True
    for t0, t1 in spans:
        a, b = fast[t0:t1].float(), kernel[t0:t1].float()
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
        if not err <= 3e-2:
            log.warning("FP8 prefill through flash differs from the FP8 prefill kernel (max relative %.3g); "
                        "using the kernel", err)
            ENABLED = False
            return
    log.info("FP8 prefill through flash checked against the kernel (agrees); used from now on")


def page_kinds(kv_layer: torch.Tensor, quantised: torch.Tensor, ids: torch.Tensor,
               compact: tuple[torch.Tensor, int] | None = None,
               host: tuple[torch.Tensor, int] | None = None) -> np.ndarray:
    """Where each page of ``ids`` is stored (full precision, FP8 in place, a compact slot, a staged host row), on
    the host: one sync (prefill only)."""
    N = kv_layer.shape[0]
    cbase = compact[1] if compact is not None else N
    hbase = host[1] if host is not None else 1 << 62
    kind = torch.where(ids >= hbase, _HOST, torch.where(ids >= cbase, _COMPACT,
                                                         torch.where(quantised[ids.clamp(max=N - 1)], _INPLACE,
                                                                     _FULL)))
    return kind.cpu().numpy()


def _hi(p: torch.Tensor, sink: int, recent: int, ps: int) -> torch.Tensor:
    """First position each query at p reads at full precision after its FP8 range (>= sink)."""
    return ((p - recent + 1).clamp(min=0) // ps * ps).clamp(min=sink)


def _band_start(s0: int, sink: int, recent: int, ps: int) -> int:
    """min(hi(s0), s0): the keys before it are read alike by every query from s0 on."""
    return min(max(max(s0 - recent + 1, 0) // ps * ps, sink), s0)


def _heads_first(pages: torch.Tensor, kv: int, length: int) -> torch.Tensor:
    """[n, 2, page, H, D] -> K (kv 0) or V (kv 1) as [H, length, D], contiguous."""
    n, _, ps, h, d = pages.shape
    return pages[:, kv].reshape(n * ps, h, d)[:length].transpose(0, 1).contiguous()


_HALF_MM: list[bool] = []      # [False] once a half-precision bmm with fp32 output was refused


def _bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. CUDA bf16 / fp16 inputs: one half-precision GEMM with fp32 accumulation and output (the
    products of half-precision values are exact in fp32, so the scores equal the fp32 ones up to summation
    order); else fp32 matmuls."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype and not _HALF_MM:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):       # a torch without bmm(..., out_dtype): fp32 from now on
            _HALF_MM.append(False)
    return a.float() @ b.float()


def _masked_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q [H, Lq, D], k/v [H, Lk, D], mask [Lq, Lk] (every row has a key) -> (out, lse) in fp32. The
    probabilities meet V in V's dtype (as in flash attention)."""
    s = _bmm32(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    return _bmm32(p.to(v.dtype), v), lse


def fp8_chunk_attention(q: torch.Tensor, kv_layer: torch.Tensor, quantised: torch.Tensor, table_row: torch.Tensor,
                        start: int, scale: float, page_size: int, keep_sink: int, keep_recent: int,
                        compact: tuple[torch.Tensor, int] | None = None,
                        host: tuple[torch.Tensor, int] | None = None, slice_rows: int | None = None,
                        key_from: int = 0, with_lse: bool = False):
    """q [n, Hq, D] of the chunk at positions start .. start + n - 1 (its K/V already written to the pages of
    ``table_row``) -> [n, Hq, D]: causal attention over the sequence under the FP8 read rule. ``key_from`` (a page
    multiple, at most ``start``): only the keys from that position on (sparse prefill attends to the context
    before it apart, ``sparse_fp8_prefill``); ``with_lse``: also the log-sum-exp [Hq, n] (fp32) for merging."""
    n, hq, d = q.shape
    h, ps = kv_layer.shape[3], page_size
    g = hq // h
    c1 = start + n
    assert key_from % ps == 0 and 0 <= key_from <= start
    kf = key_from // ps                    # first page read; key positions from o = key_from
    o = key_from
    sink, recent = -(-keep_sink // ps) * ps, max(keep_recent, 1)
    npg = -(-c1 // ps)
    ids = table_row[kf:npg]
    kinds = page_kinds(kv_layer, quantised, ids, compact, host)                        # the one host sync
    pages = page_readings(kv_layer, quantised, ids, c1 - o, ps, True, compact, host, kinds)
    sp = min(sink // ps, npg) - kf
    if sp > 0:                             # below the sink every query reads full precision: one key set
        pages[:sp] = page_readings(kv_layer, quantised, ids[:sp], c1 - o, ps, False, compact, host, kinds[:sp])
    keys = (_heads_first(pages, 0, c1 - o), _heads_first(pages, 1, c1 - o))           # [H, c1 - o, D]
    del pages
    # full readings of the keys some slice reads per (row, key): from the first slice's window page on
    wf = max(_band_start(start, sink, recent, ps) // ps, kf)
    fp = page_readings(kv_layer, quantised, table_row[wf:npg], c1 - wf * ps, ps, False, compact, host,
                       kinds[wf - kf:])
    fulls = (_heads_first(fp, 0, c1 - wf * ps), _heads_first(fp, 1, c1 - wf * ps))     # positions wf * ps ..
    del fp
    step = slice_rows or SLICE
    out = torch.empty_like(q)
    lse_out = torch.empty(hq, n, dtype=torch.float32, device=q.device) if with_lse else None
    dev = q.device
    for s0 in range(start, c1, step):
        s1 = min(s0 + step, c1)
        rows = s1 - s0
        p = torch.arange(s0, s1, device=dev)
        hi = _hi(p, sink, recent, ps)[:, None]
        u = max(_band_start(s0, sink, recent, ps), o)
        folded = q[s0 - start:s1 - start].transpose(0, 1).reshape(h, g * rows, d)   # heads of a group share keys
        # keys u .. s1 - 1 (whole pages from u's), each in both readings: FP8 first, then full
        w0, w1 = u // ps, -(-s1 // ps)
        m = min(w1 * ps, c1) - w0 * ps
        j = torch.arange(w0 * ps, w0 * ps + m, device=dev)[None, :]
        seen = (j >= u) & (j <= p[:, None])
        fp8_ok = seen & (j >= sink) & (j < hi)
        full_ok = seen & ((j < sink) | (j >= hi))
        a, b = w0 * ps, w0 * ps + m
        mk = torch.cat([keys[0][:, a - o:b - o], fulls[0][:, a - wf * ps:b - wf * ps]], dim=1)
        mv = torch.cat([keys[1][:, a - o:b - o], fulls[1][:, a - wf * ps:b - wf * ps]], dim=1)
        res, lse = _masked_lse(folded, mk, mv, torch.cat([fp8_ok, full_ok], dim=1).repeat(g, 1), scale)
        if u > o:               # every key from o to u, read the same way by all the slice's rows: flash
            ou, lu = attend_lse(folded, keys[0][:, :u - o], keys[1][:, :u - o], scale, causal=False)
            res = merge_lse(ou, lu, res, lse)
            if with_lse:
                lse = torch.logaddexp(lu, lse)
        out[s0 - start:s1 - start] = res.to(q.dtype).reshape(hq, rows, d).transpose(0, 1)
        if with_lse:
            lse_out[:, s0 - start:s1 - start] = lse.reshape(hq, rows)
    return (out, lse_out) if with_lse else out
