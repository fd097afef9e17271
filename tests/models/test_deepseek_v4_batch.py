"""DeepSeek-V4 batched decode (``DeepseekV4Model.decode_batch``, ``StatefulRunner.batch_decode``) against
the one-sequence-per-forward path and transformers (fp32, CPU).

Batch invariance: every row of a batch of sequences of different lengths (empty, shorter than the
window and than every compress ratio, crossing entry boundaries at different steps) gets the same
greedy tokens as ``forward_step`` on that sequence alone and log-probs within 1e-5; its new state
continues like the one-sequence state. Both tiny configs (hash + top-k MoE, hc_mult 2 / 3, CSA with an
indexer top-k below the entry count, HCA ratios 8 / 16, windows 8 / 12).
"""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import engine_checkpoints, rand_ids, CONFIGS, make_checkpoint, one_thread  # noqa: F401
from tierserve import LLM, SamplingParams
from tierserve.models.deepseek_v4 import load_model
from tierserve.models.deepseek_v4.state import LayerState

# 0: an empty state; 1-3 < CSA ratio 4; 5, 7 < window 8 / ratio 8; 11 < window 12 / ratio 16; then longer
LENGTHS = (0, 1, 3, 5, 7, 11, 21, 45)
STEPS = 20            # crosses every compressor's window boundary at least once for every row
ATOL = 1e-5


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return engine_checkpoints(tmp_path_factory, CONFIGS)


@pytest.fixture(scope="module")
def models(paths):
    return {name: load_model(p) for name, p in paths.items()}


rand = rand_ids


def start(model, n: int, seed: int):
    """State after a prompt of ``n`` tokens and the next token (greedy from the prompt's last row)."""
    if n == 0:
        return model.new_state(), 5
    logits, state = model.prefill(torch.tensor(rand(n, seed)))
    return state, int(logits[-1].argmax())


def assert_slots_match(ss, states) -> None:
    """Every slot ``b`` of a ``StaticState`` exports ``states[b]`` (the reference's state after the same steps)."""
    for b, st in enumerate(states):
        for x, y in zip(ss.export(b, st.num_tokens).layers, st.layers):
            assert_states_close(x, y)


def assert_states_close(a: LayerState, b: LayerState) -> None:
    assert a.num_tokens == b.num_tokens
    for x, y in ((a.window, b.window), (a.compressed, b.compressed), (a.index_keys, b.index_keys)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    for c, d in ((a.compressor, b.compressor), (a.indexer, b.indexer)):
        assert (c is None) == (d is None)
        if c is None:
            continue
        assert c.num_entries == d.num_entries and c.num_pending == d.num_pending
        for x, y in ((c.pending_kv, d.pending_kv), (c.pending_gate, d.pending_gate),
                     (c.prev_kv, d.prev_kv), (c.prev_gate, d.prev_gate)):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_batch_equals_one_sequence_forward(models, name):
    model = models[name]
    starts = [start(model, n, seed=i) for i, n in enumerate(LENGTHS)]
    ref = [s for s, _ in starts]
    batch = list(ref)
    ref_tok = [t for _, t in starts]
    tok = list(ref_tok)
    for _ in range(STEPS):
        rows = []
        for i in range(len(ref)):
            logits, ref[i] = model.forward_step(torch.tensor([ref_tok[i]]), ref[i])
            rows.append(logits[-1])
        want = torch.log_softmax(torch.stack(rows), -1)
        logits, batch = model.decode_batch(torch.tensor(tok), batch)
        got = torch.log_softmax(logits, -1)
        ref_tok, tok = want.argmax(-1).tolist(), got.argmax(-1).tolist()
        assert tok == ref_tok
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for r, b, n in zip(ref, batch, LENGTHS):
        assert b.num_tokens == r.num_tokens == n + STEPS
        for lr, lb in zip(r.layers, b.layers):
            assert_states_close(lb, lr)
    # a state made by decode_batch continues like a one-sequence state (multi-token chunk after it)
    more = torch.tensor(rand(6, 99))
    a, _ = model.forward_step(more, batch[3])
    b, _ = model.forward_step(more, ref[3])
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_decode_batch_of_one_and_repeated_rows(models):
    """B = 1 equals forward_step; the same state twice in a batch gives the same row twice."""
    model = models["mixed"]
    state, t = start(model, 13, seed=7)
    one, (s1,) = model.decode_batch(torch.tensor([t]), [state])
    ref, sr = model.forward_step(torch.tensor([t]), state)
    torch.testing.assert_close(one, ref, atol=ATOL, rtol=0)
    for a, b in zip(s1.layers, sr.layers):
        assert_states_close(a, b)
    two, _ = model.decode_batch(torch.tensor([t, t]), [state, state])
    torch.testing.assert_close(two[0], two[1], atol=0, rtol=0)
    torch.testing.assert_close(two[:1], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [2, 21])
def test_decode_batch_equal_lengths(models, n):
    """Rows of one length take the unmasked path (plain stacks, no length masks)."""
    model = models["mixed"]
    starts = [start(model, n, seed=s) for s in range(3)]
    states, toks = [s for s, _ in starts], [t for _, t in starts]
    logits, new = model.decode_batch(torch.tensor(toks), states)
    for i, (s, t) in enumerate(starts):
        ref, sr = model.forward_step(torch.tensor([t]), s)
        torch.testing.assert_close(logits[i:i + 1], ref, atol=ATOL, rtol=0)
        for a, b in zip(new[i].layers, sr.layers):
            assert_states_close(a, b)


def test_decode_batch_leaves_states_untouched(models):
    model = models["hca-first"]
    states = [start(model, n, seed=n)[0] for n in (3, 15, 16, 30)]
    before = [[t.clone() for ls in s.layers for t in (ls.window, ls.compressed, ls.index_keys) if t is not None]
              for s in states]
    ids = torch.tensor([4, 5, 6, 7])
    a, _ = model.decode_batch(ids, states)
    model.decode_batch(torch.tensor([9, 9, 9, 9]), states)
    b, _ = model.decode_batch(ids, states)
    assert torch.equal(a, b)
    for s, old in zip(states, before):
        now = [t for ls in s.layers for t in (ls.window, ls.compressed, ls.index_keys) if t is not None]
        assert all(torch.equal(x, y) for x, y in zip(now, old))


def test_decode_batch_rejects_bad_input(models):
    model = models["mixed"]
    with pytest.raises(ValueError, match="one token per state"):
        model.decode_batch(torch.tensor([1, 2]), [model.new_state()])


# ---------------------------------------------------------------------------------------- engine
PROMPT_LENGTHS = (2, 3, 6, 13, 37)
NEW = 24
SP = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)


