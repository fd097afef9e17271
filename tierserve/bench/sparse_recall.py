"""Attention-mass recall of a sparse selector: the share of the dense softmax mass that falls inside the
pages it selects, per layer, measured on real text while the model itself runs dense.

A probe replaces each layer's attention backend: it computes dense attention (the output the model
uses), and for every query with a context longer than ``topk_tokens`` also the pages the selector
would choose, accumulating  sum(softmax over chosen keys) / 1  per (layer, query, query head).
"""
from __future__ import annotations

import dataclasses


from tierserve.attention.backend import AttnMetadata
from tierserve.attention.indexer import indexer_page_scores
from tierserve.attention.select import SparseConfig, page_upper_bounds, select_pages
from tierserve.attention.torch_ref import TorchRefBackend, _gather_pages
from tierserve.bench.results import make_result


class RecallProbe(TorchRefBackend):
    name = "recall_probe"

    def __init__(self, cfg: SparseConfig, num_layers: int) -> None:
        self.cfg = cfg
        self.sum = [0.0] * num_layers
        self.count = [0] * num_layers
        self.low = [0] * num_layers          # queries x heads with recall < 0.9

    def forward(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float, sliding_window=None, layer_idx=0,
                kv_written=False):
        dense = dataclasses.replace(meta, sparse=None)
        out = super().forward(q, k, v, kv_layer, dense, scale, sliding_window, layer_idx, kv_written)
        p = self._prep(meta, sliding_window)
        B, page, P = meta.num_seqs, meta.page_size, meta.page_table.shape[1]
        _, _, rows, hkv, d = kv_layer.shape
        kv = _gather_pages(kv_layer, meta, layer_idx).view(B, P, 2, rows, hkv, d)
        keys = kv[:, :, 0, :page].reshape(B, P * page, hkv, d).transpose(1, 2).float()
        qp = q[p["q_index"]].transpose(1, 2).float()                                  # [B, Hq, Q, D]
        g = qp.shape[1] // hkv
        scores = (qp @ keys.repeat_interleave(g, dim=1).transpose(-1, -2)) * scale   # [B, Hq, Q, L]
        scores = scores.masked_fill(~p["mask"][:, None], float("-inf"))
        probs = scores.softmax(-1)
        if self.cfg.selector == "indexer":
            ub = indexer_page_scores(meta, layer_idx, p["q_index"], p["mask"]).expand(-1, hkv, -1, -1)
        else:
            ub = page_upper_bounds(qp, kv[:, :, 0, page].transpose(1, 2), kv[:, :, 1, page].transpose(1, 2),
                                   self.cfg.page_spread)
        chosen = select_pages(ub, p["q_pos"], meta.seq_lens, page, self.cfg)           # [B, Hkv, Q, P]
        chosen = chosen.repeat_interleave(g, dim=1).repeat_interleave(page, dim=-1)
        recall = (probs * chosen).sum(-1)                                              # [B, Hq, Q]
        sparse_q = (p["q_valid"] & (p["q_pos"] + 1 > self.cfg.topk_tokens))[:, None].expand_as(recall)
        vals = recall[sparse_q]
        self.sum[layer_idx] += float(vals.sum())
        self.count[layer_idx] += vals.numel()
        self.low[layer_idx] += int((vals < 0.9).sum())
        return out


def measure_recall(model: str | None, text: str, topk_list: list[int], context: int, chunk: int = 32,
                   max_windows: int = 4, selectors: tuple[str, ...] = ("pages",), indexer_path: str | None = None,
                   page_spread: float = 1.0, page_size: int | None = None) -> dict:
    from tierserve import LLM, SamplingParams

    rows, used_page = [], page_size
    for selector, topk in [(s, t) for s in selectors for t in topk_list]:
        llm = LLM(model, sparse_attention=selector, sparse_topk_tokens=topk, max_model_len=context + 1,
                  max_num_batched_tokens=chunk, enable_prefix_caching=False, indexer_path=indexer_path,
                  sparse_page_spread=page_spread, **({"page_size": page_size} if page_size else {}))
        cfg = llm.engine.runner.sparse
        layers = llm.engine.runner.model.layers
        used_page = llm.engine.config.page_size
        probe = RecallProbe(cfg, len(layers))
        for layer in layers:
            layer.self_attn.backend = probe
        ids = llm.get_tokenizer().encode(text)
        windows = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)][:max_windows]
        if not windows:
            raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {context}")
        llm.generate(windows, SamplingParams(temperature=0, max_tokens=1))
        for i in range(len(layers)):
            n = max(probe.count[i], 1)
            rows.append({"selector": selector, "topk_tokens": topk, "context": context, "layer": i,
                         "mass_recall": probe.sum[i] / n, "frac_below_0.9": probe.low[i] / n,
                         "query_heads_measured": probe.count[i]})
    summary = {}
    for sel in selectors:
        for t in topk_list:
            mine = [r["mass_recall"] for r in rows if r["topk_tokens"] == t and r["selector"] == sel]
            summary[f"mean_recall_top{t}" if sel == "pages" else f"mean_recall_{sel}_top{t}"] = \
                sum(mine) / max(1, len(mine))
    settings = {"model": model or "tierserve-nano", "context": context, "chunk": chunk, "windows": max_windows,
                "sink_tokens": 16, "recent_tokens": 64, "selectors": list(selectors), "indexer_path": indexer_path,
                "page_spread": page_spread, "page_size": used_page}
    return make_result("tierserve bench", "sparse-recall", settings, rows, summary)
