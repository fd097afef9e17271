"""Engram table placements give bit-identical rows; prefetch/wait; FP8 rows within the e4m3 error bound."""
import os

import pytest
import torch

from tierserve.memory.engram_fp8 import dequantize_rows, quantize_rows
from tierserve.memory.engram_table import EngramTable

R, D = 211, 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _table(placement, tmp_path=None, **kw) -> EngramTable:
    path = tmp_path / placement if placement == "disk" else None
    t = EngramTable(R, D, placement=placement, dtype=torch.bfloat16, path=path, out_dtype=torch.float32, **kw)
    t.reset_parameters(0.5, torch.Generator().manual_seed(3))
    return t


def _zero_copy_runs(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True])
def test_placements_bit_identical(tmp_path, fp8, device):
    """On a GPU this also covers the side-stream copy and the zero-copy kernel on registered host memory."""
    ids = torch.randint(0, R, (9, 4), generator=torch.Generator().manual_seed(1))
    ref = _table("device", fp8=fp8, device=device).gather(ids)
    assert ref.shape == (9, 4 * D) and ref.dtype == torch.float32 and ref.device.type == device
    kinds = [("cpu", {}), ("disk", {})]
    kinds += [("cpu", {"host_gather": "zero_copy"})] if _zero_copy_runs(device) else []
    for placement, kw in kinds:
        t = _table(placement, tmp_path, fp8=fp8, device=device, **kw)
        h1, h2 = t.prefetch(ids), t.prefetch(ids[:2])       # two in flight, consumed in order
        assert torch.equal(t.wait(h1), ref), placement
        assert torch.equal(t.wait(h2), ref[:2])
        t.close()
    assert (tmp_path / "disk" / "weight.bin").stat().st_size == R * D * (1 if fp8 else 2)


def test_device_table_is_a_parameter_and_host_table_is_not():
    dev, host = _table("device"), _table("cpu")
    assert [n for n, _ in dev.named_parameters()] == ["weight"]
    assert list(host.named_parameters()) == [] and host.nbytes() == R * D * 2
    assert host.row_device == torch.device("cpu")
    rows = dev.gather(torch.tensor([[1, 2]]))
    rows.sum().backward()                                    # trainable on the device
    assert dev.weight.grad[1].abs().sum() > 0


def test_fp8_rows_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 128, generator=g) * torch.logspace(-6, 3, 300)[:, None]
    x[0] = 0.0
    x[1, :32] = 448.0 * 2.0 ** 5                             # amax exactly a power of two times 448
    codes, scales = quantize_rows(x)
    assert codes.dtype == scales.dtype == torch.uint8 and scales.shape == (300, 4)
    y = dequantize_rows(codes, scales)
    s = torch.exp2((scales.int() - 127).float()).repeat_interleave(32, dim=1)
    bound = torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10)
    assert bool(((y - x).abs() <= bound).all())
    assert torch.equal(y[0], x[0]) and torch.equal(y[1, :32], x[1, :32])
    assert bool((x.abs().view(300, 4, 32).amax(-1) / s[:, ::32] <= 448).all())
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < 0.05


def test_float_checkpoint_into_fp8_table_quantises(tmp_path):
    src = torch.randn(R, D, generator=torch.Generator().manual_seed(5))
    t = EngramTable(R, D, placement="cpu", fp8=True)
    t.load_("weight", src)
    codes, scales = quantize_rows(src)
    assert torch.equal(t.storage()["weight"], codes) and torch.equal(t.storage()["weight_scale"], scales)
    with pytest.raises(ValueError, match="fp8_rows"):
        EngramTable(R, D, placement="cpu").load_("weight_scale", scales)
    with pytest.raises(ValueError, match="shape"):
        t.load_("weight", src[:5])
    with pytest.raises(ValueError, match="zero_copy needs placement=cpu"):
        EngramTable(R, D, placement="disk", host_gather="zero_copy")
    with pytest.raises(RuntimeError, match="disk_path"):
        EngramTable(R, D, placement="disk").gather(torch.tensor([[1]]))
