"""Staging of spilled KV pages for prefill steps: one layer's K/V rows of the host slots a step reads, copied
by a GPU kernel straight from pinned CPU RAM into a device buffer.

A prefill chunk's query blocks each read the whole context; read in place over PCIe, a page in CPU RAM would
cross the bus once per query block and KV head. Staging reads it once per layer: the step's page tables are
remapped (host slot s -> device page count + its index in the staged buffer) so the prefill and decode
kernels read the staged copy through their ``host_cache`` path. Reference: indexing the store and copying.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stage_kernel(src_ptr, slot_ptr, dst_ptr, s_slot, s_kv, d_page, d_kv, ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    kv = tl.program_id(1)
    c = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = c < ELEMS
    slot = tl.load(slot_ptr + i).to(tl.int64)
    x = tl.load(src_ptr + slot * s_slot + kv * s_kv + c, mask=mask)
    tl.store(dst_ptr + i.to(tl.int64) * d_page + kv * d_kv + c, x, mask=mask)


def stage_rows(store: torch.Tensor, slots: torch.Tensor, n_elems: int | None = None, block: int = 2048) -> torch.Tensor:
    """``store [S, 2, n]`` (last dim contiguous; pinned CPU RAM or device memory), ``slots [U]`` int64 on the
    device -> ``[U, 2, n_elems]`` (the first ``n_elems``, default n, of each slot's K and V rows) on ``slots``'
    device."""
    S, two, n = store.shape
    assert two == 2 and store.stride(2) == 1
    E = n if n_elems is None else n_elems
    U = slots.numel()
    out = torch.empty(U, 2, E, dtype=store.dtype, device=slots.device)
    if U == 0:
        return out
    _stage_kernel[(U, 2, triton.cdiv(E, block))](store, slots, out, store.stride(0), store.stride(1), out.stride(0),
                                                 out.stride(1), ELEMS=E, BLOCK=block, num_warps=4)
    return out


def stage_layer(store_layer: torch.Tensor, slots: torch.Tensor, page_size: int, block: int = 2048) -> torch.Tensor:
    """``store_layer [S, 2, rows, H, D]`` (one layer of the host store; each (slot, K/V) block contiguous),
    ``slots [U]`` int64 on the device -> ``[U, 2, page_size, H, D]`` on ``slots``' device."""
    S, two, rows, H, D = store_layer.shape
    assert two == 2 and store_layer.stride(2) == H * D and store_layer.stride(3) == D and store_layer.stride(4) == 1
    out = stage_rows(store_layer.flatten(2), slots, page_size * H * D, block)
    return out.view(slots.numel(), 2, page_size, H, D)


def remap_host_entries(page_table: torch.Tensor, num_device_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(host slots the table reads [U], the table with host entries renumbered n_dev + index into them).
    One host sync (the number of distinct slots)."""
    on_host = page_table >= num_device_pages
    slots, inverse = torch.unique(torch.where(on_host, page_table - num_device_pages, -1), return_inverse=True)
    has_pad = bool(slots[0] < 0) if slots.numel() else False
    if has_pad:                                  # -1 stands for device entries
        slots, inverse = slots[1:], inverse - 1
    table = torch.where(on_host, num_device_pages + inverse, page_table)
    return slots, table
