"""KV page storage: one page-major tensor per tier.

Shape ``[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]``: one page across all layers
(K and V) is contiguous, so a page is the unit that moves between tiers (GPU, pinned CPU RAM, disk)
in one copy. Attention reads per-layer views ``[num_pages, page_size, num_kv_heads, head_dim]``
(strided by page), which works for any subset of a request's pages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    # extra rows per page after the tokens: row 0 of K holds the page's per-channel key minimum and
    # row 0 of V its maximum (the summary sparse page selection scores). The summary lives inside the
    # page, so it moves with the page between tiers and is shared with prefix-cache hits.
    summary_rows: int = 0

    @property
    def rows_per_page(self) -> int:
        return self.page_size + self.summary_rows

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.rows_per_page


class KVCache:
    """Storage for ``num_pages`` pages in the page-major layout."""

    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.data = torch.zeros(num_pages, layout.num_layers, 2, layout.rows_per_page,
                                layout.num_kv_heads, layout.head_dim, dtype=layout.dtype, device=device)
        # hit pages still being copied in, layer by layer, on a side stream (tiers/overlap.py: ``wait(i)``,
        # ``wait_all()``); None when every page is in place
        self.loading = None

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s view ``[num_pages, 2, rows_per_page, num_kv_heads, head_dim]`` (K at [:, 0], V at [:, 1]).
        The model asks for it when layer ``i`` runs: its reads then wait for that layer's copies only."""
        if self.loading is not None:
            self.loading.wait(i)
        return self.data[:, i]

    def settle(self) -> None:
        """After the forward pass (or before anything that reads every layer, e.g. a CUDA graph): the
        compute stream waits for whatever a load still copies."""
        if self.loading is not None:
            self.loading.wait_all()
            self.loading = None
