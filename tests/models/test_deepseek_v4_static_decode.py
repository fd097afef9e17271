"""The graph-capturable V4 decode step (``static_decode.py`` on ``StaticState`` buffers), run eagerly on the
CPU in fp32, against the current decode path (``decode_batch``): >= 40 steps, batch 1 and 2 (plus a padding
row), prompts crossing the CSA ratio 4 and HCA ratios 8 / 16 / 128, hc_mult 2 and 3, hash and top-k MoE
layers, kv_dtype auto and fp8; ``export`` gives the same states, ``load`` + ``export`` round-trips."""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import one_thread, rand_ids, tiny_models  # noqa: F401 (one_thread: autouse)
from tests.models.test_deepseek_v4_batch import assert_slots_match, assert_states_close
from tierserve.models.deepseek_v4.static_decode import decode_static
from tierserve.models.deepseek_v4.static_state import StaticState

STEPS = 42
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def _start(model, lengths):
    states, toks = [], []
    for i, n in enumerate(lengths):
        if n == 0:
            states.append(model.new_state())
            toks.append(5)
            continue
        logits, st = model.prefill(torch.tensor(rand_ids(n, seed=i + 7)))
        states.append(st)
        toks.append(int(logits[-1].argmax()))
    return states, toks


CASES = [("mixed", (6,)), ("mixed", (3, 11)), ("mixed", (0, 1)), ("hca-first", (5,)), ("hca-first", (2, 17)),
         ("hca128", (100,)), ("hca128", (90, 125))]


@pytest.mark.parametrize("name,lengths", CASES)
@pytest.mark.parametrize("pad", [0, 1])
def test_static_decode_equals_decode_batch(models, name, lengths, pad):
    model = models[name]
    ref, tok = _start(model, lengths)
    B = len(lengths)
    ss = StaticState(model, slots=B + pad, max_len=256)
    for b, st in enumerate(ref):
        ss.load(b, st)
    ids = torch.zeros(B + pad, dtype=torch.long)
    for _ in range(STEPS):
        want, ref = model.decode_batch(torch.tensor(tok), ref)
        ids[:B] = torch.tensor(tok)
        got = decode_static(model, ss, ids)[:B]
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1), atol=ATOL, rtol=0)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        tok = want.argmax(-1).tolist()
        assert got.argmax(-1).tolist() == tok
    assert ss.positions[:B].tolist() == [st.num_tokens for st in ref]
    for b, st in enumerate(ref):
        out = ss.export(b, st.num_tokens)
        for x, y in zip(out.layers, st.layers):
            assert_states_close(x, y)
    # the exported states continue like the reference ones
    cont = [ss.export(b, st.num_tokens) for b, st in enumerate(ref)]
    a, _ = model.decode_batch(torch.tensor(tok), ref)
    b, _ = model.decode_batch(torch.tensor(tok), cont)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_kv_fp8_static_decode_equals_decode_batch(models):
    model = models["mixed"].set_kv_dtype("fp8")
    try:
        ref, tok = _start(model, (3, 14))
        ss = StaticState(model, slots=2, max_len=128)
        for b, st in enumerate(ref):
            ss.load(b, st)
        for _ in range(STEPS):
            want, ref = model.decode_batch(torch.tensor(tok), ref)
            got = decode_static(model, ss, torch.tensor(tok))
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            tok = want.argmax(-1).tolist()
        assert_slots_match(ss, ref)
    finally:
        model.set_kv_dtype("auto")


def test_load_export_move_round_trip(models):
    model = models["mixed"]
    (st,), _ = _start(model, (13,))
    ss = StaticState(model, slots=3, max_len=64)
    ss.load(2, st)
    ss.move(2, 0)
    for x, y in zip(ss.export(0, 13).layers, st.layers):
        assert_states_close(x, y)
    assert ss.positions[0] == 13
    assert ss.bytes_for(13) == st.nbytes()
    with pytest.raises(ValueError, match="does not fit"):
        StaticState(model, slots=1, max_len=8).load(0, st)
    assert StaticState.estimate_bytes(model, 3, 64) == sum(
        t.numel() * t.element_size() for t in ss.tensors()[1:])
