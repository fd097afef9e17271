"""Per-request decode state of DeepSeek-V4, one explicit object per attention layer.

A state is immutable: ``forward_step`` returns new state objects and never writes into the ones it
was given, so a snapshot (for prefix caching, preemption or speculative rollback) is just a
reference to an old state. Tensors are the request's, on the model's device and dtype.

What one attention layer keeps (``D`` = head_dim, ``Di`` = index_head_dim, ``m`` = compress ratio,
``W`` = sliding_window; sizes in elements):

=====================  =====================================  ===========================
field                   shape                                  grows with context?
=====================  =====================================  ===========================
``window``              [min(n, W), D]  raw K=V, rope applied  no  (ring of the last W)
``compressed``          [n // m, D]     pooled K=V entries     yes (1 entry per m tokens)
``compressor``          pending [n % m, C] x 2 (+ [m, D] x 2)  no  (C = 2D for CSA, D for HCA)
``index_keys``          [n // 4, Di]    indexer keys (CSA)     yes (1 key per 4 tokens)
``indexer``             pending [n % 4, 2Di] x 2 + [4, Di] x 2 no
=====================  =====================================  ===========================

Sliding-window-only layers keep only ``window``. See ``kv_bytes.py`` for bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompressorState:
    """The compressor's not-yet-pooled tokens.

    ``pending_kv`` / ``pending_gate``: projections (``wkv(x)``, ``wgate(x)``; no position bias) of the
    ``n % ratio`` tokens of the open window, ``[n_pending, C]``.
    ``prev_kv`` / ``prev_gate``: overlapping compressors (CSA and its indexer) only: the first half
    (the "Ca" series, ``[ratio, dim]``, gate with position bias added) of the last *closed* window,
    which the next entry pools together with its own window. ``None`` before the first window closes
    and always for HCA.
    ``num_entries``: entries emitted so far (= tokens seen // ratio).
    """
    pending_kv: torch.Tensor
    pending_gate: torch.Tensor
    prev_kv: torch.Tensor | None
    prev_gate: torch.Tensor | None
    num_entries: int

    @property
    def num_pending(self) -> int:
        return int(self.pending_kv.shape[0])


@dataclass(frozen=True)
class LayerState:
    """Everything one attention layer needs to continue a sequence of ``num_tokens`` tokens."""
    num_tokens: int
    window: torch.Tensor                        # [min(num_tokens, W), D]
    compressed: torch.Tensor | None = None      # [num_tokens // ratio, D]   CSA / HCA
    compressor: CompressorState | None = None   # CSA / HCA
    index_keys: torch.Tensor | None = None      # [num_tokens // ratio, Di]  CSA
    indexer: CompressorState | None = None      # CSA

    def nbytes(self) -> int:
        """Bytes held right now (all tensors at their stored dtype)."""
        ts = [self.window, self.compressed, self.index_keys]
        for c in (self.compressor, self.indexer):
            if c is not None:
                ts += [c.pending_kv, c.pending_gate, c.prev_kv, c.prev_gate]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass(frozen=True)
class SequenceState:
    """The decode state of one sequence: one ``LayerState`` per decoder layer."""
    num_tokens: int
    layers: tuple[LayerState, ...]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)
