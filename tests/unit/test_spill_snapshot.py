"""Selection counts read from a host snapshot (runner/spill_state.py ``snapshot`` / ``frozen``): what the KV
manager places pages by inside a queue of multi-step windows, with no host sync."""
import torch

from tierserve.memory.pinned import ids_to
from tierserve.runner.spill_state import SpillState


def _state(pages=12, slots=40):
    return SpillState([], slots, pages, 0, 4, torch.device("cpu"), torch.float32, count_heat=True)


def test_frozen_reads_the_snapshot_not_later_counts():
    st = _state()
    g = torch.Generator().manual_seed(0)
    st.page_heat.copy_(torch.randint(0, 9, st.page_heat.shape, generator=g).float())
    st.host_heat.copy_(torch.randint(0, 9, st.host_heat.shape, generator=g).float())
    assert not st.has_snapshot
    st.snapshot()
    page0, host0 = st.page_heat.clone(), st.host_heat.clone()
    st.page_heat += 5                                 # work queued after the snapshot
    st.host_heat[3] = 100
    with st.frozen():
        assert st.page_heat_of([0, 5, 11]) == page0[[0, 5, 11]].tolist()
        assert st.slot_heat_of([3, 7]) == host0[[3, 7]].tolist()
        slots, heat = st.top_slots(6)
    assert heat == sorted(heat, reverse=True)
    assert heat == torch.topk(host0, 6).values.tolist()
    assert all(host0[s] == h for s, h in zip(slots, heat))
    assert st.slot_heat_of([3]) == [100.0]            # outside: the live counts again


def test_frozen_top_slots_all_and_ties():
    st = _state(slots=5)
    st.host_heat.copy_(torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]))
    st.snapshot()
    with st.frozen():
        slots, heat = st.top_slots(10)                  # more than there are: every slot, highest first
        assert heat == [3.0, 3.0, 2.0, 1.0, 0.0] and sorted(slots[:2]) == [1, 2] and slots[2:] == [4, 0, 3]
        assert st.top_slots(1)[1] == [3.0]


def test_ids_to():
    assert ids_to([3, 1, 2], torch.device("cpu")).tolist() == [3, 1, 2]
    t = ids_to(torch.tensor([1, 2], dtype=torch.int32), torch.device("cpu"))
    assert t.dtype == torch.int64
