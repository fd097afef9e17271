"""The rows of a pure decode step that ``TritonBackend._check`` recomputes with the torch reference.

The check runs once, on the first step that takes a path reading spilled KV pages from CPU RAM; with CUDA graphs
that is the spill graphs' warm-up: the largest bucket (max_num_seqs rows, 128 by default) over tables
max_model_len wide. The reference materialises every (row, column) page (``[B*P, 2, rows, Hkv, D]``, then with
FP8 pages ``[B, P, 2, page, Hkv, D]`` in fp32 twice): 68 + 128 GiB for Llama-3.1-8B at 128k (P = 8200), which
turned the fast path off. A few rows over the columns they use are enough to check a read."""
from __future__ import annotations

import dataclasses

import torch

from tierserve.attention.backend import AttnMetadata, host_base

CHECK_ROWS = 2      # decode rows the one-off reference check recomputes


def check_subset(meta: AttnMetadata, n_dev: int, max_rows: int = CHECK_ROWS):
    """(row indices, metadata of those rows only): up to ``max_rows`` rows, those whose pages in use include
    spilled ones first (shortest first), tables cut to the columns those rows use; no selection counts (the
    checked step counted them already). One host sync."""
    page, pt, lens = meta.page_size, meta.page_table, meta.seq_lens
    used = torch.arange(pt.shape[1], device=pt.device)[None, :] * page < lens[:, None]
    spilled = ((pt >= host_base(meta, n_dev)) & used).any(1).tolist()
    lens_l = lens.tolist()
    pick = sorted(sorted(range(len(lens_l)), key=lambda b: (not spilled[b], lens_l[b]))[:max_rows])
    width = min(pt.shape[1], max(1, -(-max(lens_l[b] for b in pick) // page)))
    idx = torch.tensor(pick, dtype=torch.int64, device=pt.device)
    n = len(pick)
    sub = dataclasses.replace(
        meta, num_seqs=n, num_tokens=n, positions=meta.positions[idx], slot_pages=meta.slot_pages[idx],
        slot_offsets=meta.slot_offsets[idx], query_start_loc=torch.arange(n + 1, device=pt.device),
        seq_lens=lens[idx], page_table=pt[idx, :width], query_lens_cpu=[1] * n,
        seq_lens_cpu=[lens_l[b] for b in pick], backend_data={}, page_heat=None, host_heat=None)
    return idx, sub
