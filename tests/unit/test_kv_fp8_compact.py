"""FP8 KV cache part 2: compact pool -- same bits as part 1's in-place pages, about twice the tokens."""

import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tests.unit.test_kv_fp8 import _decode_meta
from tierserve import LLM, SamplingParams
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.kv.fp8_pages import Fp8PagePolicy
from tierserve.kv.fp8_split import split_pages
from tierserve.kv.manager import KVManager
from tierserve.quant.fp8_compact import compact_summary, dequant_compact, new_compact_pool, store_compact_
from tierserve.quant.fp8_kv import dequant_pages, quantise_pages_
from tierserve.runner.kv_fp8 import Fp8Pages

SP = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
PROMPT = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]
OTHER = PROMPT[:100] + [(11 * i + 5) % 500 + 3 for i in range(60)]
KW = dict(kv_dtype="fp8", kv_fp8_keep_sink=4, kv_fp8_keep_recent=16)


@pytest.mark.parametrize("dtype,summary", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 1)])
def test_compact_slot_bytes_match_in_place_pages(dtype, summary):
    g = torch.Generator().manual_seed(1)
    ps, L, h, d = 16, 3, 2, 8
    data = (torch.randn(5, L, 2, ps + summary, h, d, generator=g) * 10).to(dtype)
    pool = new_compact_pool(4, L, ps, h, d, summary, dtype, "cpu")
    elem = data.element_size()
    assert pool.shape[-1] == ps * h * d + 4 * h + summary * h * d * elem      # codes, scales, summary rows
    store_compact_(data, pool, torch.tensor([3, 1]), torch.tensor([0, 2]), ps)
    inplace = data.clone()
    quantise_pages_(inplace, torch.tensor([3, 1]), ps)
    for src, dst in ((3, 0), (1, 2)):
        want = dequant_pages(inplace[src], ps)                  # [L, 2, ps, H, D]
        got = dequant_compact(pool[dst], ps, h, d)
        assert torch.equal(got, want)
        if summary:
            assert torch.equal(compact_summary(pool[dst], summary, h, d, ps, dtype), data[src, :, :, ps:])
    assert not pool[[1, 3]].any()


def test_split_rule():
    # 1000 pages' worth of memory, pages of 1 MiB bf16 / 0.52 MiB compact, 4 seqs * (1 + 4 + 2) + 2 chunk pages
    full, comp = split_pages(1000 * 2**20, 2**20, 2**19 + 2**12, 16, 4, 32, 16, 64)
    assert full == 4 * 7 + 2
    assert full + comp > 1.9 * 1000
    full, comp = split_pages(20 * 2**20, 2**20, 2**19 + 2**12, 16, 4, 32, 16, 64)   # tiny budget
    assert full >= 7 + 2 and comp > 0


@pytest.mark.parametrize("recent", [0, 16])
def test_torch_ref_reads_compact_pages_like_in_place(recent):
    """The same sequence with its old pages stored in place (part 1) or moved to compact slots: same bits."""
    torch.manual_seed(0)
    ps, hkv, hq, d, n = 16, 2, 4, 8, 64
    kv = torch.randn(6, 1, 2, ps, hkv, d) * 3
    q, k, v = torch.randn(1, hq, d), torch.randn(1, hkv, d), torch.randn(1, hkv, d)
    pt = [3, 0, 4, 1]
    a = Fp8Pages(6, ps, keep_sink=4, keep_recent=recent, device="cpu")
    ma = _decode_meta(n, ps, pt)
    ma.kv_fp8 = a
    kv_a = kv.clone()
    a.quantise(kv_a, [0, 4])                        # pages 1 and 2 of the sequence
    out_a = TorchRefBackend().forward(q, k, v, kv_a[:, 0], ma, d ** -0.5)
    pool = new_compact_pool(3, 1, ps, hkv, d, 0, torch.float32, "cpu")
    b = Fp8Pages(6, ps, keep_sink=4, keep_recent=recent, device="cpu", compact=pool)
    b.quantise(kv, [(0, 6 + 2), (4, 6 + 0)])
    kv[[0, 4]] = float("nan")                       # the freed full-precision slots are not read
    mb = _decode_meta(n, ps, [3, 8, 6, 1])
    mb.kv_fp8 = b
    out_b = TorchRefBackend().forward(q, k, v, kv[:, 0], mb, d ** -0.5)
    assert torch.equal(out_a, out_b)


