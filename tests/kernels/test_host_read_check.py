"""The one-off reference check of the decode paths that read spilled KV pages from CPU RAM
(``TritonBackend._check``) recomputes only a few rows over the table columns they use: a CUDA-graph warm-up step
is the largest bucket (max_num_seqs rows) over max_model_len, whose full reference (every (row, column) page
gathered, twice in fp32 with FP8 pages) needed 68 + 128 GiB at 128k and turned the fast path off. It still
catches a wrong read. GPU when there is one, else the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import tierserve.attention.triton_fp8_steps as tb  # noqa: E402
from tests.kernels.test_triton_fp8_compact import _both, _meta, _setup  # noqa: E402
from tests.kernels.test_triton_fp8_tiers import _spill  # noqa: E402
from tierserve.attention.triton_backend import TritonBackend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, PS, D, LENS, SINK, RECENT = 4, 2, 16, 16, [9, 40, 100], 4, 16
PAD, WIDTH = 13, 40          # padding rows (a graph bucket's) and table columns (max_model_len's pages)


def _bucket_step(real_rows: bool):
    """A pure decode step shaped like a CUDA-graph warm-up: the real rows (pages spilled to CPU RAM) or none,
    then padding rows at position 0 on one page, every table ``WIDTH`` columns wide."""
    data, table, pick = _setup(torch.float32, HKV, PS, D, LENS, SINK, RECENT, [1] * len(LENS), seed=7)
    f, dat, tab = _both(data, table, pick, PS, SINK, RECENT)[0]
    ids = sorted({int(x) for x in tab.flatten().tolist()} & set(f.quantised.nonzero().flatten().tolist()))[::2]
    store, tab_h, dat_h = _spill(f, dat, tab, ids)
    lens = (LENS if real_rows else []) + [1] * PAD
    wide = torch.zeros(len(lens), WIDTH, dtype=torch.int64, device=DEV)
    if real_rows:
        wide[:len(LENS), :tab_h.shape[1]] = tab_h
    meta, _ = _meta(lens, [1] * len(lens), PS, wide, f, True)
    meta.host_kv, meta.host_ram_only = [(0, store)], True
    q = torch.randn(len(lens), HQ, D, generator=torch.Generator().manual_seed(3)).to(DEV)
    kv = torch.zeros(len(lens), HKV, D, device=DEV)
    return q, kv, dat_h[:, 1], meta


@pytest.mark.parametrize("real_rows", [True, False])
def test_check_recomputes_few_rows_over_their_columns(real_rows):
    q, kv, kv_layer, meta = _bucket_step(real_rows)
    backend = TritonBackend()
    seen, real = [], backend._ref.forward

    def spy(q_, k_, v_, kv_, m, *a, **kw):
        seen.append((m.num_seqs, tuple(m.page_table.shape)))
        return real(q_, k_, v_, kv_, m, *a, **kw)
    backend._ref.forward = spy
    out = backend.forward(q, kv, kv, kv_layer, meta, D ** -0.5, None, 1, kv_written=True)
    assert backend.fp8_host_reads is True
    in_use = torch.arange(WIDTH, device=DEV)[None, :] * PS < meta.seq_lens[:, None]
    spilled = ((meta.page_table >= meta.kv_fp8.end) & in_use).any(1).nonzero().flatten().tolist()
    assert spilled == ([2] if real_rows else [])      # (row 0's table has spilled ids past its length)
    # 2 rows: those reading spilled pages first, then the shortest; columns up to the longest of them
    assert seen == ([(2, (2, -(-100 // PS)))] if real_rows else [(2, (2, 1))])
    want = real(q, kv, kv, kv_layer, meta, D ** -0.5, None, 1, kv_written=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_check_still_catches_a_wrong_read(monkeypatch):
    q, kv, kv_layer, meta = _bucket_step(True)
    real = tb.paged_decode_fp8

    def wrong(*a, **kw):                     # a wrong read of the spilled pages: rows that read them differ
        out = real(*a, **kw).clone()
        out[:len(LENS)] += 1.0
        return out
    monkeypatch.setattr(tb, "paged_decode_fp8", wrong)
    backend = TritonBackend()
    out = backend.forward(q, kv, kv, kv_layer, meta, D ** -0.5, None, 1, kv_written=True)
    assert backend.fp8_host_reads is False            # gathering instead: the reference's output
    want = backend._ref.forward(q, kv, kv, kv_layer, meta, D ** -0.5, None, 1, kv_written=True)
    torch.testing.assert_close(out, want)
