"""Exact-size page-locked host buffers (memory/pinned.py): the CPU KV tier and Engram host tables."""
import pytest
import torch

from tierserve.memory.pinned import PinnedBuffers


def test_cpu_only_buffers_are_plain_tensors():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    bufs = PinnedBuffers()
    t = bufs.empty((3, 5), torch.bfloat16, "test buffer")
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    bufs.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_cuda_buffers_are_locked_at_their_size_and_unlocked_on_close():
    bufs = PinnedBuffers()
    n = 3 * 2**20 + 12345                         # not a power of two
    t = bufs.empty((n,), torch.uint8, "test buffer")
    assert t.is_pinned() and t.numel() == n
    # a view past the first byte counts as pinned too: torch asks about the storage, which starts before the
    # 2 MiB-aligned tensor (copies inside CUDA graph captures need that)
    assert t[12345:].is_pinned() and t.view(-1)[7:].is_pinned()
    t.copy_(torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8))
    d = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t)
    bufs.close()
    assert not t.is_pinned()


def test_aligned_empty_starts_on_the_boundary_and_has_the_shape():
    from tierserve.memory.pinned import ALIGN, aligned_empty

    for shape, dtype in (((3, 5, 7), torch.bfloat16), ((1000, 3), torch.float32), ((0, 4), torch.uint8)):
        t = aligned_empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        if t.numel():
            assert t.data_ptr() % ALIGN == 0
            t.fill_(1)
            assert float(t.float().sum()) == t.numel()
