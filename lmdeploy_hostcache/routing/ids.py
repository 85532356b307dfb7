"""Published block ids: the one function that maps a node's block digest to what leaves the node.

A node names its cached blocks by chained xxh3-128 digests (``tier/digest.py``).  What it publishes
in its cache-state feed, and what the proxy computes for a request, is ``publish_id(digest)``:
a 64-bit id, never 0 or 1 (the routing table's empty and reserved keys).

Keyed ids (issue 16).  The feed also publishes the namespace's root and seed, so anyone who reads
it can compute the chained digests of a guessed prompt.  With a cluster secret set
(``LMDEPLOY_HOSTCACHE_CLUSTER_SECRET``, the same value on every node and on the proxy), an id is
``blake2b(digest, key=blake2b(secret), digest_size=8)``: without the secret an id cannot be
tested against a guessed prompt (blake2b is a keyed PRF).  Without the secret ids are the
unkeyed fold of the digest (as before issue 16; ``docs/security.md`` says when that is enough).

Invariants:
- pure and process-stable for one secret: the proxy and every node map the same digest to the
  same id when they share the secret;
- this is the only place digests become published ids;
- the secret is never logged, published or written; a secret shorter than
  ``MIN_SECRET_CHARS`` is refused with one message naming the variable;
- a 64-bit id can collide; a collision only misguides one routing decision (the node still
  verifies the exact tokens of every block it restores).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

_MASK64 = (1 << 64) - 1
RESERVED_IDS = 2  # 0: empty slot, 1: reserved
CLUSTER_SECRET_ENV = "LMDEPLOY_HOSTCACHE_CLUSTER_SECRET"
MIN_SECRET_CHARS = 16
_KEY_LABEL = b"lmdeploy-hostcache publish-id key v1"

_cached: tuple[str | None, bytes | None] = (None, None)


def cluster_key(environ=None) -> bytes | None:
    """The 32-byte id key derived from ``LMDEPLOY_HOSTCACHE_CLUSTER_SECRET`` (None when unset).

    Raises ValueError naming the variable when it is set but shorter than ``MIN_SECRET_CHARS``.
    """
    global _cached
    text = (os.environ if environ is None else environ).get(CLUSTER_SECRET_ENV, "")
    if text == _cached[0] and environ is None:
        return _cached[1]
    if not text:
        key = None
    elif len(text) < MIN_SECRET_CHARS:
        raise ValueError(f"{CLUSTER_SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters "
                         f"(a secret shared by the proxy and every node), got {len(text)}")
    else:
        key = hashlib.blake2b(text.encode(), key=_KEY_LABEL, digest_size=32).digest()
    if environ is None:
        _cached = (text, key)
    return key


def publish_id(digest: int, key: bytes | None = None, *, keyed: bool = True) -> int:
    """64-bit published id of a 128-bit block digest (never 0 or 1).

    ``key`` defaults to ``cluster_key()`` (the environment's cluster secret); ``keyed=False``
    forces the unkeyed fold.
    """
    if key is None and keyed:
        key = cluster_key()
    if key is None:
        v = (digest ^ (digest >> 64)) & _MASK64
    else:
        v = int.from_bytes(hashlib.blake2b(digest.to_bytes(16, "little"), key=key, digest_size=8).digest(),
                           "little")
    return v if v >= RESERVED_IDS else v + RESERVED_IDS


def publish_ids(digests, key: bytes | None = None) -> np.ndarray:
    """``publish_id`` of each digest, as a uint64 array."""
    if key is None:
        key = cluster_key()
    return np.fromiter((publish_id(d, key, keyed=key is not None) for d in digests), dtype=np.uint64,
                       count=len(digests))
