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


def encode(fingerprint: str, block_hash: bytes, tokens: tuple[int, ...], payload: bytes) -> bytes:
    header = json.dumps({"fp": fingerprint, "hash": block_hash.hex(), "n": len(tokens),
                         "bytes": len(payload)}).encode()
    body = b"".join([MAGIC, struct.pack("<I", len(header)), header,
                     np.asarray(tokens, dtype=np.int64).tobytes(), payload])
    return body + hashlib.blake2b(body, digest_size=16).digest()


def decode(blob: bytes, fingerprint: str, block_hash: bytes, tokens: tuple[int, ...]) -> bytes:
    """Return the payload, or raise CorruptBlock saying what is wrong."""
    if len(blob) < len(MAGIC) + 4 + 16 or not blob.startswith(MAGIC):
        raise CorruptBlock("bad magic or truncated")
    body, digest = blob[:-16], blob[-16:]
    if hashlib.blake2b(body, digest_size=16).digest() != digest:
        raise CorruptBlock("checksum mismatch")
    (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
    off = len(MAGIC) + 4
    try:
        header = json.loads(body[off:off + hlen])
    except ValueError:
        raise CorruptBlock("unreadable header") from None
    off += hlen
    if header.get("fp") != fingerprint:
        raise CorruptBlock("foreign block (other model, dtype or layout)")
    if header.get("hash") != block_hash.hex():
        raise CorruptBlock("hash mismatch")
    n = int(header.get("n", -1))
    stored = tuple(np.frombuffer(body[off:off + 8 * n], dtype=np.int64).tolist())
    if stored != tuple(tokens):
        raise CorruptBlock("tokens differ")
    off += 8 * n
    payload = body[off:]
    if len(payload) != header.get("bytes"):
        raise CorruptBlock("payload size mismatch")
    return payload
