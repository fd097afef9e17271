"""Engine behaviour on a tiny random Llama: batch invariance, chunked prefill, preemption, prefix cache,
page accounting and input validation."""
import random

import pytest

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def make(ckpt, **kw):
    kw.setdefault("max_model_len", 256)
    return LLM(str(ckpt), dtype="float32", device="cpu", **kw)


def prompts(n=8, seed=0):
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 70))] for _ in range(n)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_pool_empty(llm):
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.pool.num_in_use == 0
    assert kv.num_requests == 0
    assert not llm.engine.requests


@pytest.fixture(scope="module")
def one_at_a_time(ckpt):
    # the plain path: one request at a time, a host sync after every step
    llm = make(ckpt, enable_prefix_caching=False, num_scheduler_steps=1)
    return [tokens(llm.generate([p], GREEDY))[0] for p in prompts()]


def test_batch_invariance(ckpt, one_at_a_time):
    llm = make(ckpt)
    assert tokens(llm.generate(prompts(), GREEDY)) == one_at_a_time
    assert_pool_empty(llm)


def test_multi_step_decode_identical_and_used(ckpt, one_at_a_time):
    """Greedy steps fed back on the device (num_scheduler_steps) give the plain path's tokens, with
    stops landing inside a multi-step window, and leave no page behind."""
    llm = make(ckpt, num_scheduler_steps=5)
    calls, extends = [], []
    runner = llm.engine.runner
    orig, orig_ext = runner.launch_multi, runner.extend_multi
    runner.launch_multi = lambda so, k: calls.append(k) or orig(so, k)
    runner.extend_multi = lambda w, k, t: extends.append(k) or orig_ext(w, k, t)
    assert tokens(llm.generate(prompts(), GREEDY)) == one_at_a_time
    assert calls and max(calls) == 5
    assert extends                      # windows were queued behind windows (pipelined)
    assert_pool_empty(llm)
    # stop tokens and odd max_tokens: outputs end exactly where the plain path ends them
    ps = prompts(4, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=m, stop_token_ids=[one_at_a_time[0][7]])
              for m in (3, 11, 17, 24)]
    plain = make(ckpt, num_scheduler_steps=1).generate(ps, params)
    multi = llm.generate(ps, params)
    for a, b in zip(multi, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert_pool_empty(llm)


def test_abort_while_multi_step_window_in_flight(ckpt, one_at_a_time):
    """An abort between engine steps, while a window is queued, leaves the other request's tokens as
    the plain path's and frees every page."""
    llm = make(ckpt, num_scheduler_steps=4)
    eng = llm.engine
    p = prompts()
    eng.add_request("keep", p[0], GREEDY)
    eng.add_request("drop", p[1], GREEDY)
    done = {}
    while eng.multi.inflight is None:
        for o in eng.step():
            done[o.request_id] = o
    eng.abort_request("drop")
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert done["keep"].outputs[0].token_ids == one_at_a_time[0]
    while eng.multi.inflight is not None:       # a speculative window may still be queued
        eng.step()
    assert_pool_empty(llm)


def test_chunked_prefill_tiny_budget(ckpt, one_at_a_time):
    llm = make(ckpt, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert tokens(llm.generate(prompts(), GREEDY)) == one_at_a_time
    assert_pool_empty(llm)


def test_preemption_forced(ckpt, one_at_a_time):
    # 20 pages of 16 tokens: 8 requests of up to ~95 tokens cannot all fit -> preemption by recompute
    llm = make(ckpt, num_kv_pages=20, max_model_len=256 if False else 160, max_num_batched_tokens=64)
    outs = llm.generate(prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == one_at_a_time
    assert_pool_empty(llm)


def test_max_num_seqs_cap(ckpt, one_at_a_time):
    llm = make(ckpt, max_num_seqs=2)
    seen = []
    orig = llm.engine.scheduler.schedule

    def spy():
        so = orig()
        seen.append(len(llm.engine.scheduler.running))
        return so
    llm.engine.scheduler.schedule = spy
    assert tokens(llm.generate(prompts(), GREEDY)) == one_at_a_time
    assert max(seen) == 2


def test_prefix_hit_reuses_pages_and_keeps_output(ckpt):
    llm = make(ckpt)
    base = [0] + list(range(10, 80))                 # 71 tokens: 4 full pages of 16
    a = llm.generate([base], GREEDY)[0]
    assert a.num_cached_tokens == 0
    b = llm.generate([base], GREEDY)[0]
    assert b.num_cached_tokens == 64
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    other = base[:40] + [7] * 30                      # shares 2 full pages
    c = llm.generate([other], GREEDY)[0]
    assert c.num_cached_tokens == 32
    fresh = make(ckpt, enable_prefix_caching=False).generate([other], GREEDY)[0]
    assert c.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert_pool_empty(llm)


def test_prefix_cache_compares_tokens(ckpt):
    """A forged hash collision must not produce a hit: the pool compares the stored tokens."""
    llm = make(ckpt)
    base = [0] + list(range(10, 60))
    llm.generate([base], GREEDY)
    pool = llm.engine.kv.pool
    for m in pool.meta:
        if m.tokens is not None:
            m.tokens = tuple(t + 1 for t in m.tokens)     # stored tokens no longer match their hash
    assert llm.generate([base], GREEDY)[0].num_cached_tokens == 0


def test_abort_frees_pages(ckpt):
    llm = make(ckpt)
    eng = llm.engine
    for i, p in enumerate(prompts(4)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.kv.pool.num_in_use > 0
    for i in range(4):
        eng.abort_request(f"r{i}")
    assert not eng.has_unfinished_requests()
    assert_pool_empty(llm)


def test_n_samples_and_seed(ckpt):
    llm = make(ckpt)
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    a = llm.generate([prompts(1)[0]], sp)[0]
    b = llm.generate([prompts(1)[0]], sp)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert_pool_empty(llm)


def test_stop_token_and_max_tokens(ckpt):
    llm = make(ckpt)
    p = prompts(1)[0]
    full = llm.generate([p], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == full.token_ids[:first + 1]


def test_stop_string(ckpt):
    llm = make(ckpt)
    p = prompts(1)[0]
    full = llm.generate([p], GREEDY)[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate text")
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)]
    out2 = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                            include_stop_str_in_output=True))[0].outputs[0]
    assert out2.text == text[:text.find(stop) + len(stop)]


def test_prompt_logprobs_match_full_forward(ckpt):
    llm = make(ckpt, max_num_batched_tokens=5)     # prompt logprobs across prefill chunks
    p = prompts(1)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    ref = make(ckpt).generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    for i in range(1, len(p)):
        assert p[i] in out.prompt_logprobs[i]
        assert len(out.prompt_logprobs[i]) <= 3
        assert abs(out.prompt_logprobs[i][p[i]] - ref.prompt_logprobs[i][p[i]]) < 1e-4


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts(ckpt):
    llm = make(ckpt, max_model_len=64)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[0] * 64], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[0, 100000]], GREEDY)
    assert_pool_empty(llm)
    assert tokens(llm.generate([[0, 5, 6]], GREEDY))   # the engine still works afterwards


def test_unknown_architecture(tmp_path, ckpt):
    import json
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FooForCausalLM"):
        make(d)


def test_bad_engine_settings(ckpt):
    with pytest.raises(ValueError, match="page_size"):
        make(ckpt, page_size=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        make(ckpt, max_num_seqs=0)
    with pytest.raises(TypeError, match="no_such_setting"):
        make(ckpt, no_such_setting=1)
