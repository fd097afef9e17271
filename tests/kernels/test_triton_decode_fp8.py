"""Triton paged decode over FP8 KV pages (issue 6) vs the torch reference's FP8 path, and the engine with it.

Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tests.helpers.tiny_models import make_checkpoint  # noqa: E402
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.attention.backend import AttnMetadata  # noqa: E402
from tierserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from tierserve.attention.triton_decode_fp8 import paged_decode_fp8  # noqa: E402
from tierserve.kv.fp8_pages import Fp8PagePolicy  # noqa: E402
from tierserve.runner.kv_fp8 import Fp8Pages  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(dtype, hq, hkv, ps, D, seq_lens, sink, recent, seed, N=48, L=2):
    """Page-major storage [N, L, 2, ps, Hkv, D] with a different magnitude per (page, K/V, head), disjoint
    random pages per sequence (table padding: random ids, never read) and the pages the policy would
    allow to be stored as FP8 at this step (no query reads them at full precision any more)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-3, 4, (N, 1, 2, 1, hkv, 1), generator=g).float())
    data = (torch.randn(N, L, 2, ps, hkv, D, generator=g) * mag).to(dtype)
    B, P = len(seq_lens), max(-(-n // ps) for n in seq_lens) + 1
    perm = torch.randperm(N, generator=g)
    table = torch.randint(0, N, (B, P), generator=g)
    pol, used, eligible = Fp8PagePolicy(ps, sink, recent), 0, []
    for b, n in enumerate(seq_lens):
        k = -(-n // ps)
        table[b, :k] = perm[used:used + k]
        eligible += [int(perm[used + i]) for i in range(k) if i * ps >= sink and not pol.needs_full(i, n - 1)]
        used += k
    q = torch.randn(B, hq, D, generator=g).to(dtype)
    pick = [p for p in eligible if torch.rand(1, generator=g).item() < 0.6]     # a mix: stored or not yet
    return data.to(DEV), table.to(DEV), q.to(DEV), torch.tensor(seq_lens, device=DEV), eligible, pick


def _ref(q, kv_layer, fp8, table, seq_lens, window, layer):
    B = q.shape[0]
    z = torch.zeros(B, dtype=torch.long, device=q.device)
    meta = AttnMetadata(num_seqs=B, num_tokens=B, page_size=fp8.page_size, positions=seq_lens - 1, slot_pages=z,
                        slot_offsets=z, query_start_loc=torch.arange(B + 1, device=q.device), seq_lens=seq_lens,
                        page_table=table, query_lens_cpu=[1] * B, seq_lens_cpu=seq_lens.tolist(),
                        decode_only=True, kv_fp8=fp8)
    return TorchRefBackend().forward(q, None, None, kv_layer, meta, q.shape[-1] ** -0.5, window, layer,
                                     kv_written=True)


CASES = [  # hq, hkv, page, D, seq_lens, keep_sink, keep_recent, splits, window, block_n
    (4, 2, 16, 16, [1, 9, 40, 100], 4, 16, 1, None, None),
    (4, 2, 16, 16, [1, 16, 17, 100], 0, 0, 3, None, 16),
    (8, 2, 4, 16, [3, 17, 50], 5, 7, 2, None, 16),          # 4 pages per block
    (6, 6, 8, 32, [8, 33, 70], 16, 1, 2, None, 32),
    (4, 1, 16, 16, [12, 90], 4, 16, 2, 30, 32),              # sliding window, 2 pages per block
    (4, 2, 16, 16, [60, 61], 0, 100, 1, None, None),         # window covers everything: no FP8 read
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_decode_matches_reference(dtype, case):
    hq, hkv, ps, D, lens, sink, recent, splits, window, bn = CASES[case]
    data, table, q, seq_lens, eligible, pick = _inputs(dtype, hq, hkv, ps, D, lens, sink, recent, seed=case)
    fp8 = Fp8Pages(data.shape[0], ps, sink, recent, DEV)
    layer = 1

    def run():
        return paged_decode_fp8(q, data[:, layer], fp8.quantised, table, seq_lens, D ** -0.5, ps, sink, recent,
                                num_splits=splits, sliding_window=window, block_n=bn)

    fake = run()                            # every FP8 read quantised on the fly
    # fp32 reference on the same values (exact in bf16), every FP8 read fake-quantised
    want32 = _ref(q.float(), data[:, layer].float(), Fp8Pages(data.shape[0], ps, sink, recent, DEV), table,
                  seq_lens, window, layer)
    if eligible and dtype == torch.float32:     # the rule matters: full precision everywhere differs
        everything_full = Fp8Pages(data.shape[0], ps, 0, 1 << 20, DEV)
        full = _ref(q, data[:, layer], everything_full, table, seq_lens, window, layer)
        assert (fake - full).abs().max() > 1e-4     # (case 4: only 4 tokens in the window are read in FP8)
    fp8.quantise(data, pick)                # a mix of pages stored as FP8 and not yet
    assert bool(fp8.quantised.any()) == bool(pick)
    got = run()
    assert torch.equal(got, fake)           # storage and on-the-fly quantisation: the very same numbers
    want = _ref(q, data[:, layer], fp8, table, seq_lens, window, layer)      # reads the stored pages
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got, want32, atol=2e-5, rtol=2e-5)
    else:   # bf16 outputs (and the bf16 reference's softmax) are rounded: compare at bf16 precision
        tol = dict(atol=2e-2 * want32.abs().max().item(), rtol=2e-2)
        torch.testing.assert_close(got.float(), want32, **tol)
        torch.testing.assert_close(got.float(), want.float(), **tol)


# ---- engine --------------------------------------------------------------------------------------------
PROMPTS = [[0] + [(7 * i + 3) % 500 + 3 for i in range(45)], [0] + [(11 * i + 5) % 500 + 3 for i in range(30)]]
LATER = [[0] + [(13 * i + 1) % 500 + 3 for i in range(40)]]      # second round: recycles freed (FP8) pages


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8dec") / "llama", "llama")


def _generate(ckpt, backend, steps, logprobs=None, kv_dtype="fp8", rounds=None, **kw):
    # eager: the decode calls are counted at the backend (a CUDA graph replay would bypass the counter)
    settings = dict(dtype="float32", device=DEV, max_model_len=128, attention_backend=backend, num_kv_pages=20,
                    page_size=8, max_num_batched_tokens=16, kv_dtype=kv_dtype, kv_fp8_keep_sink=4,
                    kv_fp8_keep_recent=8, num_scheduler_steps=steps, enable_prefix_caching=False, enforce_eager=True)
    llm = LLM(str(ckpt), **{**settings, **kw})
    runner = llm.engine.runner
    calls = {"multi": 0, "decode": 0}
    multi, fwd = runner.launch_multi, runner.backend.forward

    def count_multi(*a, **kw):
        calls["multi"] += 1
        return multi(*a, **kw)

    def count_fwd(q, k, v, kv_layer, meta, *a, **kw):
        calls["decode"] += meta.decode_only
        return fwd(q, k, v, kv_layer, meta, *a, **kw)

    runner.launch_multi = count_multi
    runner.backend.forward = count_fwd
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=logprobs)
    outs = [o.outputs[0] for r in (rounds or (PROMPTS, LATER)) for o in llm.generate(r, sp)]
    if kv_dtype == "fp8":
        assert bool(runner.fp8.quantised.any())           # pages really were stored as FP8
    lps = [[next(iter(d.values())) for d in o.logprobs] for o in outs] if logprobs is not None else None
    return [o.token_ids for o in outs], lps, calls


def test_engine_triton_fp8_matches_reference_and_multi_step(ckpt):
    """kv_dtype=fp8: the Triton decode kernel gives the torch reference's greedy tokens and logprobs, and
    multi-step decode (pages that turn FP8 inside the k steps are quantised on the fly until the engine
    stores them after the k steps) gives the one-step tokens."""
    ref, lp_ref, _ = _generate(ckpt, "torch_ref", 1, logprobs=0)
    one, lp_one, calls_one = _generate(ckpt, "triton", 1, logprobs=0)
    multi, _, calls_multi = _generate(ckpt, "triton", 4)
    _, lp_full, _ = _generate(ckpt, "torch_ref", 1, logprobs=0, kv_dtype="auto")
    assert calls_one["decode"] > 0 and calls_one["multi"] == 0 and calls_multi["multi"] > 0
    assert one == ref
    torch.testing.assert_close(torch.tensor(lp_one), torch.tensor(lp_ref), atol=1e-4, rtol=0)
    assert (torch.tensor(lp_one) - torch.tensor(lp_full)).abs().max() > 1e-3      # FP8 reads do matter
    assert multi == one


def test_engine_triton_fp8_with_sparse_pages_matches_reference(ckpt, monkeypatch):
    """kv_dtype=fp8 with sparse "pages" attention: the FP8 kernel reads only the selected pages, each under
    the read rule of its real position (page summaries survive quantisation), and prefill chunks whose context is
    past the budget read their blocks' top-k pages (attention/sparse_fp8_prefill.py) -- the torch reference's
    tokens and logprobs; multi-step gives the one-step tokens; the budget really drops pages."""
    from tierserve.attention import triton_fp8_steps

    long = [[[0] + [(7 * i + 3) % 500 + 3 for i in range(119)], [0] + [(11 * i + 5) % 500 + 3 for i in range(96)]]]
    # in-place storage: with the compact pool (the default) sparse decode steps take the reference
    sparse = dict(sparse_attention="pages", sparse_topk_tokens=96, max_model_len=160, num_kv_pages=64,
                  rounds=long, kv_fp8_storage="inplace")    # 12 of up to 17 pages; chunks of 16: the one at 112 sparse
    chunks = []
    real = triton_fp8_steps.sparse_fp8_chunk_attention
    monkeypatch.setattr(triton_fp8_steps, "sparse_fp8_chunk_attention",
                        lambda *a, **k: chunks.append(a[4]) or real(*a, **k))

    ref, lp_ref, _ = _generate(ckpt, "torch_ref", 1, logprobs=0, **sparse)
    one, lp_one, calls = _generate(ckpt, "triton", 1, logprobs=0, **sparse)
    assert chunks and min(chunks) >= 104                 # the chunks past 12 full context pages went sparse
    multi, _, calls_multi = _generate(ckpt, "triton", 4, **sparse)
    _, lp_dense, _ = _generate(ckpt, "torch_ref", 1, logprobs=0, max_model_len=160, num_kv_pages=64, rounds=long)
    assert calls["decode"] > 0 and calls_multi["multi"] > 0
    assert one == ref
    torch.testing.assert_close(torch.tensor(lp_one), torch.tensor(lp_ref), atol=1e-4, rtol=0)
    assert (torch.tensor(lp_one) - torch.tensor(lp_dense)).abs().max() > 1e-3      # pages were dropped
    assert multi == one


def test_sparse_launch_setting_reaches_the_kernel(ckpt, monkeypatch):
    """``TIERSERVE_FP8_SPARSE_DECODE`` (fp8_decode_config.SPARSE): sparse FP8 decode steps launch the kernel with
    those settings (split-K, block, warps, stages, codes-only branch) and still give the torch reference's tokens and
    logprobs; eager and multi-step steps use the same settings (the same tokens)."""
    from tierserve.attention import fp8_decode_config

    long = [[[0] + [(7 * i + 3) % 500 + 3 for i in range(112)], [0] + [(11 * i + 5) % 500 + 3 for i in range(96)]]]
    sparse = dict(sparse_attention="pages", sparse_topk_tokens=80, max_model_len=160, num_kv_pages=64,
                  rounds=long, kv_fp8_storage="inplace", max_num_batched_tokens=512)
    setting = dict(num_splits=3, block_n=16, num_warps=2, num_stages=1, fast=True)
    monkeypatch.setattr(fp8_decode_config, "SPARSE", setting)
    _setting_reaches_the_kernel(ckpt, monkeypatch, setting, lambda kw: kw.get("selection") is not None, sparse)


def _setting_reaches_the_kernel(ckpt, monkeypatch, setting: dict, counted, engine_kw: dict) -> None:
    """Every FP8 decode call that ``counted(kwargs)`` selects carries ``setting``; the Triton engine gives the torch
    reference's tokens and logprobs, and multi-step windows (which must run) the one-step tokens."""
    from tierserve.attention import triton_fp8_steps

    seen, kernel = [], triton_fp8_steps.paged_decode_fp8

    def spy(*a, **kw):
        if counted(kw):
            seen.append({k: kw.get(k) for k in setting})
        return kernel(*a, **kw)
    monkeypatch.setattr(triton_fp8_steps, "paged_decode_fp8", spy)
    ref, lp_ref, _ = _generate(ckpt, "torch_ref", 1, logprobs=0, **engine_kw)
    one, lp_one, _ = _generate(ckpt, "triton", 1, logprobs=0, **engine_kw)
    multi, _, calls = _generate(ckpt, "triton", 4, **engine_kw)
    assert seen and all(x == setting for x in seen) and calls["multi"] > 0
    assert one == ref and multi == one
    torch.testing.assert_close(torch.tensor(lp_one), torch.tensor(lp_ref), atol=1e-4, rtol=0)


def test_engine_dense_lean_setting_matches_reference(ckpt, monkeypatch):
    """``TIERSERVE_FP8_DECODE=lean=1,...`` (fp8_decode_config.DENSE): dense FP8 decode steps take the split launch
    and give the torch reference's tokens and logprobs; multi-step windows the one-step tokens (compact storage,
    the engine's default for dense FP8 KV; in-place pages: test_lean_split_launch_matches_one_launch)."""
    from tierserve.attention import fp8_decode_config

    setting = dict(lean=True, block_n=16, num_splits=2, num_stages=5)
    monkeypatch.setattr(fp8_decode_config, "DENSE", setting)
    # (pure decode steps pass the setting's keys; decode rows of prefill steps keep the defaults)
    _setting_reaches_the_kernel(ckpt, monkeypatch, setting, lambda kw: "num_stages" in kw,
                                dict(kv_fp8_storage="compact", num_kv_pages=40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 2, 3, 4])
def test_fp8_prefill_matches_reference(dtype, case):
    """Chunks of several queries (continued prefill) over FP8 pages: each (query, key) read under the rule,
    stored and not-yet-stored pages mixed; == the torch reference's two-precision attention."""
    from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8

    hq, hkv, ps, D, lens, sink, recent, _, window, _ = CASES[case]
    data, table, _, seq_lens, eligible, pick = _inputs(dtype, hq, hkv, ps, D, lens, sink, recent, seed=case)
    g = torch.Generator().manual_seed(case)
    qlens = [min(n, 1 + (7 * b) % 9) for b, n in enumerate(lens)]             # 1..9 new tokens per sequence
    q = torch.randn(sum(qlens), hq, D, generator=g).to(DEV, dtype)
    fp8 = Fp8Pages(data.shape[0], ps, sink, recent, DEV)
    # only pages no query of these chunks reads at full precision may be stored as FP8
    first_q = {b: n - qlens[b] for b, n in enumerate(lens)}
    pol = Fp8PagePolicy(ps, sink, recent)
    ok = {int(table[b, i]) for b, n in enumerate(lens) for i in range(-(-n // ps))
          if i * ps >= sink and not pol.needs_full(i, first_q[b]) and (i + 1) * ps <= first_q[b]}
    layer = 1
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    pos = torch.cat([torch.arange(n - k, n) for n, k in zip(lens, qlens)]).to(DEV)
    z = torch.zeros(len(pos), dtype=torch.long, device=DEV)
    meta = AttnMetadata(num_seqs=len(lens), num_tokens=qsl[-1], page_size=ps, positions=pos, slot_pages=z,
                        slot_offsets=z, query_start_loc=torch.tensor(qsl, device=DEV), seq_lens=seq_lens,
                        page_table=table, query_lens_cpu=qlens, seq_lens_cpu=list(lens), kv_fp8=fp8)
    full = TorchRefBackend().forward(q, None, None, data[:, layer], dataclasses.replace(
        meta, kv_fp8=Fp8Pages(data.shape[0], ps, 0, 1 << 20, DEV)), D ** -0.5, window, layer, kv_written=True)
    fp8.quantise(data, [p for p in pick if p in ok])          # stored FP8 pages mixed with not-yet-stored ones
    # the reference reads the storage as it is (FP8 blobs live in the storage dtype's bytes)
    want = TorchRefBackend().forward(q, None, None, data[:, layer], meta, D ** -0.5, window, layer,
                                     kv_written=True).float()
    got = paged_prefill_fp8(q, data[:, layer], fp8.quantised, table, torch.tensor(qsl[:-1], device=DEV),
                            torch.tensor(qlens, device=DEV), seq_lens, max(qlens), D ** -0.5, ps, sink, recent,
                            sliding_window=window)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert not ok or (got - full).abs().max() > 1e-3        # FP8 reads really happened
    else:
        torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_engine_fp8_prefill_chunks_use_the_kernel(ckpt, monkeypatch):
    """Chunked prefill over FP8 pages goes through the FP8 prefill kernel (not the reference) and gives the
    reference's greedy tokens."""
    import tierserve.attention.triton_fp8_steps as tb

    calls = []
    real = tb.paged_prefill_fp8
    monkeypatch.setattr(tb, "paged_prefill_fp8", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref, _, _ = _generate(ckpt, "torch_ref", 1)
    got, _, _ = _generate(ckpt, "triton", 1)
    assert calls and got == ref


@pytest.mark.parametrize("checked", [True, False])
def test_engine_fp8_prefill_through_flash_readings(ckpt, monkeypatch, checked):
    """Where flash runs (forced here on the CPU: its plain path), chunked prefill over FP8 pages goes through the
    gathered readings (attention/fp8_flash_prefill.py) and gives the reference's greedy tokens and
    log-probabilities; the first such step (``checked`` False) also runs the kernel once and compares."""
    import tierserve.attention.fp8_flash_prefill as ff
    import tierserve.attention.triton_fp8_steps as tb

    calls, kernel = [], []
    real, real_kernel = ff.fp8_chunk_attention, tb.paged_prefill_fp8
    monkeypatch.setattr(tb, "flash_ok", lambda q: True)
    monkeypatch.setattr(ff, "MIN_WORK", 0)          # (tiny chunks: below the default, the kernel runs)
    monkeypatch.setattr(ff, "fp8_chunk_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ff, "CHECKED", checked)
    monkeypatch.setattr(ff, "ENABLED", True)
    monkeypatch.setattr(tb, "paged_prefill_fp8", lambda *a, **kw: kernel.append(1) or real_kernel(*a, **kw))
    ref, ref_lp, _ = _generate(ckpt, "torch_ref", 1, logprobs=1)
    got, got_lp, _ = _generate(ckpt, "triton", 1, logprobs=1)
    assert calls and got == ref and ff.ENABLED
    assert len(kernel) == (0 if checked else 1)
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


def test_engine_fp8_small_prefill_steps_keep_the_kernel(ckpt, monkeypatch):
    """Steps with little prefill work (below ``MIN_WORK`` query rows x keys: the kernel is faster there) go through
    the FP8 prefill kernel even where flash runs."""
    import tierserve.attention.fp8_flash_prefill as ff
    import tierserve.attention.triton_fp8_steps as tb

    calls = []
    monkeypatch.setattr(tb, "flash_ok", lambda q: True)
    monkeypatch.setattr(ff, "ENABLED", True)
    monkeypatch.setattr(ff, "fp8_chunk_attention", lambda *a, **kw: calls.append(1))
    ref, _, _ = _generate(ckpt, "torch_ref", 1)
    got, _, _ = _generate(ckpt, "triton", 1)
    assert got == ref and not calls
    assert ff.worth_it([(0, 0, 8192, 32768)]) and not ff.worth_it([(0, 0, 2048, 0)])


def test_engine_fp8_flash_prefill_failure_falls_back_to_the_kernel(ckpt, monkeypatch):
    """A failure of the flash path (here: an error on its first chunk) turns it off with a warning and the step runs
    the FP8 prefill kernel -- not the slow reference --, with the reference's greedy tokens."""
    import tierserve.attention.fp8_flash_prefill as ff
    import tierserve.attention.triton_fp8_steps as tb

    def broken(*a, **kw):
        raise ValueError("boom")

    kernel = []
    real_kernel = tb.paged_prefill_fp8
    monkeypatch.setattr(tb, "flash_ok", lambda q: True)
    monkeypatch.setattr(ff, "MIN_WORK", 0)
    monkeypatch.setattr(ff, "fp8_chunk_attention", broken)
    monkeypatch.setattr(ff, "ENABLED", True)
    monkeypatch.setattr(tb, "paged_prefill_fp8", lambda *a, **kw: kernel.append(1) or real_kernel(*a, **kw))
    ref, _, _ = _generate(ckpt, "torch_ref", 1)
    got, _, _ = _generate(ckpt, "triton", 1)
    assert got == ref and kernel and not ff.ENABLED


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_lean_split_launch_matches_one_launch(case):
    """``lean=True`` (a kernel over the blocks read wholly in FP8, then the general kernel over the sink / recent
    blocks and any part whose pages lag the rule): the one-launch values up to the order of the split sums, with
    some bulk pages not stored yet (their parts redone by the general kernel) and with every one stored; with a
    sliding window the option is ignored."""
    hq, hkv, ps, D, lens, sink, recent, splits, window, bn = CASES[case]
    data, table, q, seq_lens, eligible, pick = _inputs(torch.float32, hq, hkv, ps, D, lens, sink, recent, seed=case)
    for stored in (pick, eligible):
        fp8 = Fp8Pages(data.shape[0], ps, sink, recent, DEV)
        fp8.quantise(data, stored)
        base = paged_decode_fp8(q, data[:, 1], fp8.quantised, table, seq_lens, D ** -0.5, ps, sink, recent,
                                sliding_window=window, block_n=bn or 16, num_splits=splits)
        for parts, lean_bn in ((1, 16), (3, 16), (2, 32)):
            got = paged_decode_fp8(q, data[:, 1], fp8.quantised, table, seq_lens, D ** -0.5, ps, sink, recent,
                                   sliding_window=window, block_n=max(lean_bn, ps), num_splits=parts, lean=True)
            torch.testing.assert_close(got, base, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [0, 2, 3, 4])
def test_fast_loads_give_the_same_bits(case):
    """``fast=True`` (blocks read wholly in FP8 skip the full-precision loads) and ``bulk=True`` (the blocks
    between the sink and the recent pages in a loop of unmasked code loads): the very same outputs as the general
    loop, with some FP8-read pages not stored yet (quantised on the fly inside the fast branch; the bulk loop
    gives way to the general one) and with every one stored (the fast branch's plain path, the bulk loop)."""
    hq, hkv, ps, D, lens, sink, recent, splits, window, bn = CASES[case]
    data, table, q, seq_lens, eligible, pick = _inputs(torch.float32, hq, hkv, ps, D, lens, sink, recent, seed=case)
    for stored in (pick[::2], eligible):
        fp8 = Fp8Pages(data.shape[0], ps, sink, recent, DEV)
        fp8.quantise(data, stored)
        got = [paged_decode_fp8(q, data[:, 1], fp8.quantised, table, seq_lens, D ** -0.5, ps, sink, recent,
                                sliding_window=window, block_n=bn or 16, **{"num_splits": splits, **kw})
               for kw in (dict(), dict(fast=True), dict(fast=True, num_splits=1), dict(fast=True, bulk=True),
                          dict(bulk=True), dict(fast=True, bulk=True, num_splits=1))]
        for other in got[1], got[3], got[4]:
            assert torch.equal(got[0], other)
        assert torch.equal(got[2], got[5])
        torch.testing.assert_close(got[2], got[0], atol=2e-5, rtol=2e-5)
    with pytest.raises(AssertionError, match="rule_loads"):
        paged_decode_fp8(q, data[:, 1], fp8.quantised, table, seq_lens, D ** -0.5, ps, sink, recent,
                         num_splits=splits, fast=True, rule_loads=False)
