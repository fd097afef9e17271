"""FP8 (e4m3) KV pages: power-of-two scales per (page, layer, K/V, kv-head), stored inside the page.

A quantised page keeps its place in the page-major KV tensor: for each layer and K/V, the bytes of
``page[l, kv]`` hold ``page_size * Hkv * D`` e4m3 codes, then ``Hkv`` fp32 scales (4-byte aligned),
then zeros; rows after the page's tokens (the sparse selector's key min / max summary) are kept.
``dequant = code * scale``. The scale is the smallest power of two >= amax / 448, so
dividing by it is exact and the codes are round-to-nearest e4m3 of the page's values.

The read rule (which tokens a query reads in FP8) lives here too, because both the attention
reference and the tests need it, at page level: query at position p reads token j in FP8 iff j's page
starts at or after keep_sink and ends at least max(keep_recent, 1) positions before p (its last position l:
p - l >= max(keep_recent, 1)); every other token is read at full precision. A page is therefore read in FP8
exactly from the step the page policy (``kv.fp8_pages.Fp8PagePolicy.needs_full``) lets storage quantise it,
and no query reads a page partly in each precision. (Until stop 20 the rule was per token -- ``j >= keep_sink``,
``p - j >= keep_recent``, page complete before p --, so the page straddling the keep_recent edge had to be
quantised on the fly in every step: on the H200 that one program made the whole 2k decode launch 23 us
instead of 10.5, ``benchmarks/results/stop20/diag-fp8-engine-decode-{token,page}-rule-h200.json``.)
Because quantising a complete page is a pure function of its values, a page
read in FP8 gives the same numbers whether it was quantised in storage or on the fly (``fake_quant``).
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= amax / 448 (1.0 for an all-zero block), in fp32."""
    x = (amax.float() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    m, e = torch.frexp(x)                          # x = m * 2**e, m in [0.5, 1)
    e = torch.where(m == 0.5, e - 1, e)
    s = torch.ldexp(torch.ones_like(x), e)
    return torch.where(amax > 0, s, torch.ones_like(s))


def quantise_block(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes (as float8_e4m3fn) and pow2 scales of ``x`` with one scale per slice over ``dims``."""
    x = x.float()
    scale = pow2_scale(x.abs().amax(dim=dims, keepdim=True))
    codes = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fake_quant(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """``pages [..., rows, H, D]`` (one K or V block per page) -> dequant(quant(.)) over the first
    ``page_size`` rows, one scale per head: exactly what a page quantised in storage reads back as."""
    codes, scale = quantise_block(pages[..., :page_size, :, :], dims=(-3, -1))
    return codes.float() * scale


def _offsets(page_size: int, h: int, d: int) -> tuple[int, int]:
    n_codes = page_size * h * d
    off = -(-n_codes // 4) * 4
    return n_codes, off


def quantise_pages_(data: torch.Tensor, pids: torch.Tensor, page_size: int) -> None:
    """Quantise pages ``pids`` of ``data [N, L, 2, rows, H, D]`` in place (full precision -> FP8 blob)."""
    if pids.numel() == 0:
        return
    n, (L, two, _, h, d) = pids.numel(), data.shape[1:]
    nbytes = page_size * h * d * data.element_size()      # the token rows only: summary rows stay as they are
    n_codes, off = _offsets(page_size, h, d)
    if off + 4 * h > nbytes:
        raise ValueError(f"a page of {page_size} tokens in {data.dtype} has no room for FP8 codes + scales")
    codes, scale = quantise_block(data[pids][:, :, :, :page_size], dims=(3, 5))   # scale [n, L, 2, 1, H, 1]
    blob = torch.zeros(n, L, two, nbytes, dtype=torch.uint8, device=data.device)
    blob[..., :n_codes] = codes.view(torch.uint8).reshape(n, L, two, n_codes)
    blob[..., off:off + 4 * h] = scale.reshape(n, L, two, h).contiguous().view(torch.uint8)
    data[pids, :, :, :page_size] = blob.view(data.dtype).view(n, L, two, page_size, h, d)


def dequant_pages(blob: torch.Tensor, page_size: int) -> torch.Tensor:
    """``blob [..., rows, H, D]`` (quantised K or V blocks, in the storage dtype) -> ``[..., page, H, D]`` fp32."""
    *lead, rows, h, d = blob.shape
    n_codes, off = _offsets(page_size, h, d)
    raw = blob.contiguous().view(torch.uint8).reshape(*lead, -1)
    codes = raw[..., :n_codes].contiguous().view(torch.float8_e4m3fn).reshape(*lead, page_size, h, d)
    scale = raw[..., off:off + 4 * h].contiguous().view(torch.float32).reshape(*lead, 1, h, 1)
    return codes.float() * scale


def fp8_read_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, page_size: int, keep_sink: int,
                  keep_recent: int) -> torch.Tensor:
    """``[..., Q, L]`` True where the query at ``q_pos`` reads the key at ``kv_pos`` in FP8 (page level)."""
    first = kv_pos // page_size * page_size
    last = first + page_size - 1
    q = q_pos[..., :, None]
    return (first >= keep_sink) & (q - last >= max(keep_recent, 1))


def split_precision(kv: torch.Tensor, quantised: torch.Tensor, page_size: int, deq: torch.Tensor | None = None):
    """``kv [B, P, 2, rows, H, D]`` gathered pages, ``quantised [B, P]`` bool -> (full, low), each
    ``[B, P, 2, page, H, D]`` fp32: the full-precision values and the FP8 reading of every page.
    A page quantised in storage has only its FP8 reading (the read rule never asks it for more);
    ``deq`` gives those readings (pages held elsewhere, e.g. a compact pool), else they are decoded from ``kv``."""
    raw = kv[:, :, :, :page_size].float()
    low = fake_quant(kv, page_size)
    if bool(quantised.any()):
        if deq is None:
            deq = dequant_pages(kv[quantised], page_size)
        low[quantised] = deq
        raw[quantised] = deq
    return raw, low
