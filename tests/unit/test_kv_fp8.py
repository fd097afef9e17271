"""FP8 KV cache (issue 6, part 1): page format, the full-precision read rule, engine output."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.attention.backend import AttnMetadata
from tierserve.attention.torch_ref import TorchRefBackend
from tierserve.config import EngineConfig
from tierserve.quant.fp8_kv import dequant_pages, fake_quant, pow2_scale, quantise_pages_
from tierserve.runner.kv_fp8 import Fp8Pages

SP = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
PROMPT = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens: 9 full pages of 16
OTHER = PROMPT[:100] + [(11 * i + 5) % 500 + 3 for i in range(60)]


def test_page_roundtrip_pow2_scales_within_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, 2, 2, 16, 2, 8, generator=g) * torch.logspace(-3, 3, 6)[:, None, None, None, None, None]
    orig = data.clone()
    quantise_pages_(data, torch.tensor([1, 4, 5]), 16)
    assert torch.equal(data[[0, 2, 3]], orig[[0, 2, 3]])          # other pages untouched
    deq = dequant_pages(data[[1, 4, 5]], 16)                       # [3, L, 2, 16, H, D]
    ref = orig[[1, 4, 5]]
    amax = ref.abs().amax(dim=(3, 5), keepdim=True)
    assert ((deq - ref).abs() <= amax * 2.0 ** -4).all()            # e4m3: 3 mantissa bits
    scale = data[[1, 4, 5]].contiguous().view(torch.uint8).reshape(3, 2, 2, -1)[..., 256:256 + 8]
    scale = scale.contiguous().view(torch.float32)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)     # powers of two
    assert (scale >= amax.reshape(3, 2, 2, 2) / 448).all() and (scale < amax.reshape(3, 2, 2, 2) / 224).all()
    assert torch.equal(deq, fake_quant(ref.reshape(-1, 16, 2, 8), 16).reshape(deq.shape))  # storage == on the fly
    assert pow2_scale(torch.tensor([448.0, 449.0, 0.0])).tolist() == [1.0, 2.0, 1.0]


def _decode_meta(seq_len, ps, page_table):
    pos = torch.tensor([seq_len - 1])
    return AttnMetadata(num_seqs=1, num_tokens=1, page_size=ps, positions=pos,
                        slot_pages=torch.tensor([page_table[(seq_len - 1) // ps]]),
                        slot_offsets=pos % ps, query_start_loc=torch.tensor([0, 1]),
                        seq_lens=torch.tensor([seq_len]), page_table=torch.tensor([page_table]),
                        query_lens_cpu=[1], seq_lens_cpu=[seq_len], decode_only=True)


@pytest.mark.parametrize("stored", [False, True])
def test_sink_and_recent_tokens_are_read_at_full_precision(stored):
    """Attention equals SDPA over keys where exactly tokens 16..47 are FP8 (the read rule is per page: page 0
    holds sink tokens 0..3, page 3 recent ones; pages 1 and 2 end >= keep_recent before the query), whether
    those pages are quantised in storage or still full precision."""
    torch.manual_seed(0)
    ps, hkv, hq, d, n = 16, 2, 4, 8, 64
    kv = torch.randn(5, 2, ps, hkv, d) * 3
    pt = [3, 0, 4, 1]
    q, k, v = torch.randn(1, hq, d), torch.randn(1, hkv, d), torch.randn(1, hkv, d)
    fp8 = Fp8Pages(5, ps, keep_sink=4, keep_recent=16, device="cpu")
    meta = _decode_meta(n, ps, pt)
    meta.kv_fp8 = fp8
    # expected: the logical sequence with per-token precision
    seq = kv.clone()
    seq[pt[3], 0, 15], seq[pt[3], 1, 15] = k[0], v[0]
    logical = seq[pt]                                             # [4, 2, ps, H, D]
    low = fake_quant(logical, ps)
    j = torch.arange(n)
    first = j // ps * ps
    use_low = (first >= 4) & (n - 1 - (first + ps - 1) >= 16)
    assert use_low.nonzero().flatten().tolist() == list(range(16, 48))
    full_k, full_v = logical[:, 0].reshape(n, hkv, d), logical[:, 1].reshape(n, hkv, d)
    ek = torch.where(use_low[:, None, None], low[:, 0].reshape(n, hkv, d), full_k)
    ev = torch.where(use_low[:, None, None], low[:, 1].reshape(n, hkv, d), full_v)
    want = F.scaled_dot_product_attention(q.view(1, hkv, 2, d), ek.transpose(0, 1), ev.transpose(0, 1),
                                          scale=d ** -0.5).reshape(1, hq, d)
    if stored:        # pages 1 and 2 of the sequence are old enough: quantise them in storage
        fp8.quantise(kv.view(5, 1, 2, ps, hkv, d), [pt[1], pt[2]])
    out = TorchRefBackend().forward(q, k, v, kv, meta, d ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # and the rule matters: all-FP8 (or all-full) keys give a different result
    for keys in (low[:, 0].reshape(n, hkv, d), full_k):
        other = F.scaled_dot_product_attention(q.view(1, hkv, 2, d), keys.transpose(0, 1), ev.transpose(0, 1),
                                               scale=d ** -0.5).reshape(1, hq, d)
        assert (other - want).abs().max() > 1e-4


def test_config_validation():
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(kv_dtype="int8")
    with pytest.raises(ValueError, match="kv_fp8_keep_recent"):
        EngineConfig(kv_fp8_keep_recent=-1)
    EngineConfig(kv_dtype="fp8", cpu_kv_gb=0.01)                 # live pages spill as compact FP8 rows
    with pytest.raises(ValueError, match="disk_kv_dir.*only cpu_kv_gb"):
        EngineConfig(kv_dtype="fp8", disk_kv_dir="/tmp/kv")
    with pytest.raises(ValueError, match="remote_kv_url"):
        EngineConfig(kv_dtype="fp8", remote_kv_url="redis://localhost:6379")
    with pytest.raises(ValueError, match="indexer"):
        EngineConfig(kv_dtype="fp8", cpu_kv_gb=0.01, sparse_attention="indexer")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("kvfp8") / "llama", "llama")


def _run(ckpt, prompts, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_batched_tokens", 32)        # small chunks: attention reads the stored pages
    llm = LLM(str(ckpt), dtype="float32", device="cpu", debug_invariants=True, **kw)
    outs = [llm.generate([p], SP)[0].outputs[0] for p in prompts]
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_requests == 0 and all(m.ref_count == 0 for m in kv.pool.meta)   # accounting back to 0
    return [o.token_ids for o in outs], [[next(iter(d.values())) for d in o.logprobs] for o in outs], llm


@pytest.fixture(scope="module")
def runs(ckpt):
    full = _run(ckpt, [PROMPT, OTHER], enable_prefix_caching=False)
    fp8 = _run(ckpt, [PROMPT, OTHER], kv_dtype="fp8", enable_prefix_caching=False,
               kv_fp8_keep_sink=4, kv_fp8_keep_recent=16)
    return full, fp8


def test_fp8_close_to_full_precision(runs):
    (tok_f, lp_f, _), (tok_q, lp_q, llm) = runs
    assert len(llm.engine.kv.quantised) > 0                      # pages really were stored as FP8
    delta = max(abs(a - b) for la, lb in zip(lp_f, lp_q) for a, b in zip(la, lb))
    print(f"max |logprob delta| fp8 vs fp32 KV: {delta:.4f}")
    assert delta < 0.1 and tok_f == tok_q


def test_fp8_exact_when_window_covers_everything(ckpt, runs):
    (tok_f, lp_f, _), _ = runs
    tok, lp, llm = _run(ckpt, [PROMPT, OTHER], kv_dtype="fp8", enable_prefix_caching=False,
                        kv_fp8_keep_recent=256)
    assert not llm.engine.kv.quantised
    assert tok == tok_f and lp == lp_f


@pytest.mark.parametrize("storage", ["inplace", "compact"])
def test_fp8_storage_keeps_sink_and_window_pages(ckpt, storage):
    tok, lp, llm = _run(ckpt, [PROMPT], kv_dtype="fp8", enable_prefix_caching=True,
                        kv_fp8_keep_sink=20, kv_fp8_keep_recent=40, kv_fp8_storage=storage)
    kv = llm.engine.kv
    pol = kv.fp8
    n = len(PROMPT) + SP.max_tokens - 1                # tokens computed by the end
    stored = llm.engine.runner.fp8.quantised
    want = sum(1 for i in range(n // 16) if not pol.needs_full(i, n))
    assert len(kv.quantised) == want
    if storage == "inplace":
        assert int(stored.sum()) == want
    else:                                              # moved to compact slots (cached, evictable by now)
        assert kv.compact.pool.num_cached_evictable == want and min(kv.quantised) >= kv.compact.base
    assert pol.needs_full(0, n) and pol.needs_full(1, n)          # sink tokens 0..19 span pages 0 and 1
    assert not pol.needs_full(2, n) and pol.needs_full(n // 16 - 1, n)


def test_prefix_hits_and_preemption_identical(ckpt, runs):
    _, (tok_q, lp_q, _) = runs
    kw = dict(kv_dtype="fp8", kv_fp8_keep_sink=4, kv_fp8_keep_recent=16)
    # same prompt twice (full hit), then a prompt sharing 100 tokens (hit truncated to full-precision pages)
    tok, lp, llm = _run(ckpt, [PROMPT, PROMPT, OTHER], **kw)
    assert llm.engine.kv.hit_tokens["gpu"] > 0
    assert tok == [tok_q[0], tok_q[0], tok_q[1]]       # logprobs: equal up to GEMM shape rounding
    torch.testing.assert_close(torch.tensor(lp), torch.tensor([lp_q[0], lp_q[0], lp_q[1]]), rtol=0, atol=1e-5)
    # preemption: three requests in a pool too small for all of them
    # (in-place storage: the compact pool's ~2x capacity would not preempt here; test_kv_fp8_compact.py does)
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256, num_kv_pages=18,
              max_num_batched_tokens=32, debug_invariants=True, kv_fp8_storage="inplace", **kw)
    outs = llm.generate([PROMPT, OTHER, PROMPT[:120]], SP)
    assert llm.engine.scheduler.num_preemptions > 0
    ref, _, _ = _run(ckpt, [PROMPT[:120]], enable_prefix_caching=False, **kw)
    assert [o.outputs[0].token_ids for o in outs] == [tok_q[0], tok_q[1], ref[0]]
    llm.engine.kv.check_invariants()
    assert all(m.ref_count == 0 for m in llm.engine.kv.pool.meta)
