"""Batched sampler: penalties, temperature, top-k / top-p / min-p, exponential-race sampling.

Everything on the hot path is vectorised over the batch and stays on the logits' device; the only
Python loop is over rows that carry their own (seeded) generator. ``reference_sample_probs`` is a slow,
obvious per-row version that the tests hold the fast path to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tierserve.sampling import SamplingParams


@dataclass
class SamplingBatch:
    """Per-step sampling tensors for N rows, built once per step by the runner."""

    temperature: Tensor  # [N] float32, 0 for greedy rows
    top_k: Tensor  # [N] int64, 0 = off
    top_p: Tensor  # [N] float32
    min_p: Tensor  # [N] float32
    repetition_penalty: Tensor  # [N] float32
    presence_penalty: Tensor  # [N] float32
    frequency_penalty: Tensor  # [N] float32
    prompt_token_mask: Tensor | None  # [N, V] bool: token in prompt or output; None if no repetition penalty
    output_token_counts: Tensor | None  # [N, V] float32 output counts; None if no presence/frequency penalty
    generators: list[torch.Generator | None]
    max_logprobs: int  # max top-logprobs requested in this batch (0 = none)
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k_p_min_p: bool
    need_logprobs: bool = False  # some row asked for logprobs (even logprobs=0: the sampled token's)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
              output_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None],
              vocab_size: int, device) -> "SamplingBatch":
        n = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError(f"SamplingBatch.build: params, prompt_ids, output_ids and generators must all "
                             f"have length {n}, got {len(prompt_ids)}, {len(output_ids)}, {len(generators)}")
        greedy = [p.greedy for p in params]
        # Greedy rows get neutral filter values: only their penalties matter.
        temp = [0.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_k = [0 if g or p.top_k >= vocab_size else p.top_k for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_counts = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)

        def f32(xs):
            return torch.tensor(xs, dtype=torch.float32, device=device)

        mask = counts = None
        if use_rep:
            rows, cols = _flat_ids([list(a) + list(b) for a, b in zip(prompt_ids, output_ids)], vocab_size)
            mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            mask[rows.to(device), cols.to(device)] = True
        if use_counts:
            rows, cols = _flat_ids(output_ids, vocab_size)
            counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            ones = torch.ones(rows.numel(), dtype=torch.float32, device=device)
            counts.index_put_((rows.to(device), cols.to(device)), ones, accumulate=True)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=f32(temp), top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=f32(top_p), min_p=f32(min_p),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            prompt_token_mask=mask, output_token_counts=counts, generators=list(generators),
            max_logprobs=max(requested, default=0),
            all_greedy=all(greedy), all_random=not any(greedy),
            no_penalties=not (use_rep or use_counts),
            no_top_k_p_min_p=all(k == 0 and p == 1.0 and m == 0.0 for k, p, m in zip(top_k, top_p, min_p)),
            need_logprobs=bool(requested),
        )


def _flat_ids(ids: Sequence[Sequence[int]], vocab_size: int) -> tuple[Tensor, Tensor]:
    """(row, token) index pairs for a ragged list of token ids; ids outside [0, V) are dropped."""
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(x) for x in ids], dtype=torch.long))
    cols = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    keep = (cols >= 0) & (cols < vocab_size)
    return rows[keep], cols[keep]


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [N] int64
    logprobs: Tensor | None = None  # [N, 1 + max_logprobs] float32: sampled token's logprob, then top-k
    logprob_token_ids: Tensor | None = None  # [N, 1 + max_logprobs] int64


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF/vLLM: prompt + output tokens) then presence/frequency (OpenAI: output tokens)."""
    if batch.no_penalties:
        return logits
    if batch.prompt_token_mask is not None:
        p = batch.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(batch.prompt_token_mask, penalised, logits)
    if batch.output_token_counts is not None:
        c = batch.output_token_counts
        logits = logits - batch.frequency_penalty.unsqueeze(1) * c \
            - batch.presence_penalty.unsqueeze(1) * (c > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Mask (to -inf) tokens removed by top-k, then top-p, then min-p, with one descending sort."""
    if batch.no_top_k_p_min_p:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(batch.top_k > 0, batch.top_k, vocab).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    # top-p: keep a token while the mass strictly before it is < top_p (so the first always stays).
    before = probs.cumsum(dim=-1) - probs
    top_p = batch.top_p.unsqueeze(1)
    drop = (before >= top_p) & (top_p < 1.0)  # top_p = 1 never drops (cumsum rounding)
    drop[:, 0] = False
    # min-p: relative to the most likely token, which the renormalisation above does not change.
    drop |= probs < batch.min_p.unsqueeze(1) * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, sorted_idx, sorted_logits)


def _random_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    return apply_top_k_top_p_min_p(logits / temp.unsqueeze(1), batch)


def filtered_probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """The distribution each row is sampled from: [N, V] float32; greedy rows are one-hot."""
    logits = apply_penalties(logits.float(), batch)
    probs = _random_logits(logits, batch).softmax(dim=-1)
    onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where((batch.temperature == 0).unsqueeze(1), onehot, probs)


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # for unseeded random rows; None = torch's default generator

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if (batch.need_logprobs or batch.max_logprobs > 0) else None
        logits = apply_penalties(logits, batch)
        greedy = logits.argmax(dim=-1) if batch.all_greedy or not batch.all_random else None
        if batch.all_greedy:
            tokens = greedy
        else:
            probs = _random_logits(logits, batch).softmax(dim=-1)
            tokens = self._race(probs, batch.generators)
            if greedy is not None:
                tokens = torch.where(batch.temperature == 0, greedy, tokens)
        out = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            ids = tokens.unsqueeze(1)
            lps = raw_logprobs.gather(1, ids)
            if batch.max_logprobs > 0:
                top_lps, top_ids = raw_logprobs.topk(batch.max_logprobs, dim=-1)
                lps, ids = torch.cat([lps, top_lps], 1), torch.cat([ids, top_ids], 1)
            out.logprobs, out.logprob_token_ids = lps, ids
        return out

    def _race(self, probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
        """argmax(probs / E) with E ~ Exp(1) i.i.d. draws a token with probability probs (Gumbel-max)."""
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return probs.div_(noise.clamp_min_(1e-30)).argmax(dim=-1)


def reference_sample_probs(logits_row: Tensor, params: SamplingParams, prompt_ids: Sequence[int] = (),
                           output_ids: Sequence[int] = ()) -> Tensor:
    """Slow, obvious per-row version of what the Sampler samples from (float64 Python arithmetic)."""
    x = [float(v) for v in logits_row.tolist()]
    vocab = len(x)
    seen = set(prompt_ids) | set(output_ids)
    for t in range(vocab):
        if t in seen and params.repetition_penalty != 1.0:
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
        count = sum(1 for o in output_ids if o == t)
        x[t] -= params.frequency_penalty * count + params.presence_penalty * (1 if count > 0 else 0)
    if params.greedy:
        best = max(range(vocab), key=lambda t: (x[t], -t))  # ties -> lowest index
        return torch.tensor([1.0 if t == best else 0.0 for t in range(vocab)], dtype=torch.float64)
    x = [v / params.temperature for v in x]
    order = sorted(range(vocab), key=lambda t: -x[t])
    keep = order if params.top_k == 0 else order[:params.top_k]

    def softmax_over(ids):
        m = max(x[t] for t in ids)
        e = {t: math.exp(x[t] - m) for t in ids}
        s = sum(e.values())
        return {t: v / s for t, v in e.items()}

    p = softmax_over(keep)
    kept, mass = [], 0.0
    for t in keep:  # smallest prefix whose cumulative probability reaches top_p
        kept.append(t)
        mass += p[t]
        if params.top_p < 1.0 and mass >= params.top_p:
            break
    p = softmax_over(kept)
    top = max(p.values())
    kept = [t for t in kept if p[t] >= params.min_p * top]
    p = softmax_over(kept)
    return torch.tensor([p.get(t, 0.0) for t in range(vocab)], dtype=torch.float64)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for [B, V] (first index of the maximum), in two passes over column chunks:
    one row of a 128k vocabulary is a single long reduction for ``argmax`` but 256 short ones here."""
    B, V = x.shape
    chunk = next((c for c in range(256, 4097) if V % c == 0), 0)
    if chunk == 0 or V // chunk < 8:
        return x.argmax(-1)
    vals, idx = x.view(B, V // chunk, chunk).max(-1)       # first maximum within each chunk
    best = vals.argmax(-1, keepdim=True)                   # first chunk holding the row maximum
    return best[:, 0] * chunk + idx.gather(1, best)[:, 0]


def plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing that needs the logits beyond their argmax."""
    return (p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0)


def sample_requests(sampler: "Sampler", reqs, logits: torch.Tensor, sampled: dict, logprobs: dict,
                    greedy: torch.Tensor | None = None) -> None:
    """Sample one token per request from its logits row (``logits [len(reqs), V]``, fp32) into
    ``sampled[request_id]`` (and ``logprobs[request_id]`` when asked for). ``greedy``: argmax tokens
    already computed on the device (CUDA-graph path)."""
    if all(plain_greedy(r.params) for r in reqs):      # fast path: argmax, nothing else to build
        tokens = greedy if greedy is not None else argmax_rows(logits)
        for req, tok in zip(reqs, tokens.tolist()):
            sampled[req.request_id] = tok
        return
    batch = SamplingBatch.build([r.params for r in reqs], [r.prompt_token_ids for r in reqs],
                                [r.output_token_ids for r in reqs], [r.generator for r in reqs],
                                logits.shape[-1], logits.device)
    res = sampler(logits, batch)
    tokens = res.token_ids.tolist()
    lps = res.logprobs.tolist() if res.logprobs is not None else None
    lp_ids = res.logprob_token_ids.tolist() if res.logprob_token_ids is not None else None
    for i, req in enumerate(reqs):
        sampled[req.request_id] = tokens[i]
        if req.params.logprobs is not None and lps is not None:
            k = 1 + req.params.logprobs
            logprobs[req.request_id] = dict(zip(lp_ids[i][:k], lps[i][:k]))


def prompt_logprob_rows(req, logits: torch.Tensor, pos0: int) -> list[dict[int, float]]:
    """Log-probs of the prompt tokens at positions ``pos0+1 ..`` from the logits of positions ``pos0 ..``:
    the actual token's, plus the top ``params.prompt_logprobs``."""
    k = req.params.prompt_logprobs
    n = logits.shape[0]
    lsm = torch.log_softmax(logits.float(), dim=-1)
    tgt = req.all_token_ids[pos0 + 1:pos0 + 1 + n]
    tgt_lp = lsm.gather(1, torch.tensor(tgt, device=lsm.device)[:, None])[:, 0].tolist()
    top_lp, top_id = (lsm.topk(k, dim=-1) if k > 0 else (None, None))
    rows = []
    for i in range(n):
        d = {tgt[i]: tgt_lp[i]}
        if k > 0:
            d.update(zip(top_id[i].tolist(), top_lp[i].tolist()))
        rows.append(d)
    return rows
