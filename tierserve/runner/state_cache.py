"""Prefix cache of whole decode states for models with an explicit per-request state (DeepSeek-V4).

A DeepSeek-V4 ``SequenceState`` is immutable, so the state of a request right after token ``b`` is a
complete, reusable snapshot of everything the model needs to continue any sequence that starts with
the same ``b`` tokens. This cache keeps such snapshots at *prefix units*: every ``unit`` tokens
(``b = k * unit``). ``unit`` is a multiple of the page size and of every compress ratio, so that at a
boundary every compressor's open window is empty and the snapshot holds no half-pooled tokens.

* key: the engine's chained page hash (``tierserve.kv.prefix.hash_page``, blake2b-128) of the page
  that ends at the boundary, so the key covers the whole prefix; a hit also compares the unit's own
  token ids (as ``BlockPool`` compares a page's), so a hash collision cannot give a false hit;
* ``lookup``: the longest stored boundary ``<= max_tokens`` whose prefix equals the prompt's;
* ``store``: called by the runner when a request's state sits exactly on a boundary;
* bounded by bytes (``max_bytes``); least recently used (stored or hit) entries are evicted first.
  Each entry is charged the full ``nbytes`` of its state: successive snapshots of one request do not
  share their compressed entries (``forward_step`` concatenates into new tensors), so a prompt of
  ``L`` tokens stores about ``per_token * L**2 / (2 * unit)`` bytes when every boundary is kept.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Sequence

import torch

from tierserve.kv.prefix import hash_pages

DEFAULT_UNIT = 1024


@dataclass
class _Entry:
    state: Any
    tokens: bytes       # token ids of the entry's last unit (collision check)
    nbytes: int


class StateCache:
    def __init__(self, unit: int, page_size: int, max_bytes: int) -> None:
        if unit <= 0 or unit % page_size:
            raise ValueError(f"prefix unit {unit} must be a positive multiple of page_size={page_size}")
        self.unit, self.page_size, self.max_bytes = unit, page_size, max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()     # LRU order: first = oldest
        self._chains: dict[str, list[bytes]] = {}    # request id -> hash at each unit boundary so far
        self.bytes = 0
        self.queries = self.hits = self.hit_tokens = 0
        self.stored = self.evicted = self.skipped = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ---- hashing --------------------------------------------------------------------------------
    def _unit_hashes(self, token_ids: Sequence[int], k: int, have: list[bytes]) -> list[bytes]:
        """Extend ``have`` (hashes of the first ``len(have)`` units) to ``k`` units; returns it."""
        u, ps = self.unit, self.page_size
        for i in range(len(have), k):
            parent = have[-1] if have else None
            have.append(hash_pages(token_ids[i * u:(i + 1) * u], ps, u // ps, parent)[-1])
        return have

    def _unit_tokens(self, token_ids: Sequence[int], k: int) -> bytes:
        return array("q", token_ids[(k - 1) * self.unit:k * self.unit]).tobytes()

    # ---- lookup / store -------------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int], max_tokens: int, request_id: str | None = None
               ) -> tuple[int, Any]:
        """``(b, state)`` for the longest stored boundary ``b <= max_tokens`` that is a prefix of
        ``token_ids``, or ``(0, None)``."""
        self.queries += 1
        k = max_tokens // self.unit
        if k <= 0:
            return 0, None
        chain = self._chains.get(request_id, []) if request_id is not None else []
        hashes = self._unit_hashes(token_ids, k, list(chain[:k]))
        if request_id is not None and len(hashes) > len(chain):
            self._chains[request_id] = hashes
        for j in range(k, 0, -1):
            e = self._entries.get(hashes[j - 1])
            if e is not None and e.tokens == self._unit_tokens(token_ids, j):
                self._entries.move_to_end(hashes[j - 1])
                self.hits += 1
                self.hit_tokens += j * self.unit
                return j * self.unit, e.state
        return 0, None

    def is_boundary(self, num_tokens: int) -> bool:
        return num_tokens > 0 and num_tokens % self.unit == 0

    def cuts(self, start: int, end: int) -> list[int]:
        """Unit boundaries strictly inside ``(start, end)``: where a chunk is split so that the state
        exactly at each boundary exists."""
        first = (start // self.unit + 1) * self.unit
        return list(range(first, end, self.unit))

    def store(self, request_id: str, token_ids: Sequence[int], state) -> bool:
        """Keep ``state`` (of the first ``state.num_tokens`` tokens, on a boundary) for reuse."""
        n = state.num_tokens
        if not self.is_boundary(n):
            raise ValueError(f"state of {n} tokens is not on a prefix-unit boundary ({self.unit})")
        k = n // self.unit
        chain = self._unit_hashes(token_ids, k, self._chains.setdefault(request_id, []))
        key = chain[k - 1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        state = compact(state)
        tokens = self._unit_tokens(token_ids, k)
        nbytes = state.nbytes() + len(tokens)
        if nbytes > self.max_bytes:
            self.skipped += 1
            return False
        while self.bytes + nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evicted += 1
        self._entries[key] = _Entry(state, tokens, nbytes)
        self.bytes += nbytes
        self.stored += 1
        return True

    def forget(self, request_id: str) -> None:
        """Drop the per-request hash chain (the request finished)."""
        self._chains.pop(request_id, None)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return dict(entries=len(self._entries), bytes=self.bytes, max_bytes=self.max_bytes, unit=self.unit,
                    queries=self.queries, hits=self.hits, hit_tokens=self.hit_tokens, stored=self.stored,
                    evicted=self.evicted, skipped=self.skipped)


def compact(obj):
    """A copy of a frozen state dataclass whose tensors own exactly their bytes: views (the window
    ring is a slice of a ``[W + n, D]`` concatenation) are cloned so that a snapshot does not keep the
    chunk's whole buffer alive, and ``nbytes`` is what it really holds."""
    if isinstance(obj, torch.Tensor):
        own = obj.untyped_storage().nbytes()
        return obj.clone() if own > obj.numel() * obj.element_size() else obj
    if isinstance(obj, tuple):
        return tuple(compact(x) for x in obj)
    if is_dataclass(obj):
        changes = {}
        for f in fields(obj):
            v = getattr(obj, f.name)
            c = compact(v)
            if c is not v:
                changes[f.name] = c
        return replace(obj, **changes) if changes else obj
    return obj


def choose_unit(requested: int | None, page_size: int, ratios: Sequence[int]) -> int:
    """The prefix unit: ``requested`` (checked) or ``DEFAULT_UNIT`` rounded up to a multiple of the
    page size and of every compress ratio."""
    import math

    step = math.lcm(page_size, *[r for r in ratios if r > 0])
    if requested is None:
        return -(-DEFAULT_UNIT // step) * step
    if requested % step:
        raise ValueError(f"prefix_unit={requested} must be a multiple of {step} (page_size={page_size} and the "
                         f"model's compress ratios {sorted(set(r for r in ratios if r > 0))})")
    return requested