def test_manager_moves_pages_and_follows_sharers():
    pol = Fp8PagePolicy(4, keep_sink=4, keep_recent=4)
    kv = KVManager(8, 4, enable_prefix_caching=True, fp8=pol, compact_slots=10)
    toks = list(range(40))
    assert kv.allocate("a", 24)
    kv.commit("a", toks, 24)
    moved = kv.take_quantise()
    # pages 1..4 left the window (page 5 holds positions 20..23, the recent ones); page 0 is the sink
    assert [i for i, p in enumerate(kv.page_table("a")) if p >= 9] == [1, 2, 3, 4]
    assert [new for _, new in moved] == kv.page_table("a")[1:5]
    assert kv.pool.num_free == 8 - 2
    hit = kv.find_prefix(toks, 23)                 # a new request reusing the chain: only the sink page
    assert hit.pages == kv.page_table("a")[:1]     # (its first query reads page 1.. at full precision)
    kv.check_invariants()
    kv.free("a")
    kv.check_invariants()
    assert kv.pool.num_in_use == 0 and kv.compact.pool.num_in_use == 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("kvfp8c") / "llama", "llama")


def _run(ckpt, prompts, together=False, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_batched_tokens", 32)
    kw.setdefault("dtype", "float32")
    llm = LLM(str(ckpt), device="cpu", debug_invariants=True, **kw)
    if together:
        outs = [o.outputs[0] for o in llm.generate(prompts, SP)]
    else:
        outs = [llm.generate([p], SP)[0].outputs[0] for p in prompts]
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_requests == 0 and kv.pool.num_in_use == 0
    assert kv.compact is None or kv.compact.pool.num_in_use == 0
    return [o.token_ids for o in outs], [[next(iter(x.values())) for x in o.logprobs] for o in outs], llm


@pytest.mark.parametrize("extra", [dict(enable_prefix_caching=False), dict(enable_prefix_caching=True),
                                   dict(enable_prefix_caching=False, num_scheduler_steps=4)])
def test_engine_compact_identical_to_in_place(ckpt, extra):
    prompts = [PROMPT, PROMPT, OTHER] if extra.get("enable_prefix_caching") else [PROMPT, OTHER]
    tok_a, lp_a, _ = _run(ckpt, prompts, kv_fp8_storage="inplace", **KW, **extra)
    tok_b, lp_b, llm = _run(ckpt, prompts, kv_fp8_storage="compact", **KW, **extra)
    assert llm.engine.kv.compact is not None and llm.engine.kv.quantised       # pages really moved
    assert tok_a == tok_b and lp_a == lp_b
    if extra.get("enable_prefix_caching"):
        assert llm.engine.kv.hit_tokens["gpu"] > 0


def test_auto_keeps_in_place_pages_where_the_compact_pool_would_be_small(ckpt):
    """A budget whose split leaves only a few compact slots: "auto" quantises in place (a full compact pool would
    leave pages at full precision for the kernel to quantise on every read); "compact" still takes the pool."""
    kw = dict(num_kv_pages=16, max_num_seqs=1, max_num_batched_tokens=176, **KW)
    tok_a, lp_a, _ = _run(ckpt, [PROMPT], kv_fp8_storage="inplace", **kw)
    tok_b, lp_b, llm = _run(ckpt, [PROMPT], **kw)                        # auto
    assert llm.engine.kv.compact is None and llm.engine.runner.num_compact_pages == 0
    assert tok_a == tok_b and lp_a == lp_b
    _, _, llm = _run(ckpt, [PROMPT], kv_fp8_storage="compact", **kw)
    assert 0 < llm.engine.runner.num_compact_pages < 16 // 4


def test_engine_compact_preemption(ckpt):
    prompts = [PROMPT, OTHER, PROMPT[:120]]
    ref, lp_ref, _ = _run(ckpt, prompts, together=True, enable_prefix_caching=False, kv_fp8_storage="inplace", **KW)
    tok, lp, llm = _run(ckpt, prompts, together=True, num_kv_pages=16, kv_fp8_storage="compact",
                        enable_prefix_caching=False, max_num_seqs=3, **KW)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tok == ref
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp_ref), rtol=0, atol=1e-5)


