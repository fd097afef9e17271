"""Runner side of the FP8 KV cache: per-page "stored as FP8" flags, in-place quantisation, and the
two-precision attention inputs the torch reference reads (see tierserve/quant/fp8_kv.py for the
format and the read rule, tierserve/kv/fp8_pages.py for when a page is quantised)."""
from __future__ import annotations

import torch

from tierserve.quant.fp8_kv import fp8_read_mask, quantise_pages_, split_precision


class Fp8Pages:
    def __init__(self, num_pages: int, page_size: int, keep_sink: int, keep_recent: int,
                 device: torch.device) -> None:
        self.page_size, self.keep_sink, self.keep_recent = page_size, keep_sink, keep_recent
        self.quantised = torch.zeros(num_pages, dtype=torch.bool, device=device)

    def quantise(self, kv_data: torch.Tensor, pids: list[int]) -> None:
        """Convert complete pages that no query reads at full precision any more to FP8 in place (every
        layer at once; the KV manager hands each page over once). On CUDA: one Triton launch and one indexed
        copy, page ids up through pinned memory -- no host sync, so a multi-step window queued behind keeps
        the GPU busy (``tierserve.attention.triton_fp8_quant``)."""
        if not pids:
            return
        idx = torch.tensor(sorted(pids), dtype=torch.int64)
        if kv_data.is_cuda:
            from tierserve.attention.triton_fp8_quant import quantise_pages_triton
            idx = idx.pin_memory().to(kv_data.device, non_blocking=True)
            quantise_pages_triton(kv_data, idx, self.page_size)
        else:
            idx = idx.to(kv_data.device)
            assert not bool(self.quantised[idx].any()), "page quantised twice"
            quantise_pages_(kv_data, idx, self.page_size)
        self.quantised[idx] = True

    def on_write(self, slot_pages: torch.Tensor) -> None:
        """Pages written this step hold full-precision tokens (a recycled page starts over)."""
        self.quantised[slot_pages] = False

    def attention_inputs(self, kv: torch.Tensor, meta, prep: dict):
        """``kv [B, P, 2, rows, H, D]`` gathered pages -> ([B, 2P, 2, page, H, D] fp32 keys/values:
        full precision then FP8 readings, mask [B, 1, Q, 2L]) so one softmax covers each key once."""
        B, P = kv.shape[:2]
        ps = self.page_size
        full, low = split_precision(kv, self.quantised[meta.page_table], ps)
        use_low = fp8_read_mask(prep["q_pos"], prep["kv_pos"], ps, self.keep_sink, self.keep_recent)
        mask = prep["mask"]
        both = torch.cat([mask & ~use_low, mask & use_low], dim=-1)[:, None]
        return torch.cat([full, low], dim=1), both
