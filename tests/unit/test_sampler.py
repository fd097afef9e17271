import random

import pytest
import torch

from tierserve.runner.sampler import (
    Sampler, SamplingBatch, filtered_probs, reference_sample_probs,
)
from tierserve.sampling import SamplingParams


def build(params, vocab, prompt=None, output=None, gens=None):
    n = len(params)
    return SamplingBatch.build(params, prompt or [[] for _ in range(n)], output or [[] for _ in range(n)],
                               gens or [None] * n, vocab, "cpu")


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([0, 0, 1, 2, 5, vocab - 1, vocab + 10]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.2, 0.05]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2, 0.6]),
    )


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # tie -> lowest index
    batch = build([SamplingParams(temperature=0)] * 5 + [SamplingParams(top_k=1, temperature=0.8)], 50)
    assert batch.all_greedy and not batch.all_random
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[2] == 7 and out.logprobs is None and out.token_ids.dtype == torch.int64
    # bf16 logits are computed in float32
    out16 = Sampler()(logits.bfloat16(), batch)
    assert torch.equal(out16.token_ids, logits.bfloat16().float().argmax(-1))


def test_filtered_probs_match_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    for vocab in (8, 33):
        params = [random_params(rng, vocab) for _ in range(200)]
        logits = torch.randn(len(params), vocab) * 3
        got = filtered_probs(logits, build(params, vocab))
        for i, p in enumerate(params):
            ref = reference_sample_probs(logits[i], p)
            torch.testing.assert_close(got[i].double(), ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{p}: {m}")
            assert not torch.any((got[i] > 0) & (ref == 0)), p  # nothing filtered out comes back
            assert torch.all((got[i] > 0) | (ref < 1e-30)), p  # float32 may underflow the far tail


def test_fast_path_flags():
    b = build([SamplingParams(), SamplingParams(temperature=0.5, top_k=100)], 50)
    assert b.all_random and not b.all_greedy and b.no_penalties and b.no_top_k_p_min_p
    assert b.prompt_token_mask is None and b.output_token_counts is None
    b = build([SamplingParams(temperature=0, top_p=0.5), SamplingParams(min_p=0.1)], 50)
    assert not b.all_random and not b.all_greedy and not b.no_top_k_p_min_p
    assert b.top_p[0] == 1.0  # greedy rows get neutral filters


def test_empirical_frequencies_match_reference():
    vocab, n = 8, 20000
    torch.manual_seed(1)
    logits = torch.randn(vocab)
    for p in (SamplingParams(), SamplingParams(temperature=0.7, top_p=0.8),
              SamplingParams(temperature=1.3, top_k=5, min_p=0.05)):
        ref = reference_sample_probs(logits, p)
        out = Sampler(torch.Generator().manual_seed(123))(logits.expand(n, vocab), build([p] * n, vocab))
        counts = torch.bincount(out.token_ids, minlength=vocab).double()
        assert torch.all(counts[ref == 0] == 0)
        expected = ref * n
        nz = expected > 0
        chi2 = (((counts - expected)[nz]) ** 2 / expected[nz]).sum().item()
        assert chi2 < 30.0, (p, chi2, counts, expected)  # dof <= 7; p(chi2 > 30) ~ 1e-4


def test_seeded_rows_independent_of_batch():
    vocab = 40
    torch.manual_seed(2)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    others = [SamplingParams(temperature=0.8), SamplingParams(temperature=0), SamplingParams(top_k=3)]

    def run(with_others: bool, steps=20):
        g = torch.Generator().manual_seed(seeded.seed)
        sampler = Sampler(torch.Generator().manual_seed(99 if with_others else 5))
        toks = []
        for step in range(steps):
            row = torch.randn(vocab, generator=torch.Generator().manual_seed(step))
            if with_others:
                params = others[:1] + [seeded] + others[1:]
                logits = torch.stack([torch.randn(vocab), row, torch.randn(vocab), torch.randn(vocab)])
                out = sampler(logits, build(params, vocab, gens=[None, g, None, None]))
                toks.append(out.token_ids[1].item())
            else:
                out = sampler(row[None], build([seeded], vocab, gens=[g]))
                toks.append(out.token_ids[0].item())
        return toks

    alone = run(False)
    assert alone == run(False) == run(True)
    assert len(set(alone)) > 1


def naive_penalties(logits, p: SamplingParams, prompt, output):
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def test_penalties_match_naive_loop():
    from tierserve.runner.sampler import apply_penalties
    rng = random.Random(3)
    vocab = 30
    params, prompts, outputs = [], [], []
    for _ in range(12):
        params.append(SamplingParams(repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
                                     presence_penalty=rng.choice([0.0, 0.5, -1.0]),
                                     frequency_penalty=rng.choice([0.0, 0.3, -2.0]), temperature=0))
        prompts.append([rng.randrange(vocab) for _ in range(rng.randrange(6))])
        outputs.append([rng.randrange(vocab) for _ in range(rng.randrange(8))] + [vocab + 5])  # dropped
    params[0] = SamplingParams(temperature=0)
    logits = torch.randn(12, vocab) * 2
    batch = build(params, vocab, prompts, outputs)
    assert not batch.no_penalties
    got = apply_penalties(logits, batch)
    out = Sampler()(logits, batch)
    for i, p in enumerate(params):
        ref = naive_penalties(logits[i], p, prompts[i], outputs[i][:-1])
        torch.testing.assert_close(got[i], ref)
        assert out.token_ids[i] == ref.argmax()
        full = reference_sample_probs(logits[i], p, prompts[i], outputs[i][:-1])
        assert full.argmax() == ref.argmax()


@pytest.mark.parametrize("mixed", [False, True])
def test_logprobs_are_raw_log_softmax(mixed):
    vocab = 64
    torch.manual_seed(4)
    logits = torch.randn(5, vocab, dtype=torch.float64)
    params = [SamplingParams(logprobs=k, temperature=0.5, repetition_penalty=1.5) for k in (0, 3, 5, None, 1)]
    if mixed:
        params[1] = SamplingParams(temperature=0, logprobs=2)
    batch = build(params, vocab, prompt=[[1, 2, 3]] * 5)
    assert batch.max_logprobs == 5 and batch.need_logprobs
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch)
    ref = logits.float().log_softmax(-1)
    assert out.logprobs.shape == (5, 6) and out.logprob_token_ids.shape == (5, 6)
    assert out.logprobs.dtype == torch.float32 and out.logprob_token_ids.dtype == torch.int64
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs[:, 0], ref.gather(1, out.token_ids[:, None])[:, 0])
    top = ref.topk(5, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    torch.testing.assert_close(out.logprobs[:, 1:], top.values)


def test_logprobs_zero_returns_sampled_only():
    batch = build([SamplingParams(logprobs=0, temperature=0)], 10)
    assert batch.max_logprobs == 0 and batch.need_logprobs
    out = Sampler()(torch.randn(1, 10), batch)
    assert out.logprobs.shape == (1, 1)


def test_build_checks_lengths_and_empty_batch():
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch.build([SamplingParams()], [[]], [[]], [], 10, "cpu")
    out = Sampler()(torch.randn(0, 10), build([], 10))
    assert out.token_ids.shape == (0,)


def test_argmax_rows_matches_argmax_with_ties():
    from tierserve.runner.sampler import argmax_rows
    g = torch.Generator().manual_seed(0)
    for V in (128256, 4096, 1000, 257 * 31):
        x = torch.randint(-3, 4, (5, V), generator=g).float()     # many ties: the first index must win
        x[1, V - 1] = 10.0
        x[2, 0] = 10.0
        x[3, V // 2] = 10.0
        x[3, V // 2 + 1] = 10.0
        assert torch.equal(argmax_rows(x), x.argmax(-1))
