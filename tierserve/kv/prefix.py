"""Chained page hashes for prefix caching.

A full page's hash covers the hash of the page before it and the page's own token ids, so equal
hashes mean equal prefixes up to a 128-bit collision -- and ``BlockPool`` also compares the stored
tokens, so a collision can never produce a false hit. The hash is stable across processes
(blake2b, not Python's salted ``hash``), which the disk and remote tiers rely on.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

ROOT = b"tierserve-kv-v1"


def hash_page(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else ROOT)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def hash_pages(token_ids: Sequence[int], page_size: int, num_pages: int,
               parent: bytes | None = None) -> list[bytes]:
    """Hashes of the first ``num_pages`` full pages of ``token_ids``."""
    out: list[bytes] = []
    for i in range(num_pages):
        parent = hash_page(parent, token_ids[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return out
