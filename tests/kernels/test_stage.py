"""Staging spilled pages for prefill steps (attention/triton_stage.py) vs indexing the store directly.

Runs on the GPU when there is one (the store pinned), else on the CPU under TRITON_INTERPRET=1."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.attention.triton_stage import remap_host_entries, stage_layer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_and_remap_read_what_the_table_means(dtype):
    g = torch.Generator().manual_seed(0)
    S, L, rows, page, H, D, n_dev = 12, 3, 5, 4, 2, 8, 10
    store = torch.randn(S, L, 2, rows, H, D, generator=g).to(dtype)
    if DEV == "cuda":
        store = store.pin_memory()
    device_kv = torch.randn(n_dev, 2, rows, H, D, generator=g).to(DEV, dtype)
    table = torch.tensor([[0, 13, 3, 10, 13, 21], [21, 4, 15, 2, 10, 9]], device=DEV)   # >= 10: host slot id - 10
    slots, remapped = remap_host_entries(table, n_dev)
    assert slots.tolist() == [0, 3, 5, 11]
    layer = 1
    staged = stage_layer(store[:, layer], slots, page)
    assert staged.shape == (4, 2, page, H, D)
    # every remapped entry reads the page its original entry meant
    for b in range(table.shape[0]):
        for i, pid in enumerate(table[b].tolist()):
            new = int(remapped[b, i])
            want = store[pid - n_dev, layer, :, :page].to(DEV) if pid >= n_dev else device_kv[pid, :, :page]
            got = staged[new - n_dev] if new >= n_dev else device_kv[new, :, :page]
            assert (new >= n_dev) == (pid >= n_dev) and torch.equal(got, want)


def test_remap_without_host_entries():
    table = torch.tensor([[0, 1, 2]], device=DEV)
    slots, remapped = remap_host_entries(table, 5)
    assert slots.numel() == 0 and torch.equal(remapped, table)
    assert stage_layer(torch.zeros(3, 2, 5, 2, 8), slots, 4).shape[0] == 0
