"""Zero-copy Triton row gather vs index_select (GPU when present, else TRITON_INTERPRET=1 on the CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.memory.engram_triton import gather_rows_ref, gather_rows_zero_copy

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,width", [(torch.float32, 8), (torch.bfloat16, 64), (torch.bfloat16, 3),
                                         (torch.uint8, 2), (torch.uint8, 5)])
def test_zero_copy_gather_bit_identical(dtype, width):
    g = torch.Generator().manual_seed(width)
    pin = torch.cuda.is_available()
    if dtype == torch.uint8:
        table = torch.randint(0, 256, (97, width), generator=g, dtype=torch.uint8)
    else:
        table = torch.randn(97, width, generator=g).to(dtype)
    table = table.pin_memory() if pin else table            # host rows, read from the device
    ids = torch.randint(0, 97, (70,), generator=g)
    ids[:3] = torch.tensor([0, 96, 0])
    out = gather_rows_zero_copy(table, ids.to(DEV))
    assert out.device.type == torch.device(DEV).type
    assert torch.equal(out.cpu().view(torch.uint8), gather_rows_ref(table, ids).view(torch.uint8))
    assert gather_rows_zero_copy(table, ids[:0].to(DEV)).shape == (0, width)
