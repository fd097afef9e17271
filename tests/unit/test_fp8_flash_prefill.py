"""FP8 KV prefill through flash attention over gathered readings (attention/fp8_flash_prefill.py) vs the torch
reference (TorchRefBackend reading the FP8 storage under the page-level read rule), on fresh random inputs: pages
stored in place, in compact slots and as staged host rows, pages still at full precision, query slices before,
across and after the sink and the keep_recent edge, GQA. On the CPU the flash calls run their plain-PyTorch path."""
import pytest
import torch

from tests.helpers.fp8_chunk import DEV, fp8_chunk_case
from tierserve.attention.fp8_flash_prefill import fp8_chunk_attention, page_readings
from tierserve.quant.fp8_kv import fake_quant

CASES = [  # hq, hkv, page, D, seq_len, chunk, keep_sink, keep_recent, slice rows
    (8, 2, 4, 16, 70, 40, 5, 7, 8),          # continued chunk: sink not a page multiple, slices across the edge
    (4, 2, 8, 16, 61, 61, 0, 0, 16),         # fresh chunk, no sink / recent: FP8 once a page is complete
    (4, 1, 8, 32, 90, 25, 16, 1, 7),         # slices not page-aligned
    (6, 3, 4, 16, 33, 12, 40, 3, 5),         # the sink past the chunk: nothing FP8
    (4, 2, 4, 16, 66, 30, 3, 100, 64),       # keep_recent covers everything
]


def _setup(hq, hkv, ps, D, n, k, sink, recent, dtype, compact_slots=0, seed=0):
    return fp8_chunk_case(hq, hkv, ps, D, n, k, sink, recent, dtype, compact_slots, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_flash_prefill_matches_reference(dtype, case):
    hq, hkv, ps, D, n, k, sink, recent, rows = CASES[case]
    for compact in (0, 3):
        data, table, fp8, q, want = _setup(hq, hkv, ps, D, n, k, sink, recent, dtype, compact, seed=case)
        got = fp8_chunk_attention(q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, sink, recent,
                                  compact=fp8.kernel_pool(0), slice_rows=rows)
        tol = 2e-5 if dtype == torch.float32 else 2e-2 * float(want.abs().max())
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol if dtype == torch.float32 else 2e-2)


def test_fp8_reads_happen_and_slices_do_not_matter():
    hq, hkv, ps, D, n, k, sink, recent, _ = CASES[0]
    data, table, fp8, q, want = _setup(hq, hkv, ps, D, n, k, sink, recent, torch.float32, 3, seed=7)
    one = fp8_chunk_attention(q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, sink, recent,
                              compact=fp8.kernel_pool(0), slice_rows=k)
    many = fp8_chunk_attention(q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, sink, recent,
                               compact=fp8.kernel_pool(0), slice_rows=3)
    torch.testing.assert_close(one, many, atol=2e-6, rtol=2e-6)
    fp8.keep_recent = 1 << 20                 # nothing FP8 (the stored pages then give their FP8 values anyway)
    full = fp8_chunk_attention(q, data[:, 0], torch.zeros_like(fp8.quantised), table.clamp(max=data.shape[0] - 1),
                               n - k, D ** -0.5, ps, 0, 1 << 20)
    assert (full - one).abs().max() > 1e-3


def test_host_rows_read_like_compact_slots():
    """A staged host row (ids from the first host id) gives the readings of the same row in a compact slot."""
    hq, hkv, ps, D, n, k, sink, recent, rows = CASES[2]
    data, table, fp8, q, want = _setup(hq, hkv, ps, D, n, k, sink, recent, torch.float32, 3, seed=3)
    pool, base = fp8.kernel_pool(0)
    comp = table >= base
    assert bool(comp.any())
    staged = pool[(table[comp] - base)]                    # the rows in table order, as a step stages them
    hbase = fp8.end
    t2 = table.clone()
    t2[comp] = hbase + torch.arange(int(comp.sum()), device=DEV)
    got = fp8_chunk_attention(q, data[:, 0], fp8.quantised, t2, n - k, D ** -0.5, ps, sink, recent,
                              compact=(pool, base), host=(staged, hbase), slice_rows=rows)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_page_readings_zero_the_unwritten_rows_and_quantise_fresh_pages():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(4, 2, 5, 2, 8, generator=g) * 3          # [N, 2, rows (page 4 + summary), H, D]
    data[2, :, 3] = float("nan")                                 # the last page's unwritten row
    ids = torch.tensor([1, 2])
    flags = torch.zeros(4, dtype=torch.bool)
    fp8, full = (page_readings(data, flags, ids, 7, 4, f) for f in (True, False))
    assert torch.equal(full[0], data[1, :, :4]) and bool((full[1, :, 3] == 0).all())
    want = data[1:3, :, :4].clone()
    want[1, :, 3] = 0
    assert torch.equal(fp8, fake_quant(want, 4))


def test_first_step_check_turns_the_path_off_on_a_difference(monkeypatch, caplog):
    import tierserve.attention.fp8_flash_prefill as ff
    monkeypatch.setattr(ff, "ENABLED", True)
    monkeypatch.setattr(ff, "CHECKED", False)
    a = torch.randn(10, 4, 8)
    ff.check_once(a + 1e-3, a, [(0, 4), (4, 10)])
    assert ff.CHECKED and ff.ENABLED
    b = a.clone()
    b[6, 1, 2] += 1.0
    monkeypatch.setattr(ff, "CHECKED", False)
    ff.check_once(b, a, [(0, 4), (4, 10)])
    assert ff.CHECKED and not ff.ENABLED and "differs" in caplog.text
