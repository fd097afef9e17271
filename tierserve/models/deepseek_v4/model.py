"""The DeepSeek-V4 decoder for one sequence: ``forward_full`` (prefill) and ``forward_step`` (decode).

Module and parameter names follow the public checkpoint (``embed``, ``layers.N.attn.wq_a``,
``layers.N.ffn.experts.E.w1``, ``head`` ...), so ``weights.py`` only has to strip prefixes, rename a
handful of mHC keys and dequantise.

Token ids are 1-D (one sequence); ``decode_batch`` (``batch.py``) runs one new token for each of many
sequences in one pass. The paged KV pool is future work: the engine keeps one ``SequenceState`` per request.
"""
from __future__ import annotations

import torch
from torch import nn

from tierserve.models.deepseek_v4.attention import Attention
from tierserve.models.deepseek_v4.config import DeepseekV4Config
from tierserve.models.deepseek_v4.mhc import HyperConnection, HyperHead
from tierserve.models.deepseek_v4.moe import MoE
from tierserve.models.deepseek_v4.norm import RMSNorm
from tierserve.models.deepseek_v4.state import LayerState, SequenceState

# Parameters kept in fp32 when the rest of the model is cast down (as the reference does).
FP32_PARAMS = ("hc_attn.", "hc_ffn.", "hc_head.", "attn_sink", ".ape", "norm.weight", "gate.bias")


class Block(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer)
        hc = (cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.hc_attn = HyperConnection(*hc)
        self.hc_ffn = HyperConnection(*hc)

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor, state: LayerState | None,
                want_state: bool) -> tuple[torch.Tensor, LayerState | None]:
        """``h``: ``[S, hc, D]`` streams. ``state=None`` runs the prefill path."""
        x, post, comb = self.hc_attn(h)
        x = self.attn_norm(x)
        if state is None:
            out, state = self.attn.forward_full(x, return_state=want_state)
        else:
            out, state = self.attn.forward_step(x, state)
        h = HyperConnection.merge(out, post, comb, h)
        x, post, comb = self.hc_ffn(h)
        out = self.ffn(self.ffn_norm(x), token_ids)
        return HyperConnection.merge(out, post, comb, h), state


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def cast(self, dtype: torch.dtype) -> DeepseekV4Model:
        """Cast to ``dtype``, keeping mHC, sinks, position biases, norms and router biases in fp32."""
        for name, p in self.named_parameters():
            keep = any(k in name for k in FP32_PARAMS)
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    def place(self, device: str | torch.device, cpu_experts: bool = False) -> DeepseekV4Model:
        """Move to ``device``; with ``cpu_experts`` the routed experts of every MoE layer move to CPU RAM
        instead (pinned when ``device`` is CUDA) and run there; the gates, shared experts, attention and
        everything else go to ``device``."""
        device = torch.device(device)
        if cpu_experts:
            for block in self.layers:
                block.ffn.experts_to_host(pin=device.type == "cuda")
        for name, mod in self.named_modules():
            if cpu_experts and ".ffn.experts" in f".{name}":
                continue
            for k, p in mod._parameters.items():
                if p is not None:
                    p.data = p.data.to(device)
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(device)
        return self

    # ------------------------------------------------------------------ state
    KV_DTYPES = ("auto", "fp8")

    @property
    def kv_dtype(self) -> str:
        return "fp8" if any(b.attn.kv_fp8 for b in self.layers) else "auto"

    def set_kv_dtype(self, kv_dtype: str) -> DeepseekV4Model:
        """``"fp8"``: store compressed entries and indexer keys in the MODEL1 layout (``model1.py``; each
        entry quantised once when its window closes, read back dequantised); the window rings and the
        compressors' open windows stay in the model dtype. ``"auto"``: everything in the model dtype.
        States of one setting cannot be continued under the other."""
        if kv_dtype not in self.KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} is not supported; allowed: {', '.join(self.KV_DTYPES)}")
        for b in self.layers:
            b.attn.kv_fp8 = kv_dtype == "fp8"
        return self

    def new_state(self) -> SequenceState:
        """The state of an empty sequence."""
        dev, dt = self.device, self.dtype
        return SequenceState(0, tuple(b.attn.empty_state(dev, dt) for b in self.layers))

    # ------------------------------------------------------------------ forward
    def _run(self, token_ids: torch.Tensor, state: SequenceState | None, want_state: bool,
             logits_from: int = 0):
        ids = _as_1d(token_ids, self.device)
        if ids.numel() == 0:
            raise ValueError("input_ids is empty; pass at least one token")
        if not 0 <= logits_from <= ids.shape[0]:
            raise ValueError(f"logits_from={logits_from} is outside [0, {ids.shape[0]}]")
        h = self.embed(ids)
        h = h.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        states = []
        for i, block in enumerate(self.layers):
            h, st = block(h, ids, None if state is None else state.layers[i], want_state)
            states.append(st)
        if logits_from == ids.shape[0]:
            logits = h.new_empty(0, self.config.vocab_size)
        else:
            logits = self.head(self.norm(self.hc_head(h[logits_from:] if logits_from else h)))
        n0 = 0 if state is None else state.num_tokens
        new = SequenceState(n0 + ids.shape[0], tuple(states)) if (want_state or state is not None) else None
        return logits, new

    @torch.no_grad()
    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[S, vocab]`` of a whole sequence (positions ``0..S-1``)."""
        return self._run(input_ids, None, want_state=False)[0]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, logits_from: int = 0) -> tuple[torch.Tensor, SequenceState]:
        """``forward_full`` that also returns the state continuing the sequence. ``logits_from``: logits
        only for the rows ``logits_from..S-1`` (the engine asks for the last row only: a full
        ``[S, vocab]`` block of a long prompt is large)."""
        return self._run(input_ids, None, want_state=True, logits_from=logits_from)

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, state: SequenceState, logits_from: int = 0
                     ) -> tuple[torch.Tensor, SequenceState]:
        """Logits ``[n, vocab]`` of the ``n >= 1`` tokens following ``state``, and the new state
        (``[n - logits_from, vocab]`` with ``logits_from``, as in ``prefill``).
        ``state`` itself is left untouched (it stays a valid snapshot)."""
        return self._run(input_ids, state, want_state=True, logits_from=logits_from)

    @torch.no_grad()
    def decode_batch(self, token_ids: torch.Tensor, states: list[SequenceState]
                     ) -> tuple[torch.Tensor, list[SequenceState]]:
        """One forward pass for ``B`` sequences, one new token each: ``token_ids[b]`` follows
        ``states[b]`` (any lengths). Returns logits ``[B, vocab]`` and the new states; equals
        ``forward_step`` row by row up to the summation order of batched products (``batch.py``)."""
        from tierserve.models.deepseek_v4.batch import decode_batch

        return decode_batch(self, token_ids, states)


def _as_1d(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=device)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids: expected one sequence (shape [S] or [1, S]), got shape {tuple(ids.shape)}")
    return ids.long()


@torch.no_grad()
def greedy_generate(model: DeepseekV4Model, prompt_ids, max_new_tokens: int) -> list[int]:
    """Prefill the prompt, then decode ``max_new_tokens`` tokens one ``forward_step`` at a time."""
    logits, state = model.prefill(torch.as_tensor(prompt_ids))
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(logits[-1].argmax())
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        logits, state = model.forward_step(torch.tensor([tok]), state)
    return out
