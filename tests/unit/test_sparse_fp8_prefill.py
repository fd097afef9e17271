"""Sparse prefill over FP8 KV pages through flash (attention/sparse_fp8_prefill.py) vs the torch reference
(TorchRefBackend applying the sparse prefill rule and the FP8 read rule), on fresh random inputs: pages in place and
in compact slots, some still at full precision, chunks starting inside a page, blocks whose chosen pages straddle
the FP8 recent edge (masked) and blocks that do not (flash), GQA. On the CPU the flash calls run their plain path."""
import pytest
import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.attention.select import SparseConfig
from tierserve.attention.sparse_fp8_prefill import page_summaries, sparse_fp8_chunk_attention
from tierserve.attention.sparse_prefill import sparse_context
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.quant.fp8_compact import new_compact_pool, store_compact_
from tierserve.quant.fp8_kv import quantise_pages_
from tierserve.runner.kv_fp8 import Fp8Pages

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # hq, hkv, page, D, seq_len, chunk, keep_sink, keep_recent, topk tokens, sparse sink, sparse recent
    (8, 2, 4, 16, 400, 150, 5, 20, 24, 4, 8),     # chunk inside a page; block 0 straddles the FP8 recent edge
    (4, 1, 8, 16, 520, 130, 16, 1, 64, 8, 16),   # keep_recent 1: every block uniform
    (6, 3, 4, 32, 400, 200, 0, 70, 40, 4, 12),   # no sink; FP8 window past the selection's recent pages
]


def _setup(case, dtype, compact_slots, seed):
    hq, hkv, ps, D, n, k, sink, recent, topk, s_sink, s_recent = CASES[case]
    g = torch.Generator().manual_seed(seed)
    pages = -(-n // ps)
    N = pages + 6
    mag = torch.exp2(torch.randint(-3, 4, (N, 1, 2, 1, hkv, 1), generator=g).float())
    data = torch.randn(N, 1, 2, ps + 1, hkv, D, generator=g) * mag
    lo, hi = data[:, :, 0, :ps].amin(2), data[:, :, 0, :ps].amax(2)      # the key min / max summary rows
    data[:, :, 0, ps], data[:, :, 1, ps] = lo, hi
    data = data.to(DEV, dtype)
    table = torch.randperm(N, generator=g)[:pages + 1].to(DEV)
    pool = new_compact_pool(compact_slots, 1, ps, hkv, D, 1, dtype, DEV) if compact_slots else None
    fp8 = Fp8Pages(N, ps, sink, recent, DEV, compact=pool)
    pol = Fp8PagePolicy(ps, sink, recent)
    ok = [i for i in range(-(-(n - k) // ps)) if i * ps >= sink and not pol.needs_full(i, n - k)
          and (i + 1) * ps <= n - k]
    stored = [i for j, i in enumerate(ok) if j % 5 != 1]             # some pages stay at full precision
    slot = 0
    for j, i in enumerate(stored):
        if pool is not None and j % 2 == 0 and slot < compact_slots:
            store_compact_(data, pool, table[i:i + 1], torch.tensor([slot], device=DEV), ps)
            table[i] = N + slot
            slot += 1
        else:
            quantise_pages_(data, table[i:i + 1], ps)
            fp8.quantised[table[i]] = True
    q = torch.randn(k, hq, D, generator=g).to(DEV, dtype)
    cfg = SparseConfig("pages", topk, s_sink, s_recent)
    pos = torch.arange(n - k, n, device=DEV)
    z = torch.zeros(k, dtype=torch.long, device=DEV)
    meta = AttnMetadata(num_seqs=1, num_tokens=k, page_size=ps, positions=pos, slot_pages=z, slot_offsets=z,
                        query_start_loc=torch.tensor([0, k], device=DEV), seq_lens=torch.tensor([n], device=DEV),
                        page_table=table[None], query_lens_cpu=[k], seq_lens_cpu=[n], kv_fp8=fp8, sparse=cfg)
    want = TorchRefBackend().forward(q, None, None, data[:, 0], meta, D ** -0.5, None, 0, kv_written=True)
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
    torch.testing.assert_close(sfp.sparse_fp8_chunk_attention(*args), one, atol=1e-6, rtol=1e-6)


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
