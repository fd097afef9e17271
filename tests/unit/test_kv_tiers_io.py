"""Tier I/O (kv/tiers/io.py): grouped read-outs, the disk writers' bounded backlog, parallel disk-hit reads
and the cost policy's read probe. Outputs never change."""
import logging
import threading

import pytest
import torch

from tests.helpers.tier_llm import PS, make_tier_llm
from tierserve import SamplingParams
from tierserve.kv.prefix import hash_page
from tierserve.kv.tiers import codec, io
from tierserve.kv.tiers.disk import DiskTier
from tierserve.kv.tiers.manager import TierManager

SP = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPT = [1] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens: 9 full prefix pages of 16
OTHER = [1] + [(11 * i + 5) % 500 + 3 for i in range(150)]
PAGES = 9
SHAPE = (2, 2, 4, 2, 8)                                          # a small page: 1 KiB of float32


make = make_tier_llm


@pytest.fixture(scope="module")
def reference():
    llm = make(enable_prefix_caching=False)
    return {"p": llm.generate([PROMPT], SP)[0].outputs[0].token_ids,
            "o": llm.generate([OTHER], SP)[0].outputs[0].token_ids}


def chain(n, salt=0):
    parent, out = None, []
    for i in range(n):
        toks = tuple(range(salt + i * PS, salt + (i + 1) * PS))
        parent = hash_page(parent, toks)
        out.append((parent, toks))
    return out


def count_groups(monkeypatch):
    groups = []
    orig = io.read_out

    def spy(kv_data, pids, page_bytes):
        for at, pages in orig(kv_data, pids, page_bytes):
            groups.append(len(pages))
            yield at, pages
    monkeypatch.setattr(io, "read_out", spy)
    return groups


def test_grouped_offload_stores_identical_pages(tmp_path, monkeypatch):
    """Group size 2 pages: 7 leaving pages (4 persisted, 3 to CPU RAM) move in 4 groups; what CPU RAM and
    the disk hold is exactly the device pages."""
    page_bytes = torch.Size(SHAPE).numel() * 4
    monkeypatch.setattr(io, "GROUP_BYTES", 2 * page_bytes)
    groups = count_groups(monkeypatch)
    kv = torch.randn(10, *SHAPE)
    tm = TierManager(SHAPE, torch.float32, "fp", host_pages=8, disk_dir=str(tmp_path), disk_bytes=1 << 30,
                     prefetch=False)
    pages = chain(7)
    for pid, (h, toks) in zip([1, 3, 5, 7], pages[:4]):
        tm.on_register(pid, h, toks)
    for pid, (h, toks) in zip([8, 0, 2], pages[4:]):
        tm.on_evict(pid, h, toks)
    tm.apply(tm.take_transfers(), kv)
    tm.flush()
    assert sorted(groups) == [1, 2, 2, 2] and sum(groups) == 7
    for pid, (h, toks) in zip([8, 0, 2], pages[4:]):
        assert torch.equal(tm.host.data[tm.host.lookup(h, toks)], kv[pid])
    for pid, (h, toks) in zip([1, 3, 5, 7], pages[:4]):
        payload = codec.decode((tmp_path / (h.hex() + ".kvp")).read_bytes(), "fp", h, toks)
        assert bytes(payload) == kv[pid].numpy().tobytes()
    assert tm.disk.stats()["write_queued_bytes"] == 0
    tm.host.check_invariants()

    # spill of live pages and the way back, in groups too
    slots = [tm.spill_reserve() for _ in range(3)]
    for pid, slot in zip([4, 6, 9], slots):
        tm.schedule_spill(pid, slot)
    tm.apply(tm.take_transfers(), kv)
    assert all(torch.equal(tm.host.data[s], kv[p]) for p, s in zip([4, 6, 9], slots))
    out = torch.zeros_like(kv)
    for slot, pid in zip(slots, [0, 1, 2]):
        tm.schedule_unspill(slot, pid)
    tm.apply(tm.take_transfers(), out)
    assert torch.equal(out[:3], kv[[4, 6, 9]])


def test_offload_never_evicts_a_cpu_hit_still_to_load():
    """CPU RAM full: pages stored in the step that loads a CPU-RAM hit must not overwrite that hit."""
    kv = torch.randn(6, *SHAPE)
    tm = TierManager(SHAPE, torch.float32, "fp", host_pages=2, prefetch=False)
    (h0, t0), (h1, t1), (h2, t2) = chain(3)
    tm.host.store(h0, t0, kv[0])
    tm.host.store(h1, t1, kv[1])
    hit = tm.find(list(t0) + list(t1), PS, 0, 1, None)[0]          # h0 found: most recently used now
    tm.host.lookup(h1, t1)                                         # ... but h1 more recent still
    tm.on_evict(4, h2, t2)                                         # leaving page 4 must not take h0's slot
    tm.schedule_onload(5, hit)
    before = kv[0].clone()
    tm.apply(tm.take_transfers(), kv)
    assert torch.equal(kv[5], before)
    assert tm.host.contains(h2) and not tm.host.contains(h1)


