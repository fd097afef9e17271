"""The one-launch Triton Sinkhorn (``mhc_triton.py``) against ``mhc.sinkhorn`` on random fp32 logits
(GPU, else the CPU under TRITON_INTERPRET=1), hc 1..5, and ``HyperConnection(fused=True)``."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.models.deepseek_v4.mhc import HyperConnection, sinkhorn
from tierserve.models.deepseek_v4.mhc_triton import sinkhorn_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hc", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_matches_reference(hc, iters):
    x = torch.randn(6, hc, hc, generator=torch.Generator().manual_seed(hc * 100 + iters)).mul(3).to(DEV)
    torch.testing.assert_close(sinkhorn_triton(x, iters, 1e-6), sinkhorn(x, iters, 1e-6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hc,D", [(4, 24), (3, 300), (1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_connection_and_merge_fused_equal_plain(hc, D, dtype):
    torch.manual_seed(hc + D)
    hcn = HyperConnection(D, hc, 20, 1e-6, 1e-6).to(DEV)
    with torch.no_grad():
        for p in hcn.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    h = torch.randn(3, hc, D, device=DEV).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    got, want = hcn(h, fused=True), hcn(h)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)
    out = torch.randn(3, D, device=DEV).to(dtype)
    _, post, comb = want
    got, want = HyperConnection.merge(out, post, comb, h, fused=True), HyperConnection.merge(out, post, comb, h)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)
