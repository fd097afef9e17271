"""Sparse attention in prefill chunks: the gather + LSE-merge path (attention/sparse_prefill.py) equals masked
attention under the reference rule, and the engine's Triton backend equals the torch reference."""
import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.attention.select import SparseConfig, page_upper_bounds
from tierserve.attention.sparse_prefill import (PREFILL_BLOCK, prefill_selection, sparse_chunk_attention,
                                                sparse_context)


def _pool(num_pages, page, hkv, d, g):
    """Random pages with their key min / max summary row (as kv/layout.py keeps it)."""
    kv = torch.randn(num_pages, 2, page + 1, hkv, d, generator=g)
    kv[:, 0, page] = kv[:, 0, :page].amin(1)
    kv[:, 1, page] = kv[:, 0, :page].amax(1)
    return kv


@pytest.mark.parametrize("start,n,hq,hkv", [(200, 30, 4, 2), (133, 70, 8, 8), (260, 1, 4, 1), (96, 129, 4, 2)])
def test_sparse_chunk_attention_matches_masked_reference(start, n, hq, hkv):
    g = torch.Generator().manual_seed(start + n)
    page, d = 8, 16
    cfg = SparseConfig("pages", topk_tokens=48, sink_tokens=8, recent_tokens=16)
    assert sparse_context(start, page, cfg)
    P = -(-(start + n) // page)
    kv = _pool(P + 3, page, hkv, d, g)
    pages = torch.randperm(P + 3, generator=g)[:P]
    q = torch.randn(n, hq, d, generator=g)
    L = start + n                                        # the chunk's own K/V already sit in the pages
    keys = kv[pages, 0, :page].reshape(-1, hkv, d)[:L]
    vals = kv[pages, 1, :page].reshape(-1, hkv, d)[:L]
    scale = d ** -0.5
    got = sparse_chunk_attention(q, keys[start:], vals[start:], kv, pages, start, scale, cfg, page)
    # reference: per-query page scores -> the rule's page mask, key-level causal mask, masked softmax
    ub = page_upper_bounds(q.transpose(0, 1)[None], kv[pages, 0, page].transpose(0, 1)[None],
                           kv[pages, 1, page].transpose(0, 1)[None])[0]                    # [Hkv, n, P]
    chosen = prefill_selection(ub, start, n, page, cfg).repeat_interleave(page, -1)[..., :L]   # [Hkv, n, L]
    causal = torch.arange(L)[None, :] <= start + torch.arange(n)[:, None]
    mask = (chosen & causal).repeat_interleave(hq // hkv, 0)                                # [Hq, n, L]
    s = q.transpose(0, 1) @ keys.transpose(0, 1).repeat_interleave(hq // hkv, 0).transpose(1, 2) * scale
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vals.transpose(0, 1).repeat_interleave(hq // hkv, 0)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    # the rule reads a subset: the budget's pages per block, the partial page and the chunk itself
    k = cfg.topk_tokens // page
    assert int(chosen[0, 0, :start // page * page].view(-1, page)[:, 0].sum()) == k


def test_prefill_selection_shares_one_choice_per_block():
    cfg = SparseConfig("pages", topk_tokens=32, sink_tokens=8, recent_tokens=8)
    start, n, page = 120, 100, 8
    ub = torch.randn(2, n, -(-(start + n) // page))
    sel = prefill_selection(ub, start, n, page, cfg)
    pc = start // page
    for i in range(n):                                   # same block -> same context pages
        j = (start + i) // PREFILL_BLOCK * PREFILL_BLOCK - start
        assert torch.equal(sel[:, i, :pc], sel[:, max(j, 0), :pc])
    assert not torch.equal(sel[:, 0, :pc], sel[:, n - 1, :pc])


@pytest.mark.parametrize("budget", [32, 24])
def test_engine_sparse_prefill_matches_reference(tmp_path, monkeypatch, budget):
    from tierserve.attention import triton_backend

    calls = []
    real = triton_backend.sparse_chunk_attention
    monkeypatch.setattr(triton_backend, "sparse_chunk_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # the short prompt decodes while the long one still prefills: steps mixing decode rows and sparse chunks
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(210)], [0] + [(5 * i + 1) % 400 + 3 for i in range(120)]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for be in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device=dev, max_model_len=256, attention_backend=be, num_kv_pages=64,
                  page_size=8, sparse_attention="pages", sparse_topk_tokens=88, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)
        outs[be] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]
    assert calls, "no chunk took the sparse prefill path"
