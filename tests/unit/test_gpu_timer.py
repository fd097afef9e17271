"""Grouping of profiled device kernels by kind (bench/gpu_timer.device_kernels, used by the profile scripts)."""
from types import SimpleNamespace as NS

import torch

from tierserve.bench.gpu_timer import device_kernels


def _ev(name, us, device=True):
    return NS(name=name, device_type=torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU,
              time_range=NS(elapsed_us=lambda: us))


def test_device_kernels_group_by_kind_and_divide_per_step():
    prof = NS(events=lambda: [_ev("sm90_xmma_gemm_bf16", 30.0), _ev("sm90_xmma_gemm_bf16", 30.0),
                              _ev("_paged_decode_kernel", 8.0), _ev("rms_norm_fused", 2.0), _ev("weird", 1.0),
                              _ev("aten::mm", 99.0, device=False)])
    rows, by_kind = device_kernels(prof, [("gemm", ("gemm",)), ("attention", ("decode",)), ("norm", ("rms",))],
                                   per=2)
    assert [r["kernel"] for r in rows] == ["sm90_xmma_gemm_bf16", "_paged_decode_kernel", "rms_norm_fused", "weird"]
    assert rows[0]["us"] == 30.0 and rows[0]["calls"] == 1.0
    assert by_kind == {"gemm": 30.0, "attention": 4.0, "norm": 1.0, "other": 0.5}
    assert list(by_kind) == ["gemm", "attention", "norm", "other"]          # by time, descending
