"""Engram n-gram hashing vs a per-position Python reference; chunked, packed and recomputed calls agree."""
import pytest
import torch

from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_hash import (
    NgramHasher,
    engram_history,
    is_prime,
    naive_row_ids,
    ngram_row_ids,
    table_sizes,
)

VOCAB, NCANON = 300, 211


def _hasher(**kw) -> tuple[NgramHasher, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    canonical = torch.randint(0, NCANON, (VOCAB,), generator=g)
    canonical[:NCANON] = torch.arange(NCANON)          # every canonical id used
    cfg = EngramConfig(**{"layers": (1, 3), "heads_per_order": 4, "dim_per_head": 8, "table_size": 1000,
                          "seed": 7, **kw})
    return NgramHasher(cfg, canonical), canonical


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("orders", [(2, 3), (2,), (3, 4)])
def test_rows_match_naive_reference(orders):
    hasher, canonical = _hasher(orders=orders)
    toks = _tokens(57, 1)
    for layer in (1, 3):
        got = hasher.row_ids(toks, None, layer, local=True)
        assert got.tolist() == naive_row_ids(toks.tolist(), canonical.tolist(), hasher, layer)
        offs = torch.tensor(hasher.offsets[layer])
        assert torch.equal(hasher.row_ids(toks, None, layer), got + offs)
        assert int((got + offs).max()) < hasher.num_rows(layer)
        sizes = torch.tensor(hasher.sizes[layer])
        assert bool((got < sizes).all()) and bool((got >= 0).all())


def test_chunks_with_history_equal_one_call_and_preemption():
    hasher, _ = _hasher()
    toks = _tokens(40, 2)
    full = ngram_row_ids(toks, None, hasher, 1)
    for cuts in ([1, 2, 3, 10, 11, 40], [5, 40], [39, 40], list(range(1, 41))):
        start, parts = 0, []
        for end in cuts:
            hist = torch.tensor(engram_history(toks.tolist(), start, hasher.cfg.lookback))
            parts.append(ngram_row_ids(toks[start:end], hist, hasher, 1))
            start = end
        assert torch.equal(torch.cat(parts), full), cuts
    # preemption: the request restarts from scratch (no history) and recomputes its tokens -> same rows
    assert torch.equal(ngram_row_ids(toks[:25], None, hasher, 1), full[:25])
    # history shorter than the look-back = near the sequence start
    assert torch.equal(ngram_row_ids(toks[1:9], toks[:1], hasher, 1), full[1:9])
    assert torch.equal(ngram_row_ids(toks[1:9], torch.tensor([-1, int(toks[0])]), hasher, 1), full[1:9])


def test_packed_batch_equals_per_sequence():
    hasher, _ = _hasher()
    seqs = [_tokens(n, 10 + n) for n in (7, 1, 12, 3)]
    starts = [0, 5, 2, 30]     # position of each chunk in its request
    reqs = [torch.cat([_tokens(s, 99 + s), t]) for s, t in zip(starts, seqs)]
    hist = torch.tensor([engram_history(r.tolist(), s) for r, s in zip(reqs, starts)])
    qsl = torch.tensor([0, 7, 8, 20, 23])
    packed = hasher.row_ids_packed(torch.cat(seqs), qsl, hist)
    for layer in (1, 3):
        want = torch.cat([hasher.row_ids(r, None, layer)[s:] for r, s in zip(reqs, starts)])
        assert torch.equal(packed[layer], want)


def test_table_sizes_are_distinct_primes_near_request():
    cfg = EngramConfig(layers=(0, 2, 5), heads_per_order=8, table_size=(5000, 7000))
    sizes = table_sizes(cfg)
    allp = [p for s in sizes.values() for p in s]
    assert len(allp) == 3 * 2 * 8 and len(set(allp)) == len(allp)
    assert all(is_prime(p) for p in allp)
    for s in sizes.values():
        assert all(5000 <= p < 5000 * 1.1 for p in s[:8]) and all(7000 <= p < 7000 * 1.1 for p in s[8:])
    assert [n for n in range(2, 200) if is_prime(n)] == [n for n in range(2, 200)
                                                         if all(n % d for d in range(2, int(n ** 0.5) + 1))]
    assert is_prime(2_305_843_009_213_693_951) and not is_prime(2_305_843_009_213_693_953)


def test_multipliers_odd_deterministic_and_no_overflow():
    h1, _ = _hasher()
    h2, _ = _hasher()
    assert h1.multipliers == h2.multipliers and h1.sizes == h2.sizes
    for mult in h1.multipliers.values():
        assert all(m % 2 == 1 for m in mult) and all(m * (NCANON + 1) < 2 ** 63 for m in mult)
    assert h1.multipliers[1] != h1.multipliers[3]
    h3, _ = _hasher(seed=8)
    assert h3.multipliers[1] != h1.multipliers[1]


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="engram.orders"):
        EngramConfig(orders=(3, 2))
    with pytest.raises(ValueError, match="engram.heads_per_order"):
        EngramConfig(heads_per_order=0)
    with pytest.raises(ValueError, match="engram.table_size"):
        EngramConfig(table_size=(100,))
    with pytest.raises(ValueError, match="engram.placement"):
        EngramConfig(placement="gpu")
    with pytest.raises(ValueError, match="engram.dim_per_head"):
        EngramConfig(fp8_rows=True, dim_per_head=48)
    with pytest.raises(ValueError, match="engram.conv_kernel_size"):
        EngramConfig(conv_kernel_size=1)
    with pytest.raises(ValueError, match="unknown engram setting"):
        EngramConfig.from_dict({"layer": [1]})
    with pytest.raises(ValueError, match="canonical_vocab_size"):
        _hasher(canonical_vocab_size=NCANON + 1)
    with pytest.raises(ValueError, match="at most 2 tokens"):
        _hasher()[0].row_ids(torch.tensor([1]), torch.tensor([1, 2, 3]), 1)
    with pytest.raises(ValueError, match="token ids"):
        _hasher()[0].row_ids(torch.tensor([VOCAB]), None, 1)
    cfg = EngramConfig(layers=(1, 3), conv_kernel_size=4, table_size=(10, 20))
    assert EngramConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="out of range"):
        cfg.check_model(3)
