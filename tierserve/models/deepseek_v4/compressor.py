"""Gated pooling of every ``ratio`` tokens into one compressed K=V entry (CSA and HCA).

For window ``w`` (source tokens ``w*m .. w*m+m-1``) the compressor projects each token to a value
``C_j = wkv(x_j)`` and a gate ``Z_j = wgate(x_j) + ape[j mod m]`` (learned per-slot position bias)
and emits ``rope(norm(sum_j softmax_j(Z) * C_j))`` at position ``w*m``; the softmax runs over the
slots separately for each channel.

* HCA (ratio 128): non-overlapping windows, ``C`` and ``Z`` have ``dim`` channels.
* CSA (ratio 4) and the lightning indexer's key compressor: *overlapping* windows. The projections
  have ``2*dim`` channels: two series, Ca = ``[..., :dim]`` and Cb = ``[..., dim:]``. Entry ``w`` pools
  the ``m`` Ca slots of window ``w-1`` together with the ``m`` Cb slots of window ``w`` (width ``2m``,
  stride ``m``). Window 0 has no predecessor: those slots get weight 0.

Entry ``w`` becomes visible to a query at position ``t`` once its window is complete:
``(w + 1) * m <= t + 1``.
"""
from __future__ import annotations

import torch
from torch import nn

from tierserve.models.deepseek_v4.norm import RMSNorm
from tierserve.models.deepseek_v4.rope import RopeSpec, apply_rope
from tierserve.models.deepseek_v4.state import CompressorState


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, dim: int, ratio: int, overlap: bool, rope: RopeSpec, eps: float) -> None:
        super().__init__()
        self.dim, self.ratio, self.overlap, self.rope = dim, ratio, overlap, rope
        width = 2 * dim if overlap else dim
        self.wkv = nn.Linear(hidden_size, width, bias=False)
        self.wgate = nn.Linear(hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(dim, eps)

    # ------------------------------------------------------------------ shared math
    def pool(self, kv: torch.Tensor, gate: torch.Tensor, first_entry: int,
             prev: tuple[torch.Tensor, torch.Tensor] | None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Pool ``n`` complete windows. ``kv`` / ``gate``: ``[n*ratio, C]`` projections (gate without
        ``ape``), the first of them at position ``first_entry * ratio``. ``prev``: the Ca half of the
        window before (overlap only). Returns the ``[n, dim]`` entries and the Ca half of the last
        window (overlap only)."""
        m, d = self.ratio, self.dim
        n = kv.shape[0] // m
        kv = kv.view(n, m, -1)
        gate = gate.view(n, m, -1) + self.ape
        last = None
        if self.overlap:
            if prev is None:
                prev_kv = kv.new_zeros(1, m, d)
                prev_gate = gate.new_full((1, m, d), float("-inf"))
            else:
                prev_kv, prev_gate = prev[0].to(kv.dtype)[None], prev[1].to(gate.dtype)[None]
            slots_kv = torch.cat([torch.cat([prev_kv, kv[:-1, :, :d]]), kv[:, :, d:]], dim=1)
            slots_gate = torch.cat([torch.cat([prev_gate, gate[:-1, :, :d]]), gate[:, :, d:]], dim=1)
            last = (kv[-1, :, :d], gate[-1, :, :d])
        else:
            slots_kv, slots_gate = kv, gate
        weights = slots_gate.softmax(dim=1, dtype=torch.float32).to(slots_kv.dtype)
        pooled = self.norm((slots_kv * weights).sum(dim=1))
        positions = (torch.arange(n, device=kv.device) + first_entry) * m
        cos, sin = self.rope.cos_sin(positions, pooled.dtype)
        return apply_rope(pooled, cos, sin), last

    def empty_state(self, device: torch.device, dtype: torch.dtype) -> CompressorState:
        width = 2 * self.dim if self.overlap else self.dim
        z = torch.zeros(0, width, device=device, dtype=dtype)
        return CompressorState(pending_kv=z, pending_gate=z, prev_kv=None, prev_gate=None, num_entries=0)

    # ------------------------------------------------------------------ prefill / step
    def forward_full(self, x: torch.Tensor) -> tuple[torch.Tensor, CompressorState]:
        """All entries of a sequence ``x`` (``[S, hidden]``, positions ``0..S-1``) and the state
        that continues it."""
        return self.step(x, self.empty_state(x.device, x.dtype))

    def step(self, x: torch.Tensor, state: CompressorState) -> tuple[torch.Tensor, CompressorState]:
        """Consume ``x`` (the tokens following ``state``); return the entries that closed
        (``[k, dim]``, possibly ``k = 0``) and the new state."""
        kv = torch.cat([state.pending_kv, self.wkv(x)])
        gate = torch.cat([state.pending_gate, self.wgate(x)])
        usable = (kv.shape[0] // self.ratio) * self.ratio
        if usable == 0:
            return kv.new_zeros(0, self.dim), CompressorState(kv, gate, state.prev_kv, state.prev_gate,
                                                                state.num_entries)
        prev = (state.prev_kv, state.prev_gate) if state.prev_kv is not None else None
        entries, last = self.pool(kv[:usable], gate[:usable], state.num_entries, prev)
        prev_kv, prev_gate = last if last is not None else (None, None)
        return entries, CompressorState(kv[usable:], gate[usable:], prev_kv, prev_gate,
                                        state.num_entries + usable // self.ratio)


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries a query at each position may read: ``(t + 1) // ratio``."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")
