"""DeepSeek-V4 served by the engine (``StatefulRunner``) against transformers' ``generate`` (fp32, CPU).

Tiny random checkpoints from tests/helpers/tiny_deepseek_v4.py (every layer type, compress ratios
4 / 8 / 16, windows 8 / 12) with a synthetic word-level tokenizer beside them. Prompts of 5, 13 and
37 tokens (longer than the window and than every compress ratio) run batched in one ``generate`` call.
"""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import CONFIGS, make_checkpoint, one_thread  # noqa: F401
from tierserve import LLM, SamplingParams
from tierserve.loader.tokenizer import Tokenizer
from tierserve.models.registry import is_stateful
from tierserve.runner.stateful_runner import StatefulRunner

NEW = 24
LENGTHS = (5, 13, 37)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (checkpoint dir, transformers' greedy tokens for ``prompts()``)."""
    from transformers import DeepseekV4ForCausalLM

    out = {}
    for name in CONFIGS:
        path = make_checkpoint(tmp_path_factory.mktemp(name), name)
        Tokenizer.synthetic(128).backend.save(str(path / "tokenizer.json"))
        hf = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        refs = []
        for p in prompts():
            ids = torch.tensor([p])
            seq = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            refs.append(seq[0, len(p):].tolist())
        out[name] = (path, refs)
    return out


def make(path, **kw) -> LLM:
    kw.setdefault("max_model_len", 128)
    return LLM(str(path), dtype="float32", device="cpu", **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_clean(llm: LLM) -> None:
    eng = llm.engine
    eng.kv.check_invariants()
    assert eng.kv.pool.num_in_use == 0 and eng.kv.num_requests == 0
    assert eng.runner.num_states == 0
    assert not eng.requests


@pytest.fixture(scope="module")
def mixed(ckpts):
    return make(ckpts["mixed"][0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_matches_transformers(ckpts, name):
    path, refs = ckpts[name]
    llm = make(path)
    assert isinstance(llm.engine.runner, StatefulRunner)
    assert not llm.engine.kv.enable_prefix_caching
    assert tokens(llm.generate(prompts(), GREEDY)) == refs
    assert_clean(llm)


def test_chunked_prefill(ckpts):
    path, refs = ckpts["mixed"]
    llm = make(path, max_num_batched_tokens=5)       # prompts arrive in chunks of <= 5, mixed with decodes
    assert tokens(llm.generate(prompts(), GREEDY)) == refs
    assert_clean(llm)


def test_preemption(ckpts):
    path, refs = ckpts["hca-first"]
    # 20 pages of 4 tokens; the three requests need 10 + 12 + 16 pages at the end
    llm = make(path, page_size=4, num_kv_pages=20, max_model_len=80)
    assert tokens(llm.generate(prompts(), GREEDY)) == refs
    assert llm.engine.scheduler.num_preemptions > 0
    assert_clean(llm)


def test_abort_frees_state(mixed):
    eng = mixed.engine
    eng.add_request("a", prompts()[2], GREEDY)
    eng.add_request("b", prompts()[1], GREEDY)
    eng.step()
    eng.step()
    assert set(eng.runner.states) == {"a", "b"} and eng.runner.state_bytes() > 0
    eng.abort_request("a")
    assert set(eng.runner.states) == {"b"} and not eng.kv.has("a")
    while eng.has_unfinished_requests():
        eng.step()
    assert_clean(mixed)


def test_seeded_sampling_reproducible(mixed):
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=16, ignore_eos=True,
                        logprobs=2)
    p = prompts(seed=3)
    alone = mixed.generate([p[1]], sp)[0].outputs[0]
    batched = mixed.generate(p, [GREEDY, sp, GREEDY])
    again = batched[1].outputs[0]
    assert again.token_ids == alone.token_ids and len(alone.token_ids) == 16
    for d1, d2, tok in zip(again.logprobs, alone.logprobs, alone.token_ids):
        assert tok in d1 and 2 <= len(d1) <= 3 and d1 == pytest.approx(d2, abs=1e-5)
    assert tokens(mixed.generate([p[0]], GREEDY))[0] == batched[0].outputs[0].token_ids
    sp.seed = 8
    assert mixed.generate([p[1]], sp)[0].outputs[0].token_ids != alone.token_ids
    assert_clean(mixed)


def test_prompt_logprobs_and_logprobs(mixed, ckpts):
    from tierserve.models.deepseek_v4 import load_model

    path, _ = ckpts["mixed"]
    model = load_model(path)
    p = prompts()[2]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1, logprobs=0)
    chunked = make(path, max_num_batched_tokens=7)
    for llm in (mixed, chunked):
        out = llm.generate([p], sp)[0]
        want = torch.log_softmax(model.forward_full(torch.tensor(p + out.outputs[0].token_ids)), -1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i, d in enumerate(out.prompt_logprobs[1:], start=1):
            assert d[p[i]] == pytest.approx(float(want[i - 1, p[i]]), abs=1e-4)
            assert len(d) <= 2
        for j, (d, tok) in enumerate(zip(out.outputs[0].logprobs, out.outputs[0].token_ids)):
            assert d[tok] == pytest.approx(float(want[len(p) - 1 + j, tok]), abs=1e-4)
        assert_clean(llm)


def test_no_prefix_cache_hits(mixed):
    p = prompts()[2]
    a = mixed.generate([p], GREEDY)[0]
    b = mixed.generate([p], GREEDY)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert b.num_cached_tokens == 0


def test_dummy_weights(ckpts):
    path, refs = ckpts["mixed"]
    a = make(path, load_format="dummy", seed=3)
    b = make(path, load_format="dummy", seed=3)
    ta, tb = tokens(a.generate(prompts(), GREEDY)), tokens(b.generate(prompts(), GREEDY))
    assert ta == tb and all(len(t) == NEW for t in ta)
    assert ta != refs                                  # random weights, not the checkpoint's


@pytest.mark.parametrize("setting", [dict(cpu_kv_gb=1.0), dict(sparse_attention="pages"),
                                     dict(quantization="fp8"), dict(attention_backend="triton")])
def test_unsupported_settings_refused(ckpts, setting):
    path, _ = ckpts["mixed"]
    with pytest.raises(ValueError, match=next(iter(setting))):
        make(path, **setting)


def test_logits_from(ckpts):
    from tierserve.models.deepseek_v4 import load_model

    model = load_model(ckpts["mixed"][0])
    ids = torch.tensor(prompts()[2])
    full, st_full = model.prefill(ids)
    part, st = model.prefill(ids, logits_from=30)
    torch.testing.assert_close(part, full[30:], atol=1e-5, rtol=0)
    assert st.num_tokens == st_full.num_tokens == 37
    none, _ = model.forward_step(torch.tensor([3, 4]), st, logits_from=2)
    assert none.shape == (0, 128)
    with pytest.raises(ValueError, match="logits_from"):
        model.forward_step(torch.tensor([3]), st, logits_from=2)


def test_registry():
    assert is_stateful("DeepseekV4ForCausalLM")
    assert not is_stateful("LlamaForCausalLM")
