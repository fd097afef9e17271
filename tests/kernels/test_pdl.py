"""Programmatic dependent launch (``tierserve.pdl``): off on the CPU; on an sm_90 GPU a CUDA graph of the decode
chain paged decode (BF16 and FP8 pages) -> split merge -> row GEMV -> add_rmsnorm -> FP8 row GEMV -> silu_mul -> row
GEMV (split-K reduce, then a direct store) gives the same bits with PDL as without, replay after replay (a kernel
reading before its ``wait`` would race)."""
import pytest
import torch

from tierserve import pdl

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_off_without_a_hopper_gpu():
    assert pdl.dependent_options(torch.device("cpu")) == {}
    assert not pdl.active(torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="needs an sm_90 GPU")
def test_pdl_chain_same_bits(monkeypatch):
    from tierserve.attention.triton_decode import paged_decode
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
    from tierserve.models.layers.triton_fused import add_rmsnorm, silu_mul
    from tierserve.quant.fp8 import quantize_fp8_blockwise
    from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows

    torch.manual_seed(0)
    dev, H, I = torch.device("cuda"), 4096, 14336
    w1, s1 = quantize_fp8_blockwise(torch.randn(2 * I, H, device=dev) * 0.02)
    w2, s2 = quantize_fp8_blockwise(torch.randn(H, I, device=dev) * 0.02)
    r = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    g = torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5
    wo, so = quantize_fp8_blockwise(torch.randn(H, H, device=dev) * 0.02)
    kv = torch.randn(40, 2, 16, 8, 128, device=dev, dtype=torch.bfloat16)        # one layer, 40 pages
    table = torch.randperm(40, device=dev)[None, :36]
    lens = torch.tensor([570], device=dev)
    q = torch.randn(1, 32, 128, device=dev, dtype=torch.bfloat16)
    stored = torch.zeros(40, dtype=torch.bool, device=dev)

    def chain():
        attn = paged_decode(q, kv[:, 0], kv[:, 1], table, lens, 0.088, num_splits=5)
        attn = paged_decode_fp8(attn, kv, stored, table, lens, 0.088, 16, 16, 64, num_splits=9, fast=True)
        a = fp8_gemv_rows(attn.reshape(1, H), wo, so, split_k=3)
        h, res = add_rmsnorm(a, r, g, 1e-5)
        up = silu_mul(fp8_gemv_rows(h, w1, s1, split_k=4))
        d = fp8_gemv_rows(up, w2, s2, split_k=7) + res
        return fp8_gemv_rows(d, wo, so, split_k=1)

    outs = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        assert pdl.active(dev) == on
        chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain()
        runs = []
        for _ in range(20):
            graph.replay()
            runs.append(y.clone())
        torch.cuda.synchronize()
        assert all(torch.equal(a, runs[0]) for a in runs)
        outs[on] = runs[0]
    assert torch.equal(outs[True], outs[False])
