"""Triton skinny GEMM (optional RMSNorm prologue, residual epilogue) vs RMSNorm + F.linear + add."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.models.layers.norm import RMSNorm  # noqa: E402
from tierserve.models.layers.triton_gemv import gemv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (5, 72, 300), (16, 33, 64)])
@pytest.mark.parametrize("norm,res", [(False, False), (True, False), (False, True), (True, True)])
def test_gemv_matches_reference(dtype, M, N, K, norm, res):
    torch.manual_seed(M * 7 + N + K + 2 * norm + res)
    x = torch.randn(M, K, device=DEV).to(dtype)
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    ln = RMSNorm(K, 1e-5, device=DEV, dtype=dtype)
    ln.weight.data = (1 + 0.3 * torch.randn(K, device=DEV)).to(dtype)
    r = torch.randn(M, N, device=DEV).to(dtype) if res else None
    h = ln(x) if norm else x
    want = F.linear(h, w)
    if res:
        want = r + want
    got = gemv(x, w, ln.weight if norm else None, ln.eps, r, block_k=64)
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_gemv_rejects_many_rows():
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(torch.zeros(17, 8, device=DEV), torch.zeros(4, 8, device=DEV))
