"""FP8 KV pages over the CPU tier: live pages spill to CPU RAM as compact FP8 rows and come back from them (a mixin
of ``TierTransfers``, transfers.py, whose ``host``, ``codec`` and ``zero_copy`` it uses). On CUDA, once the zero-copy
gather works (``zero_copy.py``), the rows move by that kernel queued on the stream -- no host sync, so the KV manager
may move pages while multi-step windows are queued (engine/multi_step.py); else through host copies."""
from __future__ import annotations

import logging

import torch

from tierserve.kv.tiers import io
from tierserve.memory.pinned import ids_to

log = logging.getLogger("tierserve")


class Fp8RowMoves:
    # FP8 KV pages (``runner.kv_fp8.Fp8Pages``, set by the runner): CPU RAM holds spilled live pages as compact
    # FP8 rows ``[slots, L, 2, slot_bytes]`` uint8; ``codec.host_rows`` / ``codec.restore`` convert on the way
    # down / up (no prefix-cache pages in CPU RAM then, and no disk spill file: both are refused with FP8)
    codec = None
    _rows_kernel_ok = True      # False once the first rows written by the kernel did not read back the same
    _rows_checked = False       # that check has run

    def moves_without_sync(self, kv_data: torch.Tensor) -> bool:
        """Whether live pages spill and come back with no host sync (queued on the stream behind the work in
        flight), so the KV manager may place pages while multi-step windows are queued: on the CPU (nothing is
        queued), and on CUDA with FP8 KV (compact rows moved by the zero-copy kernel, no prefix-cache pages in CPU
        RAM that a host write could reuse a slot for); bf16 spills copy through the host."""
        return not kv_data.is_cuda or self._rows_in_kernel(kv_data)

    def _rows_in_kernel(self, kv_data: torch.Tensor) -> bool:
        """FP8 compact rows move between the device and CPU RAM by the zero-copy kernel (zero_copy.py), queued on
        the stream with no host sync (a multi-step window may be queued): on CUDA once the zero-copy gather
        works, until a check of the first rows written that way fails."""
        return self.codec is not None and kv_data.is_cuda and self.zero_copy is True and self._rows_kernel_ok

    def _spill_rows(self, pairs: list[tuple[int, int]], kv_data: torch.Tensor) -> None:
        """FP8: live pages (device page or compact id, CPU-RAM slot) -> their compact rows, group by group."""
        store = self.host.data
        assert all(s < store.shape[0] for _, s in pairs), "FP8 pages spill to CPU RAM only"
        n = io.group_pages(store[0].numel())
        for at in range(0, len(pairs), n):
            grp = pairs[at:at + n]
            rows = self.codec.host_rows(kv_data, [p for p, _ in grp])
            if self._rows_in_kernel(kv_data):
                self._rows_to_host(rows, [s for _, s in grp], store)
            else:
                store[torch.tensor([s for _, s in grp])] = rows.to("cpu")

    def _rows_to_host(self, rows: torch.Tensor, slots: list[int], store: torch.Tensor) -> None:
        from tierserve.kv.tiers.zero_copy import gather_pages
        dev = rows.device
        at = ids_to(slots, dev)
        gather_pages(rows, torch.arange(len(slots), device=dev), store, at)
        if self._rows_checked:
            return
        torch.cuda.current_stream(dev).synchronize()          # once: the rows landed where they belong
        self._rows_checked = True
        if not torch.equal(store[torch.tensor(slots)], rows.cpu()):
            log.warning("FP8 rows written to CPU RAM by the zero-copy kernel differ from the device's; "
                        "spilled rows go through host copies from now on")
            self._rows_kernel_ok = False
            store[torch.tensor(slots)] = rows.to("cpu")

    def _unspill_rows(self, pairs: list[tuple[int, int]], kv_data: torch.Tensor) -> None:
        """FP8: CPU-RAM slots -> promoted pages (a compact slot, or a page in the in-place FP8 layout)."""
        store = self.host.data
        n = io.group_pages(store[0].numel())
        for at in range(0, len(pairs), n):
            grp = pairs[at:at + n]
            if self._rows_in_kernel(kv_data):
                from tierserve.kv.tiers.zero_copy import gather_pages
                dev = kv_data.device
                rows = torch.empty((len(grp), *store.shape[1:]), dtype=store.dtype, device=dev)
                gather_pages(store, ids_to([s for s, _ in grp], dev), rows, torch.arange(len(grp), device=dev))
            else:
                rows = store[torch.tensor([s for s, _ in grp])].to(kv_data.device)
            self.codec.restore(kv_data, rows, [p for _, p in grp])
