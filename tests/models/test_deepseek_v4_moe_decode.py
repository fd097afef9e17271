"""Graph-safe routed MoE for decode rows (``moe_triton.py``, ``MoE.forward_decode``) against the per-expert
reference ``MoE.routed``: the Triton kernels (on the GPU, else on the CPU under TRITON_INTERPRET=1, fp32)
and the plain-PyTorch gather, random inputs, several tokens and slots, two slots of a token on one expert,
hash-routed and top-k layers with the shared expert."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tierserve.models.deepseek_v4.moe import MoE
from tierserve.models.deepseek_v4.moe_triton import routed_gather, routed_triton, triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _moe(hashed: bool, E=5, D=48, I=40, k=3, limit=0.7, seed=0):
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_experts_per_tok=k, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                          n_routed_experts=E, hidden_size=D, vocab_size=32, moe_intermediate_size=I,
                          swiglu_limit=limit, n_shared_experts=1,
                          mlp_layer_types=["hash_moe" if hashed else "moe"])
    torch.manual_seed(seed)
    m = MoE(cfg, 0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        if hashed:
            m.gate.tid2eid.copy_(torch.stack([torch.randperm(E)[:k] for _ in range(32)]))
    return m.to(DEV)


def _case(N=4, E=5, k=3, D=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    idx[0, 1] = idx[0, 0]                                  # two slots of one token on the same expert
    wts = torch.rand(N, k, generator=g)
    return x.to(DEV), wts.to(DEV), idx.to(DEV)


@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("N,k,D,I", [(1, 3, 48, 40), (4, 3, 48, 40), (7, 2, 33, 70)])
def test_triton_kernels_match_the_per_expert_reference(N, k, D, I):
    m = _moe(False, k=k, D=D, I=I)
    x, wts, idx = _case(N=N, k=k, D=D)
    want = m.routed(x, wts, idx)
    w1, w3, w2 = m.stacked()
    got = routed_triton(x, wts, idx, w1, w3, w2, m.experts[0].limit)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    got = routed_triton(x, wts, idx, w1, w3, w2, m.experts[0].limit, block_i=8, block_d=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels on the GPU")
def test_triton_kernels_bf16_on_the_gpu():
    m = _moe(False, E=16, D=256, I=128, k=4)
    m.to(torch.bfloat16)
    x, wts, idx = _case(N=3, E=16, k=4, D=256)
    x, wts = x.bfloat16(), wts.bfloat16()
    want = m.routed(x, wts, idx).float()
    got = routed_triton(x, wts, idx, *m.stacked(), m.experts[0].limit).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("N", [1, 3])
def test_gather_matches_the_per_expert_reference(N):
    m = _moe(False)
    x, wts, idx = _case(N=N)
    want = m.routed(x, wts, idx)
    got = routed_gather(x, wts, idx, *m.stacked(), m.experts[0].limit)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("hashed", [True, False])
def test_forward_decode_equals_forward(hashed):
    m = _moe(hashed)
    x, _, _ = _case(N=3)
    ids = torch.tensor([3, 17, 3], device=DEV)
    want = m(x, ids)
    torch.testing.assert_close(m.forward_decode(x, ids), want, atol=2e-5, rtol=1e-5)
    # the experts' weights are views of the stacks now; forward still gives the same
    w1 = m.stacked()[0]
    assert m.experts[2].w1.weight.data_ptr() == w1[2].data_ptr()
    torch.testing.assert_close(m(x, ids), want, atol=0, rtol=0)
    assert m.stacked()[0] is w1                    # built once


@pytest.mark.parametrize("N,E,k", [(1, 5, 3), (9, 5, 3), (64, 16, 4)])
def test_grouped_gemms_match_the_per_expert_reference(N, E, k):
    """Prefill's routed experts as grouped GEMMs (moe_grouped.py): experts with no tokens, two slots of a
    token on one expert, more tokens than experts; fp32 on the CPU (bf16 on the GPU, below)."""
    from tierserve.models.deepseek_v4.moe_grouped import routed_grouped

    m = _moe(False, E=E, D=48, I=40, k=k)
    x, wts, idx = _case(N=N, E=E, k=k)
    want = m.routed(x, wts, idx)
    if DEV == "cuda":                           # torch._grouped_mm takes bf16 there
        m.to(torch.bfloat16)
        x, wts = x.bfloat16(), wts.bfloat16()
    got = routed_grouped(x, wts, idx, *m.stacked(), m.experts[0].limit)
    tol = dict(atol=3e-2, rtol=3e-2) if DEV == "cuda" else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_forward_takes_the_grouped_path_and_falls_back(monkeypatch):
    """MoE.forward uses the grouped GEMMs where torch._grouped_mm runs, remembers a refusal and then computes
    one expert at a time -- the same numbers either way."""
    from tierserve.models.deepseek_v4 import moe as moe_mod

    m = _moe(False)
    x, _, _ = _case(N=5)
    ids = torch.arange(5, device=DEV)
    calls = []
    real = moe_mod.MoE.routed
    monkeypatch.setattr(moe_mod.MoE, "routed", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(moe_mod, "_GROUPED_OFF", set())
    got = m(x, ids)
    if DEV == "cpu":                            # fp32 on the CPU: grouped, no per-expert loop
        assert not calls
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no")))
    again = m(x, ids)
    assert calls and (x.device.type, x.dtype) in moe_mod._GROUPED_OFF
    torch.testing.assert_close(again, got, atol=2e-5, rtol=1e-5)
