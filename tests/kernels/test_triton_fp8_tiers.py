"""FP8 KV pages spilled to CPU RAM (KV tiers, issue 6): the Triton FP8 decode kernel reads spilled pages' compact
rows from the host store (page ids >= ``Fp8Pages.end``) and gives the very same bits as with those pages on the
device (in place or in compact slots), with and without a sparse selection; the torch reference reads them too.
GPU when there is one, else the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tests.kernels.test_triton_fp8_compact import PREFILL, _both, _meta, _setup  # noqa: E402
from tierserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from tierserve.attention.triton_decode import compact_selection  # noqa: E402
from tierserve.attention.triton_decode_fp8 import paged_decode_fp8  # noqa: E402
from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8  # noqa: E402
from tierserve.attention.triton_stage import remap_host_entries, stage_rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # hq, hkv, page, D, seq_lens, keep_sink, keep_recent, splits, block_n
    (4, 2, 16, 16, [9, 40, 100], 4, 16, 1, None),
    (8, 2, 4, 16, [3, 17, 50], 5, 7, 2, 16),
    (4, 1, 16, 16, [12, 90], 0, 1, 2, 32),
]


def _spill(f, dat, tab, pick_ids):
    """Move pages ``pick_ids`` (stored FP8) to a host store of compact rows: the table points at host ids, the
    device copies are poisoned (never read)."""
    store = f.host_rows(dat, pick_ids).cpu()
    slots = {p: f.end + 2 + j for j, p in enumerate(pick_ids)}         # slots 0, 1 unused
    store = torch.cat([torch.zeros_like(store[:2]), store])
    if DEV == "cuda":                      # after the cat (its result is pageable): the kernel reads it in place
        store = store.pin_memory()
    tab_h = tab.clone().cpu().apply_(lambda x: slots.get(x, x)).to(DEV)
    dat_h = dat.clone()
    full = [p for p in pick_ids if p < f.base]
    if full:
        dat_h[torch.tensor(full, device=DEV)] = float("nan")
    if f.compact is not None:
        comp = [p - f.base for p in pick_ids if p >= f.base]
        if comp:
            f.compact[torch.tensor(comp, device=DEV)] = 0x7F                 # e4m3 NaN codes
    return store, tab_h, dat_h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("sparse", [False, True])
def test_decode_reads_spilled_pages_from_host(dtype, case, sparse):
    hq, hkv, ps, D, lens, sink, recent, splits, bn = CASES[case]
    data, table, pick = _setup(dtype, hkv, ps, D, lens, sink, recent, [1] * len(lens), seed=40 + case)
    assert pick
    g = torch.Generator().manual_seed(300 + case)
    q = torch.randn(len(lens), hq, D, generator=g).to(DEV, dtype)
    seq = torch.tensor(lens, device=DEV)
    B, P = table.shape
    chosen = torch.rand(B, hkv, P, generator=g).to(DEV) < 0.6
    n_pages = (seq + ps - 1) // ps
    ar = torch.arange(P, device=DEV)
    chosen &= ar[None, None, :] < n_pages[:, None, None]
    chosen |= ar[None, None, :] == (n_pages - 1)[:, None, None]              # the last page always
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):
        ids = sorted({int(x) for x in tab.flatten().tolist()} & set(f.quantised.nonzero().flatten().tolist()))
        ids = [p for p in ids if p != f.base - 1][::2] or ids[:1]          # half the stored pages spill
        assert ids

        def run(tab_, dat_, host=None):
            sel = None
            if sparse:
                tab_, logical, n = compact_selection(chosen, tab_, seq, ps, logical=True)
                sel = (logical, n)
            return paged_decode_fp8(q, dat_[:, 1], f.quantised, tab_, seq, D ** -0.5, ps, sink, recent,
                                    num_splits=splits, block_n=bn, compact=f.kernel_pool(1), selection=sel,
                                    host=host)
        want = run(tab, dat)
        store, tab_h, dat_h = _spill(f, dat, tab, ids)
        assert (tab_h >= f.end).any()
        got = run(tab_h, dat_h, host=(store[:, 1], f.end))
        assert torch.equal(got, want)                   # the same codes and scales, read from CPU RAM
        assert not got.isnan().any()
        if not sparse:                                  # the reference reads the host rows too
            meta, _ = _meta(lens, [1] * len(lens), ps, tab_h, f, True)
            meta.host_kv = [(0, store)]
            ref = TorchRefBackend().forward(q, None, None, dat_h[:, 1], meta, D ** -0.5, None, 1, kv_written=True)
            tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else \
                dict(atol=2e-2 * ref.float().abs().max().item(), rtol=2e-2)
            torch.testing.assert_close(got.float(), ref.float(), **tol)


# + keep_recent 0 with chunks starting on a page boundary: the stored page just before a chunk is in its scratch
PREFILL_SPILL = PREFILL + [(4, 2, 16, 16, [80, 40], [16, 8], 0, 0, None)]


# each case in one dtype (the interpreter is slow), the edge case in both
@pytest.mark.parametrize("case,dtype", [(0, torch.bfloat16), (1, torch.float32), (2, torch.bfloat16),
                                        (3, torch.float32), (3, torch.bfloat16)])
def test_prefill_reads_staged_spilled_pages(case, dtype):
    """Prefill chunks over FP8 pages spilled to CPU RAM: the step's host rows staged on the device
    (``stage_rows``, tables remapped) give the very same bits as with those pages on the device -- also where a
    spilled page falls in a chunk's FP8 scratch range (keep_recent 0: the page just before the chunk)."""
    hq, hkv, ps, D, lens, qlens, sink, recent, window = PREFILL_SPILL[case]
    data, table, pick = _setup(dtype, hkv, ps, D, lens, sink, recent, qlens, seed=60 + case)
    edge = case == len(PREFILL)
    if edge:                                                 # every stored page, the scratch-range ones too
        pick = sorted(set(pick) | {int(table[b, (n - k) // ps - 1]) for b, (n, k) in enumerate(zip(lens, qlens))})
    g = torch.Generator().manual_seed(600 + case)
    q = torch.randn(sum(qlens), hq, D, generator=g).to(DEV, dtype)
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):
        def run(tab_, dat_, host=None):
            meta, qsl = _meta(lens, qlens, ps, tab_, f, False)
            return paged_prefill_fp8(q, dat_[:, 1], f.quantised, tab_, torch.tensor(qsl[:-1], device=DEV),
                                     torch.tensor(qlens, device=DEV), meta.seq_lens, max(qlens), D ** -0.5, ps,
                                     sink, recent, sliding_window=window, compact=f.kernel_pool(1), host=host)
        want = run(tab, dat)
        ids = sorted({int(x) for x in tab.flatten().tolist()} & set(f.quantised.nonzero().flatten().tolist()))
        ids = [p for p in ids if p != f.base - 1]
        ids = ids if edge else ids[::2] or ids[:1]
        assert ids
        if edge:        # the page before each chunk (first scratch page: (c0 - 1) // ps) is among them
            assert all(int(tab[b, (n - k) // ps - 1]) in ids for b, (n, k) in enumerate(zip(lens, qlens)))
        store, tab_h, dat_h = _spill(f, dat, tab, ids)
        slots, tab_r = remap_host_entries(tab_h, f.end)
        assert (tab_r >= f.end).any()
        rows = stage_rows(store[:, 1], slots)
        assert rows.device.type == DEV and rows.shape[1:] == store.shape[2:]
        got = run(tab_r, dat_h, host=(rows, f.end))
        assert torch.equal(got, want) and not got.isnan().any()


# ---- engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers.tiny_models import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("fp8tiers") / "llama", "llama")


def _generate(ckpt, n=44, **kw):
    from tierserve import LLM, SamplingParams
    settings = dict(dtype="float32", device=DEV, max_model_len=128, attention_backend="triton", num_kv_pages=64,
                    page_size=8, max_num_batched_tokens=24, kv_dtype="fp8", kv_fp8_keep_sink=4,
                    kv_fp8_keep_recent=8, enable_prefix_caching=False, enforce_eager=True, debug_invariants=True)
    llm = LLM(str(ckpt), **{**settings, **kw})
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(n)], [0] + [(11 * i + 5) % 500 + 3 for i in range(n - 10)]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.pool.num_in_use == 0 and (kv.compact is None or kv.compact.pool.num_in_use == 0)
    if kv.tiers is not None:
        assert kv.tiers.host.num_spilled == 0
    return outs, llm


@pytest.mark.parametrize("extra", [dict(kv_fp8_storage="inplace", num_kv_pages=8),
                                   dict(kv_fp8_storage="compact", num_kv_pages=8),
                                   dict(sparse_attention="pages", sparse_topk_tokens=80, num_kv_pages=12, n=100,
                                        max_model_len=136)])
def test_engine_triton_spilled_fp8_pages(ckpt, monkeypatch, extra):
    """A GPU pool smaller than one request: FP8 pages spill to CPU RAM and the FP8 decode kernel reads them there
    (checked once against the reference, then trusted): the large pool's tokens."""
    import tierserve.attention.triton_fp8_steps as tb
    big = {k: v for k, v in extra.items() if k != "num_kv_pages"}      # 64 pages: nothing spills
    want, _ = _generate(ckpt, **big)
    calls, prefills = [], []
    real, real_prefill = tb.paged_decode_fp8, tb.paged_prefill_fp8
    monkeypatch.setattr(tb, "paged_decode_fp8", lambda *a, **k: calls.append(
        (k.get("host") is not None, k.get("selection") is not None)) or real(*a, **k))
    monkeypatch.setattr(tb, "paged_prefill_fp8", lambda *a, **k: prefills.append(k.get("host") is not None)
                        or real_prefill(*a, **k))
    got, llm = _generate(ckpt, cpu_kv_gb=0.001, **extra)
    assert llm.engine.kv.num_spilled > 0
    assert llm.engine.runner.backend.fp8_host_reads is True
    assert (True, "sparse_attention" in extra) in calls
    # chunks after the first spill read the spilled rows staged on the device (CPU: sparse prefill is the reference)
    assert True in prefills or ("sparse_attention" in extra and DEV == "cpu")
    assert llm.engine.runner.backend.fp8_prefill is not False
    assert got == want


def test_staging_failure_turns_off_only_the_staged_fp8_prefill(ckpt, monkeypatch):
    """A failure while staging spilled FP8 rows for a prefill step sends such steps to the reference; prefill
    steps without spilled pages keep the FP8 prefill kernel, and the tokens stay the large pool's."""
    import tierserve.attention.triton_fp8_steps as tb
    want, _ = _generate(ckpt)

    def broken(*a, **k):
        raise RuntimeError("staging broke")
    monkeypatch.setattr(tb, "stage_rows", broken)
    got, llm = _generate(ckpt, cpu_kv_gb=0.001, kv_fp8_storage="inplace", num_kv_pages=8)
    backend = llm.engine.runner.backend
    assert llm.engine.kv.num_spilled > 0
    assert backend.fp8_staged_prefill is False and backend.fp8_prefill is True
    assert got == want


@pytest.mark.parametrize("case", [0, 1])
def test_fast_sparse_decode_over_spilled_pages(case):
    """``fast=True`` (the codes-only branch for blocks read wholly in FP8) with a selection: the default's very
    bits, whether the spilled pages are read from CPU RAM or the device."""
    hq, hkv, ps, D, lens, sink, recent, splits, bn = CASES[case]
    data, table, pick = _setup(torch.float32, hkv, ps, D, lens, sink, recent, [1] * len(lens), seed=40 + case)
    g = torch.Generator().manual_seed(300 + case)
    q = torch.randn(len(lens), hq, D, generator=g).to(DEV)
    seq = torch.tensor(lens, device=DEV)
    B, P = table.shape
    ar = torch.arange(P, device=DEV)
    n_pages = (seq + ps - 1) // ps
    chosen = (torch.rand(B, hkv, P, generator=g).to(DEV) < 0.6) & (ar[None, None, :] < n_pages[:, None, None])
    chosen |= ar[None, None, :] == (n_pages - 1)[:, None, None]
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):
        ids = sorted({int(x) for x in tab.flatten().tolist()} & set(f.quantised.nonzero().flatten().tolist()))
        ids = [p for p in ids if p != f.base - 1][::2] or ids[:1]

        def run(tab_, dat_, host=None, fast=False):
            tab_, logical, n = compact_selection(chosen, tab_, seq, ps, logical=True)
            return paged_decode_fp8(q, dat_[:, 1], f.quantised, tab_, seq, D ** -0.5, ps, sink, recent,
                                    num_splits=max(splits, 2), block_n=bn, compact=f.kernel_pool(1),
                                    selection=(logical, n), host=host, fast=fast)
        want = run(tab, dat)
        assert torch.equal(run(tab, dat, fast=True), want)
        store, tab_h, dat_h = _spill(f, dat, tab, ids)          # (poisons the spilled pages' device copies)
        assert torch.equal(run(tab_h, dat_h, host=(store[:, 1], f.end)), want)
        assert torch.equal(run(tab_h, dat_h, host=(store[:, 1], f.end), fast=True), want)


def test_sparse_fp8_prefill_over_spilled_pages(ckpt, monkeypatch):
    """Sparse attention + FP8 pages + a GPU pool smaller than the prompt: prefill chunks past the budget read their
    blocks' top-k pages with the spilled ones' rows staged on the device (attention/sparse_fp8_prefill.py with
    ``host``) -- the torch reference's tokens under the same tiers."""
    import tierserve.attention.triton_fp8_steps as tb
    seen = []
    real = tb.sparse_fp8_chunk_attention
    monkeypatch.setattr(tb, "sparse_fp8_chunk_attention",
                        lambda *a, **k: seen.append(k.get("host") is not None) or real(*a, **k))
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96, num_kv_pages=12, n=130, max_model_len=160,
              max_num_batched_tokens=16, cpu_kv_gb=0.001, kv_fp8_storage="inplace")
    want, _ = _generate(ckpt, attention_backend="torch_ref", **kw)
    got, llm = _generate(ckpt, **kw)
    assert llm.engine.kv.num_spilled > 0
    assert True in seen                       # a sparse chunk read spilled rows staged on the device
    backend = llm.engine.runner.backend       # no path turned itself off on the way
    assert backend.fp8_staged_prefill is True and backend.fp8_host_reads is not False
    assert got == want
