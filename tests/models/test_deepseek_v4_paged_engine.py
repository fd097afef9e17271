"""The V4 page pool in the engine (CPU, fp32, slot decoding run eagerly): its size follows the budget
(``num_kv_pages``, ``gpu_kv_gb`` less a fixed state per request), a budget too small is refused with an
error naming it, a pool too small for all requests preempts (same tokens as an unlimited run), and the
pages of finished / aborted requests go back to the pool (and their slot rows to the scratch page)."""
import pytest

from tests.helpers.tiny_deepseek_v4 import CSA, HCA, make_checkpoint, one_thread, rand_ids  # noqa: F401
from tierserve import LLM, SamplingParams
from tierserve.loader.tokenizer import Tokenizer
from tierserve.models.deepseek_v4.paged_state import PagePools
from tierserve.models.deepseek_v4.static_state import StaticState

LENGTHS = (5, 13, 37)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = make_checkpoint(tmp_path_factory.mktemp("hca-first"), "hca-first")
    Tokenizer.synthetic(128).backend.save(str(p / "tokenizer.json"))
    return p


def _llm(path, slots: bool = True, **kw) -> LLM:
    kw.setdefault("max_model_len", 80)
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
    if slots:
        assert llm.engine.runner.enable_slot_decode(use_graphs=False)
    return llm


