"""The data-moving half of ``TierManager`` (manager.py): the step's transfers, the spill space of live
pages, and ``apply``, which the model runner calls at the start of a step, before the forward pass: (0)
promoted live pages back, (1) pages leaving the GPU read out, group by group, (2) hits loaded into their
new GPU pages -- CPU RAM by the zero-copy gather (or staging copies), disk/remote payloads through pinned
staging groups (io.py). Each step's transfer time is kept (``_apply_s``) so the prefill cost model does
not count it as prefill time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tierserve.kv.tiers import io


@dataclass
class TierHit:
    block_hash: bytes
    tokens: tuple[int, ...]
    source: str                  # "cpu" | "disk" | "remote"
    slot: int | None = None      # host slot
    payload: bytes | memoryview | None = None   # verified disk/remote page (a view into its read buffer)
    prefetched: bool = False     # a disk/remote page read ahead (prefetch.py): slot (staged) or payload set
                                 # when it is admitted


@dataclass
class KVTransfers:
    offload: list[tuple[int, bytes, tuple[int, ...], bool, bool]] = field(default_factory=list)
    onload: list[tuple[int, TierHit]] = field(default_factory=list)
    spill: list[tuple[int, int]] = field(default_factory=list)   # (GPU page, host slot) of live pages
    unspill: list[tuple[int, int]] = field(default_factory=list)  # (host slot, GPU page): promoted back
    manager: Any = None          # the TierManager that applies them

    def __bool__(self) -> bool:
        return bool(self.offload or self.onload or self.spill or self.unspill)


class TierTransfers:
    """Mixed into TierManager: needs ``host``, ``disk``, ``remote``, ``disk_spill``, ``prefetcher``,
    ``page_bytes``, ``zero_copy``, ``_pending``, ``_apply_s``, ``last_onload`` and ``_measure``."""

    # ---- spill space for live pages: CPU RAM slots first, then the disk spill file ----------------
    @property
    def _host_slots(self) -> int:
        return self.host.num_pages if self.host is not None else 0

    def spill_reserve(self) -> int | None:
        slot = self.host.reserve() if self.host is not None else None
        if slot is None and self.disk_spill is not None:
            s = self.disk_spill.reserve()
            slot = None if s is None else self._host_slots + s
        if slot is None and self.prefetcher is not None and self.prefetcher.give_back_slot():
            slot = self.host.reserve()                    # live pages before read-ahead ones
        return slot

    def spill_release(self, slot: int) -> None:
        if slot < self._host_slots:
            self.host.release(slot)
        else:
            self.disk_spill.release(slot - self._host_slots)

    def spill_stores(self) -> list[tuple[int, torch.Tensor]]:
        """(first slot, storage) of each place spilled pages live, for attention's gather."""
        out = [(0, self.host.data)] if self.host is not None else []
        if self.disk_spill is not None:
            out.append((self._host_slots, self.disk_spill.data))
        return out

    @property
    def spill_capacity(self) -> int:
        return self._host_slots + (self.disk_spill.num_pages if self.disk_spill is not None else 0)

    def schedule_spill(self, pid: int, slot: int) -> None:
        self._pending.spill.append((pid, slot))

    def schedule_unspill(self, slot: int, pid: int) -> None:
        """A spilled live page (CPU-RAM slot) comes back to GPU page ``pid`` at the next step's start,
        before any spill of that step (so the slot may be released and reused at once)."""
        self._pending.unspill.append((slot, pid))

    def take_transfers(self) -> KVTransfers:
        if self.prefetcher is not None:
            self.prefetcher.reap()
        out, self._pending = self._pending, KVTransfers()
        out.manager = self
        self._apply_s = 0.0
        return out

    # ---- data movement (runner side, start of a step) -----------------------------------------
    def apply(self, tr: KVTransfers, kv_data: torch.Tensor) -> None:
        """Move the step's pages, in groups of at most io.GROUP_BYTES (one gather + one copy per group and
        direction), so PCIe sees large copies and no temporary holds a whole set of pages."""
        if not tr:
            return
        t0 = time.perf_counter()
        try:
            self._apply(tr, kv_data)
        finally:
            self._apply_s += time.perf_counter() - t0

    def _apply(self, tr: KVTransfers, kv_data: torch.Tensor) -> None:
        if tr.unspill:                                   # (0) promoted live pages, before any spill reuses a slot
            self._from_host([s for s, _ in tr.unspill], [p for _, p in tr.unspill], kv_data)
        if tr.offload:                                   # (1) read out pages leaving the GPU, group by group
            self._offload(tr, kv_data)
        if tr.spill:                                     # live pages moving to CPU RAM / the spill file
            for first, store in self.spill_stores():
                io.spill([(p, s - first) for p, s in tr.spill if first <= s < first + store.shape[0]], kv_data, store)
        if tr.onload:                                    # (2) hits into their new GPU pages
            self._onload(tr.onload, kv_data)
            for _, hit in tr.onload:                     # prefetched pages' staged slots are free again
                if hit.prefetched and hit.slot is not None:
                    self.host.unstage(hit.slot)

    def _offload(self, tr: KVTransfers, kv_data: torch.Tensor) -> None:
        """Pages leaving the GPU: to CPU RAM (never evicting a CPU-RAM hit this step still loads) and / or
        handed, as CPU tensors, to the disk / remote writers (io.offload)."""
        keep = {h.slot for _, h in tr.onload if h.slot is not None and not h.prefetched}
        writers = [t for t in (self.disk, self.remote) if t is not None]
        io.offload(tr.offload, kv_data, self.page_bytes, self.host, keep, writers)

    def _onload(self, onload: list[tuple[int, TierHit]], kv_data: torch.Tensor) -> None:
        cpu = [(pid, h.slot) for pid, h in onload if h.slot is not None]       # CPU RAM: cached or prefetched
        other = [(pid, h) for pid, h in onload if h.slot is None]
        self.last_onload = {}
        if cpu:
            t0 = time.perf_counter()
            self._from_host([s for _, s in cpu], [p for p, _ in cpu], kv_data)
            dt = time.perf_counter() - t0
            self._measure("cpu", len(cpu) * self.page_bytes, dt)
            self.last_onload["cpu"] = {"pages": len(cpu), "seconds": dt, "zero_copy": bool(self.zero_copy)}
        if other:                                        # verified payloads, grouped, one copy into staging
            t0 = time.perf_counter()
            io.load_payloads(kv_data, [p for p, _ in other], [h.payload for _, h in other])
            dt = time.perf_counter() - t0
            self._measure("copy_in", len(other) * self.page_bytes, dt)
            self.last_onload["copy_in"] = {"pages": len(other), "seconds": dt}
            for _, h in other:
                h.payload = None                         # the read buffer can go

    def _from_host(self, host_slots: list[int], gpu_pages: list[int], kv_data: torch.Tensor) -> None:
        """CPU-RAM slots -> GPU pages: a zero-copy kernel where it works (checked on first use, off for good
        after a failure), else grouped staging copies."""
        pin = kv_data.device.type == "cuda"
        if not (pin and self.zero_copy is not False and self._gather_zero_copy(
                torch.tensor(host_slots), torch.tensor(gpu_pages, device=kv_data.device), kv_data)):
            io.from_host(self.host.data, host_slots, gpu_pages, kv_data)
        if pin:
            torch.cuda.current_stream(kv_data.device).synchronize()

    def _gather_zero_copy(self, slots: torch.Tensor, pids: torch.Tensor, kv_data: torch.Tensor) -> bool:
        self.zero_copy = io.gather_zero_copy(self.host.data, slots, pids, kv_data, check=self.zero_copy is None)
        return self.zero_copy

