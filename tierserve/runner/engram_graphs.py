"""Engram inside CUDA-graph decode steps (models whose Engram has no conv).

Row ids depend only on token ids, which the host knows before each step: the runner hashes them and starts
every layer's gather (device tables: an index_select; host tables: a CPU gather + copy on a side stream, or
the zero-copy kernel) before the replay, and copies each layer's gathered rows into a static buffer that the
captured graph reads. The graph itself never touches a table, so the same captured graph serves every
placement. Engram with a causal conv keeps per-request state and stays on the eager path.
"""
from __future__ import annotations

import torch


class StaticEngramRows:
    def __init__(self, modules: dict, max_bs: int, device: torch.device, dtype: torch.dtype) -> None:
        self.modules = modules
        self.rows = {layer: torch.zeros(max_bs, m.cfg.engram_dim, device=device, dtype=dtype)
                     for layer, m in modules.items()}

    def fill(self, step, bs: int) -> None:
        """Wait for the step's gathers (``memory.engram.EngramStep``) and copy the rows into the buffers;
        rows past ``bs`` (bucket padding) keep stale but finite values."""
        for layer, m in self.modules.items():
            self.rows[layer][:bs].copy_(m.table.wait(step.handles.pop(layer)))

    def view(self, bs: int) -> "GraphEngramStep":
        return GraphEngramStep(self, bs)


class GraphEngramStep:
    """The model's Engram hand-off during capture: each layer reads its static rows."""

    def __init__(self, owner: StaticEngramRows, bs: int) -> None:
        self.owner, self.bs = owner, bs

    def apply(self, module, hidden: torch.Tensor) -> torch.Tensor:
        return module(hidden, self.owner.rows[module.layer][:self.bs])[0]
