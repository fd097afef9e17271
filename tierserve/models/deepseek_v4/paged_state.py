"""The growing part of the DeepSeek-V4 decode state in page pools addressed by the engine's page ids.

A request's page table (``KVManager.page_table``: page ``i`` covers its tokens ``[i*ps, (i+1)*ps)``,
``ps`` = page_size) addresses, per CSA / HCA layer, one ``EntryPool`` of compressed entries and, per CSA
layer, one of indexer keys. Entries are kept in their stored form (the model dtype, or MODEL1 ``uint8``
rows / FP8 keys with ``kv_dtype="fp8"``), flattened to ``row`` values. Entry ``w`` of a compressor of
ratio ``m`` covers tokens ``[w*m, (w+1)*m)``; it is written when its window closes (token ``(w+1)*m - 1``):

* ``m <= ps`` (CSA, ratio 4, and its indexer): ``ps // m`` entries per page, entry ``w`` in page
  ``w // (ps // m)`` (the page holding its last token), sub-row ``w % (ps // m)``;
* ``m > ps`` (HCA, ratio 128 with pages of 16): an entry spans ``k = m // ps`` pages, so it is cut into
  ``k`` pieces of ``ceil(row / k)`` values, piece ``j`` in page ``w*k + j`` (the ``k`` pages of its own
  tokens, all allocated once its last token is). A page holds ``row / k`` values: no empty page slots.

Both are one rule: the pieces of entry ``w`` are the flat sub-rows ``g = w*k + j``, sub-row ``g`` lives in
page ``g // s``, row ``g % s`` (``s`` = sub-rows per page = ``max(1, ps // m)``). Bytes per page are then
``entry_bytes * ps / m`` exactly (waste only when ``row`` is not a multiple of ``k``: < ``k`` values of
padding per entry; none for V4: 1024 / 584 B rows, ``k`` = 8). ``ps`` and ``m`` must divide one another
(both are powers of two in practice; anything else is refused).

Each pool has ``num_pages + 1`` pages: the last (``scratch``) takes the writes of rows that do not close
an entry this step and serves the reads past a request's pages (page-table entries beyond its length
point there); such reads are always masked by length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class EntryPool:
    """The stored entries of one compressor for every page of the pool: ``data [num_pages + 1, s, c]``."""

    def __init__(self, ratio: int, row_shape, dtype: torch.dtype, num_pages: int, page_size: int,
                 device) -> None:
        if page_size % ratio and ratio % page_size:
            raise ValueError(f"page_size {page_size} and compress ratio {ratio} must divide one another "
                             "for paged compressed entries")
        self.ratio, self.page_size = ratio, page_size
        self.per_page = max(1, page_size // ratio)            # s: sub-rows per page
        self.pieces = max(1, ratio // page_size)              # k: pages per entry
        self.row_shape = tuple(row_shape)
        self.row = math.prod(self.row_shape)
        self.width = -(-self.row // self.pieces)              # c: values per sub-row
        self.num_pages = self.scratch = num_pages
        self.data = torch.zeros(num_pages + 1, self.per_page, self.width, dtype=dtype, device=device)

    @property
    def bytes_per_page(self) -> int:
        return self.per_page * self.width * self.data.element_size()

    def pages_for(self, num_entries: int) -> int:
        """Pages a request needs so that its first ``num_entries`` entries have a home."""
        return -(-num_entries * self.pieces // self.per_page)

    def flat_index(self, table: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Rows of ``data.view(-1, c)`` holding the pieces of ``entries [B, T]`` (entry numbers) of the
        requests whose page tables are ``table [B, P]``: ``[B, T, k]``. Out-of-range pages are clamped
        (the caller masks what they hold)."""
        B, k, s = table.shape[0], self.pieces, self.per_page
        g = entries[..., None] * k + torch.arange(k, device=table.device)        # [B, T, k]
        col = torch.div(g, s, rounding_mode="floor").clamp(0, table.shape[1] - 1)
        page = table.gather(1, col.reshape(B, -1)).view_as(g)
        return page * s + g % s

    def gather(self, table: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``entries [B, T]``: ``[B, T, *row_shape]`` (a copy)."""
        B, T = entries.shape
        idx = self.flat_index(table, entries)
        rows = self.data.view(-1, self.width)[idx.view(-1)].view(B, T, self.pieces * self.width)
        return rows[..., :self.row].reshape(B, T, *self.row_shape)

    def gather_first(self, table: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` entries of each request, ``[B, n, *row_shape]`` (a copy): consecutive pages hold
        consecutive entries (``s`` per page) or pieces (``k`` pages per entry), so this gathers whole pages
        of the table's first columns, no per-entry index arithmetic."""
        B = table.shape[0]
        cols = -(-n * self.pieces // self.per_page)
        rows = self.data[table[:, :cols]].view(B, cols * self.per_page // self.pieces, self.pieces * self.width)
        return rows[:, :n, :self.row].reshape(B, n, *self.row_shape)

    def scatter(self, table: torch.Tensor, entry: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows [B, *row_shape]`` as entry ``entry [B]`` of each request where ``keep [B]``, else
        into the scratch page. Graph-safe (no host sync, fixed shapes)."""
        B, k, c = rows.shape[0], self.pieces, self.width
        idx = self.flat_index(table, entry.clamp(min=0)[:, None])[:, 0]           # [B, k]
        idx = torch.where(keep[:, None], idx, torch.full_like(idx, self.scratch * self.per_page))
        pieces = F.pad(rows.reshape(B, -1), (0, k * c - self.row)).view(B * k, c)
        self.data.view(-1, c).index_copy_(0, idx.view(-1), pieces.to(self.data.dtype))

    # ---- host side: a whole request at once (SequenceState <-> pages) ---------------------------------
    def _table(self, pages: list[int], n: int) -> torch.Tensor:
        if len(pages) < self.pages_for(n):
            raise ValueError(f"{n} entries of ratio {self.ratio} need {self.pages_for(n)} pages of "
                             f"{self.page_size} tokens, the request has {len(pages)}")
        return torch.tensor(pages or [self.scratch], dtype=torch.int64, device=self.data.device)[None]

    def write(self, pages: list[int], entries: torch.Tensor) -> None:
        """Put a request's ``entries [n, *row_shape]`` (stored form) into its pages ``pages``."""
        n = entries.shape[0]
        if n == 0:
            return
        table = self._table(pages, n)
        ar = torch.arange(n, device=table.device)[None]
        self.scatter(table.expand(n, -1), ar[0], torch.ones(n, dtype=torch.bool, device=table.device),
                     entries)

    def read(self, pages: list[int], n: int) -> torch.Tensor:
        """A request's first ``n`` entries out of its pages: ``[n, *row_shape]`` (a copy)."""
        table = self._table(pages, n)
        return self.gather(table, torch.arange(n, device=table.device)[None])[0]

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        d = torch.tensor(dst, dtype=torch.int64, device=self.data.device)
        self.data[d] = self.data[torch.tensor(src, dtype=torch.int64, device=self.data.device)]


def _pool(ratio: int, dim: int, store, num_pages: int, page_size: int, device, dtype) -> EntryPool:
    row = store(torch.zeros(1, dim, dtype=dtype))[0]          # the stored form of one entry
    return EntryPool(ratio, row.shape, row.dtype, num_pages, page_size, device)


class PagePools:
    """Per decoder layer: the pool of compressed entries (``comp``, CSA / HCA) and of indexer keys
    (``index``, CSA), ``None`` where the layer has none."""

    def __init__(self, model, num_pages: int, page_size: int, device=None) -> None:
        device = model.device if device is None else device
        self.num_pages, self.page_size, self.scratch = num_pages, page_size, num_pages
        self.comp: list[EntryPool | None] = []
        self.index: list[EntryPool | None] = []
        for b in model.layers:
            a, c, i = b.attn, b.attn.compressor, b.attn.indexer
            z = (num_pages, page_size, device, model.dtype)
            self.comp.append(None if c is None else _pool(c.ratio, c.dim, a.store_entries, *z))
            self.index.append(None if i is None else _pool(i.compressor.ratio, i.compressor.dim, a.store_keys, *z))

    def pools(self) -> list[EntryPool]:
        return [p for p in self.comp + self.index if p is not None]

    def nbytes(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.pools())

    @property
    def bytes_per_page(self) -> int:
        return sum(p.bytes_per_page for p in self.pools())

    @staticmethod
    def page_bytes(model, page_size: int) -> int:
        """Bytes one page takes over all layers' pools (built on the meta device; 0: nothing grows)."""
        return PagePools(model, 0, page_size, "meta").bytes_per_page
