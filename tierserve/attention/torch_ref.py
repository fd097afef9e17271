"""Plain-PyTorch paged attention: the reference every fast backend is tested against.

Gathers each request's pages into a padded [B, max_pages*page_size] key block and runs SDPA with
a causal (and optional sliding-window) mask. Works on CPU and GPU, any dtype, any page subset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.attention.backend import AttnMetadata, count_selection, write_kv
from tierserve.attention.indexer import indexer_page_scores
from tierserve.attention.select import page_upper_bounds, select_pages
from tierserve.attention.sparse_prefill import prefill_selection


class TorchRefBackend:
    name = "torch_ref"

    def _prep(self, meta: AttnMetadata, window: int | None) -> dict:
        key = ("torch_ref", window)
        cached = meta.backend_data.get(key)
        if cached is not None:
            return cached
        base = meta.backend_data.get(("torch_ref", None))
        if base is None:
            dev = meta.positions.device
            max_q = meta.max_query_len
            qlens = torch.tensor(meta.query_lens_cpu, device=dev)
            starts = meta.query_start_loc[:-1]
            ar = torch.arange(max_q, device=dev)
            q_valid = ar[None, :] < qlens[:, None]                        # [B, max_q]
            q_index = torch.where(q_valid, starts[:, None] + ar[None, :], 0)
            q_pos = torch.where(q_valid, meta.positions[q_index], 0)      # invalid rows see key 0
            max_kv = meta.page_table.shape[1] * meta.page_size
            kv_pos = torch.arange(max_kv, device=dev)
            mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < meta.seq_lens[:, None, None])
            base = dict(q_valid=q_valid, q_index=q_index, q_pos=q_pos, kv_pos=kv_pos, mask=mask)
            meta.backend_data[("torch_ref", None)] = base
        if window is None:
            return base
        out = dict(base)
        out["mask"] = base["mask"] & (base["q_pos"][:, :, None] - base["kv_pos"][None, None, :] < window)
        meta.backend_data[key] = out
        return out

    def forward(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float,
                sliding_window: int | None = None, layer_idx: int = 0, kv_written: bool = False) -> torch.Tensor:
        if not kv_written:
            write_kv(k, v, kv_layer, meta)
        p = self._prep(meta, sliding_window)
        B = meta.num_seqs
        _, _, rows, hkv, d = kv_layer.shape
        page = meta.page_size
        P = meta.page_table.shape[1]
        f = meta.kv_fp8
        flat = f.gather(kv_layer, meta, layer_idx) if (f is not None and (f.compact is not None or meta.host_kv is not None)) \
            else _gather_pages(kv_layer, meta, layer_idx)
        kv = flat.view(B, P, 2, rows, hkv, d)
        mask = p["mask"][:, None]                                                  # [B, 1, max_q, L]
        qp = q[:, :, None, :] if meta.decode_only else q[p["q_index"]].transpose(1, 2)   # [B, Hq, max_q, D]
        chosen_keys = None
        if meta.sparse is not None:
            if meta.sparse.selector == "indexer":
                ub = indexer_page_scores(meta, layer_idx, p["q_index"], p["mask"]).expand(-1, hkv, -1, -1)
            else:
                ub = page_upper_bounds(qp, kv[:, :, 0, page].transpose(1, 2), kv[:, :, 1, page].transpose(1, 2),
                                       meta.sparse.page_spread)
            chosen = select_pages(ub, p["q_pos"], meta.seq_lens, page, meta.sparse)   # [B, Hkv, Q, P]
            for b, n in enumerate(meta.query_lens_cpu):      # prefill chunks: one choice per query block
                if n > 1:
                    start = meta.seq_lens_cpu[b] - n
                    chosen[b, :, :n] = prefill_selection(ub[b, :, :n], start, n, page, meta.sparse)
            count_selection(meta, chosen & p["q_valid"][:, None, :, None], kv_layer.shape[0])
            chosen_keys = chosen.repeat_interleave(page, dim=-1)                   # [B, Hkv, Q, L]
        if meta.kv_fp8 is not None:       # each key twice: full precision and its FP8 reading
            kv, mask = meta.kv_fp8.attention_inputs(kv, meta, p, layer_idx)
            P = kv.shape[1]
            if chosen_keys is not None:
                chosen_keys = torch.cat([chosen_keys, chosen_keys], dim=-1)
        if chosen_keys is not None:
            mask = mask & chosen_keys
        keys = kv[:, :, 0, :page].reshape(B, P * page, hkv, d).transpose(1, 2).to(q.dtype)   # [B, Hkv, L, D]
        vals = kv[:, :, 1, :page].reshape(B, P * page, hkv, d).transpose(1, 2).to(q.dtype)
        if meta.decode_only:
            # one query per sequence: fold the query heads sharing a KV head into the query axis
            hq = q.shape[1]
            qg = q.view(B, hkv, hq // hkv, d)
            out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=scale)
            return out.reshape(B, hq, d)
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(qp.shape[1] // hkv, dim=1)               # per query head
        out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=mask, scale=scale,
                                             enable_gqa=qp.shape[1] != hkv)
        return out.transpose(1, 2)[p["q_valid"]]                                   # [T, Hq, D]


def _gather_pages(kv_layer: torch.Tensor, meta: AttnMetadata, layer_idx: int) -> torch.Tensor:
    """All pages of the step's page tables in one gather; spilled pages are copied in from CPU RAM
    (dense attention over a tiered KV reads every page each step: PCIe-bound by design)."""
    flat = meta.page_table.reshape(-1)
    if meta.host_kv is None:
        return torch.index_select(kv_layer, 0, flat)
    n_dev = kv_layer.shape[0]
    on_host = flat >= n_dev
    out = torch.index_select(kv_layer, 0, torch.where(on_host, 0, flat))
    slots = (flat - n_dev).cpu()
    for first, store in meta.host_kv:          # CPU RAM, then the disk spill file
        sel = on_host & (slots >= first).to(on_host.device) & (slots < first + store.shape[0]).to(on_host.device)
        if bool(sel.any()):
            rows = torch.index_select(store[:, layer_idx], 0, slots[sel.cpu()] - first)
            out[sel] = rows.to(out.device, non_blocking=True)
    return out

