"""Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) over the paged KV cache.

Differences between the families are config switches: qkv bias (Qwen2), per-head q/k RMSNorm
(Qwen3), tied embeddings, sliding window (Mistral), rope scaling. q/k/v and gate/up are fused
into one matmul each at load time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.attention.backend import AttentionBackend, AttnMetadata
from tierserve.kv.layout import KVCache
from tierserve.models.config import ModelConfig
from tierserve.models.layers.norm import RMSNorm
from tierserve.models.layers.rotary import RotaryEmbedding
from tierserve.models.llama_weights import LlamaWeights


# Batch-1 FP8 decode, opt-in (the same bits): the q/k/v split-K sum, rotary and KV write in one kernel
# (``layers/triton_qkv_rope.py``). H200, stop 27, the engine loop at 2k (FP8 weights, 128 tokens): 3.145 ms a token
# against 3.161 without it -- within the run-to-run spread, so not the default (stop27/engine-loop-fold-*.json). A
# second fold (silu(gate) * up in the gate_up GEMV's epilogue) measured 3.439 ms there and was removed.
QKV_ROPE_FOLD = os.environ.get("TIERSERVE_QKV_ROPE_FOLD", "0") == "1"


def _fused():
    """The Triton kernels of the fused GPU path (imported on first use: Triton is optional)."""
    from tierserve.models.layers import triton_fused
    return triton_fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, layer_idx: int, **f) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.d, bias=cfg.attention_bias, **f)
        self.o_proj = nn.Linear(self.nh * self.d, cfg.hidden_size, bias=False, **f)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, **f) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, **f) if cfg.qk_norm else None
        self.backend = backend
        self.window = cfg.sliding_window
        self.scale = self.d ** -0.5
        self.indexer = None        # attention.indexer.Indexer (sparse_attention="indexer"), with its rope tables
        self.index_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        if self.indexer is not None and meta.index_keys is not None:
            self._index(x, meta)
        if QKV_ROPE_FOLD and isinstance(rope, FusedRope) and self.q_norm is None \
                and (self.d // 2) & (self.d // 2 - 1) == 0:         # (the kernel's half head: a power of two)
            rows = getattr(self.qkv_proj, "row_partials", None)       # FP8 weights, batch-1 decode on CUDA
            part = rows(x) if rows is not None else None
            if part is not None:
                return self.o_proj(self._attend_partials(part, x.dtype, rope, kv, meta))
        return self.o_proj(self.attend(self.qkv_proj(x), rope, kv, meta))

    def _attend_partials(self, part: torch.Tensor, dtype: torch.dtype, rope: "FusedRope", kv: torch.Tensor,
                         meta: AttnMetadata) -> torch.Tensor:
        """``attend`` from the q/k/v projection's split-K partials: their sum, rotary and the KV write in one kernel
        (``layers/triton_qkv_rope.py``; the same bits as the reduce kernel, then ``rope_write_kv``)."""
        from tierserve.models.layers.triton_qkv_rope import reduce_rope_write_kv
        T, n = part.shape[1], part.shape[2]
        bias = self.qkv_proj.bias.to(dtype) if self.qkv_proj.bias is not None else None
        qkv = torch.empty(T, n, dtype=dtype, device=part.device)
        written = rope.can_write_kv(kv, meta)
        reduce_rope_write_kv(part, bias, qkv, self.nh, self.nkv, rope.cos, rope.sin, meta.positions,
                             kv if written else None, meta.slot_pages, meta.slot_offsets, meta.page_size)
        q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, k, v = q.view(T, self.nh, self.d), k.view(T, self.nkv, self.d), v.view(T, self.nkv, self.d)
        o = self.backend.forward(q, k, v, kv, meta, self.scale, self.window, self.layer_idx, kv_written=written)
        return o.reshape(T, self.nh * self.d)

    def _index(self, x: torch.Tensor, meta: AttnMetadata) -> None:
        """Indexer keys of the new tokens into the paged index cache; its queries for the selector."""
        cos, sin = self.index_tables
        q, k, w = self.indexer(x, cos[meta.positions], sin[meta.positions])
        meta.index_keys[meta.slot_pages, self.layer_idx, meta.slot_offsets] = k.to(meta.index_keys.dtype)
        meta.backend_data[("index_q", self.layer_idx)] = (q, w)

    def attend(self, qkv: torch.Tensor, rope, kv: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Everything between the q/k/v projection and o_proj: [T, (Hq+2Hkv)*D] -> [T, Hq*D]."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, k, v = q.view(T, self.nh, self.d), k.view(T, self.nkv, self.d), v.view(T, self.nkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(rope, FusedRope):      # rotary + KV write in one kernel (GPU fast path)
            written = rope.can_write_kv(kv, meta)
            _fused().rope_write_kv(q, k, v, rope.cos, rope.sin, meta.positions, kv if written else None,
                                   meta.slot_pages, meta.slot_offsets, meta.page_size)
            o = self.backend.forward(q, k, v, kv, meta, self.scale, self.window, self.layer_idx,
                                     kv_written=written)
        else:
            q, k = RotaryEmbedding.apply(rope, q, k)
            o = self.backend.forward(q, k, v, kv, meta, self.scale, self.window, self.layer_idx)
        return o.reshape(T, self.nh * self.d)


def _project(lin: nn.Module, x: torch.Tensor, norm: RMSNorm | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + lin(norm(x))`` in one kernel: the bf16 skinny GEMM."""
    w, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
    from tierserve.models.layers.triton_gemv import gemv
    return gemv(x, lin.weight, w, eps, residual)


