"""FP8 KV pages with the CPU tier (issue 6): live pages of sequences larger than the GPU pool spill to CPU RAM as
compact FP8 rows and attention reads them back; output identical to the same FP8 settings with a large pool."""
import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.config import EngineConfig
from tierserve.quant.fp8_compact import slot_bytes

PROMPT = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens
OTHER = [0] + [(11 * i + 5) % 500 + 3 for i in range(150)]
FP8 = dict(kv_dtype="fp8", kv_fp8_keep_sink=4, kv_fp8_keep_recent=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8tiers") / "llama", "llama")


def make(ckpt, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_batched_tokens", 16)
    kw.setdefault("enable_prefix_caching", False)
    return LLM(str(ckpt), dtype="float32", device="cpu", debug_invariants=True, **FP8, **kw)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def check_clean(llm):
    kv = llm.engine.kv
    kv.check_invariants()
    kv.tiers.check_invariants()
    assert kv.num_requests == 0 and kv.pool.num_in_use == 0
    assert kv.compact is None or kv.compact.pool.num_in_use == 0
    assert kv.tiers.host.num_spilled == 0                  # every spilled slot released at the end


def test_config():
    EngineConfig(kv_dtype="fp8", cpu_kv_gb=1)
    with pytest.raises(ValueError, match="disk_kv_dir"):
        EngineConfig(kv_dtype="fp8", cpu_kv_gb=1, disk_kv_dir="/tmp/x")


@pytest.mark.parametrize("storage,pages", [("inplace", 8), ("compact", 6)])   # compact: 5 full + 3 compact
def test_dense_spill_identical_to_large_pool(ckpt, storage, pages):
    """A GPU pool far smaller than one request's KV: FP8 pages spill to CPU RAM (compact rows), attention reads
    them from there; greedy tokens equal the large-pool FP8 run's."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [PROMPT, OTHER[:120]]
    ref = tokens(make(ckpt, kv_fp8_storage=storage).generate(prompts, sp))
    llm = make(ckpt, num_kv_pages=pages, cpu_kv_gb=0.01, kv_fp8_storage=storage)
    eng = llm.engine
    assert (eng.runner.num_compact_pages > 0) == (storage == "compact")
    assert (eng.runner.num_pages + eng.runner.num_compact_pages) * 16 < len(PROMPT) + 40   # one request does not fit
    store = eng.kv.tiers.host.data
    L, H, D = 2, 2, 16
    assert store.dtype == torch.uint8 and tuple(store.shape[1:]) == (L, 2, slot_bytes(16, H, D, 0, 4))
    assert tokens(llm.generate(prompts, sp)) == ref
    assert eng.kv.num_spilled > 0
    check_clean(llm)


def test_sparse_spill_identical_to_large_pool(ckpt):
    """The same with sparse "pages" attention (in-place storage, the selector scores spilled pages from their
    device-resident summaries; hot pages are promoted back in the in-place FP8 layout)."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96)
    ref = tokens(make(ckpt, **kw).generate([PROMPT, OTHER[:120]], sp))
    llm = make(ckpt, num_kv_pages=10, cpu_kv_gb=0.01, **kw)
    eng = llm.engine
    assert eng.runner.num_compact_pages == 0 and eng.kv.slot_heat is not None
    eng.kv.rebalance_every = 1
    assert tokens(llm.generate([PROMPT, OTHER[:120]], sp)) == ref
    assert eng.kv.num_spilled > 0
    check_clean(llm)


def test_prefix_caching_on_keeps_cpu_ram_for_live_pages(ckpt):
    """With prefix caching on, evicted prefix pages are not demoted to CPU RAM under FP8 (the tier holds spilled
    live pages only); GPU-pool hits still work and output matches the large pool's."""
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [PROMPT, PROMPT, OTHER]
    want = [tokens(make(ckpt, enable_prefix_caching=True, kv_fp8_storage="inplace").generate([p], sp))[0]
            for p in prompts]
    llm = make(ckpt, num_kv_pages=8, cpu_kv_gb=0.01, enable_prefix_caching=True, kv_fp8_storage="inplace")
    got = [tokens(llm.generate([p], sp))[0] for p in prompts]
    assert got == want
    kv = llm.engine.kv
    assert kv.num_spilled > 0 and kv.pool.on_evict is None
    assert kv.tiers.host.num_used == 0 and kv.hit_tokens["cpu"] == 0
    check_clean(llm)


def _spillable_reference(kv):
    """The page-by-page rule (stop 22's loop), for the vectorised ``SpillPlacement._spillable``."""
    fp8, ps = kv.fp8, kv.page_size
    out = []
    for t in kv._tables.values():
        n = min(t.computed // ps, len(t.pages) - 1)
        for i in range(n):
            pid = t.pages[i]
            if pid < 0 or kv._is_compact(pid) or kv.pool.meta[pid].ref_count != 1:
                continue
            if fp8 is not None and fp8.needs_full(i, t.computed):
                continue
            out.append((id(t), i, pid))
    return out


@pytest.mark.parametrize("kw", [dict(kv_fp8_storage="inplace", sparse_attention="pages", sparse_topk_tokens=96,
                                     num_kv_pages=10),
                                dict(kv_fp8_storage="compact", num_kv_pages=6), dict(kv_dtype="auto", num_kv_pages=10)])
def test_spillable_pages_match_the_page_by_page_rule(ckpt, monkeypatch, kw):
    """Every time the engine asks which device pages may spill (spills, demotions), the vectorised answer equals
    the page-by-page rule: FP8 sink / recent window kept, compact slots and shared pages never."""
    from tierserve.kv.spill_placement import SpillPlacement

    calls = []
    real = SpillPlacement._spillable

    def checked(self):
        got = [(id(t), i, pid) for t, i, pid in real(self)]
        assert got == _spillable_reference(self)
        calls.append(len(got))
        return real(self)
    monkeypatch.setattr(SpillPlacement, "_spillable", checked)
    if kw.get("kv_dtype") == "auto":       # bf16 pages: no FP8 rule
        llm = LLM(str(ckpt), dtype="float32", device="cpu", debug_invariants=True, max_model_len=256,
                  max_num_batched_tokens=16, cpu_kv_gb=0.01, enable_prefix_caching=True, **kw)
    else:
        llm = make(ckpt, cpu_kv_gb=0.01, enable_prefix_caching=True, **kw)
    llm.engine.kv.rebalance_every = 1
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm.generate([PROMPT, PROMPT[:100] + OTHER[:20]], sp)      # a shared prefix: shared pages stay
    assert calls and max(calls) > 0
