"""Fused sparse page selection (attention/triton_select.py, triton_select_topk.py) vs the PyTorch chain it replaces
(select.page_upper_bounds -> select.select_pages -> compact_selection, count_selection), on random pages
(interpreter on the CPU, tiny sizes)."""
import pytest
import torch

from tierserve.attention.backend import AttnMetadata
from tierserve.attention.select import SparseConfig, page_upper_bounds, selection_bound
from tierserve.attention.triton_backend import _select_pages
from tierserve.attention.triton_decode import paged_decode
from tierserve.attention.triton_select import page_scores
from tierserve.attention.triton_select_topk import topk_compact

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(seed, B, hkv, group, page, D, P, N, seq_lens, spill=False, heat=False, dtype=torch.float32):
    """A random layer [N, 2, page + 1, Hkv, D] (keys, values, min / max summary row), page tables of distinct
    ids, optionally with some entries spilled (ids >= N, summaries in host_summaries), and the metadata."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(N, 2, page + 1, hkv, D, generator=g).to(dtype)
    keys = kv[:, 0, :page].float()
    kv[:, 0, page], kv[:, 1, page] = keys.amin(1).to(dtype), keys.amax(1).to(dtype)
    n_host = N if spill else 0
    table = torch.stack([torch.randperm(N + n_host, generator=g)[:P] for _ in range(B)])
    if not spill:
        table %= N
    host_summ = None
    if spill:       # [slots, L=2, 2, rows=1, Hkv, D]; this test's layer is 1
        hk = torch.randn(n_host, page, hkv, D, generator=g)
        host_summ = torch.zeros(n_host, 2, 2, 1, hkv, D, dtype=dtype)
        host_summ[:, 1, 0, 0], host_summ[:, 1, 1, 0] = hk.amin(1).to(dtype), hk.amax(1).to(dtype)
    q = torch.randn(B, hkv * group, D, generator=g).to(dtype)
    seq = torch.tensor(seq_lens)
    meta = AttnMetadata(num_seqs=B, num_tokens=B, page_size=page, positions=seq - 1, slot_pages=table[:, 0],
                        slot_offsets=seq * 0, query_start_loc=torch.arange(B + 1), seq_lens=seq, page_table=table,
                        decode_only=True, host_summaries=host_summ,
                        host_kv=[(0, torch.zeros(1))] if spill else None,
                        page_heat=torch.zeros(N) if heat else None,
                        host_heat=torch.zeros(n_host) if heat and spill else None)
    for name in ("positions", "slot_pages", "slot_offsets", "query_start_loc", "seq_lens", "page_table",
                 "host_summaries", "page_heat", "host_heat"):
        if getattr(meta, name) is not None:
            setattr(meta, name, getattr(meta, name).to(DEV))
    return q.to(DEV), kv.to(DEV), meta


def run_both(monkeypatch, q, kv, meta, cfg, layer=1):
    meta.sparse = cfg
    monkeypatch.setenv("TIERSERVE_SPARSE_SELECT", "torch")
    heat = [t.clone() if t is not None else None for t in (meta.page_heat, meta.host_heat)]
    want = _select_pages(q, kv, meta, layer, logical=True)
    want_heat = [t.clone() if t is not None else None for t in (meta.page_heat, meta.host_heat)]
    meta.page_heat, meta.host_heat = heat
    monkeypatch.delenv("TIERSERVE_SPARSE_SELECT")
    got = _select_pages(q, kv, meta, layer, logical=True)
    return want, got, want_heat, [meta.page_heat, meta.host_heat]


def assert_same_selection(want, got, scores, meta):
    """Equal index sets, except where reference scores tie (or differ by rounding) at the cut."""
    (wt, wl, wn), (gt, gl, gn) = want, got
    if torch.equal(wl, gl):
        torch.testing.assert_close(gt, wt, rtol=0, atol=0)
        torch.testing.assert_close(gn, wn, rtol=0, atol=0)
        return
    B, H, K = wl.shape
    torch.testing.assert_close(gn, wn, rtol=0, atol=0)        # same counts
    for b in range(B):
        for h in range(H):
            n = (int(wn[b, h]) - 1) // meta.page_size + 1
            a, c = set(wl[b, h, :n].tolist()), set(gl[b, h, :n].tolist())
            if a == c:
                continue
            s = scores[b, h]
            cut = min(float(s[list(a & c)].min()), 1e30) if a & c else 0.0
            for p in a ^ c:         # a page in only one of them scored (within rounding) at the cut
                assert abs(float(s[p]) - cut) <= 1e-4 * max(1.0, abs(cut)), (b, h, p, float(s[p]), cut)


CASES = [  # (B, hkv, group, page, P, seq_lens, cfg)
    (1, 2, 4, 4, 24, [93], SparseConfig("pages", topk_tokens=32, sink_tokens=4, recent_tokens=8)),
    (3, 2, 1, 8, 20, [150, 77, 9], SparseConfig("pages", topk_tokens=48, sink_tokens=8, recent_tokens=8)),
    (2, 1, 4, 4, 33, [130, 3], SparseConfig("pages", topk_tokens=20, sink_tokens=4, recent_tokens=4)),
    (4, 2, 4, 8, 16, [30, 127, 64, 65], SparseConfig("pages", topk_tokens=64, sink_tokens=16, recent_tokens=16)),
    (2, 2, 2, 4, 12, [40, 47], SparseConfig("pages", topk_tokens=64, sink_tokens=4, recent_tokens=4)),   # dense
    (2, 2, 4, 8, 18, [141, 100], SparseConfig("pages", topk_tokens=30, sink_tokens=5, recent_tokens=11)),
    # the midpoint-weighted page score (``page_spread`` < 1)
    (2, 2, 4, 8, 18, [141, 100], SparseConfig("pages", topk_tokens=30, sink_tokens=5, recent_tokens=11,
                                              page_spread=0.5)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("spill,topk", [(False, "search"), (True, "search"), (False, "two-level"),
                                        (True, "two-level")])
def test_fused_selection_matches_torch_chain(monkeypatch, case, spill, topk):
    from tierserve.attention import triton_select_topk
    monkeypatch.setattr(triton_select_topk, "DEFAULT_METHOD", topk)
    B, hkv, group, page, P, seq_lens, cfg = CASES[case]
    D = 16
    q, kv, meta = make_case(case, B, hkv, group, page, D, P, N=max(P, 40), seq_lens=seq_lens, spill=spill,
                            heat=True)
    want, got, want_heat, got_heat = run_both(monkeypatch, q, kv, meta, cfg)
    K = min(P, selection_bound(cfg, page))
    assert got[0].shape == (B, hkv, K) and got[0].dtype == want[0].dtype and got[2].dtype == want[2].dtype
    scores = page_scores(q, kv, meta.page_table, meta.seq_lens, page, cfg,
                         meta.host_summaries[:, 1] if spill else None)
    assert_same_selection(want, got, scores, meta)
    if torch.equal(want[1], got[1]):
        for w, g in zip(want_heat, got_heat, strict=True):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    else:
        assert float(got_heat[0].sum()) + float(got_heat[1].sum() if spill else 0) == float(want_heat[0].sum()) + \
            float(want_heat[1].sum() if spill else 0)


@pytest.mark.parametrize("case", [0, 1, 3, 5])
@pytest.mark.parametrize("spill,topk", [(False, "search"), (True, "search"), (True, "two-level")])
def test_fused_selection_reads_fp8_compact_summaries(monkeypatch, case, spill, topk):
    """FP8 KV in compact storage: page ids [N, N + S) are compact slots whose rows carry the key min / max
    (read in place through ``Fp8Pages.summary_views``), spilled pages start at ``Fp8Pages.end``."""
    from tierserve.attention import triton_select_topk
    monkeypatch.setattr(triton_select_topk, "DEFAULT_METHOD", topk)
    from tierserve.quant.fp8_compact import new_compact_pool
    from tierserve.runner.kv_fp8 import Fp8Pages

    B, hkv, group, page, P, seq_lens, cfg = CASES[case]
    D, N, S = 16, max(P, 40) // 2, max(P, 40) // 2
    q, kv, meta = make_case(50 + case, B, hkv, group, page, D, P, N=N, seq_lens=seq_lens, heat=True)
    g = torch.Generator().manual_seed(70 + case)
    pool = new_compact_pool(S, 2, page, hkv, D, 1, kv.dtype, "cpu")
    pool.copy_(torch.randint(0, 256, pool.shape, generator=g, dtype=torch.uint8))    # codes: never read here
    f = Fp8Pages(N, page, 0, 0, torch.device("cpu"), compact=pool)
    ck = torch.randn(S, page, hkv, D, generator=g).to(kv.dtype).float()
    cmin, cmax = f.summary_views(1, kv)
    cmin.copy_(ck.amin(1).to(kv.dtype))
    cmax.copy_(ck.amax(1).to(kv.dtype))
    n_host = N if spill else 0
    meta.page_table = torch.stack([torch.randperm(N + S + n_host, generator=g)[:P] for _ in range(B)]).to(DEV)
    if spill:
        hk = torch.randn(n_host, page, hkv, D, generator=g)
        hs = torch.zeros(n_host, 2, 2, 1, hkv, D, dtype=kv.dtype)
        hs[:, 1, 0, 0], hs[:, 1, 1, 0] = hk.amin(1).to(kv.dtype), hk.amax(1).to(kv.dtype)
        meta.host_summaries, meta.host_kv, meta.host_heat = hs.to(DEV), [(0, torch.zeros(1))], torch.zeros(n_host).to(DEV)
    f.compact, f.quantised = pool.to(DEV), f.quantised.to(DEV)
    meta.kv_fp8 = f
    want, got, want_heat, got_heat = run_both(monkeypatch, q, kv, meta, cfg)
    scores = page_scores(q, kv, meta.page_table, meta.seq_lens, page, cfg,
                         meta.host_summaries[:, 1] if spill else None, host_base=f.end,
                         compact=(*f.summary_views(1, kv), f.base))
    ids = meta.page_table
    assert bool(((ids >= N) & (ids < N + S)).any())
    assert_same_selection(want, got, scores, meta)
    if torch.equal(want[1], got[1]):
        for w, g_ in zip(want_heat, got_heat, strict=True):
            if w is not None:
                torch.testing.assert_close(g_, w, rtol=0, atol=0)


@pytest.mark.parametrize("spread", [1.0, 0.5, 0.0])
def test_scores_match_upper_bounds(spread):
    """The score kernel's page bounds == page_upper_bounds where pages compete (``page_spread`` < 1: the score
    q.c + spread |q|.r of both); -inf / +inf elsewhere."""
    B, hkv, group, page, P = 2, 2, 4, 4, 16
    cfg = SparseConfig("pages", topk_tokens=16, sink_tokens=4, recent_tokens=4, page_spread=spread)
    q, kv, meta = make_case(5, B, hkv, group, page, 32, P, N=20, seq_lens=[61, 30])
    got = page_scores(q, kv, meta.page_table, meta.seq_lens, page, cfg)
    summ = kv[meta.page_table, :, page]                                   # [B, P, 2, Hkv, D]
    ub = page_upper_bounds(q[:, :, None], summ[:, :, 0].transpose(1, 2), summ[:, :, 1].transpose(1, 2),
                           spread)[:, :, 0]
    if spread != 1.0:                   # the score from its definition: q.c + spread |q|.r, max over the group
        lo, hi = summ[:, :, 0].transpose(1, 2).float(), summ[:, :, 1].transpose(1, 2).float()
        qg = q.float().view(B, hkv, group, -1)
        ref = (qg @ ((lo + hi) / 2).transpose(-1, -2) + spread * (qg.abs() @ ((hi - lo) / 2).transpose(-1, -2)))
        torch.testing.assert_close(ub, ref.amax(2), rtol=1e-5, atol=1e-5)
    pos = (meta.seq_lens - 1)[:, None, None]
    p = torch.arange(P, device=DEV)[None, None, :]
    visible = p * page <= pos
    forced = visible & ((p * page < cfg.sink_tokens) | (p * page + page > pos - cfg.recent_tokens))
    compete = visible & ~forced
    torch.testing.assert_close(got[compete.expand_as(got)], ub[compete.expand_as(ub)], rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[~compete.expand_as(got)]).all()
    assert (got[forced.expand_as(got)] > 0).all() and (got[~visible.expand_as(got)] < 0).all()


def test_ties_break_to_lowest_page():
    """Equal scores: the lowest page indices win, so the selection is deterministic."""
    P, page = 12, 4
    scores = torch.zeros(1, 1, P, device=DEV)
    scores[0, 0, 10:] = float("inf")                      # the always-kept pages
    table = torch.arange(P, device=DEV)[None] + 100
    seq = torch.tensor([P * page], device=DEV)
    t, logical, lens = topk_compact(scores, table, seq, page, budget=5, max_selected=8)
    assert logical[0, 0].tolist() == [0, 1, 2, 10, 11, 11, 11, 11]
    assert t[0, 0, :5].tolist() == [100, 101, 102, 110, 111] and int(lens[0, 0]) == 5 * page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_fused_selection_matches_reference(monkeypatch, dtype):
    """Attention outputs over the fused and the torch selections agree (robust to ties)."""
    B, hkv, group, page, P = 2, 2, 4, 4, 20
    cfg = SparseConfig("pages", topk_tokens=24, sink_tokens=4, recent_tokens=4)
    q, kv, meta = make_case(3, B, hkv, group, page, 16, P, N=40, seq_lens=[77, 55], dtype=dtype)
    want, got, _, _ = run_both(monkeypatch, q, kv, meta, cfg)
    outs = [paged_decode(q, kv[:, 0, :page], kv[:, 1, :page], t, n, 0.25, num_splits=2, block_n=16)
            for t, _, n in (want, got)]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("P,seq_lens,D,group", [(1, [1], 16, 1), (2, [5, 1], 24, 8), (7, [25, 28], 20, 2)])
def test_edge_shapes_match_torch_chain(monkeypatch, P, seq_lens, D, group):
    """One- and two-page tables, a one-token context, head dims that are no power of two, 8 heads a group."""
    cfg = SparseConfig("pages", topk_tokens=8, sink_tokens=4, recent_tokens=4)
    q, kv, meta = make_case(11, len(seq_lens), 2, group, 4, D, P, N=12, seq_lens=seq_lens, heat=True)
    want, got, want_heat, got_heat = run_both(monkeypatch, q, kv, meta, cfg)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got_heat[0], want_heat[0], rtol=0, atol=0)


# chunk 64: the streaming kernel; reg 16: rows past 16 visible pages streamed, None: held in registers there
@pytest.mark.parametrize("chunk,method,reg", [(None, "search", None), (None, "radix", None), (64, None, 16),
                                              (64, None, None)])
@pytest.mark.parametrize("P,budget", [(37, 9), (300, 64), (3000, 128), (64, 64), (50, 80)])
def test_threshold_search_is_exact_topk(P, budget, chunk, method, reg):
    """topk_compact on random scores (both signs, repeated values, -0.0 and +0.0, +inf kept, -inf invisible tails) keeps
    exactly the +inf pages and the ``budget`` best, ties to the lowest index (a stable-sort reference)."""
    g = torch.Generator().manual_seed(P)
    page, B, H = 4, 2, 3
    scores = torch.randn(B, H, P, generator=g) * 10.0 ** torch.randint(-3, 4, (B, H, P), generator=g).float()
    scores[:, :, ::7] = scores[:, :, 3:4]                         # many equal scores
    scores[:, :, 5::11], scores[:, :, 6::13] = 0.0, -0.0          # zeros of both signs tie
    scores[:, :, :2] = float("inf")
    seq = torch.tensor([P * page, P * page * 2 // 3 + 1])
    n_vis = (seq - 1) // page + 1
    scores[1, :, int(n_vis[1]):] = float("-inf")
    table = torch.randperm(4 * P, generator=g)[:P].repeat(B, 1)
    heat = torch.zeros(4 * P, device=DEV)
    t, logical, lens = topk_compact(scores.to(DEV), table.to(DEV), seq.to(DEV), page, budget, max_selected=P,
                                    page_heat=heat, num_device_pages=4 * P, chunk=chunk, method=method, reg=reg)
    want_heat = torch.zeros(4 * P)
    for b in range(B):
        for h in range(H):
            s = scores[b, h, : int(n_vis[b])]
            order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
            keep = set(order[:budget]) | {i for i in range(len(s)) if s[i] == float("inf")}
            n = len(keep)
            assert logical[b, h, :n].tolist() == sorted(keep), (b, h)
            assert t[b, h, :n].tolist() == table[b, sorted(keep)].tolist()
            tail = int(seq[b]) - (int(seq[b]) - 1) // page * page
            assert int(lens[b, h]) == (n - 1) * page + tail
            assert logical[b, h, n:].eq(P - 1).all() and t[b, h, n:].eq(table[b, P - 1]).all()
            want_heat[table[b, sorted(keep)]] += 1
    torch.testing.assert_close(heat.cpu(), want_heat, rtol=0, atol=0)