@dataclass
class FusedRope:
    """The fp32 cos/sin tables, handed to layers that rotate inside a Triton kernel."""
    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def can_write_kv(kv: torch.Tensor, meta: AttnMetadata) -> bool:
        # new tokens go to bf16/fp32 rows (FP8 pages are quantised later); pages with a key min / max summary
        # row (sparse selection, FP8 pages) only in decode steps: one token per sequence, so no two programs
        # update one page's summary
        return kv.shape[2] == meta.page_size or meta.decode_only


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **f) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, **f)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **f)

    def forward(self, x: torch.Tensor, use_fused: bool = False) -> torch.Tensor:
        if use_fused:
            return self.down_proj(_fused().silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend, layer_idx: int, **f) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **f)
        self.self_attn = Attention(cfg, backend, layer_idx, **f)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **f)
        self.mlp = MLP(cfg, **f)
        self.engram = None        # memory.engram.Engram on the layers that carry it (attach_engram)

    def forward(self, x, rope, kv, meta, engram=None):
        if self.engram is not None:          # n-gram memory joins the residual before attention
            x = x + engram.apply(self.engram, x)
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, h, residual, rope, kv, meta, next_norm: RMSNorm):
        """h = this layer's normalised input, residual = the stream; returns the next layer's pair."""
        a = self.self_attn(h, rope, kv, meta)
        ln = self.post_attention_layernorm
        add_rmsnorm = _fused().add_rmsnorm
        h, residual = add_rmsnorm(a, residual, ln.weight, ln.eps)
        m = self.mlp(h, use_fused=True)
        return add_rmsnorm(m, residual, next_norm.weight, next_norm.eps)


