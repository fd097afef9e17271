"""Block-scaled FP8 (e4m3, 128x128) quantisation: error bounds, amax, power-of-two scales, formats."""
import pytest
import torch

from tierserve.quant import fp8
from tierserve.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Format,
    dequantize_fp8_blockwise,
    expand_scales,
    fp8_format_from_hf,
    fp8_w8a8_ref,
    pow2_ceil,
    quantize_act_fp8,
    quantize_fp8_blockwise,
)

SHAPES = [(256, 384), (200, 300), (130, 129), (7, 1000), (1, 5)]


def _block_amax(w, block):
    N, K = w.shape
    s = torch.zeros(-(-N // block[0]), -(-K // block[1]))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
    return s


def _elem_bound(w, scale_per_elem):
    # e4m3: 3 mantissa bits -> half-ulp relative error 2**-4 for normals; below the smallest normal
    # (2**-6 in code units) the spacing is 2**-9, so the absolute error is at most 2**-10 code units.
    return torch.maximum(w.abs() * 2.0 ** -4, scale_per_elem * 2.0 ** -10) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_roundtrip_error_bound_and_amax(shape, pow2, src):
    torch.manual_seed(shape[0] * 7 + shape[1])
    w = (torch.randn(shape) * torch.logspace(-3, 1, shape[1])).to(src)     # columns of very different size
    q, s = quantize_fp8_blockwise(w, pow2_scale=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    wf = w.float()
    deq = dequantize_fp8_blockwise(q, s)
    err = (deq - wf).abs()
    assert bool((err <= _elem_bound(wf, expand_scales(s, shape))).all()), err.max()
    assert q.float().abs().max() <= FP8_MAX
    amax, damax = _block_amax(wf, (128, 128)), _block_amax(deq, (128, 128))
    if pow2:
        assert bool((torch.log2(s) == torch.round(torch.log2(s))).all())
        assert bool((s >= amax / FP8_MAX).all()) and bool((s < 2 * amax / FP8_MAX * (1 + 1e-6)).all())
        torch.testing.assert_close(damax, amax, rtol=2.0 ** -4, atol=0)
    else:
        # the block's largest entry maps onto +-448 exactly, so the block amax survives the round trip
        torch.testing.assert_close(damax, amax, rtol=1e-6, atol=0)


def test_relative_error_statistics():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    for pow2 in (False, True):
        q, s = quantize_fp8_blockwise(w, pow2_scale=pow2)
        rel = (dequantize_fp8_blockwise(q, s) - w).norm() / w.norm()
        assert rel < 0.04, rel          # measured: 0.0265 (amax/448), 0.0266 (pow2); see docs/fp8.md


def test_zero_and_tiny_blocks_and_nonfinite():
    w = torch.zeros(130, 130)
    w[129, 129] = 1e-30
    q, s = quantize_fp8_blockwise(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dequantize_fp8_blockwise(q, s)[:128, :128], torch.zeros(128, 128))
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf/nan"):
        quantize_fp8_blockwise(w)


def test_dequant_dtype_single_rounding():
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    q, s = quantize_fp8_blockwise(w)
    exact = dequantize_fp8_blockwise(q, s)
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_fp8_blockwise(q, s, dtype=dt), exact.to(dt))
    # the fast (aligned) and general (edge-block) dequantisers agree
    assert torch.equal(exact, q.float() * expand_scales(s, (256, 256)))


def test_pow2_ceil_exact():
    x = torch.tensor([1.0, 0.75, 2.0 ** -20, 3.0, 448.0, 2.0 ** 10 + 1])
    assert pow2_ceil(x).tolist() == [1.0, 1.0, 2.0 ** -20, 4.0, 512.0, 2.0 ** 11]


def test_other_block_sizes_and_per_row():
    torch.manual_seed(2)
    w = torch.randn(70, 200)
    for block in [(1, 128), (64, 64), (128, 32)]:
        q, s = quantize_fp8_blockwise(w, block)
        assert s.shape == (-(-70 // block[0]), -(-200 // block[1]))
        err = (dequantize_fp8_blockwise(q, s, block) - w).abs()
        assert bool((err <= _elem_bound(w, expand_scales(s, (70, 200), block))).all())


def test_activation_quant_per_token_per_128():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 300) * torch.tensor([1.0, 100.0]).repeat_interleave(150)
    xq, xs = quantize_act_fp8(x)
    assert xq.shape == x.shape and xs.shape == (2, 5, 3)
    assert torch.allclose(xs[..., 0], x[..., :128].abs().amax(-1) / FP8_MAX)
    deq = dequantize_fp8_blockwise(xq.view(10, 300), xs.view(10, 3), (1, 128)).view_as(x)
    assert ((deq - x).abs() <= torch.maximum(x.abs() * 2.0 ** -4,
                                             expand_scales(xs.view(10, 3), (10, 300), (1, 128)).view_as(x)
                                             * 2.0 ** -10) * 1.000001).all()
    # emulated W8A8 is close to W8A16
    w = torch.randn(64, 300)
    q, s = quantize_fp8_blockwise(w)
    a8 = fp8_w8a8_ref(x.view(10, 300), q, s)
    a16 = x.view(10, 300) @ dequantize_fp8_blockwise(q, s).T
    assert (a8 - a16).norm() / a16.norm() < 0.05


@pytest.mark.parametrize("K,group,pow2", [(300, 128, False), (256, 128, True), (200, 64, False), (7, 4, True)])
def test_activation_quant_matches_the_blockwise_path(K, group, pow2):
    """quantize_act_fp8 (quantize_fp8_blockwise's broadcast division, no inf/nan check) gives the bits of the plain
    per-element formula: each group's amax / FP8_MAX (floored, optionally a power of two), x over the expanded
    scales."""
    g = torch.Generator().manual_seed(K + group)
    x = (torch.randn(3, 4, K, generator=g) * 10.0 ** torch.randint(-4, 4, (3, 4, K), generator=g)).bfloat16()
    x[0, 0, :group] = 0.0                                           # an all-zero group: the amax floor
    xq, xs = quantize_act_fp8(x, group, pow2)
    xf = x.reshape(-1, K).float()
    kb = -(-K // group)
    amax = torch.stack([xf[:, i * group:(i + 1) * group].abs().amax(-1) for i in range(kb)], 1)
    rs = amax.clamp_min(fp8._AMAX_FLOOR) / FP8_MAX
    rs = pow2_ceil(rs) if pow2 else rs
    rq = (xf / expand_scales(rs, (xf.shape[0], K), (1, group))).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(xq.view(-1, K).view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(xs.view(-1, rs.shape[1]), rs)
    assert xq.is_contiguous() and xs.shape == (3, 4, -(-K // group))


def test_hf_quantization_config():
    assert fp8_format_from_hf({}) is None
    v3 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}}
    assert fp8_format_from_hf(v3) == Fp8Format((128, 128), False, "dynamic")
    v31 = {"quantization_config": {**v3["quantization_config"], "scale_fmt": "ue8m0"}}
    assert fp8_format_from_hf(v31).pow2_scale is True
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8_format_from_hf({"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="fmt"):
        fp8_format_from_hf({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2",
                                                    "weight_block_size": [128, 128]}})
