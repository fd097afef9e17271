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
