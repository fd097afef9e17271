"""CPU-RAM hits copied layer by layer during the forward pass (kv/tiers/overlap.py) and a last step's pages
written through when the request finishes. On the CPU the side stream is ``DeferredStreams``: its copies run
only when a layer waits for them, so a layer that read its KV before waiting would see stale pages."""
import pytest
import torch

from tests.helpers.tier_llm import PS, make_tier_llm
from tierserve import LLM, SamplingParams
from tierserve.kv.prefix import hash_page
from tierserve.kv.tiers import overlap
from tierserve.kv.tiers.manager import TierManager
from tierserve.kv.tiers.overlap import DeferredStreams

SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = [1] + [(5 * i + 7) % 500 + 3 for i in range(150)]        # 151 tokens: 9 full prefix pages
SHAPE = (3, 2, 4, 2, 8)                                          # 3 layers


make = make_tier_llm


@pytest.fixture(scope="module")
def reference():
    return make(enable_prefix_caching=False).generate([PROMPT], SP)[0].outputs[0].token_ids


def cpu_hit(llm, streams):
    """PROMPT once, its pages demoted to CPU RAM, then PROMPT again with ``streams`` as the side stream."""
    llm.generate([PROMPT], SP)
    llm.engine.demote_prefix_cache()
    tiers = llm.engine.kv.tiers
    tiers.streams = streams
    out = llm.generate([PROMPT], SP)[0]
    tiers.flush()
    return out, tiers


def test_overlapped_cpu_hit_waits_layer_by_layer_same_tokens(reference):
    llm = make(cpu_kv_gb=0.01)
    streams = DeferredStreams()
    out, tiers = cpu_hit(llm, streams)
    layers = llm.engine.runner.layout.num_layers
    assert out.cached_tokens_by_tier.get("cpu", 0) >= len(PROMPT) - PS
    assert out.outputs[0].token_ids == reference
    assert tiers.last_onload["cpu"]["overlap"] is True
    # one copy and one event per layer: each layer waited for once, in order
    assert streams.waits[:layers] == list(range(1, 1 + layers))
    assert streams.done == len(streams.queue)
    assert llm.engine.runner.kv.loading is None and tiers._loading is None
    tiers.check_invariants()


def test_a_layer_read_before_its_wait_changes_the_output(reference, monkeypatch):
    """The check above means something: with the per-layer waits gone the pages arrive too late."""
    monkeypatch.setattr(overlap.LayerReady, "wait", lambda self, i: None)
    out, _ = cpu_hit(make(cpu_kv_gb=0.01), DeferredStreams())
    assert out.cached_tokens_by_tier.get("cpu", 0) > 0
    assert out.outputs[0].token_ids != reference


def test_overlap_off_is_the_synchronous_path(reference):
    llm = make(cpu_kv_gb=0.01, kv_load_overlap=False)           # the setting (CLI --no-kv-load-overlap)
    assert llm.engine.kv.tiers.overlap_loads is False
    streams = DeferredStreams()
    out, tiers = cpu_hit(llm, streams)
    assert out.outputs[0].token_ids == reference
    assert tiers.last_onload["cpu"]["overlap"] is False and not streams.queue


def test_apply_loads_each_layer_only_when_waited_for():
    g = torch.Generator().manual_seed(0)
    tm = TierManager(SHAPE, torch.float32, "t", host_pages=6, prefetch=False)
    pages = torch.randn(4, *SHAPE, generator=g)
    parent, hashes = None, []
    for i in range(4):
        parent = hash_page(parent, tuple(range(i * PS, (i + 1) * PS)))
        hashes.append(parent)
    tm.host.store_many([(h, tuple(range(i * PS, (i + 1) * PS))) for i, h in enumerate(hashes)], pages, set())
    hits = tm.find(list(range(4 * PS)), PS, 0, 4, None)
    assert [h.source for h in hits] == ["cpu"] * 4
    for pid, hit in zip((5, 0, 3, 7), hits):
        tm.schedule_onload(pid, hit)
    kv = torch.zeros(8, *SHAPE)
    tm.streams = DeferredStreams()
    ready = tm.apply(tm.take_transfers(), kv, overlap=True)
    assert ready is not None and not kv.any()                    # issued, nothing copied yet
    pids = torch.tensor([5, 0, 3, 7])
    for layer in range(SHAPE[0]):
        ready.wait(layer)
        assert torch.equal(kv[pids, :layer + 1], pages[:, :layer + 1])
        assert not kv[:, layer + 1:].any()
    tm.settle_loads()
    assert tm._loading is None and tm.stats()["cpu"]["used"] == 4
    tm.check_invariants()


def test_last_step_pages_reach_disk_when_the_request_finishes(tmp_path):
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)   # a single step: no step after it
    a = make(disk_kv_dir=str(tmp_path))
    a.generate([PROMPT], one)
    a.engine.kv.tiers.disk.flush()                   # the writer's queue only: the pages were handed over
    assert len(list(tmp_path.glob("*.kvp"))) == (len(PROMPT) - 1) // PS
    b = make(disk_kv_dir=str(tmp_path))
    out = b.generate([PROMPT], one)[0]
    assert out.cached_tokens_by_tier.get("disk", 0) >= len(PROMPT) - PS


def test_flush_writes_pages_registered_in_the_last_step(tmp_path):
    tm = TierManager(SHAPE, torch.float32, "t", disk_dir=str(tmp_path), disk_bytes=1 << 30, prefetch=False)
    kv = torch.randn(4, *SHAPE)
    tm.bind(kv)
    parent = None
    for pid in range(3):
        parent = hash_page(parent, tuple(range(pid * PS, (pid + 1) * PS)))
        tm.on_register(pid, parent, tuple(range(pid * PS, (pid + 1) * PS)))
    tm.flush()
    assert len(list(tmp_path.glob("*.kvp"))) == 3
    assert not tm.take_transfers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs a GPU")
def test_gpu_overlapped_cpu_hit_matches_synchronous(tmp_path):
    from tests.helpers.tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path / "llama", "llama")
    prompt = [1] + [(5 * i + 7) % 500 + 3 for i in range(700)]
    toks = {}
    for on in (True, False):
        llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=1024, page_size=PS, num_kv_pages=200,
                  cpu_kv_gb=0.05, kv_load_policy="always", debug_invariants=True)
        tiers = llm.engine.kv.tiers
        tiers.overlap_loads = on
        first = llm.generate([prompt], SP)[0].outputs[0].token_ids
        llm.engine.demote_prefix_cache()
        out = llm.generate([prompt + [9, 10, 11] * 60], SP)[0]       # a hit plus a suffix to compute
        assert out.cached_tokens_by_tier.get("cpu", 0) >= len(prompt) - PS
        assert tiers.last_onload["cpu"]["overlap"] is (on and tiers.zero_copy is True)
        toks[on] = (first, out.outputs[0].token_ids)
        del llm
    assert toks[True] == toks[False]
