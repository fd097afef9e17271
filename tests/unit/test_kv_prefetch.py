"""KV prefetch (kv/tiers/prefetch.py): a waiting request's disk-tier hit is read in the background and
served from CPU RAM at admission; outputs never change, corrupt blocks are still refused, aborted
requests give everything back."""
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.redis_server import redis_server
from tests.helpers.tier_llm import PS, make_tier_llm
from tierserve import SamplingParams
from tierserve.config import EngineConfig
from tierserve.kv.prefix import hash_page
from tierserve.kv.tiers.disk import DiskTier

SP = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPT = [1] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens: 9 full prefix pages of 16
OTHER = [1] + [(11 * i + 5) % 500 + 3 for i in range(100)]
PAGES = 9


make = make_tier_llm


@pytest.fixture(scope="module")
def reference():
    llm = make(enable_prefix_caching=False)
    return {"p": llm.generate([PROMPT], SP)[0].outputs[0].token_ids,
            "o": llm.generate([OTHER], SP)[0].outputs[0].token_ids}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A disk tier written by a first engine (its blocks for PROMPT)."""
    disk = tmp_path_factory.mktemp("prefetch") / "kv"
    llm = make(disk_kv_dir=str(disk))
    llm.generate([PROMPT], SP)
    llm.engine.kv.tiers.flush()
    assert len(list(disk.glob("*.kvp"))) >= PAGES
    return disk


@pytest.fixture
def disk(filled, tmp_path):
    d = tmp_path / "kv"
    shutil.copytree(filled, d)
    return d


def finish(eng):
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
    return out


def run(llm, prompt, drain=True):
    """Add the request, optionally let its prefetch finish, then step to completion."""
    llm.engine.add_request("r", prompt, SP)
    if drain:
        llm.engine.kv.tiers.prefetcher.drain()
    return finish(llm.engine)


def assert_clean(llm):
    eng = llm.engine
    tiers = eng.kv.tiers
    tiers.flush()                                  # waits for reads still running, frees their slots
    eng.kv.check_invariants()
    tiers.check_invariants()
    assert eng.kv.pool.num_in_use == 0
    if tiers.prefetcher is not None:
        assert tiers.prefetcher.num_pages == 0 and tiers.prefetcher.num_slots == 0
        assert not tiers.prefetcher._reqs
    if tiers.host is not None:
        assert tiers.host.num_staged == 0 and tiers.host.num_spilled == 0


@pytest.mark.parametrize("cpu_kv_gb", [None, 0.01], ids=["bytes", "host-slots"])
def test_second_engine_hit_served_by_prefetch(disk, reference, cpu_kv_gb):
    llm = make(disk_kv_dir=str(disk), cpu_kv_gb=cpu_kv_gb)
    tiers = llm.engine.kv.tiers
    assert tiers.prefetcher is not None                        # on by default with a disk tier
    llm.engine.add_request("r", PROMPT, SP)
    tiers.prefetcher.drain()
    if cpu_kv_gb:                                              # read into staged CPU-RAM slots
        assert tiers.host.num_staged == PAGES
        for _ in range(3):                                     # as when live pages need the room
            assert tiers.prefetcher.give_back_slot()
        assert tiers.host.num_staged == PAGES - 3
    out = finish(llm.engine)
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("disk") == PAGES * PS
    st = tiers.stats()["prefetch"]
    assert st["hits"] == PAGES and st["misses"] == 0 and tiers.hits["disk"] == PAGES
    assert_clean(llm)

    off = make(disk_kv_dir=str(disk), cpu_kv_gb=cpu_kv_gb, kv_prefetch=False)   # the synchronous path
    assert off.engine.kv.tiers.prefetcher is None
    o2 = off.generate([PROMPT], SP)[0]
    assert o2.outputs[0].token_ids == reference["p"] and o2.cached_tokens_by_tier.get("disk") == PAGES * PS


def test_waiting_request_prefetched_while_another_runs(disk, reference):
    """max_num_seqs=1: PROMPT waits while OTHER runs, its pages are read meanwhile."""
    llm = make(disk_kv_dir=str(disk), max_num_seqs=1)
    outs = llm.generate([OTHER, PROMPT], SP)
    assert [o.outputs[0].token_ids for o in outs] == [reference["o"], reference["p"]]
    st = llm.engine.kv.tiers.stats()["prefetch"]
    assert st["hits"] + st["misses"] == PAGES == llm.engine.kv.tiers.hits["disk"]
    assert st["hits"] > 0
    assert_clean(llm)


def slow_reads(monkeypatch, delay=0.02):
    orig = DiskTier.read

    def read(self, h, toks):
        time.sleep(delay)
        return orig(self, h, toks)
    monkeypatch.setattr(DiskTier, "read", read)


@pytest.mark.parametrize("cpu_kv_gb", [None, 0.01], ids=["bytes", "host-slots"])
def test_slow_disk_same_output(disk, reference, monkeypatch, cpu_kv_gb):
    """Admission comes before the reads end: running reads are waited for, queued ones are read
    synchronously; every page is served once either way."""
    slow_reads(monkeypatch)
    llm = make(disk_kv_dir=str(disk), cpu_kv_gb=cpu_kv_gb)
    out = run(llm, PROMPT, drain=False)
    assert out.outputs[0].token_ids == reference["p"]
    st = llm.engine.kv.tiers.stats()["prefetch"]
    assert st["hits"] + st["misses"] == PAGES == llm.engine.kv.tiers.hits["disk"]
    assert_clean(llm)


def test_corrupt_block_under_prefetch(disk, reference, caplog):
    """Page 3 of the chain is corrupt: the prefetch read rejects it (warning, file removed), the hit
    stops at page 3, the rest is recomputed; same output."""
    parent, hashes = None, []
    for i in range(PAGES):
        parent = hash_page(parent, tuple(PROMPT[i * PS:(i + 1) * PS]))
        hashes.append(parent)
    bad = disk / (hashes[3].hex() + ".kvp")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    llm = make(disk_kv_dir=str(disk))
    with caplog.at_level(logging.WARNING):
        llm.engine.add_request("r", PROMPT, SP)
        llm.engine.kv.tiers.prefetcher.drain()
        assert "rejected" in caplog.text and "checksum" in caplog.text
        assert not bad.exists() and llm.engine.kv.tiers.disk.num_corrupt == 1     # removed by the prefetch read
        out = finish(llm.engine)
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("disk") == 3 * PS
    assert llm.engine.kv.tiers.stats()["prefetch"]["hits"] == 3
    assert_clean(llm)
    assert bad.read_bytes() != bytes(data)         # the recomputed page was written back, intact


def test_all_blocks_corrupt_no_hit(disk, reference, caplog):
    for f in disk.glob("*.kvp"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    first = disk / (hash_page(None, tuple(PROMPT[:PS])).hex() + ".kvp")
    llm = make(disk_kv_dir=str(disk), cpu_kv_gb=0.01)
    with caplog.at_level(logging.WARNING):
        llm.engine.add_request("r", PROMPT, SP)
        llm.engine.kv.tiers.prefetcher.drain()
        assert "rejected" in caplog.text and not first.exists()
        out = finish(llm.engine)
    assert out.outputs[0].token_ids == reference["p"]
    assert out.num_cached_tokens == 0 and "disk" not in out.cached_tokens_by_tier
    assert llm.engine.kv.tiers.stats()["prefetch"]["hits"] == 0
    assert_clean(llm)


def gated_reads(monkeypatch):
    """Prefetch-thread reads block until ``gate`` is set; ``started`` tells that one is blocked."""
    started, gate = threading.Event(), threading.Event()
    orig = DiskTier.read

    def read(self, h, toks):
        if threading.current_thread().name.startswith("tierserve-kv-prefetch"):
            started.set()
            assert gate.wait(10)
        return orig(self, h, toks)
    monkeypatch.setattr(DiskTier, "read", read)
    return started, gate


def test_queued_reads_fall_back_to_synchronous_path(disk, reference):
    """Reads still queued at admission (every worker busy) are cancelled and read synchronously."""
    llm = make(disk_kv_dir=str(disk), cpu_kv_gb=0.01)
    pf = llm.engine.kv.tiers.prefetcher
    gate = threading.Event()
    pf._exec = ThreadPoolExecutor(1, thread_name_prefix="tierserve-kv-prefetch")
    busy = pf._exec.submit(gate.wait, 10)          # the only worker is busy: PROMPT's reads queue behind
    out = run(llm, PROMPT, drain=False)
    gate.set()
    busy.result()
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("disk") == PAGES * PS
    st = pf.stats()
    assert st["misses"] == PAGES and st["hits"] == 0 and st["waited"] == 0
    assert_clean(llm)


@pytest.mark.parametrize("cpu_kv_gb", [None, 0.01], ids=["bytes", "host-slots"])
def test_abort_before_admission_frees_everything(disk, reference, monkeypatch, cpu_kv_gb):
    started, gate = gated_reads(monkeypatch)
    llm = make(disk_kv_dir=str(disk), cpu_kv_gb=cpu_kv_gb, max_num_seqs=1)
    eng = llm.engine
    pf = eng.kv.tiers.prefetcher
    eng.add_request("a", PROMPT, SP)
    assert started.wait(10)
    eng.abort_request("a")                         # one read running (kept until it ends), the rest cancelled
    assert len(pf._orphans) >= 1 and not pf._pages and not pf._reqs
    if cpu_kv_gb:
        assert eng.kv.tiers.host.num_staged == pf.num_slots >= 1
    gate.set()
    eng.add_request("o", OTHER, SP)
    eng.add_request("b", PROMPT, SP)
    eng.step()                                     # "o" runs, "b" waits with its reads under way
    eng.abort_request("b")
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs["o"].outputs[0].token_ids == reference["o"]
    assert pf.stats()["dropped"] >= 2 * PAGES - 1 and pf.stats()["hits"] == 0
    assert_clean(llm)


def test_remote_tier_hit_served_by_prefetch(reference):
    exe = shutil.which("redis-server")
    if not exe:
        pytest.skip("redis-server not installed")
    with redis_server(exe) as url:
        a = make(remote_kv_url=url)
        a.generate([PROMPT], SP)
        a.engine.kv.tiers.flush()
        b = make(remote_kv_url=url)
        out = run(b, PROMPT)
        assert out.outputs[0].token_ids == reference["p"]
        assert out.cached_tokens_by_tier.get("remote") == PAGES * PS
        assert b.engine.kv.tiers.stats()["prefetch"]["hits"] == PAGES
        assert_clean(b)


def test_setting_and_flag():
    assert EngineConfig().kv_prefetch is None
    with pytest.raises(ValueError, match="kv_prefetch"):
        EngineConfig(kv_prefetch="yes")
    from typer.testing import CliRunner

    from tierserve.cli import app
    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "300"})
    assert "--kv-prefetch" in r.output and "--no-kv-prefetch" in r.output
