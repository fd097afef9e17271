"""FP8 KV part 2: the Triton FP8 decode / prefill kernels reading quantised pages from the compact pool
(ids >= the first compact id) give the very same bits as with part 1's in-place pages, and match the torch
reference. GPU when there is one, else the CPU under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tierserve.attention.backend import AttnMetadata  # noqa: E402
from tierserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from tierserve.attention.triton_decode_fp8 import paged_decode_fp8  # noqa: E402
from tierserve.attention.triton_prefill_fp8 import paged_prefill_fp8  # noqa: E402
from tierserve.kv.fp8_pages import Fp8PagePolicy  # noqa: E402
from tierserve.quant.fp8_compact import new_compact_pool  # noqa: E402
from tierserve.runner.kv_fp8 import Fp8Pages  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(dtype, hkv, ps, D, lens, sink, recent, q_lens, seed, L=2):
    """Storage, a page table (padding: random ids), and the pages the policy lets be stored for queries
    from positions n - q_len on (a mix: most picked, the rest left for the kernels' on-the-fly path)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(-(-n // ps) for n in lens) + 6
    mag = torch.exp2(torch.randint(-3, 4, (N, 1, 2, 1, hkv, 1), generator=g).float())
    data = (torch.randn(N, L, 2, ps, hkv, D, generator=g) * mag).to(dtype)
    B, P = len(lens), max(-(-n // ps) for n in lens) + 1
    perm = torch.randperm(N, generator=g)
    table = torch.randint(0, N, (B, P), generator=g)
    pol, used, ok = Fp8PagePolicy(ps, sink, recent), 0, []
    for b, (n, k) in enumerate(zip(lens, q_lens)):
        c0 = n - k
        pages = -(-n // ps)
        table[b, :pages] = perm[used:used + pages]
        ok += [int(perm[used + i]) for i in range(pages)
               if i * ps >= sink and (i + 1) * ps <= c0 and not pol.needs_full(i, c0)]
        used += pages
    pick = [p for j, p in enumerate(ok) if j % 4 != 1]
    return data.to(DEV), table.to(DEV), pick


def _both(data, table, pick, ps, sink, recent):
    """(in-place Fp8Pages, storage) and (compact Fp8Pages, storage with the moved slots NaN, remapped table)."""
    N, L, _, _, h, d = data.shape
    a = Fp8Pages(N, ps, sink, recent, DEV)
    data_a = data.clone()
    a.quantise(data_a, pick)
    pool = new_compact_pool(len(pick) + 2, L, ps, h, d, 0, data.dtype, DEV)
    c = Fp8Pages(N, ps, sink, recent, DEV, compact=pool)
    data_c = data.clone()
    slots = {p: N + 1 + j for j, p in enumerate(pick)}          # slot 0 unused: ids need not start at base
    c.quantise(data_c, list(slots.items()))
    table_c = table.clone().cpu().apply_(lambda x: slots.get(x, x)).to(DEV)
    if pick:
        data_c[torch.tensor(pick, device=DEV)] = float("nan")    # freed full-precision slots: never read
    return (a, data_a, table), (c, data_c, table_c)


def _meta(lens, qlens, ps, table, fp8, decode):
    qsl = [0]
    for k in qlens:
        qsl.append(qsl[-1] + k)
    pos = torch.cat([torch.arange(n - k, n) for n, k in zip(lens, qlens)]).to(DEV)
    z = torch.zeros(len(pos), dtype=torch.long, device=DEV)
    return AttnMetadata(num_seqs=len(lens), num_tokens=qsl[-1], page_size=ps, positions=pos, slot_pages=z,
                        slot_offsets=z, query_start_loc=torch.tensor(qsl, device=DEV),
                        seq_lens=torch.tensor(lens, device=DEV), page_table=table, query_lens_cpu=list(qlens),
                        seq_lens_cpu=list(lens), decode_only=decode, kv_fp8=fp8), qsl


DECODE = [  # hq, hkv, page, D, seq_lens, keep_sink, keep_recent, splits, window, block_n
    (4, 2, 16, 16, [1, 9, 40, 100], 4, 16, 1, None, None),
    (4, 2, 16, 16, [1, 16, 17, 100], 0, 0, 3, None, 16),
    (8, 2, 4, 16, [3, 17, 50], 5, 7, 2, None, 16),
    (4, 1, 16, 16, [12, 90], 4, 16, 2, 30, 32),              # sliding window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(DECODE)))
def test_decode_compact_same_bits_as_in_place(dtype, case):
    hq, hkv, ps, D, lens, sink, recent, splits, window, bn = DECODE[case]
    data, table, pick = _setup(dtype, hkv, ps, D, lens, sink, recent, [1] * len(lens), seed=case)
    g = torch.Generator().manual_seed(100 + case)
    q = torch.randn(len(lens), hq, D, generator=g).to(DEV, dtype)
    seq = torch.tensor(lens, device=DEV)
    outs, refs = [], []
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):
        for kw in (dict(rule_loads=True), dict(rule_loads=False), dict(fast=True, bulk=True)):
            outs.append(paged_decode_fp8(q, dat[:, 1], f.quantised, tab, seq, D ** -0.5, ps, sink, recent,
                                         num_splits=splits, sliding_window=window, block_n=bn,
                                         compact=f.kernel_pool(1), **kw))
        meta, _ = _meta(lens, [1] * len(lens), ps, tab, f, True)
        refs.append(TorchRefBackend().forward(q, None, None, dat[:, 1], meta, D ** -0.5, window, 1,
                                              kv_written=True))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(refs[0], refs[1])
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):    # the split launch: up to the sums' order
        lean = paged_decode_fp8(q, dat[:, 1], f.quantised, tab, seq, D ** -0.5, ps, sink, recent, num_splits=2,
                                sliding_window=window, block_n=max(bn or 16, ps), compact=f.kernel_pool(1), lean=True)
        torch.testing.assert_close(lean.float(), outs[0].float(), atol=2e-5 if dtype == torch.float32 else 2e-2,
                                   rtol=2e-5 if dtype == torch.float32 else 2e-2)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else \
        dict(atol=2e-2 * refs[0].float().abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(outs[0].float(), refs[0].float(), **tol)


PREFILL = [  # hq, hkv, page, D, seq_lens, q_lens, keep_sink, keep_recent, window
    (8, 2, 4, 16, [70, 45], [40, 45], 5, 7, None),
    (4, 2, 16, 16, [100, 37], [33, 20], 0, 0, None),
    (4, 1, 8, 16, [90, 50], [30, 50], 4, 9, 20),            # sliding window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(PREFILL)))
def test_prefill_compact_same_bits_as_in_place(dtype, case):
    hq, hkv, ps, D, lens, qlens, sink, recent, window = PREFILL[case]
    data, table, pick = _setup(dtype, hkv, ps, D, lens, sink, recent, qlens, seed=20 + case)
    assert pick
    g = torch.Generator().manual_seed(200 + case)
    q = torch.randn(sum(qlens), hq, D, generator=g).to(DEV, dtype)
    outs, refs = [], []
    for f, dat, tab in _both(data, table, pick, ps, sink, recent):
        meta, qsl = _meta(lens, qlens, ps, tab, f, False)
        outs.append(paged_prefill_fp8(q, dat[:, 1], f.quantised, tab, torch.tensor(qsl[:-1], device=DEV),
                                      torch.tensor(qlens, device=DEV), meta.seq_lens, max(qlens), D ** -0.5, ps,
                                      sink, recent, sliding_window=window, compact=f.kernel_pool(1)))
        refs.append(TorchRefBackend().forward(q, None, None, dat[:, 1], meta, D ** -0.5, window, 1,
                                              kv_written=True))
    assert torch.equal(outs[0], outs[1]) and torch.equal(refs[0], refs[1])
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else \
        dict(atol=2e-2 * refs[0].float().abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(outs[0].float(), refs[0].float(), **tol)


# ---- engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers.tiny_models import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("fp8compact") / "llama", "llama")


def _generate(ckpt, steps=1, prompts=None, **kw):
    from tierserve import LLM, SamplingParams
    settings = dict(dtype="float32", device=DEV, max_model_len=128, attention_backend="triton", num_kv_pages=40,
                    page_size=8, max_num_batched_tokens=16, kv_dtype="fp8", kv_fp8_keep_sink=4,
                    kv_fp8_keep_recent=8, num_scheduler_steps=steps, enable_prefix_caching=False,
                    enforce_eager=True, debug_invariants=True)
    llm = LLM(str(ckpt), **{**settings, **kw})
    prompts = prompts or [[0] + [(7 * i + 3) % 500 + 3 for i in range(45)],
                          [0] + [(11 * i + 5) % 500 + 3 for i in range(30)]]
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate(prompts, sp)]
    kv = llm.engine.kv
    assert kv.pool.num_in_use == 0 and (kv.compact is None or kv.compact.pool.num_in_use == 0)
    return [o.token_ids for o in outs], [[next(iter(d.values())) for d in o.logprobs] for o in outs], llm


def test_engine_triton_compact_same_as_in_place(ckpt, monkeypatch):
    import tierserve.attention.triton_fp8_steps as tb
    tok_a, lp_a, _ = _generate(ckpt, kv_fp8_storage="inplace")
    calls = []
    for name in ("paged_decode_fp8", "paged_prefill_fp8"):
        real = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _r=real, _n=name, **kw: calls.append(
            (_n, kw.get("compact") is not None)) or _r(*a, **kw))
    tok_b, lp_b, llm = _generate(ckpt, kv_fp8_storage="compact")
    assert llm.engine.kv.compact is not None and llm.engine.kv.quantised      # pages really moved
    assert llm.engine.runner.backend.fp8_prefill is True                      # the kernel, not the fallback
    assert {c for c in calls} == {("paged_decode_fp8", True), ("paged_prefill_fp8", True)}
    assert tok_a == tok_b and lp_a == lp_b
    multi, _, _ = _generate(ckpt, steps=4, kv_fp8_storage="compact")
    assert multi == tok_b


def test_engine_triton_compact_sparse_pages(ckpt, monkeypatch):
    """Sparse "pages" attention over compact FP8 pages: the selection reads compact pages' summaries from
    their slots and the FP8 decode kernel reads the selected compact pages: in-place storage's tokens and
    logprobs."""
    import tierserve.attention.triton_fp8_steps as tb
    long = [[0] + [(7 * i + 3) % 500 + 3 for i in range(112)], [0] + [(11 * i + 5) % 500 + 3 for i in range(96)]]
    kw = dict(sparse_attention="pages", sparse_topk_tokens=80, max_model_len=160, num_kv_pages=64, prompts=long)
    tok_a, lp_a, _ = _generate(ckpt, kv_fp8_storage="inplace", **kw)
    calls = []
    real = tb.paged_decode_fp8
    monkeypatch.setattr(tb, "paged_decode_fp8", lambda *a, **k: calls.append(
        (k.get("compact") is not None, k.get("selection") is not None)) or real(*a, **k))
    tok_b, lp_b, llm = _generate(ckpt, kv_fp8_storage="compact", **kw)
    assert llm.engine.kv.quantised and (True, True) in calls
    assert tok_a == tok_b
    torch.testing.assert_close(torch.tensor(lp_b), torch.tensor(lp_a), atol=1e-5, rtol=0)