def test_engine_with_tiny_groups_same_output(reference, tmp_path, monkeypatch):
    """One page per group through the whole engine: GPU eviction to CPU RAM, write-through, demotion."""
    monkeypatch.setattr(io, "GROUP_BYTES", 1)
    groups = count_groups(monkeypatch)
    llm = make(num_kv_pages=17, cpu_kv_gb=0.01, disk_kv_dir=str(tmp_path / "kv"))
    assert llm.generate([PROMPT], SP)[0].outputs[0].token_ids == reference["p"]
    assert llm.generate([OTHER], SP)[0].outputs[0].token_ids == reference["o"]
    llm.engine.demote_prefix_cache()
    out = llm.generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("cpu", 0) > 0
    assert len(groups) > 2 * PAGES and set(groups) == {1}
    llm.engine.kv.tiers.flush()
    assert llm.engine.kv.tiers.stats()["disk"]["write_queued_bytes"] == 0


def test_writer_backlog_bound_drops_persistence(reference, tmp_path, monkeypatch, caplog):
    """The disk writer is stuck and its backlog holds 2 pages: later pages are not persisted (one
    warning, counted), the output is the same, and the accounting returns to 0 once it catches up."""
    gate = threading.Event()
    orig = DiskTier._write

    def stuck(self, *a):
        assert gate.wait(30)
        return orig(self, *a)
    monkeypatch.setattr(DiskTier, "_write", stuck)
    monkeypatch.setattr(io, "MAX_QUEUED_BYTES", 1)
    llm = make(disk_kv_dir=str(tmp_path / "kv"))
    disk = llm.engine.kv.tiers.disk
    page_bytes = llm.engine.kv.tiers.page_bytes
    disk._writer.max_bytes = 2 * page_bytes
    with caplog.at_level(logging.WARNING):
        out = llm.generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    st = disk.stats()
    assert st["write_queued_bytes"] == 2 * page_bytes
    assert st["write_dropped"] >= PAGES - 2
    assert caplog.text.count("writer is") == 1 and "not persisted" in caplog.text
    gate.set()
    disk.flush()
    st = disk.stats()
    assert st["write_queued_bytes"] == 0 and st["blocks"] == 2
    assert len(list((tmp_path / "kv").glob("*.kvp"))) == 2


def test_parallel_disk_hit_with_corrupt_block(reference, tmp_path, monkeypatch, caplog):
    """Synchronous path (no prefetch): the hit's pages are read on the read pool; page 4 is corrupt, so the
    hit stops there (warning, block removed) and the rest is recomputed; same output."""
    disk = tmp_path / "kv"
    first = make(disk_kv_dir=str(disk))
    first.generate([PROMPT], SP)
    first.engine.kv.tiers.flush()
    hashes, parent = [], None
    for i in range(PAGES):
        parent = hash_page(parent, tuple(PROMPT[i * PS:(i + 1) * PS]))
        hashes.append(parent)
    bad = disk / (hashes[4].hex() + ".kvp")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    threads = set()
    orig = DiskTier.read

    def spy(self, h, toks):
        threads.add(threading.current_thread().name)
        return orig(self, h, toks)
    monkeypatch.setattr(DiskTier, "read", spy)
    llm = make(disk_kv_dir=str(disk), kv_prefetch=False)
    with caplog.at_level(logging.WARNING):
        out = llm.generate([PROMPT], SP)[0]
    assert "rejected" in caplog.text and "checksum" in caplog.text
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("disk") == 4 * PS
    assert any(t.startswith("tierserve-kv-read") for t in threads)
    assert llm.engine.kv.tiers.disk.num_corrupt == 1
    llm.engine.kv.tiers.flush()
    assert bad.exists() and bad.read_bytes() != bytes(data)      # recomputed page written back, intact


def test_cost_policy_probes_then_decides_before_reading(tmp_path, monkeypatch):
    """Recompute far faster than the disk: an unmeasured disk is measured on the first window of reads
    (the probe), then the hit is refused without reading the rest; once measured, nothing is read."""
    n = 4 * io.READ_WORKERS * 2
    kv = torch.randn(n, *SHAPE)
    tm = TierManager(SHAPE, torch.float32, "fp", disk_dir=str(tmp_path), disk_bytes=1 << 30, prefetch=False)
    pages = chain(n)
    for pid, (h, toks) in enumerate(pages):
        tm.on_register(pid, h, toks)
    tm.apply(tm.take_transfers(), kv)
    tm.flush()
    reads = []
    orig = DiskTier.read
    monkeypatch.setattr(DiskTier, "read", lambda self, h, t: reads.append(h) or orig(self, h, t))
    tokens = [t for _, toks in pages for t in toks]
    tm.observe_prefill(1000, 1e-9)                  # 1 ps per token: recomputing always wins
    assert tm.find(tokens, PS, 0, n, None) == []
    assert 0 < len(reads) <= 2 * io.READ_WORKERS and "disk" in tm._measured
    reads.clear()
    assert tm.find(tokens, PS, 0, n, None) == [] and reads == []
    tm.prefill_s_per_token = 1.0                    # 1 s per token: loading wins, the whole chain is read
    hits = tm.find(tokens, PS, 0, n, None)
    assert len(hits) == n and len(reads) == n
    assert all(bytes(h.payload) == kv[i].numpy().tobytes() for i, h in enumerate(hits))
