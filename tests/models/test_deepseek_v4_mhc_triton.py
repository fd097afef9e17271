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


def test_hyper_connection_fused_equals_plain():
    torch.manual_seed(0)
    hcn = HyperConnection(24, 4, 20, 1e-6, 1e-6).to(DEV)
    with torch.no_grad():
        for p in hcn.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    h = torch.randn(3, 4, 24, device=DEV)
    for a, b in zip(hcn(h, fused=True), hcn(h)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
