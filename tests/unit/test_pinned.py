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


class _FakeDriver:
    """Stands in for torch.cuda.cudart(): records unlocks, refuses them while ``refuse`` is set."""

    def __init__(self) -> None:
        self.unlocked: list[int] = []
        self.refuse = False

    def cudaHostUnregister(self, ptr: int) -> int:
        if self.refuse:
            return 900                            # cudaErrorStreamCaptureUnsupported
        self.unlocked.append(ptr)
        return 0


def test_unlock_refused_or_during_capture_keeps_the_memory_until_a_later_call(monkeypatch):
    """A buffer whose unlock cannot run now (a graph capture underway, or the driver refuses) stays alive in the
    deferred list -- freeing locked memory would make a later lock of the same addresses fail -- and is unlocked
    by the next PinnedBuffers call outside a capture."""
    from tierserve.memory import pinned

    drv, capturing = _FakeDriver(), [True]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: drv)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(pinned, "_DEFERRED", [])
    a, b = torch.empty(16, dtype=torch.uint8), torch.empty(16, dtype=torch.uint8)
    bufs = PinnedBuffers()
    bufs._locked += [a, b]
    bufs.close()                                   # during a capture: nothing unlocked, both kept
    assert drv.unlocked == [] and not bufs._locked and {t.data_ptr() for t in pinned._DEFERRED} == {
        a.data_ptr(), b.data_ptr()}
    capturing[0] = False
    drv.refuse = True
    pinned.retry_deferred()                        # the driver refuses: still kept
    assert drv.unlocked == [] and len(pinned._DEFERRED) == 2
    drv.refuse = False
    PinnedBuffers().close()                        # any later call outside a capture unlocks them
    assert sorted(drv.unlocked) == sorted([a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()])
    assert pinned._DEFERRED == []


def test_graph_capture_runs_with_garbage_collected_first_and_the_collector_off():
    import gc

    from tierserve.runner.cuda_graphs import collected_then_no_gc

    class Cycle:
        finalised = 0

        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            Cycle.finalised += 1

    assert gc.isenabled()
    Cycle()                                        # unreachable, only a collection frees it
    with collected_then_no_gc():
        assert Cycle.finalised == 1 and not gc.isenabled()
        for _ in range(5000):                      # well past the collector's thresholds: nothing collected
            Cycle()
        assert Cycle.finalised == 1
    assert gc.isenabled()
    gc.collect()
    assert Cycle.finalised == 5001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_buffers_dropped_during_a_capture_do_not_break_it_nor_a_later_lock():
    """The GPU regression of stop 23: an engine collected mid-capture unlocked its CPU tier inside the capture
    (invalidating it) and freed the still-locked memory; the next tier's lock of those addresses failed."""
    import gc

    from tierserve.memory import pinned

    bufs = PinnedBuffers()
    t = bufs.empty((3 << 20,), torch.uint8, "test buffer")
    ptr = t.untyped_storage().data_ptr()
    del t
    x = torch.ones(8, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * 2
        bufs.close()                               # as a finalizer would during a capture
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full((8,), 2.0, device="cuda"))
    assert [d.untyped_storage().data_ptr() for d in pinned._DEFERRED] == [ptr]
    del bufs
    gc.collect()
    again = PinnedBuffers()                        # unlocks the deferred buffer first
    u = again.empty((3 << 20,), torch.uint8, "test buffer")
    assert u.is_pinned() and pinned._DEFERRED == []
    again.close()
