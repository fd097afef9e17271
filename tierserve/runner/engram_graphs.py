"""Engram inside CUDA-graph decode steps and multi-step windows (models whose Engram has no conv).

Two hand-offs, chosen by where the tables are:

* ``DeviceEngram`` (tables on the device, or in pinned host RAM read by the zero-copy kernel): the decode
  step hashes its own token with a per-row history buffer (the ``lookback`` previous raw ids) on the device
  and gathers the rows itself, so it can live inside the captured graph and feed its greedy token into the
  next step (multi-step windows, no host round trip). The history is loaded from the requests' token lists
  when a window starts and shifted on the device after every step.
* ``StaticEngramRows`` (host tables gathered on the CPU, ``host_gather="copy"``): the host hashes the
  step's tokens and gathers the rows before each replay, into static buffers the graph reads; one step per
  host round trip.

Engram with a causal conv keeps per-request state and stays on the eager path.
"""
from __future__ import annotations

import torch

from tierserve.memory.engram import EngramStep


class DeviceEngram:
    def __init__(self, modules: dict, lookback: int, max_bs: int, device: torch.device) -> None:
        self.modules, self.lookback = modules, lookback
        self.hasher = None                       # set with the tokenizer (runner.set_tokenizer)
        self.history = torch.full((max_bs, max(lookback, 1)), -1, dtype=torch.int64, device=device)
        self.qsl = torch.arange(max_bs + 1, device=device)

    @staticmethod
    def supports(modules: dict) -> bool:
        return all(m.conv is None and (m.table.placement == "device" or m.table.host_gather == "zero_copy")
                   for m in modules.values())

    def load(self, bs: int, history: torch.Tensor, bucket: int | None = None) -> None:
        """``history [bs, lookback]`` raw ids before each row's input token (-1 before the sequence start);
        rows up to ``bucket`` (graph padding) get -1."""
        self.history[:bs, :self.lookback].copy_(history)
        if bucket is not None and bucket > bs:
            self.history[bs:bucket].fill_(-1)

    def begin(self, bs: int, ids: torch.Tensor) -> EngramStep:
        """The hand-off for a decode step whose input tokens are ``ids [bs]`` (device): rows hashed and
        gathered on the device (graph-capturable)."""
        rows = self.hasher.row_ids_packed(ids, self.qsl[:bs + 1], self.history[:bs, :self.lookback],
                                          layers=sorted(self.modules))
        handles = {layer: self.modules[layer].table.prefetch(rows[layer]) for layer in sorted(self.modules)}
        return EngramStep(handles, self.qsl[:bs + 1])

    def advance(self, bs: int, ids: torch.Tensor) -> None:
        """After a step with input ``ids``: they become the newest history entry of their rows."""
        if self.lookback:
            h = self.history[:bs, :self.lookback]
            h.copy_(torch.cat([h[:, 1:], ids[:, None]], dim=1))


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

    def begin(self, bs: int, ids: torch.Tensor | None = None) -> "GraphEngramStep":
        return GraphEngramStep(self, bs)

    def advance(self, bs: int, ids: torch.Tensor) -> None:
        pass


class GraphEngramStep:
    """The model's Engram hand-off during capture: each layer reads its static rows."""

    def __init__(self, owner: StaticEngramRows, bs: int) -> None:
        self.owner, self.bs = owner, bs

    def apply(self, module, hidden: torch.Tensor) -> torch.Tensor:
        return module(hidden, self.owner.rows[module.layer][:self.bs])[0]