def _generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([rand_ids(n, seed=i) for i, n in enumerate(LENGTHS)], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def _assert_returned(llm: LLM) -> None:
    eng = llm.engine
    eng.kv.check_invariants()
    assert eng.kv.pool.num_in_use == 0 and eng.kv.num_requests == 0 and eng.runner.num_states == 0
    dec = eng.runner.slots
    assert not dec.slot_of and dec.state.page_table.eq(dec.state.pools.scratch).all()


@pytest.fixture(scope="module")
def want(path):
    return _generate(_llm(path, slots=False, max_model_len=128))      # decode_batch, a pool far from full


def test_pool_follows_num_kv_pages(path, want):
    llm = _llm(path, page_size=4, num_kv_pages=37, max_model_len=128)
    runner = llm.engine.runner
    assert runner.num_pages == llm.engine.kv.pool.num_pages == 37
    pools = runner.slots.state.pools
    assert pools.num_pages == 37 and all(p.data.shape[0] == 38 for p in pools.pools())
    assert runner.pool_bytes() == pools.nbytes() + runner.slots.state.nbytes() + runner.slots.state.page_table.nbytes
    assert pools.nbytes() == 38 * PagePools.page_bytes(runner.model, 4) == 38 * runner.page_bytes
    assert _generate(llm) == want
    _assert_returned(llm)


def test_pool_follows_gpu_kv_gb(path, want):
    big = _llm(path, slots=False, page_size=4, gpu_kv_gb=2**-10, max_num_seqs=4)      # 1 MiB
    runner = big.engine.runner
    fixed = StaticState.estimate_bytes(runner.model, 1, 80)
    per_page = PagePools.page_bytes(runner.model, 4)
    assert runner.fixed_state_bytes == fixed and runner.page_bytes == per_page
    assert int((2**20 - 4 * fixed) // per_page) - 1 > 4 * 20 == runner.num_pages    # capped: 4 sequences of 80
    table = 4 * (80 // 4 + 1) * 8                        # the slots' page-table rows and positions
    gb = (4 * fixed + table + 31 * per_page) / 2**30     # room for the fixed states, 30 pages and scratch
    llm = _llm(path, page_size=4, gpu_kv_gb=gb, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.num_pages == llm.engine.kv.pool.num_pages == 30
    assert runner.pool_bytes() <= gb * 2**30             # pages + the slots' fixed state fit the budget
    assert _generate(llm) == want
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_returned(llm)


def test_budget_too_small_is_refused(path):
    llm = _llm(path, slots=False, page_size=4, num_kv_pages=100)
    per_page, fixed = llm.engine.runner.page_bytes, llm.engine.runner.fixed_state_bytes
    # less than the fixed state of max_num_seqs requests
    with pytest.raises(ValueError, match="gpu_kv_gb=.* leaves no room for state pages"):
        _llm(path, slots=False, gpu_kv_gb=7.5 * fixed / 2**30, max_num_seqs=8)
    # room for a few pages, fewer than one max_model_len sequence: the engine refuses at start
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        _llm(path, slots=False, page_size=4, max_num_seqs=2, gpu_kv_gb=(2 * fixed + 12 * per_page) / 2**30)


def test_small_pool_preempts_with_paged_slots(path, want):
    # 20 pages of 4 tokens; the three requests need 8 + 10 + 16 pages at the end
    llm = _llm(path, page_size=4, num_kv_pages=20)
    assert _generate(llm) == want
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.runner.slots.steps > 0
    _assert_returned(llm)


def test_small_pool_with_prefix_cache_and_chunks(path, want):
    """Preemption, prefix-cache hits (snapshots exported from pages, copied into fresh pages on the way
    back) and chunked prefill together on a 20-page pool."""
    llm = _llm(path, page_size=4, num_kv_pages=20, enable_prefix_caching=True, prefix_unit=16,
               max_num_batched_tokens=6)
    assert _generate(llm) == want
    runner = llm.engine.runner
    assert llm.engine.scheduler.num_preemptions > 0 and runner.prefix_cache.stats()["hits"] > 0
    _assert_returned(llm)


def test_context_limits(path, want):
    """Slots whose step reads only the entries of the smallest context limit holding the longest row."""
    from tierserve.runner.stateful_graphs import SlotDecoder, context_limits

    assert context_limits(128) == [128] and context_limits(40000) == [4096, 32768, 40000]
    llm = _llm(path, slots=False, page_size=4, num_kv_pages=64)
    runner = llm.engine.runner
    runner.slots = SlotDecoder(runner.model, 4, 80, runner.device, False, num_pages=64, page_size=4,
                               limits=(8, 16, 32, 200))
    assert runner.slots.limits == [8, 16, 32, 80]
    assert _generate(llm) == want and runner.slots.steps_by_limit[80] > 0
    one = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)          # context 6 .. 45: every limit
    got = llm.generate([rand_ids(5, seed=9)], one)[0].outputs[0].token_ids
    assert got == _llm(path, slots=False).generate([rand_ids(5, seed=9)], one)[0].outputs[0].token_ids
    assert all(n > 0 for n in runner.slots.steps_by_limit.values())
    _assert_returned(llm)


def test_abort_returns_pages(path):
    llm = _llm(path, page_size=4, num_kv_pages=64)
    eng = llm.engine
    eng.add_request("a", rand_ids(37, seed=1), GREEDY)
    eng.add_request("b", rand_ids(13, seed=2), GREEDY)
    for _ in range(4):
        eng.step()
    dec = eng.runner.slots
    assert set(dec.slot_of) == {"a", "b"} and eng.kv.pool.num_in_use == len(eng.kv.page_table("a")) + len(
        eng.kv.page_table("b"))
    row = dec.state.page_table[dec.slot_of["a"]]
    assert row[:len(eng.kv.page_table("a"))].tolist() == eng.kv.page_table("a")
    eng.abort_request("a")
    assert not eng.kv.has("a") and "a" not in dec.slot_of
    while eng.has_unfinished_requests():
        eng.step()
    _assert_returned(llm)


def test_ratio_not_dividing_page_size_is_not_paged(tmp_path, caplog):
    """HCA ratio 12 with pages of 8: pages only count tokens, decode runs without slots (same tokens)."""
    p = make_checkpoint(tmp_path, "hca-first", compress_rates={CSA: 4, HCA: 12})
    Tokenizer.synthetic(128).backend.save(str(p / "tokenizer.json"))
    with caplog.at_level("WARNING", logger="tierserve"):
        llm = _llm(p, slots=False, page_size=8)
    runner = llm.engine.runner
    assert runner.page_bytes == 0 and runner.num_pages >= 3 * 80 // 8
    assert any("not paged" in r.message for r in caplog.records)
    assert not runner.enable_slot_decode(use_graphs=False) and runner.slots is None
    want = _generate(_llm(p, slots=False, page_size=4))              # 4 and 12 divide: paged geometry
    assert _generate(llm) == want
