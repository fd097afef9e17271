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

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size


class KVCache:
    """Storage for ``num_pages`` pages in the page-major layout."""

    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.data = torch.zeros(num_pages, layout.num_layers, 2, layout.page_size,
                                layout.num_kv_heads, layout.head_dim, dtype=layout.dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s view ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (K at [:, 0], V at [:, 1])."""
        return self.data[:, i]
