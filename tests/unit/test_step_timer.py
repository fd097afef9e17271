"""StepTimer: the cost model's prefill samples are device time, not the host's launch time."""
import time

import pytest
import torch

from tierserve.kv.tiers.step_timer import StepTimer


def test_cpu_steps_are_timed_at_once():
    t = StepTimer()
    t.start("cpu")
    time.sleep(0.02)
    (seconds, info), = t.stop("a")
    assert info == "a" and 0.015 < seconds < 1.0
    t.start("cpu")
    assert t.stop("b", keep=False) == []
    assert t.stop("c") == []              # no step started


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_cuda_steps_report_device_time_once_done():
    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    t = StepTimer()
    t.start(dev)
    h0 = time.perf_counter()
    for _ in range(50):                  # ~ tens of ms of queued GPU work
        x = x @ x
        x = x / x.norm()
    out = t.stop("step")
    launch = time.perf_counter() - h0
    torch.cuda.synchronize()
    wall = time.perf_counter() - h0
    out += t.ready()
    assert [i for _, i in out] == ["step"]
    seconds = out[0][0]
    assert seconds > 2 * launch and seconds <= wall * 1.05