def test_same_budget_about_twice_the_tokens(ckpt):
    kw = dict(max_model_len=4096, num_kv_pages=2048, max_num_seqs=4, max_num_batched_tokens=256)
    bf = LLM(str(ckpt), dtype="bfloat16", device="cpu", **kw).engine.runner
    fp = LLM(str(ckpt), dtype="bfloat16", device="cpu", kv_dtype="fp8", **kw).engine.runner     # compact: the default
    ratio = fp.kv_capacity_tokens / bf.kv_capacity_tokens
    assert bf.kv_capacity_tokens == 2048 * 16
    mem_bf = bf.kv.data.nbytes
    mem_fp = fp.kv.data.nbytes + fp.fp8.compact.nbytes
    print(f"bf16: {bf.kv_capacity_tokens} tokens in {mem_bf / 2**20:.1f} MiB; fp8 compact: "
          f"{fp.kv_capacity_tokens} tokens in {mem_fp / 2**20:.1f} MiB ({ratio:.2f}x)")
    assert mem_fp <= mem_bf * 1.001 and ratio > 1.8


def test_auto_storage_keeps_in_place_pages_with_sparse_attention(ckpt):
    """auto: compact for dense attention, in place with sparse attention (its fused selection and CUDA graphs
    read in-place pages only); an explicit compact still gets the compact pool."""
    kw = dict(dtype="float32", device="cpu", kv_dtype="fp8", max_model_len=512, num_kv_pages=256, max_num_seqs=2)
    assert LLM(str(ckpt), **kw).engine.runner.num_compact_pages > 0
    sparse = dict(kw, sparse_attention="pages", sparse_topk_tokens=128)
    assert LLM(str(ckpt), **sparse).engine.runner.num_compact_pages == 0
    assert LLM(str(ckpt), kv_fp8_storage="compact", **sparse).engine.runner.num_compact_pages > 0


def test_on_write_never_clears_compact_flags():
    pool = new_compact_pool(3, 1, 16, 2, 8, 0, torch.float32, "cpu")
    f = Fp8Pages(5, 16, 4, 16, "cpu", compact=pool)
    f.on_write(torch.tensor([1, 6, 7]))
    assert f.quantised.tolist() == [False] * 5 + [True] * 3


def test_same_budget_runs_requests_bf16_cannot_hold_at_once(ckpt):
    """Three 175-token requests (33 pages) in the memory of 24 bf16 pages: the model-dtype pool must preempt,
    the compact pool holds all three at once, and its tokens equal in-place FP8 storage's."""
    prompts = [PROMPT, OTHER[:151], [0] + PROMPT[50:]]
    kw = dict(max_model_len=256, num_kv_pages=24, max_num_seqs=3, enable_prefix_caching=False, together=True,
              dtype="bfloat16")
    llms = {}
    for name, extra in (("bf16", {}), ("inplace", dict(KW, kv_fp8_storage="inplace")), ("compact", KW)):
        tok, _, llm = _run(ckpt, prompts, **extra, **kw)
        llms[name] = (tok, llm.engine.scheduler.num_preemptions, llm.engine.runner.kv_capacity_tokens)
    assert llms["bf16"][1] > 0 and llms["inplace"][1] > 0 and llms["compact"][1] == 0
    # 14 full-precision pages (3 x 4 + a chunk) + 19 FP8 pages: small budgets keep a large full-precision share
    assert llms["compact"][2] > 1.3 * llms["bf16"][2]
    assert llms["compact"][0] == llms["inplace"][0]
