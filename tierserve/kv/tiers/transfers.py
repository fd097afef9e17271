"""The data-moving half of ``TierManager`` (manager.py): the step's transfers, the spill space of live
pages, and ``apply``, which the model runner calls at the start of a step, before the forward pass: (0)
promoted live pages back, (1) pages leaving the GPU read out, group by group, (2) hits loaded into their
new GPU pages -- CPU RAM by the zero-copy gather (or staging copies), disk/remote payloads through pinned
staging groups (io.py). Each step's transfer time is kept (``_apply_s``) so the prefill cost model does
not count it as prefill time. On a GPU, CPU-RAM hits are copied layer by layer on a side stream while the
forward pass runs (overlap.py; ``apply`` returns the load, ``settle_loads`` waits for it). ``write_pending``
reads out pages waiting to leave the device outside a step (a finished request's last pages, ``flush``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tierserve.kv.tiers import io
from tierserve.kv.tiers.fp8_rows import Fp8RowMoves
from tierserve.kv.tiers.overlap import LayerReady, Streams, load_layers

log = logging.getLogger("tierserve")
# CPU-RAM hits copied layer by layer on a side stream, overlapped with the forward pass (overlap.py);
# TIERSERVE_KV_OVERLAP=0: the synchronous copies before the forward pass (the reference, for comparison)
OVERLAP_DEFAULT = os.environ.get("TIERSERVE_KV_OVERLAP", "1") != "0"


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


class TierTransfers(Fp8RowMoves):
    """Mixed into TierManager: needs ``host``, ``disk``, ``remote``, ``disk_spill``, ``prefetcher``,
    ``page_bytes``, ``zero_copy``, ``_pending``, ``_apply_s``, ``last_onload`` and ``_measure``. FP8 rows of
    spilled pages move through ``Fp8RowMoves`` (fp8_rows.py)."""

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
        self._overlapped = False
        return out

    # ---- data movement (runner side, start of a step) -----------------------------------------
    def apply(self, tr: KVTransfers, kv_data: torch.Tensor, overlap: bool = False) -> LayerReady | None:
        """Move the step's pages, in groups of at most io.GROUP_BYTES (one gather + one copy per group and
        direction), so PCIe sees large copies and no temporary holds a whole set of pages. With ``overlap``
        (the caller makes layer i's reads wait on the result's ``wait(i)``, overlap.py) CPU-RAM hits are
        copied layer by layer on a side stream where that works (``overlap_loads``, CUDA with the
        zero-copy gather checked, or test ``streams``); returns that load, else None (all done)."""
        self.settle_loads()
        self._kv_data = kv_data
        if not tr:
            return None
        if (tr.offload or (tr.spill and not self._rows_in_kernel(kv_data))) and kv_data.is_cuda:
            # reading pages out waits for the queued steps that write them: wait here, outside the timed
            # transfer, so that ``_apply_s`` is the copies' time and not the previous steps' compute
            # (measured on the H200: a 128k prefill's write-through counted up to 0.44 s of attention per
            # 2k chunk as transfer time, and the cost model priced the recompute at 7.8 s against 18.8 s)
            torch.cuda.current_stream(kv_data.device).synchronize()
        t0 = time.perf_counter()
        try:
            return self._apply(tr, kv_data, overlap)
        finally:
            self._apply_s += time.perf_counter() - t0

    def _apply(self, tr: KVTransfers, kv_data: torch.Tensor, overlap: bool) -> LayerReady | None:
        if tr.unspill:                                   # (0) promoted live pages, before any spill reuses a slot
            if self.codec is not None:
                self._unspill_rows(tr.unspill, kv_data)
            else:
                self._from_host([s for s, _ in tr.unspill], [p for _, p in tr.unspill], kv_data)
        if tr.offload:                                   # (1) read out pages leaving the GPU, group by group
            self._offload(tr.offload, tr.onload, kv_data)
        if tr.spill and self.codec is not None:         # FP8: compact rows into CPU RAM
            self._spill_rows(tr.spill, kv_data)
        elif tr.spill:                                   # live pages moving to CPU RAM / the spill file
            for first, store in self.spill_stores():
                io.spill([(p, s - first) for p, s in tr.spill if first <= s < first + store.shape[0]], kv_data, store)
        ready = None
        if tr.onload:                                    # (2) hits into their new GPU pages
            ready = self._onload(tr.onload, kv_data, overlap)
            staged = [h.slot for _, h in tr.onload if h.prefetched and h.slot is not None]
            if ready is None:                            # prefetched pages' staged slots are free again
                for slot in staged:
                    self.host.unstage(slot)
            else:                                        # ... once the side stream has read them
                self._unstage_after.extend(staged)
        return ready

    def bind(self, kv_data: torch.Tensor) -> None:
        """The device page storage (the runner's), for writes scheduled outside a step (``write_pending``)."""
        self._kv_data = kv_data

    def write_pending(self) -> int:
        """Read out the pages waiting to leave the device now (write-through of pages registered in the
        last step, evictions) instead of at the next step's start: a finished request's last pages reach
        disk / Redis even if no step follows. The step's other transfers stay pending. Returns the pages."""
        todo, kv_data = self._pending.offload, self._kv_data
        if not todo or kv_data is None:
            return 0
        self._pending.offload = []
        self.settle_loads()
        self._offload(todo, self._pending.onload, kv_data)
        return len(todo)

    def settle_loads(self) -> None:
        """Wait (host) for an overlapped load's copies; then its staged slots are free and its copy time known."""
        ready, self._loading = self._loading, None
        if ready is None:
            return
        seconds = ready.settle()
        for slot in self._unstage_after:
            self.host.unstage(slot)
        self._unstage_after = []
        if seconds > 0:
            self._measure("cpu", ready.pages * self.page_bytes, seconds)
        if "cpu" in self.last_onload:
            self.last_onload["cpu"]["seconds"] = seconds

    def _offload(self, offload: list, onload: list, kv_data: torch.Tensor) -> None:
        """Pages leaving the GPU: to CPU RAM (never evicting a CPU-RAM hit still to load) and / or
        handed, as CPU tensors, to the disk / remote writers (io.offload)."""
        keep = {h.slot for _, h in onload if h.slot is not None and not h.prefetched}
        writers = [t for t in (self.disk, self.remote) if t is not None]
        io.offload(offload, kv_data, self.page_bytes, self.host, keep, writers)

    def _onload(self, onload: list[tuple[int, TierHit]], kv_data: torch.Tensor, overlap: bool) -> LayerReady | None:
        cpu = [(pid, h.slot) for pid, h in onload if h.slot is not None]       # CPU RAM: cached or prefetched
        other = [(pid, h) for pid, h in onload if h.slot is None]
        self.last_onload = {}
        ready = None
        if other:                                        # verified payloads, grouped, one copy into staging
            t0 = time.perf_counter()
            io.load_payloads(kv_data, [p for p, _ in other], [h.payload for _, h in other])
            dt = time.perf_counter() - t0
            self._measure("copy_in", len(other) * self.page_bytes, dt)
            self.last_onload["copy_in"] = {"pages": len(other), "seconds": dt}
            for _, h in other:
                h.payload = None                         # the read buffer can go
        if cpu:
            slots, pids = [s for _, s in cpu], [p for p, _ in cpu]
            t0 = time.perf_counter()
            ready = self._from_host_layers(slots, pids, kv_data) if overlap else None
            if ready is None:
                self._from_host(slots, pids, kv_data)
                dt = time.perf_counter() - t0
                self._measure("cpu", len(cpu) * self.page_bytes, dt)
            self.last_onload["cpu"] = {"pages": len(cpu), "seconds": None if ready else dt,
                                       "zero_copy": bool(self.zero_copy), "overlap": ready is not None,
                                       "issue_s": time.perf_counter() - t0}
        return ready

    def _from_host_layers(self, slots: list[int], pids: list[int], kv_data: torch.Tensor) -> LayerReady | None:
        """CPU-RAM slots -> GPU pages layer by layer on the side stream (overlap.py); None where that is off
        or unavailable (the synchronous path then runs: it checks the zero-copy kernel on first use)."""
        streams = self.streams
        cuda = kv_data.device.type == "cuda"
        if streams is None and cuda and self.overlap_loads and self.zero_copy is True:
            streams = self.streams = Streams(kv_data.device)
        if streams is None or not self.overlap_loads or (cuda and self.zero_copy is not True):
            return None
        host = self.host.data
        s_idx, p_idx = torch.tensor(slots, device=kv_data.device), torch.tensor(pids, device=kv_data.device)
        if cuda:                                         # made on the compute stream, read on the side one
            from tierserve.kv.tiers.zero_copy import gather_pages

            s_idx.record_stream(streams.side)
            p_idx.record_stream(streams.side)

        def copy(i: int) -> None:
            if cuda:
                gather_pages(host, s_idx, kv_data, p_idx, layer=i)
            else:
                kv_data[p_idx, i] = host[s_idx, i]
        try:
            self._loading = load_layers(streams, kv_data.shape[1], copy, pages=len(slots))
            self._overlapped = True
        except Exception as e:                           # a launch failed: the synchronous path, for good
            log.warning("overlapped CPU-RAM hit load failed (%s: %s); loading before the forward pass",
                        type(e).__name__, e)
            if cuda:
                torch.cuda.synchronize(kv_data.device)
            self.overlap_loads, self._loading = False, None
        return self._loading

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

