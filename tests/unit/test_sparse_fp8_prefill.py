"""Sparse prefill over FP8 KV pages through flash (attention/sparse_fp8_prefill.py) vs the torch reference
(TorchRefBackend applying the sparse prefill rule and the FP8 read rule), on fresh random inputs: pages in place and
in compact slots, some still at full precision, chunks starting inside a page, blocks whose chosen pages straddle
the FP8 recent edge (masked) and blocks that do not (flash), GQA. On the CPU the flash calls run their plain path."""
import pytest
import torch

from tests.helpers.fp8_chunk import fp8_chunk_case
from tierserve.attention.backend import AttnMetadata
from tierserve.attention.select import SparseConfig
from tierserve.attention.sparse_fp8_prefill import (
    page_summaries,
    sparse_fp8_chunk_attention,
)
from tierserve.attention.sparse_prefill import sparse_context

CASES = [  # hq, hkv, page, D, seq_len, chunk, keep_sink, keep_recent, topk tokens, sparse sink, sparse recent
    (8, 2, 4, 16, 400, 150, 5, 20, 24, 4, 8),     # chunk inside a page; block 0 straddles the FP8 recent edge
    (4, 1, 8, 16, 520, 130, 16, 1, 64, 8, 16),   # keep_recent 1: every block uniform
    (6, 3, 4, 32, 400, 200, 0, 70, 40, 4, 12),   # no sink; FP8 window past the selection's recent pages
]


def _setup(case, dtype, compact_slots, seed):
    hq, hkv, ps, D, n, k, sink, recent, topk, s_sink, s_recent = CASES[case]
    cfg = SparseConfig("pages", topk, s_sink, s_recent)
    data, table, fp8, q, want = fp8_chunk_case(hq, hkv, ps, D, n, k, sink, recent, dtype, compact_slots, seed,
                                               sparse=cfg, full_every=5)
    return data, table, fp8, q, cfg, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sparse_fp8_prefill_matches_reference(case, dtype, monkeypatch):
    import tierserve.attention.sparse_fp8_prefill as sfp
    hq, hkv, ps, D, n, k, sink, recent, *_ = CASES[case]
    calls = {"flash": 0, "masked": 0}
    for name, key in (("attend_lse", "flash"), ("_masked_lse", "masked")):
        real = getattr(sfp, name)
        monkeypatch.setattr(sfp, name, lambda *a, _r=real, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1)
                            or _r(*a, **kw))
    for compact in (0, 40):
        data, table, fp8, q, cfg, want = _setup(case, dtype, compact, seed=case + compact)
        assert sparse_context(n - k, ps, cfg)
        got = sparse_fp8_chunk_attention(q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, cfg, sink,
                                         recent, compact=fp8.kernel_pool(0), slice_rows=48)
        tol = 2e-5 if dtype == torch.float32 else 2e-2 * float(want.abs().max())
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol if dtype == torch.float32 else 2e-2)
    assert calls["flash"] > 0                         # the blocks read alike by all their rows
    assert (calls["masked"] > 0) == (case != 1)       # case 1 (keep_recent 1): no chosen page straddles the edge


def test_blocks_in_groups_give_the_same_rows(monkeypatch):
    import tierserve.attention.sparse_fp8_prefill as sfp
    hq, hkv, ps, D, n, k, sink, recent, *_ = CASES[1]
    data, table, fp8, q, cfg, want = _setup(1, torch.float32, 0, seed=5)
    args = (q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, cfg, sink, recent)
    one = sfp.sparse_fp8_chunk_attention(*args)
    monkeypatch.setattr(sfp, "_GATHER_BYTES", 1)             # one block a flash call
    # the same rows; on CUDA fp32 batched matmuls of other shapes sum in another order (1.2e-5 on the H200)
    tol = 1e-6 if q.device.type == "cpu" else 1e-4
    torch.testing.assert_close(sfp.sparse_fp8_chunk_attention(*args), one, atol=tol, rtol=tol)


def test_sparse_differs_from_dense_and_the_summaries_come_from_every_storage():
    from tierserve.attention.fp8_flash_prefill import fp8_chunk_attention
    hq, hkv, ps, D, n, k, sink, recent, *_ = CASES[0]
    data, table, fp8, q, cfg, want = _setup(0, torch.float32, 40, seed=3)
    dense = fp8_chunk_attention(q, data[:, 0], fp8.quantised, table, n - k, D ** -0.5, ps, sink, recent,
                                compact=fp8.kernel_pool(0))
    assert (dense - want).abs().max() > 1e-3              # the selection changes the result
    ids = table[:(n - k) // ps]
    kmin, kmax = page_summaries(data[:, 0], ids, ps, compact=fp8.kernel_pool(0))
    gathered = fp8.gather(data[:, 0], AttnMetadata(num_seqs=1, num_tokens=1, page_size=ps, positions=None,
                                                   slot_pages=None, slot_offsets=None, query_start_loc=None,
                                                   seq_lens=None, page_table=ids[None]), 0)
    assert bool((ids >= fp8.base).any()) and bool((ids < fp8.base).any())
    assert torch.equal(kmin, gathered[:, 0, ps]) and torch.equal(kmax, gathered[:, 1, ps])
