"""Store keys that cannot collide across nodes that would hold different bytes.

A key is ``lhc1/<space>/<digest>``:

* ``<digest>``: the block's chained xxh3-128 digest (``tier/digest.py``) as 32 hex digits; it already
  covers the whole prefix up to the end of the block and the ``Namespace`` (model, adapter,
  KV format, block size, tenant salt) through its root and seed;
* ``<space>``: 32 hex digits of xxh3-128 over the length-prefixed ``Namespace`` fields again
  *plus* the TP size, this rank's index, the KV-head shard when the caller states it
  (``head_start``, ``head_count``; the engine, ``integration/l3_tier.py``, leaves both 0: under
  LMDeploy's even split the shard follows from TP size and rank), the bytes per block object and
  the weights (``weights``: ``l3.weights_id``, or a fingerprint of the checkpoint's files,
  ``l3/weights.py``). A TP1 and a TP2 node, an int4 and an fp16 node,
  two tenant salts, or two fine-tunes mounted at the same path therefore never share a key, even
  if their digests were equal.

Invariants: pure function of its inputs (same key in every process and on every machine); the
tenant salt enters only through a hash, so keys never reveal it; LMDeploy's own Mooncake key
scheme (which omits the TP size and the KV quant policy) is never used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import xxhash

from ..tier.digest import DIGEST_BYTES, Namespace

KEY_VERSION = "lhc1"


def _blob(parts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(p.encode())) + p.encode() for p in parts)


@dataclass(frozen=True)
class StoreKeyspace:
    """Where this rank's blocks live in the shared store."""

    namespace: Namespace
    tp_size: int = 1
    tp_rank: int = 0
    head_start: int = 0
    head_count: int = 0          # KV heads this rank's block objects hold (0: not stated)
    block_nbytes: int = 0        # payload bytes per block object on this rank
    weights: str = ""            # names the weights (l3.weights_id, or l3/weights.py's fingerprint)
    space: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("tp_size", "tp_rank", "head_start", "head_count", "block_nbytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"StoreKeyspace.{name} must be an int >= 0, got {v!r}")
        if self.tp_size < 1:
            raise ValueError(f"StoreKeyspace.tp_size must be >= 1, got {self.tp_size}")
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"StoreKeyspace.tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        ns = self.namespace
        parts = [KEY_VERSION, ns.model, "" if ns.adapter is None else "A:" + ns.adapter, ns.kv_format,
                 str(ns.block_size), ns.tenant_salt, f"{ns.root:032x}", str(self.tp_size),
                 str(self.tp_rank), str(self.head_start), str(self.head_count), str(self.block_nbytes),
                 "W:" + self.weights]
        object.__setattr__(self, "space", f"{xxhash.xxh3_128_intdigest(_blob(parts)):032x}")

    def key(self, digest: int) -> str:
        """The store key of the block whose chained digest is ``digest``."""
        if not 0 <= digest < 1 << (8 * DIGEST_BYTES):
            raise ValueError(f"digest out of range for {DIGEST_BYTES} bytes: {digest!r}")
        return f"{KEY_VERSION}/{self.space}/{digest:032x}"

    def keys(self, digests) -> list[str]:
        return [self.key(d) for d in digests]
