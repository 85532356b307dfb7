"""Chained, process-stable block digests.

A block's digest is ``xxh3_128(parent_digest(16 bytes LE) || block_bytes, seed=namespace.seed)``
where ``block_bytes`` are the block's token ids as little-endian uint32.  The chain starts at
``namespace.root``, itself a digest of every namespace field.  Hence:

* the same tokens in the same namespace give the same digest in every process and on every
  machine (xxhash is specified byte-for-byte; Python's ``hash()`` is never used);
* a digest identifies the whole prefix up to the end of its block, not just the block;
* two namespaces (model, adapter, KV format, block size, tenant salt) never share a chain,
  because the namespace enters both the root and the seed of every step.

A per-request cache salt (issue 16) changes only where a request's chain starts:
``salted_root(namespace, salt)`` is ``namespace.root`` for an empty salt (unsalted requests keep
bit-identical digests) and otherwise a digest of the root and the length-prefixed salt, so two
salts never share a chain, and the salt itself never appears in a digest.

Digests are Python ints (fast dict keys).  A 128-bit digest collision is astronomically unlikely,
but the host index never trusts a digest alone: it compares the stored token bytes before reuse.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import xxhash

DIGEST_BYTES = 16
TOKEN_DTYPE = np.dtype("<u4")
_MAX_TOKEN = np.iinfo(TOKEN_DTYPE).max
_NAMESPACE_VERSION = 1

_xxh3_128 = xxhash.xxh3_128_intdigest
_xxh3_64 = xxhash.xxh3_64_intdigest


def encode_tokens(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes; raises ValueError for ids outside [0, 2**32)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != TOKEN_DTYPE:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _MAX_TOKEN:
            # counts only: token ids are prompt content and never enter a message or a log
            bad = int(np.count_nonzero((arr < 0) | (arr > _MAX_TOKEN)))
            raise ValueError(f"token id out of range [0, {_MAX_TOKEN}]: {bad} of {arr.size} ids")
        arr = arr.astype(TOKEN_DTYPE)
    return arr.tobytes()


def block_digest(parent: int, block_bytes: bytes, seed: int) -> int:
    """Digest of one block chained on ``parent`` (a 128-bit int)."""
    return _xxh3_128(parent.to_bytes(DIGEST_BYTES, "little") + block_bytes, seed)


@dataclass(frozen=True)
class Namespace:
    """Everything that makes two identical token blocks hold different KV bytes.

    ``kv_format`` names the bytes stored for the block (for example ``fp16``, ``bf16``,
    ``int8``, ``int4``, ``fp16>int4`` for an fp16 cache stored as int4 on the host).
    """

    model: str
    block_size: int
    kv_format: str = "fp16"
    adapter: str | None = None
    tenant_salt: str = ""
    seed: int = field(init=False, repr=False, compare=False)
    root: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"Namespace.model must be a non-empty string, got {self.model!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"Namespace.block_size must be a positive int, got {self.block_size!r}")
        # Length-prefixed fields: no two different namespaces encode to the same bytes.
        parts = [
            str(_NAMESPACE_VERSION),
            self.model,
            "" if self.adapter is None else "A:" + self.adapter,
            self.kv_format,
            str(self.block_size),
            self.tenant_salt,
        ]
        blob = b"".join(struct.pack("<I", len(p.encode())) + p.encode() for p in parts)
        object.__setattr__(self, "seed", _xxh3_64(blob))
        object.__setattr__(self, "root", _xxh3_128(b"lmdeploy-hostcache/root" + blob))


class ChainHasher:
    """Incremental digests of one request's full blocks.

    ``extend`` hashes only blocks completed by the new tokens; a trailing partial block is kept
    and completed by a later ``extend``.  ``digests[i]`` covers tokens ``[0, (i+1)*block_size)``
    counted from where the chain started (``parent``).
    """

    __slots__ = ("namespace", "block_size", "parent", "digests", "block_bytes", "_pending")

    def __init__(self, namespace: Namespace, parent: int | None = None) -> None:
        self.namespace = namespace
        self.block_size = namespace.block_size
        self.parent = namespace.root if parent is None else parent
        self.digests: list[int] = []
        self.block_bytes: list[bytes] = []
        self._pending = b""

    @property
    def num_blocks(self) -> int:
        return len(self.digests)

    @property
    def last_digest(self) -> int:
        """Digest of the last full block, or the starting parent when there is none."""
        return self.digests[-1] if self.digests else self.parent

    def extend(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Append tokens; returns how many new full blocks were hashed."""
        data = self._pending + encode_tokens(tokens)
        step = self.block_size * TOKEN_DTYPE.itemsize
        n_full = len(data) // step
        parent, seed = self.last_digest, self.namespace.seed
        digests, blocks = self.digests, self.block_bytes
        for i in range(n_full):
            chunk = data[i * step:(i + 1) * step]
            parent = _xxh3_128(parent.to_bytes(DIGEST_BYTES, "little") + chunk, seed)
            digests.append(parent)
            blocks.append(chunk)
        self._pending = data[n_full * step:]
        return n_full


def chain_digests(
    namespace: Namespace, tokens: Sequence[int] | np.ndarray, parent: int | None = None
) -> tuple[list[int], list[bytes]]:
    """Digests and token bytes of every full block of ``tokens`` chained from ``parent``."""
    h = ChainHasher(namespace, parent)
    h.extend(tokens)
    return h.digests, h.block_bytes


def block_id_bytes(block_id: int) -> bytes:
    """A trace's block id as the block's 'token bytes' in a replay (8 bytes little-endian: Mooncake ids
    and a capture's 63-bit keyed ids alike; ``planner.traces`` refuses ids of 2**64 or more)."""
    return block_id.to_bytes(8, "little")


def digests_of_blocks(namespace: Namespace, blocks: Iterable[bytes], parent: int | None = None) -> list[int]:
    """Chain digests over already-encoded block bytes (used by trace replay)."""
    cur = namespace.root if parent is None else parent
    seed = namespace.seed
    out = []
    for b in blocks:
        cur = _xxh3_128(cur.to_bytes(DIGEST_BYTES, "little") + b, seed)
        out.append(cur)
    return out


_SALT_LABEL = b"lmdeploy-hostcache/request-salt"


def salted_root(namespace: Namespace, salt: str | None) -> int:
    """Root of a request's chain under its cache salt; ``namespace.root`` when ``salt`` is empty."""
    if not salt:
        return namespace.root
    if not isinstance(salt, str):
        raise ValueError(f"a cache salt must be a string, got {type(salt).__name__}")
    raw = salt.encode()
    return _xxh3_128(_SALT_LABEL + namespace.root.to_bytes(DIGEST_BYTES, "little")
                     + struct.pack("<I", len(raw)) + raw, namespace.seed)
