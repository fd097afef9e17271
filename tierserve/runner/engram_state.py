"""Per-request conv history of Engram layers with a short causal convolution (``conv_kernel_size > 0``).

The conv at position t reads the (K-1)*dilation previous conv inputs of the same sequence, which depend on
hidden states, so they are state the runner keeps between engine steps: one ``[W, hc*C]`` tensor per
(request, Engram layer), zeros when a request computes from position 0 (its start, or a restart after
preemption). The state is not paged, so prefix-cache hits cannot restore it: the engine turns prefix
caching off for these models. Freed when the request finishes (``release``).
"""
from __future__ import annotations

import torch


class EngramConvStates:
    def __init__(self, modules: dict) -> None:
        self.shapes = {layer: m.conv_state_shape for layer, m in modules.items() if m.conv is not None}
        self.states: dict[str, dict[int, torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.shapes)

    def gather(self, so, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """layer -> [B, W, hc*C] for the step's requests (in schedule order)."""
        out = {}
        for layer, shape in self.shapes.items():
            rows = []
            for s in so.scheduled:
                rid = s.request.request_id
                if s.start == 0:
                    rows.append(torch.zeros(shape, device=device, dtype=dtype))
                elif rid in self.states:
                    rows.append(self.states[rid][layer])
                else:
                    raise RuntimeError(f"request {rid!r} continues at position {s.start} without its Engram "
                                       "conv state (prefix caching must be off for Engram conv models)")
            out[layer] = torch.stack(rows)
        return out

    def store(self, so, new: dict[int, torch.Tensor]) -> None:
        for b, s in enumerate(so.scheduled):
            self.states[s.request.request_id] = {layer: new[layer][b].clone() for layer in self.shapes}

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)


def make_hasher(model_cfg, tokenizer):
    """The n-gram hasher of a model with Engram: canonical ids come from the tokenizer."""
    from tierserve.memory.engram_canonical import build_canonical_ids
    from tierserve.memory.engram_hash import NgramHasher

    if tokenizer is None:
        raise ValueError("a model with Engram needs its tokenizer (canonical token ids)")
    canon = build_canonical_ids(tokenizer, vocab_size=model_cfg.vocab_size)
    return NgramHasher(model_cfg.engram, canon.table, canon.num_canonical)


def start_step(model, hasher, conv: EngramConvStates | None, so, input_ids: torch.Tensor, meta, lookback: int,
               device: torch.device, dtype: torch.dtype):
    """Hash the step's tokens (with each request's look-back) and start every Engram layer's gather:
    the ``memory.engram.EngramStep`` the model (or the CUDA-graph buffers) consume."""
    from tierserve.memory.engram import engram_modules, prepare_engram_step

    state = conv.gather(so, device, dtype) if conv else None
    return prepare_engram_step(engram_modules(model), hasher, input_ids.cpu(), meta.query_start_loc.cpu(),
                               history_rows(so, lookback), state)


def history_rows(so, lookback: int) -> torch.Tensor:
    """[B, lookback] raw ids before each scheduled chunk's first token (-1 before the sequence start)."""
    from tierserve.memory.engram_hash import engram_history

    return torch.tensor([engram_history(s.request.all_token_ids, s.start, lookback) for s in so.scheduled],
                        dtype=torch.int64).view(len(so.scheduled), lookback)
