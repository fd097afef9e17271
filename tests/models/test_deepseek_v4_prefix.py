"""DeepSeek-V4 prefix caching in the engine: state snapshots at prefix-unit boundaries (fp32, CPU).

A hit must leave the output unchanged: greedy tokens equal and per-token logprobs within 1e-5 of a
run without prefix caching. Tiny checkpoints from tests/helpers/tiny_deepseek_v4.py; prefix unit 16
tokens (a multiple of the page size 16 and of the compress ratios 4 / 8 / 16).
"""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import engine_checkpoints, rand_ids, make_checkpoint, one_thread  # noqa: F401
from tierserve import LLM, SamplingParams

UNIT = 16
SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return engine_checkpoints(tmp_path_factory, ("mixed", "hca-first"))


def make(path, **kw) -> LLM:
    kw.setdefault("max_model_len", 128)
    kw.setdefault("prefix_unit", UNIT)
    return LLM(str(path), dtype="float32", device="cpu", **kw)


rand = rand_ids


def assert_same(got, want) -> None:
    for g, w in zip(got, want):
        g, w = g.outputs[0], w.outputs[0]
        assert g.token_ids == w.token_ids
        for dg, dw, tok in zip(g.logprobs, w.logprobs, g.token_ids):
            assert dg[tok] == pytest.approx(dw[tok], abs=1e-5)


def assert_clean(llm: LLM) -> None:
    eng = llm.engine
    eng.kv.check_invariants()
    assert eng.kv.pool.num_in_use == 0 and eng.kv.num_requests == 0 and eng.runner.num_states == 0
    cache = eng.runner.prefix_cache
    assert cache.bytes <= cache.max_bytes and not cache._chains


@pytest.fixture(scope="module")
def cold(paths):
    """name -> an engine without prefix caching (the reference)."""
    return {name: make(p, enable_prefix_caching=False) for name, p in paths.items()}


@pytest.mark.parametrize("name", ["mixed", "hca-first"])
@pytest.mark.parametrize("chunk", [2048, 5])
def test_same_prompt_twice(paths, cold, name, chunk):
    p = rand(40, 1)                                  # 2.5 units: snapshots at 16 and 32
    ref = cold[name].generate([p], SP)
    llm = make(paths[name], max_num_batched_tokens=chunk)
    first = llm.generate([p], SP)
    second = llm.generate([p], SP)
    third = llm.generate([p], SP)
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == third[0].num_cached_tokens == 2 * UNIT
    assert second[0].cached_tokens_by_tier == {"gpu": 2 * UNIT}
    assert_same(first, ref)
    assert_same(second, ref)
    assert_same(third, ref)
    st = llm.engine.runner.prefix_cache.stats()
    assert st["hits"] == 2 and st["hit_tokens"] == 4 * UNIT and st["entries"] >= 2
    assert llm.engine.kv.hit_tokens["gpu"] == 4 * UNIT and llm.engine.kv.pool.hits == 2
    assert_clean(llm)


def test_shared_prefix_of_one_and_a_half_units(paths, cold):
    base = rand(40, 2)
    other = base[:24] + rand(16, 3)                  # shares 1.5 units with base
    llm = make(paths["mixed"])
    a = llm.generate([base], SP)
    b = llm.generate([other], SP)
    assert b[0].num_cached_tokens == UNIT
    assert_same(a + b, cold["mixed"].generate([base, other], SP))
    assert_clean(llm)


def test_short_prompts_do_not_hit(paths, cold):
    llm = make(paths["mixed"])
    for n in (12, UNIT):             # shorter than a unit; exactly one unit (one token must be computed)
        p = rand(n, 4)
        outs = [llm.generate([p], SP)[0] for _ in range(2)]
        assert [o.num_cached_tokens for o in outs] == [0, 0]
        assert_same(outs, cold["mixed"].generate([p, p], SP))
    p = rand(UNIT + 1, 5)
    outs = [llm.generate([p], SP)[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, UNIT]
    assert_same(outs, cold["mixed"].generate([p, p], SP))
    assert_clean(llm)


def test_eviction_under_a_tiny_budget(paths, cold):
    from tierserve.models.deepseek_v4 import load_model

    model = load_model(paths["mixed"])
    one = model.prefill(torch.tensor(rand(2 * UNIT, 0)))[1].nbytes() + 8 * UNIT
    llm = make(paths["mixed"], prefix_cache_gb=1.5 * one / 2**30)      # room for about one snapshot
    prompts = [rand(40, 6), rand(40, 7), rand(40, 6), rand(40, 6)[:20] + rand(20, 8)]
    outs = [llm.generate([p], SP)[0] for p in prompts]
    cache = llm.engine.runner.prefix_cache
    assert cache.evicted > 0 and cache.bytes <= cache.max_bytes and len(cache) <= 2
    assert_same(outs, cold["mixed"].generate(prompts, SP))
    assert_clean(llm)


def test_preemption_with_hits(paths, cold):
    # 20 pages of 4 tokens (5, 13 and 37-token prompts + 24 new tokens need 8 + 10 + 16 pages at the
    # end), unit 8: preempted requests come back from their own snapshots
    kw = dict(page_size=4, num_kv_pages=20, max_model_len=80)
    prompts = [rand(5, 9), rand(13, 10), rand(37, 11)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    ref = make(paths["mixed"], enable_prefix_caching=False, **kw).generate(prompts, sp)
    for chunk in (2048, 5):
        llm = make(paths["mixed"], prefix_unit=8, max_num_batched_tokens=chunk, **kw)
        outs = llm.generate(prompts, sp)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.runner.prefix_cache.hits > 0
        assert_same(outs, ref)
        assert_clean(llm)


def test_bad_unit_and_caching_off(paths):
    with pytest.raises(ValueError, match="prefix_unit=12"):
        make(paths["hca-first"], prefix_unit=12)
    llm = make(paths["mixed"], enable_prefix_caching=False)
    assert llm.engine.runner.prefix_cache is None and llm.engine.scheduler.state_prefix is None
