"""Device-side state of live pages spilled to CPU RAM (tiers), owned by the runner.

- ``stores``: where spilled pages live, ``(first slot, storage)`` per store (CPU RAM first, then the disk
  spill file); page-table entries past the device pool point there.
- ``summaries``: with the ``pages`` sparse selector, a spilled page's key min / max rows stay on the device
  (1/page_size of its bytes), so a sparse step scores every page without touching the host.
- ``page_heat`` / ``host_heat``: how often sparse attention chose each device page / CPU-RAM slot. The
  count follows a page down and back up; the KV manager spills the least chosen pages first and promotes
  the most chosen ones back (``page_heat_of`` / ``slot_heat_of`` are its callbacks).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from tierserve.memory.pinned import ids_to


class SpillState:
    def __init__(self, stores, ram_slots: int, num_pages: int, summary_rows: int, page_size: int,
                 device: torch.device, dtype: torch.dtype, count_heat: bool, kv_shape=None) -> None:
        self.stores, self.ram_slots = stores, ram_slots
        self.summary_rows, self.page_size, self.device, self.dtype = summary_rows, page_size, device, dtype
        self.summaries: torch.Tensor | None = None      # [ram slots, L, 2, summary rows, Hkv, D]
        self.fp8 = None                                  # Fp8Pages when kv_dtype=fp8 (set by the runner)
        if summary_rows and ram_slots and kv_shape is not None:    # now, so CUDA graphs can read it
            self._alloc_summaries(kv_shape)
        z = dict(dtype=torch.float32, device=device)
        self.page_heat = torch.zeros(num_pages, **z) if count_heat else None
        self.host_heat = torch.zeros(ram_slots, **z) if count_heat and ram_slots else None
        self._snap = None          # (page counts, slot counts, event): host copies queued by ``snapshot``
        self._frozen = None        # (page counts, slot counts) as numpy arrays while ``frozen`` reads them

    def on_transfers(self, transfers, kv_data: torch.Tensor) -> None:
        """Before the transfers run (pages still in place): keep spilled pages' summaries and counts. With
        FP8 KV pages (``fp8``, ``runner.kv_fp8.Fp8Pages``) a spilled page may be a compact slot: its summary
        rows come from its compact row, and it has no device count (compact pages are not counted)."""
        ram = [(p, s) for p, s in transfers.spill if s < self.ram_slots]
        n = self.page_heat.shape[0] if self.page_heat is not None else 0
        # promoted pages first (their data is read before a spill may reuse the slot in the same batch): the count
        # goes with the page, and the released slot starts with none
        if self.host_heat is not None and transfers.unspill:
            # a page promoted into a compact FP8 slot keeps no count (the mask is made on the host: a boolean
            # index on the device would wait for the queued work)
            kept = [(s, p) for s, p in transfers.unspill if p < n]
            if kept:
                self.page_heat[ids_to([p for _, p in kept], self.device)] = \
                    self.host_heat[ids_to([s for s, _ in kept], self.device)]
            self.host_heat[ids_to([s for s, _ in transfers.unspill], self.device)] = 0
        if ram:
            pids = ids_to([p for p, _ in ram], self.device)
            slots = ids_to([s for _, s in ram], self.device)
            if self.summary_rows:
                if self.summaries is None:
                    self._alloc_summaries(kv_data.shape)
                if self.fp8 is not None:
                    self.summaries[slots] = self.fp8.summaries_of(kv_data, [p for p, _ in ram])
                else:
                    self.summaries[slots] = kv_data[pids][:, :, :, self.page_size:]
            if self.host_heat is not None:
                self.host_heat[slots] = self.page_heat[pids.clamp(max=n - 1)] * (pids < n)

    def _alloc_summaries(self, kv_shape) -> None:
        """kv_shape: the KV storage's [pages, L, 2, rows, Hkv, D]."""
        L, _, _, H, D = kv_shape[1:]
        self.summaries = torch.zeros(self.ram_slots, L, 2, self.summary_rows, H, D, dtype=self.dtype,
                                     device=self.device)

    def on_write(self, slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
        """A page whose first token is written starts over with no history (no host sync)."""
        if self.page_heat is not None:
            keep = (slot_offsets != 0).to(self.page_heat.dtype)
            self.page_heat.scatter_reduce_(0, slot_pages, keep, reduce="prod")

    def page_heat_of(self, pids: list[int]) -> list[float]:
        if self._frozen is not None:
            return self._frozen[0][np.asarray(pids, dtype=np.int64)].tolist()
        return self.page_heat[torch.tensor(pids, device=self.device)].tolist()

    def slot_heat_of(self, slots: list[int]) -> list[float]:
        if self._frozen is not None:
            return self._frozen[1][np.asarray(slots, dtype=np.int64)].tolist()
        return self.host_heat[torch.tensor(slots, device=self.device)].tolist()

    def top_slots(self, k: int) -> tuple[list[int], list[float]]:
        """The ``k`` CPU-RAM slots with the highest counts (any order among equal counts) and their counts: one
        small read, however many slots there are."""
        if self._frozen is not None:
            heat = self._frozen[1]
            k = min(k, heat.shape[0])
            top = np.argpartition(-heat, k - 1)[:k] if k < heat.shape[0] else np.arange(heat.shape[0])
            top = top[np.argsort(-heat[top], kind="stable")]
            return top.tolist(), heat[top].tolist()
        heat, slots = torch.topk(self.host_heat, min(k, self.host_heat.shape[0]))
        return slots.tolist(), heat.tolist()

    def clear_slots(self, slots: list[int]) -> None:
        """Released slots start with no count (no host sync)."""
        self.host_heat[ids_to(slots, self.device)] = 0

    # ---- counts read without a host sync (placement inside a queue of multi-step windows) -------------------
    def snapshot(self) -> None:
        """Queue copies of both count arrays into host memory on the current stream (after the work queued so
        far); ``frozen`` reads them once they have landed. Nothing waits here."""
        if self.page_heat is None:
            return
        cuda = self.device.type == "cuda"
        if self._snap is None:
            self._snap = (torch.empty(self.page_heat.shape, dtype=torch.float32, pin_memory=cuda),
                          torch.empty(self.host_heat.shape if self.host_heat is not None else (0,),
                                      dtype=torch.float32, pin_memory=cuda), None)
        page, slot, _ = self._snap
        page.copy_(self.page_heat, non_blocking=cuda)
        if self.host_heat is not None:
            slot.copy_(self.host_heat, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._snap = (page, slot, event)

    @property
    def has_snapshot(self) -> bool:
        return self._snap is not None and (self._snap[2] is not None or self.device.type != "cuda")

    @contextmanager
    def frozen(self):
        """Inside: ``page_heat_of`` / ``slot_heat_of`` / ``top_slots`` read the last ``snapshot`` (waiting for its
        copies, which were queued behind work the caller has already waited for, or the transfers queued after
        it) instead of the device arrays, so the KV manager can place pages while windows are queued. The counts
        lag by the work queued after the snapshot."""
        page, slot, event = self._snap
        if event is not None:
            event.synchronize()
        # views, not copies: the next ``snapshot`` (the only writer of these buffers) is queued after this exits
        self._frozen = (page.numpy(), slot.numpy())
        try:
            yield
        finally:
            self._frozen = None
