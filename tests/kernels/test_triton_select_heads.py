"""The page scores with every KV head of a page in one program (attention/triton_select_heads.py) against the
one-program-per-head kernel (``triton_select._page_score_kernel``) and the PyTorch upper bounds, on random pages from
each source (pool rows, spilled pages' summaries, FP8 compact slots), with and without the two-level group maxima
(interpreter on the CPU, tiny sizes)."""
import pytest
import torch

from tierserve.attention.select import SparseConfig
from tierserve.attention.triton_select import page_scores
from tests.kernels.test_triton_select import CASES, DEV, make_case

pytest.importorskip("triton")


def _close(got, want):
    """Equal infinities, finite scores within fp32 summation-order rounding."""
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                             want[torch.isinf(want)])
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [0, 1, 2, 5])
@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("group", [0, 4])
def test_heads_kernel_matches_per_head_kernel(case, spill, group):
    B, hkv, grp, page, P, seq_lens, cfg = CASES[case]
    q, kv, meta = make_case(100 + case, B, hkv, grp, page, 16, P, N=max(P, 40), seq_lens=seq_lens, spill=spill)
    host = meta.host_summaries[:, 1] if spill else None
    want = page_scores(q, kv, meta.page_table, meta.seq_lens, page, cfg, host, group=group, heads=False)
    got = page_scores(q, kv, meta.page_table, meta.seq_lens, page, cfg, host, group=group, heads=True)
    for g_, w_ in zip(got if group else [got], want if group else [want], strict=True):
        assert g_.shape == w_.shape
        _close(g_, w_)
    assert torch.isfinite(want[0] if group else want).any()          # some pages competed


@pytest.mark.parametrize("spill", [False, True])
def test_heads_kernel_reads_fp8_compact_summaries(spill):
    from tierserve.quant.fp8_compact import new_compact_pool
    from tierserve.runner.kv_fp8 import Fp8Pages

    B, hkv, group, page, P, seq_lens, cfg = CASES[5]
    D, N, S = 16, 20, 20
    q, kv, meta = make_case(7, B, hkv, group, page, D, P, N=N, seq_lens=seq_lens)
    g = torch.Generator().manual_seed(8)
    pool = new_compact_pool(S, 2, page, hkv, D, 1, kv.dtype, "cpu")
    f = Fp8Pages(N, page, 0, 0, torch.device("cpu"), compact=pool)
    ck = torch.randn(S, page, hkv, D, generator=g)
    cmin, cmax = f.summary_views(1, kv)
    cmin.copy_(ck.amin(1))
    cmax.copy_(ck.amax(1))
    n_host = N if spill else 0
    table = torch.stack([torch.randperm(N + S + n_host, generator=g)[:P] for _ in range(B)]).to(DEV)
    host = None
    if spill:
        hk = torch.randn(n_host, page, hkv, D, generator=g)
        host = torch.zeros(n_host, 2, 1, hkv, D)
        host[:, 0, 0], host[:, 1, 0] = hk.amin(1), hk.amax(1)
        host = host.to(DEV)
    f.compact = pool.to(DEV)
    args = (q, kv, table, meta.seq_lens, page, cfg, host)
    kw = dict(host_base=f.end, compact=(*f.summary_views(1, kv), f.base))
    assert bool(((table >= N) & (table < N + S)).any())
    _close(page_scores(*args, **kw, heads=True), page_scores(*args, **kw, heads=False))


def test_heads_kernel_odd_head_dim_and_no_competition():
    """D not a power of two (masked lanes), and a context within the budget (every visible page kept: +inf)."""
    cfg = SparseConfig("pages", topk_tokens=24, sink_tokens=4, recent_tokens=4)
    q, kv, meta = make_case(3, 2, 4, 2, 4, 12, 16, N=40, seq_lens=[60, 20])
    want = page_scores(q, kv, meta.page_table, meta.seq_lens, 4, cfg, heads=False)
    got = page_scores(q, kv, meta.page_table, meta.seq_lens, 4, cfg, heads=True)
    _close(got, want)
    assert torch.isinf(want[1]).all() and torch.isfinite(want[0]).any()