class LlamaForCausalLM(LlamaWeights, nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int, **f) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **f)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, i, **f) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **f)
        self.fused = False        # enable_fused(): Triton add+norm, rotary+KV write, SiLU*mul
        self.gemv = False         # enable_fused(gemv=True): decode skinny GEMM with fused norm / residual
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **f)
        self.lm_head_fp8 = None   # quantize_lm_head_fp8() with tied embeddings: an FP8 copy for the logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                meta: AttnMetadata, engram=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.fused:
            return self._forward_fused(x, kv, meta, engram)
        rope = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv.layer(i), meta, engram)
        return self.norm(x)

    def _forward_fused(self, x: torch.Tensor, kv: KVCache, meta: AttnMetadata, engram=None) -> torch.Tensor:
        rope = FusedRope(self.rotary.cos, self.rotary.sin)
        if self.gemv and x.shape[0] <= 16:
            return self._forward_gemv(x, rope, kv, meta, engram)
        first = self.layers[0].input_layernorm
        add_rmsnorm = _fused().add_rmsnorm
        h, res = add_rmsnorm(x, None, first.weight, first.eps)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if layer.engram is not None and engram is not None:     # joins the stream, then the norm again
                ln = layer.input_layernorm
                h, res = add_rmsnorm(engram.apply(layer.engram, res), res, ln.weight, ln.eps)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < n else self.norm
            h, res = layer.forward_fused(h, res, rope, kv.layer(i), meta, nxt)
        return h

    def _forward_gemv(self, x: torch.Tensor, rope: FusedRope, kv: KVCache, meta: AttnMetadata,
                      engram=None) -> torch.Tensor:
        """Decode rows (<= 16): each norm rides in the next projection, each residual add in the projection before
        it (layers/triton_gemv.py)."""
        res = x
        for i, layer in enumerate(self.layers):
            if layer.engram is not None and engram is not None:
                res = res + engram.apply(layer.engram, res)
            a, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            o = a.attend(_project(a.qkv_proj, res, ln1), rope, kv.layer(i), meta)
            res = _project(a.o_proj, o, residual=res)
            act = _fused().silu_mul(_project(mlp.gate_up_proj, res, ln2))
            res = _project(mlp.down_proj, act, residual=res)
        return _fused().add_rmsnorm(res, None, self.norm.weight, self.norm.eps)[0]

    def enable_fused(self, gemv: bool = False) -> None:
        """Use the Triton kernels of layers/triton_fused.py (CUDA; Engram layers included); with
        ``gemv`` also the decode skinny GEMM (plain bias-free nn.Linear layers only)."""
        _fused()
        self.fused = True
        linears = [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        no_indexer = all(layer.self_attn.indexer is None for layer in self.layers)
        self.gemv = gemv and all(type(m) is nn.Linear and m.bias is None for m in linears) and no_indexer

    def attach_indexers(self, indexers) -> None:
        """Per-layer lightning indexers (attention/indexer.py) for the ``indexer`` sparse selector."""
        c = indexers.cfg
        if (c.num_layers, c.hidden_size, c.dim) != (len(self.layers), self.cfg.hidden_size, self.cfg.head_dim):
            raise ValueError(f"indexer was trained for layers={c.num_layers}, hidden={c.hidden_size}, "
                             f"dim={c.dim}; this model has {len(self.layers)}, {self.cfg.hidden_size}, "
                             f"head dim {self.cfg.head_dim}")
        self.indexers = indexers
        for layer, idx in zip(self.layers, indexers.layers):
            layer.self_attn.indexer = idx
            layer.self_attn.index_tables = (self.rotary.cos, self.rotary.sin)
        self.gemv = False   # the decode GEMV folds the norm away: the indexer needs its input

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_fp8 is not None:                      # tied embeddings, FP8 output projection
            return self.lm_head_fp8(hidden)
        if self.lm_head is not None and type(self.lm_head) is not nn.Linear:      # untied, FP8 (Fp8Linear)
            return self.lm_head(hidden)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w)

    @torch.no_grad()
    def quantize_lm_head_fp8(self) -> None:
        """``fp8_lm_head``: the output projection as block-scaled FP8 (lossy). An untied head is replaced; tied
        embeddings keep their table for the input and get an FP8 copy for the logits."""
        from tierserve.quant.fp8_linear import quantize_linear

        if self.lm_head is not None:
            if type(self.lm_head) is nn.Linear:
                self.lm_head = quantize_linear(self.lm_head)
            return
        emb = self.embed_tokens.weight
        view = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device="meta")
        view.weight = emb                                     # no copy: quantize_linear reads it
        self.lm_head_fp8 = quantize_linear(view)

    def attach_engram(self, placement: str | None, device: torch.device, dtype: torch.dtype) -> None:
        """Create the Engram modules (after the model's storage exists; tables may live in host RAM)."""
        from dataclasses import replace

        from tierserve.memory.engram import Engram

        ecfg = self.cfg.engram
        if placement is not None:
            ecfg = replace(ecfg, placement=placement)
            self.cfg.engram = ecfg
        for i in ecfg.layers:
            self.layers[i].engram = Engram(ecfg, i, self.cfg.hidden_size, self.cfg.rms_norm_eps,
                                           device=device, dtype=dtype)
