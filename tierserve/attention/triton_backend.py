"""GPU backend: Triton paged decode (split-K) for pure decode steps, the torch reference otherwise.

Prefill (and mixed prefill/decode) steps gather pages and run SDPA (``torch_ref``); measured in
benchmarks/results/decode-h200.json as TTFT.
"""
from __future__ import annotations

import torch

from tierserve.attention.backend import AttnMetadata, write_kv
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.attention.triton_decode import paged_decode


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        self._ref = TorchRefBackend()

    def forward(self, q, k, v, kv_layer, meta: AttnMetadata, scale: float,
                sliding_window: int | None = None, layer_idx: int = 0) -> torch.Tensor:
        # FP8 KV pages: the torch reference dequantises them (a Triton dequant path is later work)
        if not meta.decode_only or meta.host_kv is not None or meta.sparse is not None or meta.kv_fp8 is not None:
            return self._ref.forward(q, k, v, kv_layer, meta, scale, sliding_window, layer_idx)
        write_kv(k, v, kv_layer, meta)
        page = meta.page_size
        return paged_decode(q, kv_layer[:, 0, :page], kv_layer[:, 1, :page], meta.page_table, meta.seq_lens, scale,
                            num_splits=meta.num_splits, max_seq_len=meta.max_seq_bound,
                            sliding_window=sliding_window)
