"""Sparse page selection: bounds, selection vs a naive per-query reference, summaries, dense fallback."""
import random

import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.attention.select import SparseConfig, page_upper_bounds, select_pages


def test_upper_bound_bounds_every_key():
    torch.manual_seed(0)
    B, hq, hkv, P, page, d = 2, 4, 2, 5, 8, 16
    q = torch.randn(B, hq, 3, d)
    keys = torch.randn(B, hkv, P, page, d)
    ub = page_upper_bounds(q, keys.amin(3), keys.amax(3))                      # [B, Hkv, Q, P]
    # exact max over keys of each page, max over the query heads of the group
    qg = q.view(B, hkv, hq // hkv, 3, d)
    exact = torch.einsum("bkgqd,bkpsd->bkgqps", qg, keys).amax(-1).amax(2)      # [B, Hkv, Q, P]
    assert (ub >= exact - 1e-5).all()
    one = keys[:, :, :, :1]                  # a page of one key: the bound is exact
    ub1 = page_upper_bounds(q, one.amin(3), one.amax(3))
    torch.testing.assert_close(ub1, torch.einsum("bkgqd,bkpsd->bkgqps", qg, one).amax(-1).amax(2))


def test_page_spread_scores_the_midpoint_and_half_range():
    """``spread`` < 1: q.c + spread |q|.r per page (c / r: the key midpoint / half range), max over the group; 1: the
    bound itself, bit for bit; 0: the midpoint key's score. Out-of-range values are refused (config and selector)."""
    from tierserve.config import EngineConfig
    torch.manual_seed(1)
    B, hq, hkv, P, d = 1, 4, 2, 6, 16
    q = torch.randn(B, hq, 2, d)
    lo, hi = torch.randn(B, hkv, P, d), torch.randn(B, hkv, P, d)
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    qg = q.view(B, hkv, hq // hkv, 2, d)
    c, r = (lo + hi) / 2, (hi - lo) / 2
    for spread in (0.0, 0.25, 0.5):
        want = (torch.einsum("bkgqd,bkpd->bkgqp", qg, c) + spread * torch.einsum("bkgqd,bkpd->bkgqp", qg.abs(), r))
        torch.testing.assert_close(page_upper_bounds(q, lo, hi, spread), want.amax(2), rtol=1e-5, atol=1e-5)
    assert torch.equal(page_upper_bounds(q, lo, hi, 1.0), page_upper_bounds(q, lo, hi))
    with pytest.raises(ValueError, match="sparse_page_spread"):
        SparseConfig("pages", page_spread=1.5)
    with pytest.raises(ValueError, match="sparse_page_spread"):
        EngineConfig(model="m", sparse_attention="pages", sparse_page_spread=-0.1)


def test_engine_takes_the_page_spread(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256, sparse_attention="pages",
              sparse_topk_tokens=96, max_num_batched_tokens=32, sparse_page_spread=0.5)
    assert llm.engine.runner.sparse.page_spread == 0.5
    prompt = [0] + [(13 * i + 7) % 500 + 3 for i in range(150)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8


def naive_select(ub, q_pos, page, cfg):
    B, H, Q, P = ub.shape
    out = torch.zeros_like(ub, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                pos = int(q_pos[b, i])
                visible = [p for p in range(P) if p * page <= pos]
                if pos + 1 <= cfg.topk_tokens:
                    keep = set(visible)
                else:
                    forced = {p for p in visible if p * page < cfg.sink_tokens
                              or p * page + page > pos - cfg.recent_tokens or p == pos // page}
                    rest = sorted((p for p in visible if p not in forced), key=lambda p: (-float(ub[b, h, i, p]), p))
                    keep = forced | set(rest[:max(0, cfg.topk_tokens // page - len(forced))])
                for p in keep:
                    out[b, h, i, p] = True
    return out


def test_selection_matches_naive_reference():
    rng = random.Random(0)
    for trial in range(20):
        torch.manual_seed(trial)
        page = rng.choice([4, 8])
        P = rng.randrange(4, 16)
        cfg = SparseConfig("pages", topk_tokens=page * rng.randrange(3, 8), sink_tokens=page, recent_tokens=page)
        B, H, Q = 2, 2, 3
        ub = torch.randn(B, H, Q, P)
        q_pos = torch.randint(0, P * page, (B, Q))
        got = select_pages(ub, q_pos, None, page, cfg)
        want = naive_select(ub, q_pos, page, cfg)
        assert torch.equal(got, want), trial


def test_summaries_and_dense_equivalence(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    prompt = [0] + [(13 * i + 7) % 500 + 3 for i in range(120)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    dense = LLM(str(path), dtype="float32", device="cpu", max_model_len=256).generate([prompt], sp)[0]
    # a budget larger than the sequence: selection keeps everything -> identical tokens
    wide = LLM(str(path), dtype="float32", device="cpu", max_model_len=256, sparse_attention="pages",
               sparse_topk_tokens=256, max_num_batched_tokens=32)
    assert wide.generate([prompt], sp)[0].outputs[0].token_ids == dense.outputs[0].token_ids
    # a small budget really drops pages (the output may differ) and keeps the page summaries exact
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256, sparse_attention="pages",
              sparse_topk_tokens=96, max_num_batched_tokens=32, enable_prefix_caching=True)
    out = llm.generate([prompt], sp)[0]
    assert len(out.outputs[0].token_ids) == 16
    kv = llm.engine.runner.kv.data                   # pages stay cached after the request ends
    pool = llm.engine.kv.pool
    checked = 0
    for pid, m in enumerate(pool.meta):
        if m.block_hash is None:
            continue
        keys = kv[pid, :, 0, :16]                    # [L, page, H, D]
        torch.testing.assert_close(kv[pid, :, 0, 16], keys.amin(1))
        torch.testing.assert_close(kv[pid, :, 1, 16], keys.amax(1))
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("backend", ["torch_ref", "triton"])
def test_sparse_decode_multi_step_equals_single_steps(tmp_path, backend):
    """"pages" selection runs on the device, so sparse decode may run multi-step windows (and CUDA graphs):
    the same tokens as one step at a time, with the budget really dropping pages."""
    pytest.importorskip("triton")
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(13 * i + 7) % 500 + 3 for i in range(120)], [0] + [(7 * i + 1) % 400 + 3 for i in range(90)]]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for k in (1, 8):
        llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256, sparse_attention="pages",
                  sparse_topk_tokens=96, num_scheduler_steps=k, attention_backend=backend)
        assert llm.engine.runner.supports_multi_step()
        windows = []
        real = llm.engine.runner.launch_multi
        llm.engine.runner.launch_multi = lambda so, steps: windows.append(steps) or real(so, steps)
        outs[k] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert bool(windows) == (k > 1)
    assert outs[1] == outs[8]
