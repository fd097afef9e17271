"""N-gram hashing for Engram: token ids -> rows of the per-(order, head) embedding tables.

For position t of a sequence with canonical ids c, the n-gram ending at t is (c[t-n+1], ..., c[t]); its
hash is the multiply-XOR  mix_n(t) = (c[t]*m_0) ^ (c[t-1]*m_1) ^ ... ^ (c[t-n+1]*m_{n-1})  with odd per-layer
multipliers m_k, and head h of order n reads row  mix_n(t) mod p_{n,h}  of its table, where every p_{n,h} is
a distinct prime (distinct over all heads, orders and layers, each the next unused prime >= the requested
size). Positions before the sequence start read the fixed ``pad`` canonical id. Multipliers are drawn from
``numpy.random.default_rng(seed + 10007 * layer)`` below ``int64_max // canonical_vocab_size`` so every
product fits in int64 (no overflow, the same bits in numpy, torch and Python ints). This is the scheme of
the Engram reference implementation.

Row ids depend only on token ids, so they are computed as soon as a step's tokens are known. A chunk of a
sequence needs the ``lookback`` (max order - 1) tokens before it: ``history``, taken from the request's
token list (``engram_history``), which makes chunked prefill, preemption/recompute and prefix-cache hits
give the rows of a single full pass.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tierserve.memory.engram_config import EngramConfig

_LAYER_PRIME = 10007
_INT64_MAX = int(np.iinfo(np.int64).max)


# ---- primes -------------------------------------------------------------------------------------------------
def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def table_sizes(cfg: EngramConfig) -> dict[int, tuple[int, ...]]:
    """Prime rows per table for every Engram layer: layer -> (order-major) sizes of its num_heads tables.

    Layers in ``cfg.layers`` order, then orders, then heads, each take the next prime >= the requested size
    of its order that no earlier table took."""
    seen: set[int] = set()
    out: dict[int, tuple[int, ...]] = {}
    for layer in cfg.layers:
        sizes: list[int] = []
        for req in cfg.requested_sizes():
            cand = req
            for _ in range(cfg.heads_per_order):
                while cand in seen or not is_prime(cand):
                    cand += 1
                seen.add(cand)
                sizes.append(cand)
        out[layer] = tuple(sizes)
    return out


def layer_multipliers(cfg: EngramConfig, layer: int, canonical_vocab_size: int) -> tuple[int, ...]:
    """max_order odd multipliers for ``layer`` (m_k multiplies the token k positions back)."""
    half = max(1, (_INT64_MAX // canonical_vocab_size) // 2)
    rng = np.random.default_rng(int(cfg.seed + _LAYER_PRIME * int(layer)))
    r = rng.integers(low=0, high=half, size=(cfg.max_order,), dtype=np.int64)
    return tuple(int(x) * 2 + 1 for x in r)


def engram_history(token_ids: Sequence[int], start: int, lookback: int = 2) -> list[int]:
    """The ``lookback`` tokens before position ``start`` of a request's token list, -1 before its start."""
    return [int(token_ids[p]) if p >= 0 else -1 for p in range(start - lookback, start)]


