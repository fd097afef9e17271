"""Serialised page blocks for the disk and remote tiers.

Layout: MAGIC | u32 header length | JSON header | token ids (int64) | payload | checksum.
The header carries the KV fingerprint (model, dtype, layout), the page hash and the payload size; a
block whose checksum, fingerprint, hash or tokens do not match what the caller expects is rejected.

Checksum: format 2 (written now) ends with the CRC-32 of the rest, 4 bytes (``zlib.crc32``: about 3x
the throughput of blake2b per core, and it releases the GIL, so the reader threads verify in parallel);
it guards against torn or rotted files, while the header (fingerprint, page hash, tokens) guards against
mix-ups. Format 1 blocks (a 16-byte blake2b) are still read.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np

MAGIC = b"TSKV\x02\x00"            # format 2: CRC-32 trailer
MAGIC_V1 = b"TSKV\x01\x00"         # format 1: blake2b-16 trailer (read only)


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
    return [head, buf, struct.pack("<I", zlib.crc32(buf, zlib.crc32(head)))]


def _checksum(body: memoryview, size: int) -> bytes:
    if size == 4:
        return struct.pack("<I", zlib.crc32(body))
    return hashlib.blake2b(body, digest_size=16).digest()


def encode(fingerprint: str, block_hash: bytes, tokens: tuple[int, ...], payload) -> bytes:
    return b"".join(encode_parts(fingerprint, block_hash, tokens, payload))


def decode(blob, fingerprint: str, block_hash: bytes, tokens: tuple[int, ...]) -> memoryview:
    """Return the payload (a view into ``blob``, no copy), or raise CorruptBlock saying what is wrong."""
    mv = memoryview(blob).cast("B")
    magic = bytes(mv[:len(MAGIC)])
    tail = 4 if magic == MAGIC else 16 if magic == MAGIC_V1 else 0
    if not tail or len(mv) < len(MAGIC) + 4 + tail:
        raise CorruptBlock("bad magic or truncated")
    body, digest = mv[:-tail], bytes(mv[-tail:])
    if digest != _checksum(body, tail):
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
