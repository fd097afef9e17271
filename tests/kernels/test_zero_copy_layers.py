"""Zero-copy gather of one layer of each page (the overlapped hit loads, kv/tiers/overlap.py) vs indexing."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tierserve.kv.tiers.zero_copy import gather_pages  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_one_layer_matches_indexing(dtype):
    shape = (3, 2, 4, 2, 8)                               # [layers, K/V, rows, heads, dim]
    g = torch.Generator().manual_seed(1)
    host = (torch.randn(10, *shape, generator=g) * 50).to(dtype)
    if DEV == "cuda":
        host = host.pin_memory()
    dst = torch.zeros(7, *shape, dtype=dtype, device=DEV)
    slots, pages = torch.tensor([4, 9, 0], device=DEV), torch.tensor([6, 1, 3], device=DEV)
    want = torch.zeros_like(dst)
    for layer in (1, 0, 2):
        gather_pages(host, slots, dst, pages, block=16, layer=layer)
        want[pages, layer] = host[slots.cpu(), layer].to(DEV)
        assert torch.equal(dst, want)                    # that layer only: the others untouched


def test_gather_rejects_a_missing_layer():
    host, dst = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    idx = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="layer 3"):
        gather_pages(host, idx, dst, idx, layer=3)