# ---- hashing ------------------------------------------------------------------------------------------------
class NgramHasher:
    """Row ids of every Engram layer of a model, from raw token ids (works on any device, no host sync)."""

    def __init__(self, cfg: EngramConfig, canonical: torch.Tensor, num_canonical: int | None = None):
        canonical = canonical.to(torch.int64).cpu()
        n = int(canonical.max()) + 1 if num_canonical is None else int(num_canonical)
        if cfg.canonical_vocab_size is not None and cfg.canonical_vocab_size != n:
            raise ValueError(f"engram.canonical_vocab_size is {cfg.canonical_vocab_size} but the canonical-id "
                             f"table has {n} ids: the tokenizer does not match the checkpoint's Engram hashes")
        self.cfg = cfg
        self.num_canonical = n
        self.pad = cfg.pad_id if cfg.pad_id is not None else n
        if not 0 <= self.pad <= n:
            raise ValueError(f"engram.pad_id must be in [0, {n}], got {self.pad}")
        self.vocab_size = canonical.numel()
        self.sizes = table_sizes(cfg)
        self.multipliers = {layer: layer_multipliers(cfg, layer, n) for layer in cfg.layers}
        self.offsets = {layer: tuple(int(x) for x in np.cumsum((0,) + s[:-1])) for layer, s in self.sizes.items()}
        self._canonical = {torch.device("cpu"): canonical}
        self._consts: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def num_rows(self, layer: int) -> int:
        return sum(self.sizes[layer])

    def canonical(self, device: torch.device) -> torch.Tensor:
        t = self._canonical.get(device)
        if t is None:
            t = self._canonical[device] = self._canonical[torch.device("cpu")].to(device)
        return t

    def _layer_consts(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, device)
        if key not in self._consts:
            primes = torch.tensor(self.sizes[layer], dtype=torch.int64, device=device)
            offs = torch.tensor(self.offsets[layer], dtype=torch.int64, device=device)
            self._consts[key] = (primes.view(len(self.cfg.orders), -1), offs)
        return self._consts[key]

    def _shifted(self, token_ids: torch.Tensor, query_start_loc: torch.Tensor,
                 history: torch.Tensor) -> list[torch.Tensor]:
        """[c[t], c[t-1], ..., c[t-lookback]] over packed sequences, look-back from ``history``."""
        dev = token_ids.device
        L = self.cfg.lookback
        if token_ids.device.type == "cpu" and token_ids.numel() and \
                (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) for the Engram canonical table")
        canon = self.canonical(dev)
        c = canon[token_ids]
        if L == 0:
            return [c]
        hist = history.to(device=dev, dtype=torch.int64).view(-1, L)
        hist_c = torch.where(hist >= 0, canon[hist.clamp(0, self.vocab_size - 1)], self.pad)
        T = c.numel()
        idx = torch.arange(T, device=dev)
        qsl = query_start_loc.to(device=dev, dtype=torch.int64)
        seq = torch.searchsorted(qsl[1:], idx, right=True).clamp_max(hist.shape[0] - 1)
        local = idx - qsl[seq]
        out = [c]
        for k in range(1, L + 1):
            from_chunk = c[(idx - k).clamp_min(0)]
            from_hist = hist_c[seq, (L - k + local).clamp(0, L - 1)]
            out.append(torch.where(local >= k, from_chunk, from_hist))
        return out

    def _rows(self, shifted: list[torch.Tensor], layer: int, local: bool) -> torch.Tensor:
        mult = self.multipliers[layer]
        primes, offs = self._layer_consts(layer, shifted[0].device)
        mix = shifted[0] * mult[0]
        cols = []
        for k in range(1, self.cfg.max_order):
            mix = torch.bitwise_xor(mix, shifted[k] * mult[k])
            if k + 1 in self.cfg.orders:
                cols.append(mix[:, None] % primes[self.cfg.orders.index(k + 1)][None, :])
        rows = torch.cat(cols, dim=1)
        return rows if local else rows + offs

    def row_ids_packed(self, token_ids: torch.Tensor, query_start_loc: torch.Tensor, history: torch.Tensor,
                       layers: Sequence[int] | None = None, local: bool = False) -> dict[int, torch.Tensor]:
        """Rows for a step's packed tokens: layer -> [T, num_heads] int64 (order-major heads).

        ``token_ids`` [T] raw ids; sequence b owns ``query_start_loc[b]:query_start_loc[b+1]``;
        ``history`` [B, lookback] raw ids of the tokens before each chunk (-1 before the sequence start).
        Rows index the layer's concatenated table (head offsets added) unless ``local``."""
        shifted = self._shifted(token_ids.view(-1), query_start_loc, history)
        return {layer: self._rows(shifted, layer, local) for layer in (layers or self.cfg.layers)}

    def row_ids(self, token_ids: torch.Tensor, history: torch.Tensor | Sequence[int] | None, layer: int,
                local: bool = False) -> torch.Tensor:
        """Rows of one sequence chunk: [T, num_heads]; ``history`` = up to lookback preceding tokens."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.int64).view(-1)
        dev = token_ids.device
        hist = torch.full((self.cfg.lookback,), -1, dtype=torch.int64, device=dev)
        if history is not None:
            h = torch.as_tensor(history, dtype=torch.int64).view(-1).to(dev)
            if h.numel() > self.cfg.lookback:
                raise ValueError(f"history must hold at most {self.cfg.lookback} tokens, got {h.numel()}")
            if h.numel():
                hist[self.cfg.lookback - h.numel():] = h
        qsl = torch.tensor([0, token_ids.numel()], dtype=torch.int64, device=dev)
        return self.row_ids_packed(token_ids, qsl, hist.view(1, -1), [layer], local)[layer]


def ngram_row_ids(token_ids: torch.Tensor, history: torch.Tensor | None, hasher: NgramHasher,
                  layer: int) -> torch.Tensor:
    """[T, num_orders * heads] table rows of ``layer`` for one chunk (see ``NgramHasher.row_ids``)."""
    return hasher.row_ids(token_ids, history, layer)


def naive_row_ids(tokens: Sequence[int], canonical: Sequence[int], hasher: NgramHasher, layer: int) -> list[list[int]]:
    """Per-position reference in Python ints over a whole sequence (local, per-head rows)."""
    c = [int(canonical[t]) for t in tokens]
    mult = hasher.multipliers[layer]
    sizes = hasher.sizes[layer]
    H = hasher.cfg.heads_per_order
    out = []
    for t in range(len(c)):
        row = []
        for oi, n in enumerate(hasher.cfg.orders):
            mix = 0
            for k in range(n):
                tok = c[t - k] if t - k >= 0 else hasher.pad
                mix ^= tok * mult[k]
            row += [mix % sizes[oi * H + h] for h in range(H)]
        out.append(row)
    return out
