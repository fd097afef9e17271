"""Serialised page blocks for the disk and remote tiers.

Layout: MAGIC | u32 header length | JSON header | token ids (int64) | payload | blake2b-16 checksum.
The header carries the KV fingerprint (model, dtype, layout), the page hash and the payload size; a
block whose checksum, fingerprint, hash or tokens do not match what the caller expects is rejected.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

MAGIC = b"TSKV\x01\x00"


class CorruptBlock(ValueError):
    pass


def as_buffer(payload) -> memoryview:
    """A flat byte view of a payload: bytes-like, or a contiguous CPU tensor (no copy)."""
    if hasattr(payload, "numpy"):                       # a torch tensor (the disk writer's pages)
        import torch
        payload = payload.reshape(-1).view(torch.uint8).numpy()
    return memoryview(payload).cast("B")


def encode_parts(fingerprint: str, block_hash: bytes, tokens: tuple[int, ...], payload) -> list:
    """The block as [head, payload view, checksum]: written piece by piece, the payload is never copied."""
    buf = as_buffer(payload)
    header = json.dumps({"fp": fingerprint, "hash": block_hash.hex(), "n": len(tokens),
                         "bytes": buf.nbytes}).encode()
    head = b"".join([MAGIC, struct.pack("<I", len(header)), header, np.asarray(tokens, dtype=np.int64).tobytes()])
    digest = hashlib.blake2b(head, digest_size=16)
    digest.update(buf)
    return [head, buf, digest.digest()]


def encode(fingerprint: str, block_hash: bytes, tokens: tuple[int, ...], payload) -> bytes:
    return b"".join(encode_parts(fingerprint, block_hash, tokens, payload))


def decode(blob, fingerprint: str, block_hash: bytes, tokens: tuple[int, ...]) -> memoryview:
    """Return the payload (a view into ``blob``, no copy), or raise CorruptBlock saying what is wrong."""
    mv = memoryview(blob).cast("B")
    if len(mv) < len(MAGIC) + 4 + 16 or bytes(mv[:len(MAGIC)]) != MAGIC:
        raise CorruptBlock("bad magic or truncated")
    body, digest = mv[:-16], mv[-16:]
    if hashlib.blake2b(body, digest_size=16).digest() != bytes(digest):
        raise CorruptBlock("checksum mismatch")
    (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
    off = len(MAGIC) + 4
    try:
        header = json.loads(bytes(body[off:off + hlen]))
    except ValueError:
        raise CorruptBlock("unreadable header") from None
    off += hlen
    if not isinstance(header, dict) or header.get("fp") != fingerprint:
        raise CorruptBlock("foreign block (other model, dtype or layout)")
    if header.get("hash") != block_hash.hex():
        raise CorruptBlock("hash mismatch")
    n = int(header.get("n", -1))
    if n != len(tokens) or off + 8 * n > len(body):
        raise CorruptBlock("tokens differ")
    stored = tuple(np.frombuffer(body[off:off + 8 * n], dtype=np.int64).tolist())
    if stored != tuple(tokens):
        raise CorruptBlock("tokens differ")
    off += 8 * n
    payload = body[off:]
    if len(payload) != header.get("bytes"):
        raise CorruptBlock("payload size mismatch")
    return payload
