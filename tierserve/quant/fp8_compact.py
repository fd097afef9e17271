"""Compact FP8 KV slots (issue 6 part 2): one quantised page in about half the bytes of a bf16 page.

A compact pool is a uint8 tensor ``[num_slots, num_layers, 2, slot_bytes]``. For each (page, layer,
K/V) the row holds, in order: the ``page_size * Hkv * D`` e4m3 codes, zero padding to 4 bytes, ``Hkv``
fp32 power-of-two scales, then the page's summary rows (the sparse selector's key min / max, in the
model dtype, copied byte for byte). Codes and scales are exactly those ``quant.fp8_kv.quantise_pages_``
writes in place (same ``quantise_block``), so a page read from a compact slot gives the same numbers as
part 1's in-place page or ``fake_quant``.
"""
from __future__ import annotations

import torch

from tierserve.quant.fp8_kv import quantise_block


def slot_offsets(page_size: int, h: int, d: int) -> tuple[int, int, int]:
    """(codes bytes, offset of the scales, offset of the summary rows) of one (layer, K/V) row."""
    n_codes = page_size * h * d
    off = -(-n_codes // 4) * 4
    return n_codes, off, off + 4 * h


def slot_bytes(page_size: int, h: int, d: int, summary_rows: int, elem: int) -> int:
    """Bytes of one (layer, K/V) row of a compact slot (a multiple of 4)."""
    end = slot_offsets(page_size, h, d)[2] + summary_rows * h * d * elem
    return -(-end // 4) * 4


def new_compact_pool(num_slots: int, num_layers: int, page_size: int, h: int, d: int, summary_rows: int,
                     dtype: torch.dtype, device) -> torch.Tensor:
    nb = slot_bytes(page_size, h, d, summary_rows, torch.empty((), dtype=dtype).element_size())
    return torch.zeros(num_slots, num_layers, 2, nb, dtype=torch.uint8, device=device)


def store_compact_(data: torch.Tensor, pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   page_size: int) -> None:
    """Quantise full-precision pages ``src`` of ``data [N, L, 2, rows, H, D]`` into compact slots ``dst``
    of ``pool [S, L, 2, slot_bytes]`` (the full-precision pages are left as they are)."""
    if src.numel() == 0:
        return
    n, (L, two, rows, h, d) = src.numel(), data.shape[1:]
    n_codes, off, soff = slot_offsets(page_size, h, d)
    pages = data[src]                                                   # [n, L, 2, rows, H, D]
    codes, scale = quantise_block(pages[:, :, :, :page_size], dims=(3, 5))
    blob = torch.zeros(n, L, two, pool.shape[-1], dtype=torch.uint8, device=pool.device)
    blob[..., :n_codes] = codes.view(torch.uint8).reshape(n, L, two, n_codes)
    blob[..., off:off + 4 * h] = scale.reshape(n, L, two, h).contiguous().view(torch.uint8)
    if rows > page_size:
        summ = pages[:, :, :, page_size:].contiguous().view(torch.uint8).reshape(n, L, two, -1)
        blob[..., soff:soff + summ.shape[-1]] = summ
    pool[dst] = blob


def dequant_compact(rows: torch.Tensor, page_size: int, h: int, d: int) -> torch.Tensor:
    """``rows [..., slot_bytes]`` uint8 -> ``[..., page_size, H, D]`` fp32 (codes * scale)."""
    lead = rows.shape[:-1]
    n_codes, off, _ = slot_offsets(page_size, h, d)
    codes = rows[..., :n_codes].contiguous().view(torch.float8_e4m3fn).reshape(*lead, page_size, h, d)
    scale = rows[..., off:off + 4 * h].contiguous().view(torch.float32).reshape(*lead, 1, h, 1)
    return codes.float() * scale


def compact_summary(rows: torch.Tensor, summary_rows: int, h: int, d: int, page_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``rows [..., slot_bytes]`` uint8 -> the summary rows ``[..., summary_rows, H, D]`` in ``dtype``."""
    lead = rows.shape[:-1]
    soff = slot_offsets(page_size, h, d)[2]
    nb = summary_rows * h * d * torch.empty((), dtype=dtype).element_size()
    return rows[..., soff:soff + nb].contiguous().view(dtype).reshape(*lead, summary_rows, h, d)


def summary_views(pool_layer: torch.Tensor, h: int, d: int, page_size: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool_layer [S, 2, slot_bytes]`` uint8 (one layer of a compact pool) -> views ``[S, H, D]`` in ``dtype``
    of every slot's first summary row, K half (the key min) and V half (the key max); no copy."""
    elem = torch.empty((), dtype=dtype).element_size()
    soff = slot_offsets(page_size, h, d)[2]
    assert soff % elem == 0 and pool_layer.shape[-1] % elem == 0 and pool_layer.stride(-1) == 1
    rows = pool_layer.view(dtype)[..., soff // elem:soff // elem + h * d]          # [S, 2, H * D]
    return rows[:, 0].unflatten(-1, (h, d)), rows[:, 1].unflatten(-1, (h, d))
