"""TierManager: placement of full, hashed KV pages across CPU RAM, disk and Redis below the GPU pool.

- Lookups continue a request's prefix chain below the GPU pool: host, then disk, then remote.
- A hit chain is used only when loading it is estimated to beat recomputing it (policy "cost", cost.py):
  load time = bytes / measured tier bandwidth (+ the copy into the pages), recompute time = the fitted
  prefill time of those tokens at their positions. The decision is taken before the disk/remote pages
  are read (a tier never measured is measured first on the chain's first window of reads, a small
  probe); a chain with nothing left to read is decided as found. While the rest is read, the chain is
  dropped once reading what is left would take longer than recomputing it all (``cost.ReadWatch``). Until a
  prefill has been measured, hits are loaded. The last decision and its estimates are in ``stats()["policy"]``.
- Pages evicted from the GPU pool go down to the host tier; newly completed pages are written
  through to disk and remote asynchronously.
- Data moves in ``apply``, which the model runner calls at the start of a step, before the
  forward pass: (1) read out pages leaving the GPU, (2) load hits into their new GPU pages,
  (3) store what was read out; CPU-RAM hits on a GPU finish during the forward pass, layer by layer
  (overlap.py). A finished request's last pages are read out at once (``write_pending``). Tiering never
  changes an output token.
- With ``prefetch`` (prefetch.py) a waiting request's disk/remote pages are read in the background, so
  its hit is served from CPU RAM at admission instead of by a read on the step's critical path.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from tierserve.kv.prefix import hash_page
from tierserve.kv.tiers import io
from tierserve.kv.tiers.cost import LoadPolicy, ReadWatch
from tierserve.kv.tiers.disk import DiskTier
from tierserve.kv.tiers.step_timer import StepTimer
from tierserve.kv.tiers.host import HostTier
from tierserve.kv.tiers import flush_at_exit
from tierserve.kv.tiers.transfers import OVERLAP_DEFAULT, KVTransfers, TierHit, TierTransfers

log = logging.getLogger("tierserve")

TIERS = ("gpu", "cpu", "disk", "remote")


class TierManager(TierTransfers):
    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, fingerprint: str, *,
                 host_pages: int = 0, disk_dir: str | None = None, disk_bytes: int = 0,
                 remote_url: str | None = None, policy: str = "cost", spill_pages: int = 0,
                 prefetch: bool = True, device: torch.device | None = None) -> None:
        """``device``: where the GPU pool lives; the first hit's one-time costs are paid here (io.warm_up)."""
        self.page_shape, self.dtype, self.fingerprint = page_shape, dtype, fingerprint
        self.page_bytes = int(torch.Size(page_shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.host = HostTier(page_shape, dtype, host_pages) if host_pages else None
        self.disk = DiskTier(disk_dir, disk_bytes, fingerprint) if disk_dir else None
        self.disk_spill = None
        if self.disk is not None and self.disk.enabled and spill_pages:
            from tierserve.kv.tiers.spill import DiskSpill
            self.disk_spill = DiskSpill(disk_dir, page_shape, dtype, spill_pages)
        self.remote = None
        if remote_url:
            from tierserve.kv.tiers.remote import RemoteTier
            self.remote = RemoteTier(remote_url, fingerprint)
        self.cost = LoadPolicy(policy)
        self.bandwidth = self.cost.bandwidth          # bytes/s per tier (shared with the policy)
        self._measured = self.cost.measured           # tiers whose bandwidth was measured (else the default)
        self._apply_s = 0.0                           # time of this step's transfers (not prefill time)
        self.step_timer = StepTimer()                 # prefill steps' device time, read without a sync
        self.last_onload: dict = {}                   # pages and seconds of the last step's hit loads
        self.last_read: dict = {}                     # pages, bytes and seconds of the last chain's reads
        self.hits = {t: 0 for t in TIERS}             # pages served per tier
        self._pending = KVTransfers()
        self.zero_copy: bool | None = None            # GPU reads CPU-RAM hits from pinned memory (None: untried)
        # CPU-RAM hits copied on a side stream, layer by layer, while the forward pass runs (overlap.py):
        # ``overlap_loads`` False (or TIERSERVE_KV_OVERLAP=0) keeps the synchronous copies; ``streams`` is
        # made on the first CUDA load (tests set a stand-in)
        self.overlap_loads = OVERLAP_DEFAULT
        self.streams = None
        self._loading = None                          # the overlapped load still in flight (LayerReady)
        self._unstage_after: list[int] = []           # staged slots it reads, freed once it is done
        self._overlapped = False                      # this step's hits load during the forward pass
        self._kv_data: torch.Tensor | None = None     # the device page storage (bind / apply)
        self.prefetcher = None
        if prefetch and ((self.disk is not None and self.disk.enabled) or self.remote is not None):
            from tierserve.kv.tiers.prefetch import Prefetcher
            self.prefetcher = Prefetcher(self._read_lower, self.page_bytes, self.host)
        if device is not None:
            self.zero_copy = io.warm_up(self.host.data if self.host is not None else None, page_shape, dtype,
                                        torch.device(device))
        if (self.disk is not None and self.disk.enabled) or self.remote is not None:
            flush_at_exit(self)                       # a last step's pages still reach disk / Redis

    @property
    def policy(self) -> str:
        return self.cost.policy

    @policy.setter
    def policy(self, value: str) -> None:
        self.cost.policy = value

    @property
    def prefill_s_per_token(self) -> float | None:
        return self.cost.prefill.per_token()

    @prefill_s_per_token.setter
    def prefill_s_per_token(self, value: float | None) -> None:
        self.cost.prefill.set_flat(value)

    @property
    def enabled(self) -> bool:
        return bool(self.host or self.disk or self.remote)

    # ---- lookups (scheduler side) -----------------------------------------------------------
    def find(self, token_ids: Sequence[int], page_size: int, start_page: int, end_page: int,
             parent: bytes | None) -> list[TierHit]:
        hits: list[TierHit] = []
        for i in range(start_page, end_page):
            toks = tuple(token_ids[i * page_size:(i + 1) * page_size])
            h = hash_page(parent, toks)
            hit = self._find_near(h, toks)
            if hit is None:                   # disk / remote: read below, in parallel windows
                on_disk = self.disk is not None and self.disk.contains(h)
                if not on_disk and self.remote is None:
                    break
                hit = TierHit(h, toks, "disk" if on_disk else "remote")
            hits.append(hit)
            parent = h
        decide = self.cost.active
        todo = [k for k, x in enumerate(hits) if x.source != "cpu" and not x.prefetched]
        end = len(hits)
        if todo:
            self.last_read = {"pages": 0, "bytes": 0, "seconds": 0.0}
        if decide and todo and hits[todo[0]].source not in self._measured:   # the probe: one window
            probe, todo = todo[:2 * io.READ_WORKERS], todo[2 * io.READ_WORKERS:]
            end = self._read_chain(hits, probe, end)
            todo = [k for k in todo if k < end]
        decided = decide and bool(todo)
        if decided and not self._load_pays(hits[:end], page_size, start_page):
            return []                                  # decided before the rest is read
        if todo:
            watch = self._watch(hits[:end], page_size, start_page) if decided else None
            end = self._read_chain(hits, todo, end, watch)
            if watch is not None and watch.stopped:
                return []
        hits = hits[:end]
        # decided otherwise on the chain as found (CPU RAM only, or all read by the probe); a chain decided
        # above is not decided again once read: the reads are paid, loading them is only the copy-in
        if hits and decide and not decided and not self._load_pays(hits, page_size, start_page):
            return []
        return hits

    def _find_near(self, h: bytes, toks: tuple[int, ...]) -> TierHit | None:
        """A hit that needs no read now: CPU RAM, or a page the prefetcher read ahead."""
        if self.host is not None:
            slot = self.host.lookup(h, toks)
            if slot is not None:
                return TierHit(h, toks, "cpu", slot=slot)
        if self.prefetcher is not None:
            fetched = self.prefetcher.get(h, toks)
            if fetched is not None:       # slot / payload are taken at admission (schedule_onload)
                return TierHit(h, toks, fetched.source, prefetched=True)
        return None

    def _read_chain(self, hits: list[TierHit], ks: list[int], end: int, watch=None) -> int:
        """Read + verify pages ``hits[k]`` (k in ``ks``) on the read pool; the new end of the chain (the
        first k that missed, or ``end``). The aggregate throughput feeds the bandwidth estimate."""
        bad, nbytes, seconds = io.read_chain(self._read_lower, hits, ks, watch)
        for name, n in nbytes.items():
            self._measure(name, n, seconds)
        n = sum(nbytes.values())
        self.last_read = {"pages": self.last_read["pages"] + n // self.page_bytes,
                          "bytes": self.last_read["bytes"] + n, "seconds": self.last_read["seconds"] + seconds}
        return end if bad is None else min(end, bad)

    def _watch(self, hits: list[TierHit], page_size: int, start_page: int) -> ReadWatch:
        recompute = self.cost.prefill.estimate(len(hits) * page_size, start_page * page_size)
        copy_in = sum(h.source != "cpu" for h in hits) * self.page_bytes / self.bandwidth["copy_in"]
        return ReadWatch(self.cost, self.page_bytes, recompute, copy_in)

    def _read_lower(self, h: bytes, toks: tuple[int, ...]) -> tuple[str, memoryview, float] | None:
        """(tier, verified payload, seconds) from disk, then remote; None on a miss. Runs on the read
        pool and the prefetch threads (the tiers' reads are thread-safe)."""
        for tier in (self.disk, self.remote):
            if tier is None:
                continue
            t0 = time.perf_counter()
            payload = tier.read(h, toks)
            if payload is not None and len(payload) == self.page_bytes:   # never mis-shape a page
                return tier.name, payload, time.perf_counter() - t0
        return None

    def prefetch(self, key: str, pages: list[tuple[int, bytes, tuple[int, ...]]]) -> None:
        """Read ahead the pages of a waiting request's prefix that only disk/remote may hold (in prompt
        order, starting after its GPU-pool hits); stops at the first page no lower tier can hold."""
        if self.prefetcher is None:
            return
        todo = []
        for i, h, toks in pages:
            if self.host is not None and self.host.contains(h):
                continue
            if self.remote is None and not (self.disk.enabled and self.disk.contains(h)):
                break
            todo.append((i, h, toks))
        if todo:
            self.prefetcher.submit(key, todo)

    def prefetch_release(self, key: str) -> None:
        if self.prefetcher is not None:
            self.prefetcher.release(key)

    def _load_pays(self, hits: list[TierHit], page_size: int, start_page: int = 0) -> bool:
        sources = ["cpu" if h.prefetched else h.source for h in hits]
        return self.cost.pays(sources, self.page_bytes, page_size, start_page)

    def step_started(self, device) -> None:
        """An engine step begins on ``device``: start its timer (step_timer.py)."""
        self.step_timer.start(device)

    def step_done(self, num_tokens: int, attended: int | None) -> None:
        """The step has been issued; ``num_tokens`` (0: no prefill in it) computed, attending to ``attended``
        tokens in all. Its time reaches ``observe_prefill`` once the device has run it (CUDA: later steps;
        the CPU: now), with the step's transfer time (``apply``, synchronous on the host) taken out; a step
        whose hit loads overlapped its forward pass is no sample (its time mixes both)."""
        moved, self._apply_s = self._apply_s, 0.0
        keep = num_tokens > 0 and not self._overlapped
        for seconds, (n, att, mv) in self.step_timer.stop((num_tokens, attended, moved), keep=keep):
            self.cost.prefill.observe(n, seconds - mv if mv < seconds else seconds, att)

    def observe_prefill(self, num_tokens: int, seconds: float, attended: int | None = None) -> None:
        """Feed the recompute side of the cost model directly: ``num_tokens`` computed in ``seconds``, its
        tokens attending to ``attended`` tokens in all (tests, known rates; the engine uses ``step_done``)."""
        self.cost.prefill.observe(num_tokens, seconds, attended)

    def _measure(self, tier: str, nbytes: int, seconds: float) -> None:
        self.cost.measure(tier, nbytes, seconds)

    # ---- events from the GPU pool -------------------------------------------------------------
    def on_evict(self, pid: int, block_hash: bytes, tokens: tuple[int, ...]) -> None:
        if self.host is not None and not self.host.contains(block_hash):
            self._pending.offload.append((pid, block_hash, tokens, True, False))

    def on_register(self, pid: int, block_hash: bytes, tokens: tuple[int, ...]) -> None:
        persist = (self.disk is not None and self.disk.enabled and not self.disk.contains(block_hash)) \
            or self.remote is not None
        if persist:
            self._pending.offload.append((pid, block_hash, tokens, False, True))

    def schedule_onload(self, pid: int, hit: TierHit) -> None:
        self.hits[hit.source] += 1
        if hit.prefetched:
            fetched, hit.slot = self.prefetcher.claim(hit.block_hash)
            hit.payload = fetched.payload
            self._measure(fetched.source, self.page_bytes, fetched.seconds)
        elif self.prefetcher is not None and hit.source != "cpu":
            self.prefetcher.counts["misses"] += 1          # read on the step's critical path
        self._pending.onload.append((pid, hit))

    def flush(self) -> None:
        """Pages waiting to leave the device are read out (``write_pending``: a last step's registered
        pages), then every queued write reaches storage."""
        try:
            self.write_pending()
            self.settle_loads()
        except Exception as e:           # at interpreter exit the device may be gone: never raise here
            log.warning("KV pages pending for the lower tiers were not written (%s: %s)", type(e).__name__, e)
        if self.prefetcher is not None:
            self.prefetcher.drain()
        for tier in (self.disk, self.remote):
            if tier is not None:
                tier.flush()

    def stats(self) -> dict:
        out = {"hits_pages": dict(self.hits), "bandwidth_bytes_s": dict(self.bandwidth),
               "prefill_s_per_token": self.prefill_s_per_token,
               "policy": {"name": self.policy, "last": self.cost.last, **self.cost.decisions}}
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.stats()
        if self.host is not None:
            out["cpu"] = {"pages": self.host.num_pages, "used": self.host.num_used}
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        if self.remote is not None:
            out["remote"] = {"url": self.remote.url, "available": self.remote.available,
                             "errors": self.remote.num_errors}
        return out

    def check_invariants(self) -> None:
        if self.host is not None:
            self.host.check_invariants()
        if self.disk_spill is not None:
            assert 0 <= self.disk_spill.num_used <= self.disk_spill.num_pages
        if self.prefetcher is not None:
            staged = sum(1 for _, h in self._pending.onload if h.prefetched and h.slot is not None)
            staged += len(self._unstage_after)              # read by a load still in flight
            self.prefetcher.check_invariants(in_transit=staged)

