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
    kw.setdefault("max_model_len", 256)
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
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


@pytest.fixture(scope="module")
def conv_ckpt(tmp_path_factory):
    return make_engram_checkpoint(tmp_path_factory.mktemp("engram-conv") / "m", conv_kernel_size=3)


def test_conv_state_carried_across_steps_equals_full_recompute(conv_ckpt, ckpt):
    """Engram with a causal conv: the per-request conv history kept between engine steps (decode, chunked
    prefill, batching, preemption) gives what one pass over the whole sequence gives."""
    ps = prompts(3)
    ref, llm = run(conv_ckpt, ps, num_scheduler_steps=1)
    assert llm.engine.runner.engram_conv and not llm.engine.config.enable_prefix_caching
    assert not llm.engine.runner.engram_conv.states                 # released when requests finish
    assert [t for t, _ in run(ckpt, ps)[0]] != [t for t, _ in ref]  # the conv really changes the model
    for kw in ({"max_num_batched_tokens": 7}, {"num_kv_pages": 8, "max_model_len": 128, "max_num_batched_tokens": 16}):
        got, llm2 = run(conv_ckpt, ps, **kw)
        if "num_kv_pages" in kw:
            assert llm2.engine.scheduler.num_preemptions > 0
        for (t1, l1), (t2, l2) in zip(got, ref):
            assert t1 == t2, kw
            assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, kw
    # full recompute: each generated token's logprob from one prefill pass over prompt + generation
    full = LLM(str(conv_ckpt), dtype="float32", device="cpu", max_model_len=256)
    for p, (toks, lps) in zip(ps, ref):
        out = full.generate([p + toks], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        tail = out.prompt_logprobs[len(p):]
        for tok, lp, row in zip(toks, lps, tail):
            assert abs(row[tok] - lp) < 1e-4


@pytest.mark.parametrize("placement", [None, "cpu"])
def test_static_rows_for_cuda_graphs_equal_the_eager_hand_off(ckpt, placement):
    """The CUDA-graph path's static row buffers (filled before the replay) give each Engram layer exactly
    the rows the eager hand-off gives it (runner/engram_graphs.py); bucket padding rows are ignored."""
    import torch

    from tierserve.memory.engram import engram_modules, prepare_engram_step
    from tierserve.runner.engram_graphs import StaticEngramRows

    _, llm = run(ckpt, prompts(1), engram_placement=placement)
    runner = llm.engine.runner
    mods = engram_modules(runner.model)
    g = torch.Generator().manual_seed(5)
    B = 3                                                      # a decode step of 3 requests
    ids = torch.randint(3, 500, (B,), generator=g)
    qsl = torch.arange(B + 1)
    hist = torch.randint(3, 500, (B, 2), generator=g)
    hidden = torch.randn(B, runner.model_cfg.hidden_size, generator=g)
    eager = prepare_engram_step(mods, runner.engram_hasher, ids, qsl, hist)
    static = StaticEngramRows(mods, 8, runner.device, runner.dtype)
    static.fill(prepare_engram_step(mods, runner.engram_hasher, ids, qsl, hist), B)
    for layer, m in mods.items():
        want = eager.apply(m, hidden)
        got = static.begin(B).apply(m, hidden)
        assert torch.equal(got, want)


def test_multi_step_windows_hash_on_the_device(ckpt):
    """Device tables: decode windows hash each step's token with a device-side history (DeviceEngram) and
    feed greedy tokens back without the host -- the same tokens as one step at a time."""
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for k in (1, 8):
        llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256, num_scheduler_steps=k)
        runner = llm.engine.runner
        assert runner.device_engram is not None and runner.supports_multi_step()
        windows = []
        real = runner.launch_multi
        runner.launch_multi = lambda so, steps: windows.append(steps) or real(so, steps)
        outs[k] = [o.outputs[0].token_ids for o in llm.generate(prompts(), sp)]
        assert bool(windows) == (k > 1)
    assert outs[1] == outs[8]
    host = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256, engram_placement="cpu")
    assert host.engine.runner.device_engram is None and not host.engine.runner.supports_multi_step()
