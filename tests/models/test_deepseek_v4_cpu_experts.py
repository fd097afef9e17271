"""``--cpu-experts``: DeepSeek-V4's routed experts in CPU RAM, computed there (fp32, CPU).

On this CPU-only machine the compute device is the CPU too, so equal output alone proves little: the
tests also check that nothing but the routed experts moves, that weights already in CPU RAM are not copied
again, and that the MoE layers take the host path (CUDA: the host copies are page-locked).
"""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import engine_checkpoints, rand_ids, make_checkpoint, one_thread  # noqa: F401
from tierserve import LLM, SamplingParams
from tierserve.models.deepseek_v4 import load_model

SP = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return engine_checkpoints(tmp_path_factory, ("mixed", "hca-first"))


rand = rand_ids


def make(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=128, **kw)


@pytest.mark.parametrize("name", ["mixed", "hca-first"])
def test_same_output_as_all_on_device(paths, name):
    prompts = [rand(5, 1), rand(37, 2), rand(21, 3)]
    ref = make(paths[name], cpu_experts=False).generate(prompts, SP)
    llm = make(paths[name], cpu_experts=True, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SP)
    model = llm.engine.runner.model
    assert all(b.ffn.host_experts for b in model.layers)
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for d, dr, tok in zip(o.outputs[0].logprobs, r.outputs[0].logprobs, o.outputs[0].token_ids):
            assert d[tok] == pytest.approx(dr[tok], abs=1e-5)


def test_placement_keeps_the_rest_and_routes_experts_on_the_host(paths):
    model = load_model(paths["mixed"])
    ids = torch.tensor(rand(30, 4))
    want = model.forward_full(ids)
    experts = [p for b in model.layers for p in b.ffn.experts.parameters()]
    values = [p.detach().clone() for p in experts]
    others = {n: p for n, p in model.named_parameters() if ".ffn.experts." not in n}
    del experts
    model.place("cpu", cpu_experts=True)
    now = [p for b in model.layers for p in b.ffn.experts.parameters()]
    assert len(now) == len(values) and all(p.device.type == "cpu" for p in now)
    assert all(torch.equal(p, v) for p, v in zip(now, values))
    # gates, shared experts, attention, mHC, embeddings and head are the same tensors as before
    assert all(p is others[n] for n, p in model.named_parameters() if ".ffn.experts." not in n)
    calls = []
    for b in model.layers:
        orig = b.ffn.routed

        def spy(x, w, idx, orig=orig):
            assert x.device.type == "cpu" and idx.device.type == "cpu"
            calls.append(x.shape[0])
            return orig(x, w, idx)

        b.ffn.routed = spy
    torch.testing.assert_close(model.forward_full(ids), want, atol=0, rtol=0)
    assert calls == [30] * len(model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host copies)")
def test_cuda_experts_pinned_and_output_close(paths):
    ids = torch.tensor(rand(30, 5))
    ref = load_model(paths["mixed"]).place("cuda").forward_full(ids).cpu()
    model = load_model(paths["mixed"]).place("cuda", cpu_experts=True)
    for b in model.layers:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in b.ffn.experts.parameters())
        assert b.ffn.gate.weight.device.type == "cuda"
    torch.testing.assert_close(model.forward_full(ids).cpu(), ref, atol=1e-4, rtol=0)


def test_refused_without_routed_experts(tmp_path):
    from tests.helpers.tiny_models import make_checkpoint as make_llama

    path = make_llama(tmp_path / "llama")
    with pytest.raises(ValueError, match="cpu_experts=True: LlamaForCausalLM has no routed"):
        LLM(str(path), dtype="float32", device="cpu", cpu_experts=True)
    with pytest.raises(ValueError, match="cpu_experts must be True or False"):
        LLM(str(path), cpu_experts="yes")


def test_dummy_weights(paths):
    p = [rand(13, 6)]
    a = make(paths["mixed"], load_format="dummy", seed=3, cpu_experts=True).generate(p, SP)
    b = make(paths["mixed"], load_format="dummy", seed=3).generate(p, SP)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids      # same on the CPU (see docs for CUDA)


def test_experts_already_in_cpu_ram_are_not_copied_again(paths):
    model = load_model(paths["mixed"])
    before = [p.data_ptr() for b in model.layers for p in b.ffn.experts.parameters()]
    model.place("cpu", cpu_experts=True)               # pin=False on the CPU: host weights stay as they are
    assert [p.data_ptr() for b in model.layers for p in b.ffn.experts.parameters()] == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host copies)")
def test_dummy_host_experts_are_built_pinned_and_run(paths):
    llm = LLM(str(paths["mixed"]), dtype="float32", device="cuda", max_model_len=128, load_format="dummy",
              seed=3, cpu_experts=True, enforce_eager=True)
    model = llm.engine.runner.model
    for b in model.layers:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in b.ffn.experts.parameters())
        assert b.ffn.gate.weight.device.type == "cuda" and b.ffn.host_experts
    out = llm.generate([rand(13, 6)], SP)[0].outputs[0].token_ids
    assert len(out) == SP.max_tokens
