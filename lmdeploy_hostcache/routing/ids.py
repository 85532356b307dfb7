"""Published block ids: the one function that maps a node's block digest to what leaves the node.

A node names its cached blocks by chained xxh3-128 digests (``digest.py``).  What it publishes
in its cache-state feed, and what the proxy computes for a request, is ``publish_id(digest)``:
a 64-bit id, never 0 or 1 (the routing table's empty and reserved keys).

Invariants:
- pure and process-stable: the proxy and every node map the same digest to the same id;
- this is the only place digests become published ids, so keying them with a cluster secret
  (issue 16) changes this function and nothing else;
- a 64-bit id can collide; a collision only misguides one routing decision (the node still
  verifies the exact tokens of every block it restores).
"""
from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
RESERVED_IDS = 2  # 0: empty slot, 1: reserved


def publish_id(digest: int) -> int:
    """64-bit published id of a 128-bit block digest (never 0 or 1)."""
    v = (digest ^ (digest >> 64)) & _MASK64
    return v if v >= RESERVED_IDS else v + RESERVED_IDS


def publish_ids(digests) -> np.ndarray:
    """``publish_id`` of each digest, as a uint64 array."""
    return np.fromiter((publish_id(d) for d in digests), dtype=np.uint64, count=len(digests))
