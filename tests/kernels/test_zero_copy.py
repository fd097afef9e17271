"""Zero-copy page gather kernel vs index_select + copy, on random pages (interpreter on the CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.kv.tiers.zero_copy import gather_pages  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (2, 2, 4, 2, 8)), (torch.float32, (3, 5)),
                                         (torch.uint8, (7,))])
def test_gather_pages_matches_index_select(dtype, shape):
    g = torch.Generator().manual_seed(0)
    host = (torch.randn(12, *shape, generator=g) * 50).to(dtype)
    if DEV == "cuda":
        host = host.pin_memory()
    dst = torch.zeros(9, *shape, dtype=dtype, device=DEV)
    slots = torch.tensor([7, 0, 11, 3], device=DEV)
    pages = torch.tensor([2, 8, 0, 5], device=DEV)
    gather_pages(host, slots, dst, pages, block=8)
    want = torch.zeros_like(dst)
    want[pages] = host.index_select(0, slots.cpu()).to(DEV)
    assert torch.equal(dst, want)


def test_gather_pages_rejects_mismatched_pages():
    with pytest.raises(ValueError, match="page shapes differ"):
        gather_pages(torch.zeros(2, 4), torch.zeros(1, dtype=torch.long), torch.zeros(2, 5), torch.zeros(1, dtype=torch.long))


def test_tier_manager_zero_copy_checked_then_falls_back(monkeypatch):
    """The tier manager's zero-copy path checks its first gather against the host copy and turns itself
    off (staging copy) on any failure."""
    from tierserve.kv.tiers import zero_copy
    from tierserve.kv.tiers.manager import TierManager

    shape = (2, 2, 4, 2, 8)
    tm = TierManager(shape, torch.float32, "fp", host_pages=6)
    tm.host.data.copy_(torch.randn(6, *shape))
    kv = torch.zeros(5, *shape, device=DEV)
    slots, pids = torch.tensor([4, 1]), torch.tensor([3, 0], device=DEV)
    assert tm._gather_zero_copy(slots, pids, kv) and tm.zero_copy is True
    assert torch.equal(kv[pids].cpu(), tm.host.data[slots])
    tm.zero_copy = None
    monkeypatch.setattr(zero_copy, "gather_pages", lambda *a: None)        # a kernel that writes nothing
    kv.zero_()
    assert not tm._gather_zero_copy(slots, pids, kv) and tm.zero_copy is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the warm-up compiles the gather only for a CUDA pool")
def test_tier_manager_warm_up_compiles_and_checks_at_start():
    """The first CPU-RAM hit's one-time work (compile + check of the gather) is done when the tier manager is
    made; host slot 0 holds whatever pinned memory held (a NaN here), compared bit for bit."""
    from tierserve.kv.tiers import io
    from tierserve.kv.tiers.manager import TierManager

    shape = (2, 2, 4, 2, 8)
    orig = io.gather_zero_copy
    io.gather_zero_copy = lambda host, *a, **k: (host[0].view(-1).fill_(float("nan")), orig(host, *a, **k))[1]
    try:
        tm = TierManager(shape, torch.float32, "fp", host_pages=6, device=torch.device(DEV))
    finally:
        io.gather_zero_copy = orig
    assert tm.zero_copy is True
