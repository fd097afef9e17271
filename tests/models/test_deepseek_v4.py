"""DeepSeek-V4 against transformers' reference (fp32, CPU), and incremental decode against prefill.

Tiny random checkpoints (tests/helpers/tiny_deepseek_v4.py) cover every layer type (sliding, CSA,
HCA), hash and top-k MoE, hc_mult 2 and 3, windows shorter than the prompts, compress ratios 4 / 8 / 16
with prompt lengths that are not multiples of them, and an indexer top-k below the entry count.
"""
import pytest
import torch

from tests.helpers.tiny_deepseek_v4 import CONFIGS, make_checkpoint, one_thread  # noqa: F401
from tierserve.models.deepseek_v4 import greedy_generate, load_model

NEW = 32
LENGTHS = (7, 21, 45)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import DeepseekV4ForCausalLM

    out = {}
    for name in CONFIGS:
        path = make_checkpoint(tmp_path_factory.mktemp(name), name)
        hf = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (load_model(path), hf)
    return out


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(seed + n))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", LENGTHS)
def test_full_logits_match_transformers(models, name, n):
    ours, hf = models[name]
    ids = prompt(n)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours.forward_full(ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", LENGTHS)
def test_greedy_matches_transformers_generate(models, name, n):
    ours, hf = models[name]
    ids = prompt(n, seed=1)
    ref = hf.generate(ids[None], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, n:].tolist()
    tokens = greedy_generate(ours, ids, NEW)
    assert tokens == ref_tokens
    # log-probs of every step, computed incrementally (prefill + 31 single-token steps)
    logits, state = ours.prefill(ids)
    steps = [logits[-1]]
    for t in tokens[:-1]:
        logits, state = ours.forward_step(torch.tensor([t]), state)
        steps.append(logits[-1])
    got = torch.log_softmax(torch.stack(steps), -1)
    want = torch.log_softmax(torch.cat(ref.logits).float(), -1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


CHUNKINGS = {
    "token-by-token": [1] * 45,
    "mixed": [3, 5, 1, 7, 13, 16],            # chunks shorter and longer than window and ratios
    "one-chunk": [45],
    "prefill-then-steps": "prefill:20",
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_forward_step_equals_forward_full(models, name, chunking):
    ours, _ = models[name]
    ids = prompt(45, seed=2)
    full = ours.forward_full(ids)
    plan = CHUNKINGS[chunking]
    if isinstance(plan, str):
        k = int(plan.split(":")[1])
        first, state = ours.prefill(ids[:k])
        parts, plan, pos = [first], [1] * (45 - k), k
    else:
        state, parts, pos = ours.new_state(), [], 0
    for c in plan:
        logits, state = ours.forward_step(ids[pos:pos + c], state)
        parts.append(logits)
        pos += c
    assert state.num_tokens == 45
    torch.testing.assert_close(torch.cat(parts), full, atol=2e-5, rtol=0)


def test_states_are_snapshots(models):
    """A state is never written to: continuing from an old state (a prefix-cache hit, a rollback)
    gives the same output as the first time."""
    ours, _ = models["mixed"]
    ids = prompt(30, seed=3)
    _, state = ours.prefill(ids)
    before = [t.clone() for s in state.layers for t in (s.window, s.compressed) if t is not None]
    a1, _ = ours.forward_step(torch.tensor([5, 6, 7]), state)
    ours.forward_step(torch.tensor([9]), state)
    a2, _ = ours.forward_step(torch.tensor([5, 6, 7]), state)
    assert torch.equal(a1, a2)
    after = [t for s in state.layers for t in (s.window, s.compressed) if t is not None]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_state_layout(models):
    ours, _ = models["mixed"]          # layers: sliding, CSA (4), HCA (8), CSA (4); window 8
    cfg = ours.config
    _, state = ours.prefill(prompt(45))
    sl, csa, hca = state.layers[0], state.layers[1], state.layers[2]
    D, Di = cfg.head_dim, cfg.index_head_dim
    assert state.num_tokens == 45
    assert sl.window.shape == (8, D) and sl.compressed is None and sl.compressor is None
    assert csa.compressed.shape == (11, D) and csa.index_keys.shape == (11, Di)
    assert csa.compressor.pending_kv.shape == (1, 2 * D) and csa.compressor.prev_kv.shape == (4, D)
    assert csa.indexer.pending_kv.shape == (1, 2 * Di) and csa.indexer.prev_kv.shape == (4, Di)
    assert hca.compressed.shape == (5, D) and hca.compressor.pending_kv.shape == (5, D)
    assert hca.compressor.prev_kv is None and hca.index_keys is None
    assert state.nbytes() > 0


def test_forward_step_rejects_bad_input(models):
    ours, _ = models["mixed"]
    with pytest.raises(ValueError, match="empty"):
        ours.forward_step(torch.tensor([], dtype=torch.long), ours.new_state())
    with pytest.raises(ValueError, match="one sequence"):
        ours.forward_full(torch.zeros(2, 3, dtype=torch.long))


def test_query_blocks_do_not_change_the_result(models, monkeypatch):
    """Prefill attends in query blocks (bounded memory); block edges must not matter."""
    from tierserve.models.deepseek_v4 import attention

    ours, _ = models["mixed"]
    ids = prompt(45, seed=4)
    whole = ours.forward_full(ids)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)
    torch.testing.assert_close(ours.forward_full(ids), whole, atol=1e-5, rtol=0)
    _, state = ours.prefill(ids[:9])
    logits, _ = ours.forward_step(ids[9:], state)
    torch.testing.assert_close(logits, whole[9:], atol=2e-5, rtol=0)


def test_bf16_runs_and_steps_agree_with_prefill(models, tmp_path):
    """bf16 (mHC, sinks, position biases, norms, router biases kept in fp32). transformers' own
    model cannot run bf16 on the CPU (its fp32-kept norms feed bf16 linears), so this checks
    self-consistency and closeness to our fp32 only."""
    ours, _ = models["mixed"]
    path = make_checkpoint(tmp_path / "bf16", "mixed")
    b = load_model(path, dtype=torch.bfloat16)
    assert b.layers[0].hc_attn.fn.dtype == torch.float32 and b.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    ids = prompt(21, seed=5)
    full = b.forward_full(ids)
    state, parts = b.new_state(), []
    for i in range(0, 21, 4):
        logits, state = b.forward_step(ids[i:i + 4], state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts).float(), full.float(), atol=0.1, rtol=0)
    ref = ours.forward_full(ids)
    assert (full.float() - ref).abs().mean() < 0.1 * ref.abs().mean()      # bf16 noise: 2-5% here
