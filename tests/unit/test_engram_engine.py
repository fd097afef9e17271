"""Engram inside the engine: host vs device tables bit-identical, chunking, batching, prefix hits."""
import random

import pytest

from tests.helpers.tiny_engram import make_engram_checkpoint
from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_engram_checkpoint(tmp_path_factory.mktemp("engram") / "m")


def prompts(n=4):
    rng = random.Random(1)
    return [[0] + [rng.randrange(3, 500) for _ in range(rng.randrange(20, 60))] for _ in range(n)]


def run(path, ps, **kw):
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256, **kw)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in llm.generate(ps, SP)], llm


def test_engram_changes_the_model(ckpt, tmp_path):
    plain = make_checkpoint(tmp_path / "plain", "llama")     # same seed, same base weights
    with_e, _ = run(ckpt, prompts(2))
    without, _ = run(plain, prompts(2))
    assert [lp for _, lp in with_e] != [lp for _, lp in without]


def test_host_placement_is_bit_identical(ckpt):
    ref, _ = run(ckpt, prompts())
    host, llm = run(ckpt, prompts(), engram_placement="cpu")
    assert llm.engine.runner.model.layers[0].engram.table.placement == "cpu"
    assert host == ref                                           # tokens and logprobs, bit for bit


def test_chunked_batched_and_prefix_hit_unchanged(ckpt):
    ps = prompts()
    alone = [run(ckpt, [p])[0][0][0] for p in ps]
    batched, _ = run(ckpt, ps, max_num_batched_tokens=7)        # n-grams span chunk boundaries
    assert [t for t, _ in batched] == alone
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256)
    a = llm.generate([ps[0]], SP)[0]
    b = llm.generate([ps[0]], SP)[0]
    assert b.num_cached_tokens > 0 and b.outputs[0].token_ids == a.outputs[0].token_ids == alone[0]
