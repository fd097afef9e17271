"""The attention-backend interface and the per-step metadata every backend receives.

A step's tokens are packed: request b owns tokens ``query_start_loc[b]:query_start_loc[b+1]``,
which sit at positions ``seq_lens[b] - query_len .. seq_lens[b]-1`` of its sequence. Each request's
KV lives in the pages listed in ``page_table[b]`` (page i holds positions i*page_size ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class AttnMetadata:
    num_seqs: int
    num_tokens: int
    page_size: int
    positions: torch.Tensor        # [T] int64, position of each packed token in its sequence
    slot_pages: torch.Tensor       # [T] int64, page id where each new token's K/V is written
    slot_offsets: torch.Tensor     # [T] int64, offset inside that page
    query_start_loc: torch.Tensor  # [B+1] int64
    seq_lens: torch.Tensor         # [B] int64, context length after this step
    page_table: torch.Tensor       # [B, max_pages] int64 (padding entries point at page 0, never read unmasked)
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    backend_data: dict[str, Any] = field(default_factory=dict)   # per-step cache owned by the backend
    decode_only: bool = False      # every request has exactly one new token (a pure decode step)
    num_splits: int = 1            # split-K factor for decode kernels (fixed per CUDA-graph bucket)
    max_seq_bound: int = 0         # upper bound of seq_lens (work split size), e.g. max_model_len
    # page storage in CPU RAM ([slots, layers, 2, page, Hkv, D]) when some page-table entries are
    # spilled: entry id >= num device pages means host slot (id - num device pages); with kv_fp8 the store
    # holds compact FP8 rows ([slots, layers, 2, slot_bytes] uint8) and host ids start at kv_fp8.end
    host_kv: list[tuple[int, torch.Tensor]] | None = None    # (first slot, storage) per spill store
    host_ram_only: bool = False    # every spilled page of this step is in the first store (CPU RAM, slot 0 up)
    host_summaries: torch.Tensor | None = None   # [ram slots, L, 2, summary rows, Hkv, D] on the device
    page_heat: torch.Tensor | None = None        # [device pages] float: times sparse attention chose a page
    host_heat: torch.Tensor | None = None        # [CPU-RAM slots] float: the same for spilled pages
    sparse: Any = None             # attention.select.SparseConfig when sparse attention is on
    kv_fp8: Any = None             # runner.kv_fp8.Fp8Pages when kv_dtype=fp8 (quantised flags + read rule)
    # sparse selector "indexer": per-token index keys [pages, layers, page, dim] (same page ids as the KV);
    # each layer leaves its indexer queries in backend_data[("index_q", layer)] before attention
    index_keys: torch.Tensor | None = None

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttnMetadata, scale: float, sliding_window: int | None = None,
                layer_idx: int = 0, kv_written: bool = False) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (this step's new tokens); kv_layer [N, 2, page, Hkv, D]
        (a strided view of the page-major KV storage: K at [:, 0], V at [:, 1]).

        Writes k/v into the caches at the slots in ``meta`` (unless ``kv_written``: a fused kernel did) and returns the attention output
        [T, Hq, D] of each new token over its sequence's context (causal)."""
        ...


def choose_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132,
                  min_tokens_per_split: int = 256, per_sm: int | None = None) -> int:
    """Split-K factor of the decode kernel: enough (batch x kv_head x split) programs to fill the GPU
    (``per_sm``; by default 4 per SM while batch x kv_heads alone is below one per SM, else 2), none with
    fewer than ``min_tokens_per_split`` tokens of ``max_seq_len``. Tuned on the H200 by
    scripts/sweep_decode_kernel.py (BF16) and scripts/bench_fp8_kv.py (FP8: ``fp8_decode_config.SPLITS``)."""
    if per_sm is None:
        per_sm = 4 if batch * num_kv_heads < num_sms else 2
    want = max(1, -(-per_sm * num_sms // (batch * num_kv_heads)))
    return max(1, min(want, -(-max_seq_len // min_tokens_per_split), 64))


def host_base(meta: AttnMetadata, n_dev: int) -> int:
    """Page id of host slot 0 in the step's tables: after the device pages, or with FP8 KV pages after the
    compact FP8 slots (``Fp8Pages.end``)."""
    return meta.kv_fp8.end if meta.kv_fp8 is not None else n_dev


def count_selection(meta: AttnMetadata, chosen: torch.Tensor, n_dev: int) -> None:
    """Add how often each device page was chosen (``chosen [B, ..., P]`` over ``meta.page_table``) to
    ``meta.page_heat``; the tier manager spills the least chosen pages first."""
    if meta.page_heat is None:
        return
    pt = meta.page_table
    counts = chosen.reshape(pt.shape[0], -1, pt.shape[1]).sum(1).float()          # [B, P]
    # masked by multiplying, not by boolean indexing (which would sync with the host every layer)
    meta.page_heat.index_add_(0, pt.clamp(max=n_dev - 1).flatten(), (counts * (pt < n_dev)).flatten())
    if meta.host_heat is not None and meta.host_kv is not None:
        slot = pt - host_base(meta, n_dev)
        ram = (slot >= 0) & (slot < meta.host_heat.shape[0])
        idx = slot.clamp(0, meta.host_heat.shape[0] - 1).flatten()
        meta.host_heat.index_add_(0, idx, (counts * ram).flatten())


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> None:
    k = k.to(kv_layer.dtype)
    kv_layer[:, 0][meta.slot_pages, meta.slot_offsets] = k
    kv_layer[:, 1][meta.slot_pages, meta.slot_offsets] = v.to(kv_layer.dtype)
    if kv_layer.shape[2] > meta.page_size:     # keep the per-page key min / max summary up to date
        update_page_summary(k, kv_layer, meta)


def update_page_summary(k: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> None:
    """Fold the step's keys into their pages' per-channel key min / max; a page whose first token is
    written this step starts over. No host sync (no boolean indexing): capturable in CUDA graphs."""
    row = meta.page_size
    kmin, kmax = kv_layer[:, 0, row], kv_layer[:, 1, row]          # [N, Hkv, D]
    pages = meta.slot_pages
    restart = meta.backend_data.get("summary_restart")               # the same for every layer of a step
    if restart is None:
        first = (meta.slot_offsets == 0).to(torch.int32)             # a page's first token resets it
        reset = torch.zeros(kmin.shape[0], dtype=torch.int32, device=k.device).index_add_(0, pages, first)
        restart = meta.backend_data["summary_restart"] = (reset[pages] > 0)[:, None, None]   # [T, 1, 1]
    # duplicate pages write identical values; a restarted page keeps no old min / max
    kmin.index_copy_(0, pages, torch.where(restart, k, kmin[pages]))
    kmax.index_copy_(0, pages, torch.where(restart, k, kmax[pages]))
    idx = pages[:, None, None].expand_as(k)
    kmin.scatter_reduce_(0, idx, k, reduce="amin", include_self=True)
    kmax.scatter_reduce_(0, idx, k, reduce="amax", include_self=True)
