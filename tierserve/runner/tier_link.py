"""The ModelRunner's side of the KV tiers (``kv/tiers``): spill stores for live pages, the device state that
attention reads them through (``SpillState``), the spill CUDA graphs, and the page moves run before a step's
forward pass. A mixin of ``ModelRunner``, whose attributes it uses (``kv``, ``graphs``, ``fp8``, ...)."""
from __future__ import annotations

import logging

import torch

from tierserve.runner.spill_state import SpillState

log = logging.getLogger("tierserve")


class TierLink:
    def attach_spill(self, tiers, count_heat: bool) -> SpillState:
        """Live pages may spill to ``tiers`` (CPU RAM, then a disk file); ``count_heat``: count sparse
        selections per page so the KV manager can place pages by them."""
        self.host_kv = tiers.spill_stores()
        ram = tiers.host.num_pages if tiers.host is not None else 0
        self.spill = SpillState(self.host_kv, ram, self.num_pages + 1, self.layout.summary_rows,
                                self.config.page_size, self.device, self.dtype, count_heat,
                                kv_shape=self.kv.data.shape if self.graphs is not None else None)
        if self.fp8 is not None:        # spilled pages go down as compact FP8 rows and come back from them
            self.spill.fp8 = tiers.codec = self.fp8
        if self.graphs is not None and ram:
            captured = bool(self.graphs.graphs)
            self.graphs.set_spill(self.host_kv, self.spill)
            if captured:            # else captured later (set_tokenizer)
                try:
                    self.graphs.capture()
                except Exception as e:      # decode with spilled pages stays eager (Triton kernels)
                    log.warning("CUDA graphs over spilled KV pages failed (%s: %s); steps that read spilled "
                                "pages run eagerly", type(e).__name__, e)
                    self.graphs.set_spill(None, None)
        return self.spill

    @property
    def host_summaries(self) -> torch.Tensor | None:
        return self.spill.summaries if self.spill is not None else None

    @property
    def page_heat(self) -> torch.Tensor | None:
        return self.spill.page_heat if self.spill is not None else None

    @torch.inference_mode()
    def tiers_apply(self, transfers, overlap: bool = False) -> None:
        """Move pages between the KV storage and lower tiers before this step's forward pass; with
        ``overlap`` CPU-RAM hits may still be copying, layer by layer, while it runs (``kv.loading``)."""
        self._tiers = transfers.manager
        self.kv.settle()
        if not transfers:
            transfers.manager.bind(self.kv.data)
            return
        if self.spill is not None:
            self.spill.on_transfers(transfers, self.kv.data)
        self.kv.loading = transfers.manager.apply(transfers, self.kv.data, overlap=overlap)
