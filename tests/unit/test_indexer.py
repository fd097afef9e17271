"""Lightning-indexer selector: scoring vs a naive loop, save/load, engine paths, training smoke."""
import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.attention.indexer import IndexerConfig, IndexerSet, page_scores, token_scores


def test_token_and_page_scores_match_naive():
    g = torch.Generator().manual_seed(0)
    Q, H, d, L, page = 3, 2, 8, 12, 4
    q, w, k = torch.randn(Q, H, d, generator=g), torch.randn(Q, H, generator=g), torch.randn(L, d, generator=g)
    got = token_scores(q, w, k)
    for i in range(Q):
        for t in range(L):
            want = sum(float(w[i, h]) * max(0.0, float(q[i, h] @ k[t])) for h in range(H)) / d ** 0.5
            assert abs(float(got[i, t]) - want) < 1e-5
    visible = torch.arange(L)[None, :] <= torch.tensor([2, 5, 11])[:, None]
    ps = page_scores(got, visible, page)
    assert ps.shape == (Q, L // page)
    assert ps[0, 1] == float("-inf") and ps[1, 1] == got[1, 4:6].max() and ps[2, 2] == got[2, 8:].max()


def test_indexer_set_round_trip_and_errors(tmp_path):
    s = IndexerSet(IndexerConfig(num_layers=2, hidden_size=16, heads=2, dim=8))
    s.save(tmp_path / "idx", extra={"note": "x"})
    back = IndexerSet.load(tmp_path / "idx")
    for a, b in zip(s.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="train-indexer"):
        IndexerSet.load(tmp_path / "nothing")


def _random_indexer(ckpt, out, seed=0):
    import json
    cfg = json.loads((ckpt / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    torch.manual_seed(seed)
    s = IndexerSet(IndexerConfig(cfg["num_hidden_layers"], cfg["hidden_size"], 2, cfg["hidden_size"] // heads))
    return s.save(out)


@pytest.fixture(scope="module")
def ckpt_and_indexer(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    ckpt = make_checkpoint(d / "m", "llama")
    return ckpt, _random_indexer(ckpt, d / "indexer")


PROMPT = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)]]


def _run(ckpt, idx, backend="torch_ref", topk=88, **kw):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=160, page_size=8, attention_backend=backend,
              sparse_attention="indexer", sparse_topk_tokens=topk, indexer_path=str(idx), **kw)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    return llm.generate(PROMPT, sp)[0].outputs[0], llm


def test_indexer_selection_is_used_and_dense_when_short(ckpt_and_indexer):
    ckpt, idx = ckpt_and_indexer
    dense = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=160, page_size=8).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))[0].outputs[0]
    wide, llm = _run(ckpt, idx, topk=152)          # the budget covers the whole context: dense
    assert llm.engine.runner.index_keys is not None and llm.engine.runner.model.layers[0].self_attn.indexer
    assert wide.token_ids == dense.token_ids
    # 11 of 15 pages: the logprobs must move (32-token chunks: the last prefill chunk reads a sparse context)
    narrow, _ = _run(ckpt, idx, topk=88, max_num_batched_tokens=32)
    diffs = [abs(a[t] - b[t]) for a, b, t in zip(narrow.logprobs, dense.logprobs, dense.token_ids) if t in a]
    assert max(diffs, default=1.0) > 1e-4


def test_indexer_triton_decode_matches_reference(ckpt_and_indexer):
    ckpt, idx = ckpt_and_indexer
    ref, _ = _run(ckpt, idx, "torch_ref", num_kv_pages=64)
    tri, _ = _run(ckpt, idx, "triton", num_kv_pages=64)
    assert tri.token_ids == ref.token_ids


def test_indexer_refuses_tiers_and_wrong_shapes(ckpt_and_indexer, tmp_path):
    ckpt, idx = ckpt_and_indexer
    with pytest.raises(ValueError, match="tiers"):
        LLM(str(ckpt), device="cpu", sparse_attention="indexer", indexer_path=str(idx), cpu_kv_gb=1)
    bad = IndexerSet(IndexerConfig(num_layers=3, hidden_size=64, heads=2, dim=16)).save(tmp_path / "bad")
    with pytest.raises(ValueError, match="indexer was trained for"):
        LLM(str(ckpt), device="cpu", sparse_attention="indexer", indexer_path=str(bad))


def test_train_indexer_smoke(tmp_path):
    from tierserve.train.indexer import train_indexer
    res = train_indexer(None, tmp_path / "nano-idx", steps=3, seq_len=64, batch=1, eval_windows=1,
                        train_files=5, device="cpu")
    assert len(res["loss_curve"]) == 3 and all(v == v for v in res["loss_curve"])
    back = IndexerSet.load(tmp_path / "nano-idx")
    assert back.cfg.num_layers == 4 and len(res["heldout"]["per_layer"]) == 4