def engine(path, batch: bool, **kw) -> LLM:
    kw.setdefault("max_model_len", 128)
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
    llm.engine.runner.batch_decode = batch
    return llm


def count_batches(llm: LLM) -> list[int]:
    """Wrap the model's decode_batch; returns the list the batch sizes go into."""
    model, sizes = llm.engine.runner.model, []
    inner = model.decode_batch

    def spy(ids, states):
        sizes.append(len(states))
        return inner(ids, states)

    model.decode_batch = spy
    return sizes


def assert_same(got, want) -> None:
    for g, w in zip(got, want):
        g, w = g.outputs[0], w.outputs[0]
        assert g.token_ids == w.token_ids
        for dg, dw, tok in zip(g.logprobs, w.logprobs, g.token_ids):
            assert dg[tok] == pytest.approx(dw[tok], abs=ATOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_batched_equals_per_request_and_transformers(paths, name):
    from transformers import DeepseekV4ForCausalLM

    ps = [rand(n, seed=n) for n in PROMPT_LENGTHS]
    want = engine(paths[name], batch=False).generate(ps, SP)
    batched = engine(paths[name], batch=True)
    sizes = count_batches(batched)
    got = batched.generate(ps, SP)
    assert max(sizes) == len(ps) and sum(sizes) == len(ps) * (NEW - 1)
    assert_same(got, want)
    hf = DeepseekV4ForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
    for p, g in zip(ps, got):
        seq = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert g.outputs[0].token_ids == seq[0, len(p):].tolist()
    eng = batched.engine
    assert eng.runner.num_states == 0 and eng.kv.pool.num_in_use == 0


def test_engine_per_request_path_is_not_batched(paths):
    llm = engine(paths["mixed"], batch=False)
    sizes = count_batches(llm)
    llm.generate([rand(n, seed=n) for n in PROMPT_LENGTHS], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert sizes == []


def test_engine_env_switch(paths, monkeypatch):
    monkeypatch.setenv("TIERSERVE_STATEFUL_BATCH_DECODE", "0")
    assert not LLM(str(paths["mixed"]), dtype="float32", device="cpu", max_model_len=64).engine.runner.batch_decode
    monkeypatch.delenv("TIERSERVE_STATEFUL_BATCH_DECODE")
    assert LLM(str(paths["mixed"]), dtype="float32", device="cpu", max_model_len=64).engine.runner.batch_decode


def test_engine_chunked_prefill_and_prefix_cache(paths):
    """Decodes batched beside prompt chunks (one-token prompt chunks join the batch), with prefix-cache
    snapshots stored from batched steps (unit 16) and hit by a repeat: same as the per-request path."""
    ps = [rand(n, seed=n) for n in PROMPT_LENGTHS]
    kw = dict(max_num_batched_tokens=7, prefix_unit=16)
    want = engine(paths["hca-first"], batch=False, **kw).generate(ps, SP)
    llm = engine(paths["hca-first"], batch=True, **kw)
    sizes = count_batches(llm)
    assert_same(llm.generate(ps, SP), want)
    assert max(sizes) > 1
    assert llm.engine.runner.prefix_cache.stats()["stored"] > 0
    # 37 + 24 tokens: the snapshot at 48 was stored by a batched decode step; the repeat hits it
    p = ps[-1] + want[-1].outputs[0].token_ids
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    again = llm.generate([p], sp)
    assert again[0].num_cached_tokens == 48
    assert_same(again, engine(paths["hca-first"], batch=False, enable_prefix_caching=False).generate([p], sp))


def test_engine_seeded_sampling_batched_equals_per_request(paths):
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=12, ignore_eos=True, logprobs=1)
    ps = [rand(n, seed=n) for n in PROMPT_LENGTHS[:3]]
    a = engine(paths["mixed"], batch=False).generate(ps, sp)
    b = engine(paths["mixed"], batch=True).generate(ps, sp)
    assert_same(b, a)


def test_bf16_batched_close_to_per_request(paths):
    model = load_model(paths["mixed"], dtype=torch.bfloat16)
    states, toks = zip(*[start(model, n, seed=n) for n in (3, 9, 30)])
    logits, _ = model.decode_batch(torch.tensor(toks), list(states))
    ref = torch.cat([model.forward_step(torch.tensor([t]), s)[0] for t, s in zip(toks, states)])
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref.float(), atol=0.1, rtol=0)
