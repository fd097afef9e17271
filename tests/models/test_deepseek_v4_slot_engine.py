"""The StatefulRunner's slot decoding (``runner/stateful_graphs.py``) in the engine: eagerly on the CPU
(fp32) it gives the same greedy tokens as the ``decode_batch`` path, with requests of different prompt and
output lengths (slots freed and compacted mid-batch), max_num_seqs below the request count (requests
wait, join later), chunked prefill, prefix caching (snapshots exported from slots) and a mix of greedy
and seeded sampling. On CUDA (skipped here): the captured graphs replay equal to the eager slot step."""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import make_checkpoint, one_thread, rand_ids  # noqa: F401
from tierserve import LLM, SamplingParams
from tierserve.loader.tokenizer import Tokenizer

LENGTHS = (5, 13, 37, 2, 9)
NEWS = (44, 20, 41, 7, 30)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = make_checkpoint(tmp_path_factory.mktemp("mixed"), "mixed")
    Tokenizer.synthetic(128).backend.save(str(p / "tokenizer.json"))
    return p


def _run(path, slots: bool, params=None, small=None, **kw):
    kw.setdefault("max_model_len", 128)
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
    runner = llm.engine.runner
    if slots:
        assert runner.enable_slot_decode(use_graphs=False)
        assert not runner.cuda_graphs
    if small:                           # (slots, max_len): batches and sequences that do not fit fall back
        from tierserve.runner.stateful_graphs import SlotDecoder
        runner.slots = SlotDecoder(runner.model, small[0], small[1], runner.device, use_graphs=False)
    prompts = [rand_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    params = params or [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in NEWS]
    outs = llm.generate(prompts, params)
    assert runner.num_states == 0 and (runner.slots is None or not runner.slots.slot_of)
    if slots and not small:
        assert runner.slots.steps >= max(NEWS) - 1
    if small:
        assert 0 < runner.slots.steps < max(NEWS) - 1
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kw", [{}, dict(max_num_seqs=3), dict(max_num_batched_tokens=6),
                                dict(enable_prefix_caching=True, prefix_unit=16), dict(kv_dtype="fp8")])
def test_slot_decode_equals_decode_batch(path, kw):
    want = _run(path, False, **kw)
    assert [len(t) for t in want] == list(NEWS)
    assert _run(path, True, **kw) == want


def test_too_few_slots_or_too_short_fall_back(path):
    """2 slots of 48 tokens: the first steps (5 requests) and the long tails run ``decode_batch``, requests
    move in and out of the slots as the batch shrinks and grows past them."""
    assert _run(path, False, small=(2, 48)) == _run(path, False)


def test_slot_decode_with_sampling(path):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=n, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for i, n in enumerate(NEWS)]
    assert _run(path, True, params) == _run(path, False, params)


def test_slot_state_bytes_and_refusal(path):
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128)
    runner = llm.engine.runner
    assert runner.slots is None and not runner.cuda_graphs          # CPU: off unless asked
    assert runner.enable_slot_decode(use_graphs=False)
    llm.engine.config.cpu_experts = True
    assert not runner.enable_slot_decode(use_graphs=False) and runner.slots is None
    llm.engine.config.cpu_experts = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager(path):
    from tierserve.models.deepseek_v4 import load_model
    from tierserve.runner.stateful_graphs import SlotDecoder

    model = load_model(path, dtype=torch.float32, device="cuda")
    states, toks = [], []
    for i, n in enumerate((6, 19, 40)):
        logits, st = model.prefill(torch.tensor(rand_ids(n, seed=i), device="cuda"))
        states.append(st)
        toks.append(int(logits[-1].argmax()))
    decs = [SlotDecoder(model, 4, 128, torch.device("cuda"), use_graphs=g) for g in (False, True)]
    assert decs[1].uses_graphs and not decs[0].uses_graphs
    rids = ["a", "b", "c"]
    for d in decs:
        for r, st in zip(rids, states):
            d.admit(r, st)
    for step in range(12):
        ids = torch.tensor(toks, device="cuda")
        (le, ge), (lg, gg) = (d.step(rids, ids) for d in decs)
        torch.testing.assert_close(lg, le, atol=1e-4, rtol=1e-4)
        assert gg.tolist() == ge.tolist()
        toks = ge.tolist()
        if step == 5:                         # a request leaves: the last slot moves into its place
            for d in decs:
                d.evict("a", export=False)
            rids, toks = rids[1:], toks[1:]
    assert decs[1].replays == 12
    assert decs[1].time_replay(1) is None                 # slots still held
    for r in rids:
        decs[1].evict(r, export=False)
    assert decs[1].time_replay(1) > 0 and decs[0].time_replay(1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_cuda_graphs_equals_enforce_eager(path, dtype):
    """enforce_eager runs the slot decoder's code without graphs: bit-identical tokens and logprobs."""
    prompts = [rand_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in NEWS]
    out = {}
    for eager in (True, False):
        llm = LLM(str(path), dtype=dtype, device="cuda", max_model_len=128, enforce_eager=eager)
        runner = llm.engine.runner
        assert runner.cuda_graphs is not eager and runner.slots is not None
        out[eager] = [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                      for o in llm.generate(prompts, params)]
        if not eager:
            assert runner.slots.replays >= max(NEWS) - 1 and not runner.slots.slot_of
    assert out[False] == out[True]
