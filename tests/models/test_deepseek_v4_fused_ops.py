"""Triton RMS norms and rope of the graph decode step (``fused_ops.py``) against ``norm.py`` / ``rope.py`` on
random inputs (GPU, else the CPU under TRITON_INTERPRET=1): fp32 within 1e-5, bf16 within one rounding."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.models.deepseek_v4.fused_ops import rms_norm, rope
from tierserve.models.deepseek_v4.norm import RMSNorm, rms_unweighted
from tierserve.models.deepseek_v4.rope import RopeSpec, apply_rope

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40), (2, 4, 33), (1, 5000)])
def test_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    norm = RMSNorm(shape[-1], 1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6).float(), norm(x).float(), **TOL[dtype])
    torch.testing.assert_close(rms_norm(x, None, 1e-6).float(), rms_unweighted(x, 1e-6).float(), **TOL[dtype])
    assert rms_norm(x, None, 1e-6).dtype == dtype and rms_norm(x, None, 1e-6).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,rope_dim", [((3, 32), 8), ((2, 4, 32), 8), ((5, 3, 16), 16), ((1, 2, 300), 64)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_matches_reference(dtype, shape, rope_dim, inverse):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rope_dim)).to(DEV, dtype)
    spec = RopeSpec(theta=10000.0, rope_dim=rope_dim)
    cos, sin = spec.cos_sin(torch.arange(7, 7 + shape[0], device=DEV), dtype)
    got, want = rope(x, cos, sin, inverse), apply_rope(x, cos, sin, inverse)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
