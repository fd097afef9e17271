"""The inputs of one engine step (``ModelRunner._prepare``): token ids, positions, the slot each new token's
K/V is written to, page tables (pages spilled to CPU RAM as virtual ids after the device pages), rows to
sample, prompt-logprob spans, and the step's ``AttnMetadata`` (spill state, decode split-K)."""
from __future__ import annotations

import numpy as np
import torch

from tierserve.attention.backend import AttnMetadata


def host_id_base(runner) -> int:
    """Page id of CPU-RAM slot 0 in the kernels' tables: after the device pages (with FP8 KV pages after the
    compact FP8 slots)."""
    return runner.fp8.end if runner.fp8 is not None else runner.kv.data.shape[0]


def page_array(pages) -> np.ndarray:
    """A request's page table as int64 ids (a ``kv.page_list.PageList``: its cached array)."""
    return pages.array() if hasattr(pages, "array") else np.asarray(pages, dtype=np.int64)


def kernel_table(pt: np.ndarray, n_dev: int) -> tuple[np.ndarray, int]:
    """A page table as the kernels read it: spilled entries ``-(slot + 1)`` become ``n_dev + slot``; and the
    largest spilled slot (-1: none)."""
    neg = pt < 0
    if not neg.any():
        return pt, -1
    return np.where(neg, n_dev - pt - 1, pt), int((-pt[neg] - 1).max())


def prepare_step(runner, so, lookahead: int = 0):
    """(metadata, input ids on the device, [(row, scheduled request)] to sample, prompt-logprob spans) for the
    scheduled chunks ``so``; ``lookahead`` widens the page tables by that many positions (multi-step)."""
    ps = runner.config.page_size
    pos_l, page_l, off_l, ids_l, qsl, seq_lens, qlens = [], [], [], [], [0], [], []
    sample_rows, plp = [], []
    n_dev, has_host, max_slot = host_id_base(runner), False, -1
    max_pages = max(-(-(s.end + lookahead) // ps) for s in so.scheduled)
    table = np.zeros((len(so.scheduled), max_pages), dtype=np.int64)
    for b, s in enumerate(so.scheduled):
        req = s.request
        pos = np.arange(s.start, s.end, dtype=np.int64)
        pt, top = kernel_table(page_array(s.page_table)[:max_pages], n_dev)     # spilled to CPU RAM: virtual ids after the device pages
        if top >= 0:
            max_slot, has_host = max(max_slot, top), True
        table[b, :len(pt)] = pt
        pos_l.append(pos)
        page_l.append(pt[pos // ps])
        off_l.append(pos % ps)
        ids_l.append(np.asarray(req.all_token_ids[s.start:s.end], dtype=np.int64))
        if s.samples:
            sample_rows.append((qsl[-1] + s.num_tokens - 1, s))
        if req.prompt_logprobs is not None:
            # positions p whose next token is a prompt token and has no logprob yet
            lo = max(s.start, len(req.prompt_logprobs) - 1)
            hi = min(s.end, req.num_prompt_tokens - 1)
            if hi > lo:
                plp.append((req, qsl[-1] + lo - s.start, hi - lo, lo))
        qsl.append(qsl[-1] + s.num_tokens)
        seq_lens.append(s.end)
        qlens.append(s.num_tokens)
    dev = runner.device

    def t(a):
        return torch.from_numpy(np.concatenate(a) if isinstance(a, list) else a).to(dev, non_blocking=True)

    meta = AttnMetadata(
        num_seqs=len(so.scheduled), num_tokens=qsl[-1], page_size=ps,
        positions=t(pos_l), slot_pages=t(page_l), slot_offsets=t(off_l),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
        page_table=t(table), query_lens_cpu=qlens, seq_lens_cpu=seq_lens,
        decode_only=qsl[-1] == len(so.scheduled), host_kv=runner.host_kv if has_host else None,
        sparse=runner.sparse, kv_fp8=runner.fp8, index_keys=runner.index_keys)
    if runner.spill is not None:
        sp = runner.spill
        meta.host_ram_only = has_host and max_slot < sp.ram_slots
        meta.host_summaries, meta.page_heat, meta.host_heat = sp.summaries, sp.page_heat, sp.host_heat
        sp.on_write(meta.slot_pages, meta.slot_offsets)
    if meta.decode_only:
        meta.max_seq_bound = max(seq_lens) + lookahead
        meta.num_splits = runner.decode_splits(meta.num_seqs)
    return meta, t(ids_l), sample_rows, plp
