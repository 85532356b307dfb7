"""The object stored for one block: a checksummed header, the block's token ids, the KV bytes.

Layout (little endian)::

    magic  b"LHC3"            4
    version u16, flags u16    4
    key hash  xxh3_64(key)    8     the object belongs to exactly this key
    token_len u32             4     bytes of token ids (uint32 each)
    payload_len u64           8
    checksum  xxh3_64         8     over everything above it and after it
    token ids | payload

Invariants: ``decode`` returns the payload only when the magic, version, key hash, token bytes
(compared exactly with the request's), payload length and checksum all match; anything else
raises ``L3Corrupt`` (an absent object is not an error: ``None`` upstream). The token check is
the store's equivalent of the host index's ``verify_tokens``: a digest collision can never
restore another prompt's KV.
"""
from __future__ import annotations

import struct

import xxhash

from .errors import L3Corrupt

MAGIC = b"LHC3"
VERSION = 1
_HEAD = struct.Struct("<4sHHQIQ")        # magic, version, flags, key hash, token_len, payload_len
_SUM = struct.Struct("<Q")
HEADER_BYTES = _HEAD.size + _SUM.size


def object_nbytes(token_len: int, payload_len: int) -> int:
    return HEADER_BYTES + token_len + payload_len


def encode(key: str, token_bytes: bytes, payload) -> bytes:
    """One object; ``payload`` is any buffer (bytes, memoryview, numpy array)."""
    payload = memoryview(payload).cast("B")
    head = _HEAD.pack(MAGIC, VERSION, 0, xxhash.xxh3_64_intdigest(key.encode()), len(token_bytes),
                      payload.nbytes)
    h = xxhash.xxh3_64()
    h.update(head)
    h.update(token_bytes)
    h.update(payload)
    return b"".join((head, _SUM.pack(h.intdigest()), token_bytes, payload))


def decode(key: str, blob, token_bytes: bytes, payload_len: int | None = None) -> memoryview:
    """The payload of ``blob`` read back under ``key``; raises ``L3Corrupt`` naming the problem."""
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise L3Corrupt(f"{key}: object of {view.nbytes} bytes is shorter than its header")
    magic, version, _flags, khash, tlen, plen = _HEAD.unpack_from(view, 0)
    (checksum,) = _SUM.unpack_from(view, _HEAD.size)
    if magic != MAGIC or version != VERSION:
        raise L3Corrupt(f"{key}: not an lmdeploy-hostcache v{VERSION} object")
    if view.nbytes != HEADER_BYTES + tlen + plen:
        raise L3Corrupt(f"{key}: object is {view.nbytes} bytes, header says {HEADER_BYTES + tlen + plen}")
    h = xxhash.xxh3_64()
    h.update(view[:_HEAD.size])
    h.update(view[HEADER_BYTES:])
    if h.intdigest() != checksum:
        raise L3Corrupt(f"{key}: checksum mismatch (object corrupted in the store or in transit)")
    if khash != xxhash.xxh3_64_intdigest(key.encode()):
        raise L3Corrupt(f"{key}: object belongs to another key")
    if view[HEADER_BYTES:HEADER_BYTES + tlen] != token_bytes:
        raise L3Corrupt(f"{key}: stored token ids differ from the request's (digest collision)")
    if payload_len is not None and plen != payload_len:
        raise L3Corrupt(f"{key}: payload is {plen} bytes, this rank's blocks are {payload_len}")
    return view[HEADER_BYTES + tlen:]
