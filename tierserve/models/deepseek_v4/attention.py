"""DeepSeek-V4 attention: sliding window + compressed entries, shared-KV MQA with K = V.

Per layer (``H`` heads of ``D`` = head_dim, one shared K=V head):

* q: ``wq_a`` -> RMSNorm (``q_norm``, its output ``q_lora`` also feeds the indexer) -> ``wq_b`` ->
  unweighted RMSNorm per head -> rope on the trailing rope dims;
* K = V: ``wkv`` -> RMSNorm (``norm``) -> rope; attended inside a causal window of
  ``sliding_window`` tokens (the query's own token included);
* CSA / HCA layers append compressed entries (``compressor.py``); HCA reads every complete entry,
  CSA only the lightning indexer's top-k (``indexer.py``);
* softmax with a learned per-head sink logit (``attn_sink``: it takes probability mass, adds no value);
* the output's rope dims are rotated back by the query position (keys were rotated and K = V);
* grouped low-rank output: the H heads form ``o_groups`` groups, each projected by its own block of
  ``wo_a`` to ``o_lora_rank``, then ``wo_b`` mixes all groups to ``hidden_size``.

``forward_full`` runs a whole sequence from position 0 (prefill; optionally also returning the state
that continues it); ``forward_step`` runs the tokens that follow a ``LayerState`` (decode, or chunked
prefill with any chunk length) and returns the new state. Both share ``sink_attention``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tierserve.models.deepseek_v4.compressor import Compressor, visible_entries
from tierserve.models.deepseek_v4.config import CSA, SLIDING, DeepseekV4Config
from tierserve.models.deepseek_v4.indexer import Indexer, selection_bias
from tierserve.models.deepseek_v4.kv_bytes import entry_bytes, index_key_bytes
from tierserve.models.deepseek_v4.model1 import (dequantise_entries, dequantise_index_keys, quantise_entries,
                                                 quantise_index_keys)
from tierserve.models.deepseek_v4.norm import RMSNorm, rms_unweighted
from tierserve.models.deepseek_v4.rope import apply_rope
from tierserve.models.deepseek_v4.state import LayerState

QUERY_BLOCK = 512   # queries per block in sink_attention: bounds prefill memory to O(block * keys)

BiasFn = Callable[[int, int], torch.Tensor]   # (first query row, end row) -> [rows, T] additive bias


def sink_attention(q: torch.Tensor, q_start: int, raw: torch.Tensor, raw_start: int, window: int,
                   comp: torch.Tensor | None, comp_bias: BiasFn | None, sinks: torch.Tensor,
                   scale: float, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Attention of ``q`` (``[S, H, D]``, positions ``q_start..``) over the raw K=V entries ``raw``
    (``[K, D]``, positions ``raw_start..``, read inside the causal window) and the compressed entries
    ``comp`` (``[T, D]``, masked by ``comp_bias``). Returns ``[S, H, D]``."""
    S, H, _ = q.shape
    out = []
    for a in range(0, S, block):
        b = min(S, a + block)
        lo = max(0, q_start + a - window + 1 - raw_start)
        hi = q_start + b - raw_start
        keys = raw[lo:hi]
        kpos = torch.arange(lo, hi, device=q.device) + raw_start
        qpos = torch.arange(a, b, device=q.device) + q_start
        allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        if comp is not None and comp.shape[0] > 0:
            keys = torch.cat([keys, comp])
            bias = torch.cat([bias, comp_bias(a, b).to(q.dtype)], dim=-1)
        qh = q[a:b].transpose(0, 1)                                          # [H, s, D]
        logits = torch.matmul(qh, keys.t()) * scale + bias                   # [H, s, K]
        sink = sinks.to(logits.dtype).view(H, 1, 1).expand(H, b - a, 1)
        logits = torch.cat([logits, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = logits.softmax(dim=-1)[..., :-1].to(keys.dtype)
        out.append(torch.matmul(probs, keys).transpose(0, 1))               # [s, H, D]
    return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.kind = cfg.layer_types[layer]
        self.ratio = cfg.compress_ratio(layer)
        self.rope = cfg.rope_for(layer)
        self.n_heads, self.head_dim, self.window = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        self.groups, self.group_rank = cfg.o_groups, cfg.o_lora_rank
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        hd = self.n_heads * self.head_dim
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, hd, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(hd // self.groups, self.groups * self.group_rank, bias=False)
        self.wo_b = nn.Linear(self.groups * self.group_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads))
        self.compressor = None if self.kind == SLIDING else Compressor(
            cfg.hidden_size, self.head_dim, self.ratio, overlap=self.kind == CSA, rope=cfg.rope_compress,
            eps=cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if self.kind == CSA else None
        # kv_dtype fp8: compressed entries (and indexer keys) are stored in the MODEL1 layout
        # (model1.py) and read back dequantised; set through DeepseekV4Model.set_kv_dtype
        self.kv_fp8 = False

    # ------------------------------------------------------------------ pieces
    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        q_lora = self.q_norm(self.wq_a(x))
        q = rms_unweighted(self.wq_b(q_lora).view(x.shape[0], self.n_heads, self.head_dim), self.eps)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        kv = apply_rope(self.norm(self.wkv(x)), cos, sin)
        return q_lora, apply_rope(q, cos, sin), kv, cos, sin

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        o = apply_rope(o, cos, sin, inverse=True)
        S = o.shape[0]
        grouped = o.reshape(S, self.groups, -1).transpose(0, 1)                          # [G, S, HD/G]
        w = self.wo_a.weight.view(self.groups, self.group_rank, -1).transpose(1, 2)      # [G, HD/G, R]
        return self.wo_b(torch.bmm(grouped, w).transpose(0, 1).reshape(S, -1))

    def _comp_bias(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
                   num_entries: int, index_keys: torch.Tensor | None) -> BiasFn:
        def hca(a: int, b: int) -> torch.Tensor:
            vis = visible_entries(positions[a:b], self.ratio)[:, None]
            future = torch.arange(num_entries, device=x.device)[None, :] >= vis
            return torch.zeros(future.shape, dtype=x.dtype, device=x.device).masked_fill(future, float("-inf"))

        def csa(a: int, b: int) -> torch.Tensor:
            scores = self.indexer.scores(x[a:b], q_lora[a:b], positions[a:b], index_keys)
            return selection_bias(self.indexer.select(scores, positions[a:b]), num_entries, x.dtype)

        return csa if self.indexer is not None else hca

    def _attend(self, x, positions, q_lora, q, raw, raw_start, comp, index_keys, cos, sin) -> torch.Tensor:
        bias = None if comp is None else self._comp_bias(x, q_lora, positions, comp.shape[0], index_keys)
        o = sink_attention(q, int(positions[0]), raw, raw_start, self.window, comp, bias,
                           self.attn_sink, self.scale, block=QUERY_BLOCK)
        return self._output(o, cos, sin)

    # ------------------------------------------------------------------ stored entries
    # Without kv_fp8 all four are the identity: entries are stored and read as computed.
    def store_entries(self, new: torch.Tensor) -> torch.Tensor:
        """Compressed entries ``[..., D]`` as they are kept in the state (MODEL1 rows with kv_fp8)."""
        return quantise_entries(new, self.compressor.rope.rope_dim) if self.kv_fp8 else new

    def read_entries(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored compressed entries -> ``[..., D]`` values that attention reads."""
        if not self.kv_fp8:
            return stored
        return dequantise_entries(stored, self.head_dim, self.compressor.rope.rope_dim, dtype)

    def store_keys(self, new: torch.Tensor) -> torch.Tensor:
        return quantise_index_keys(new) if self.kv_fp8 else new

    def read_keys(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantise_index_keys(stored, self.indexer.head_dim, dtype) if self.kv_fp8 else stored

    # ------------------------------------------------------------------ state
    def empty_state(self, device: torch.device, dtype: torch.dtype) -> LayerState:
        z = torch.zeros(0, self.head_dim, device=device, dtype=dtype)
        if self.compressor is None:
            return LayerState(num_tokens=0, window=z)
        idx = self.indexer
        comp, keys = z, None if idx is None else torch.zeros(0, idx.head_dim, device=device, dtype=dtype)
        if self.kv_fp8:
            u8 = torch.uint8
            comp = torch.zeros(0, entry_bytes(self.head_dim, self.compressor.rope.rope_dim, "model1"),
                               device=device, dtype=u8)
            if idx is not None:
                keys = torch.zeros(0, index_key_bytes(idx.head_dim, "model1"), device=device, dtype=u8)
        return LayerState(
            num_tokens=0, window=z, compressed=comp, compressor=self.compressor.empty_state(device, dtype),
            index_keys=keys, indexer=None if idx is None else idx.compressor.empty_state(device, dtype))

    # ------------------------------------------------------------------ prefill / step
    def forward_full(self, x: torch.Tensor, return_state: bool = False
                     ) -> tuple[torch.Tensor, LayerState | None]:
        """Prefill: ``x`` is ``[S, hidden]`` at positions ``0..S-1``."""
        S = x.shape[0]
        positions = torch.arange(S, device=x.device)
        q_lora, q, kv, cos, sin = self._project(x, positions)
        comp = keys = cstate = istate = None
        comp_st = keys_st = None
        if self.compressor is not None:
            comp, cstate = self.compressor.forward_full(x)
            comp_st = self.store_entries(comp)
            comp = self.read_entries(comp_st, x.dtype)
        if self.indexer is not None:
            keys, istate = self.indexer.compressor.forward_full(x)
            keys_st = self.store_keys(keys)
            keys = self.read_keys(keys_st, x.dtype)
        out = self._attend(x, positions, q_lora, q, kv, 0, comp, keys, cos, sin)
        if not return_state:
            return out, None
        return out, LayerState(S, kv[-self.window:], comp_st, cstate, keys_st, istate)

    def forward_step(self, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """The ``n >= 1`` tokens ``x`` (``[n, hidden]``) that follow ``state``."""
        p0 = state.num_tokens
        positions = torch.arange(p0, p0 + x.shape[0], device=x.device)
        q_lora, q, kv, cos, sin = self._project(x, positions)
        raw = torch.cat([state.window, kv])
        comp = keys = cstate = istate = comp_st = keys_st = None
        if self.compressor is not None:
            new, cstate = self.compressor.step(x, state.compressor)
            comp_st = torch.cat([state.compressed, self.store_entries(new)])    # each entry quantised once
            comp = self.read_entries(comp_st, x.dtype)
        if self.indexer is not None:
            new_keys, istate = self.indexer.compressor.step(x, state.indexer)
            keys_st = torch.cat([state.index_keys, self.store_keys(new_keys)])
            keys = self.read_keys(keys_st, x.dtype)
        out = self._attend(x, positions, q_lora, q, raw, p0 - state.window.shape[0], comp, keys, cos, sin)
        return out, LayerState(p0 + x.shape[0], raw[-self.window:], comp_st, cstate, keys_st, istate)
