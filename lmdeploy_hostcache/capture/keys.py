"""The capture key: keyed block ids from chained digests.

A block id is ``blake2b(digest, key=K, digest_size=8)`` (the top bit cleared: a JSON-safe int
>= 0) of the block's chained digest (``tier/digest.py``: xxh3-128 over the whole prefix's token ids).
Invariants:

* equal prefixes give equal ids inside one capture (the digest names the whole prefix), so the
  prefix-sharing structure survives and ``plan`` replays it exactly;
* without ``K`` an id cannot be tested against a guessed prompt, nor matched with ids of a
  capture made with another key (blake2b is a keyed PRF); ``K`` is 128 random bits per capture
  unless the operator shares one through ``LMDEPLOY_HOSTCACHE_CAPTURE_KEY`` (32 hex digits) so that
  the captures of several nodes can be merged;
* ``K`` is never written anywhere; records carry only ``fingerprint`` (a keyed hash of a fixed
  label, 8 hex digits), which says whether two files share a key and nothing about ``K``.

Cost (the ids are derived on LMDeploy's scheduler thread): ``block_id_texts`` keeps the ids it derived
in a bounded in-memory map (digest -> the id's decimal text, what a record writes; at most
``MEMO_ENTRIES``, emptied when full), so a block shared by many requests (a system prompt, a
conversation's history) is keyed and formatted once, not once per request; the keyed hasher is set up
once per key and copied per digest (measured: a copy of the keyed state, an update and a digest cost
about two thirds of a keyed constructor, which hashes the key block again); the digests the map lacks are
found by C-level membership tests (``block_id_texts``) or, in ``block_ids_text``, which trace capture calls
once per record with a few digests, by a plain loop (one call less).
``block_ids_text`` is the same ids joined by commas (a record's ``hash_ids``), ``block_ids`` the same
ids as ints.  All give the ids of the formula above (``tests/capture/test_capture.py``); the map lives
in process memory only and holds nothing the host tier does not already hold (digests) beyond the ids
a capture writes anyway.  ``derived`` counts the keyed hashes run.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from itertools import filterfalse as _filterfalse

CAPTURE_KEY_ENV = "LMDEPLOY_HOSTCACHE_CAPTURE_KEY"
KEY_BYTES = 16
_ID_MASK = (1 << 63) - 1
_FINGERPRINT_LABEL = b"lmdeploy-hostcache capture key fingerprint v1"
MEMO_ENTRIES = 1 << 15      # about 5 MB of digests and id texts at most


class CaptureKey:
    """128-bit key; ``block_id(digest)`` and ``session_id(value)`` are keyed hashes."""

    __slots__ = ("_key", "_keyed", "_memo", "fingerprint", "derived")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a capture key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits)")
        self._key = key
        self._keyed = hashlib.blake2b(key=key, digest_size=8)   # copied per digest: the key block once
        self._memo: dict[int, str] = {}     # digest -> decimal text of its id
        self.derived = 0            # keyed hashes run by block_id_texts (memo misses)
        self.fingerprint = hashlib.blake2b(_FINGERPRINT_LABEL, key=key, digest_size=4).hexdigest()

    @classmethod
    def random(cls) -> "CaptureKey":
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str, source: str = CAPTURE_KEY_ENV) -> "CaptureKey":
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(f"{source}: expected {2 * KEY_BYTES} hex digits (a 128-bit capture key), "
                             f"got {len(text.strip())} characters")
        return cls(key)

    @classmethod
    def from_env(cls, environ=os.environ) -> "CaptureKey":
        """The shared key in ``LMDEPLOY_HOSTCACHE_CAPTURE_KEY``, else a fresh random one."""
        text = environ.get(CAPTURE_KEY_ENV, "")
        return cls.from_hex(text) if text.strip() else cls.random()

    def __repr__(self) -> str:  # never show the key
        return f"CaptureKey(fingerprint={self.fingerprint})"

    def block_id(self, digest: int) -> int:
        """Keyed id of a chained block digest (an int < 2**63)."""
        h = hashlib.blake2b(digest.to_bytes(16, "little"), key=self._key, digest_size=8)
        return int.from_bytes(h.digest(), "little") & _ID_MASK

    def block_ids(self, digests) -> list[int]:
        """``[block_id(d) for d in digests]``, each distinct digest keyed once while the memo holds it."""
        return list(map(int, self.block_id_texts(digests)))

    def block_id_texts(self, digests) -> list[str]:
        """``[str(block_id(d)) for d in digests]`` (what a record writes), each distinct digest keyed
        and formatted once while the memo holds it."""
        self._derive(digests)
        return list(map(self._memo.__getitem__, digests))

    def block_ids_text(self, digests) -> str:
        """``",".join(block_id_texts(digests))``: the ids as a record's ``hash_ids`` holds them (``_derive``
        inlined: trace capture calls this once per record, with a few digests)."""
        memo = self._memo
        if len(memo) + len(digests) > MEMO_ENTRIES:
            memo.clear()
        derived = 0
        for d in digests:
            if d not in memo:
                h = self._keyed.copy()
                h.update(d.to_bytes(16, "little"))
                memo[d] = str(int.from_bytes(h.digest(), "little") & _ID_MASK)
                derived += 1
        if derived:
            self.derived += derived
        return ",".join(map(memo.__getitem__, digests))

    def _derive(self, digests) -> None:
        """Key and format the digests the memo lacks (each once: ``filterfalse`` asks the memo as it goes,
        so a digest repeated in ``digests`` is found there the second time).  The memo is emptied first
        when it could overflow, so every digest of ``digests`` is in it on return."""
        memo = self._memo
        if len(memo) + len(digests) > MEMO_ENTRIES:
            memo.clear()
        keyed = self._keyed
        derived = 0
        for d in _filterfalse(memo.__contains__, digests):   # the membership tests run in C
            h = keyed.copy()
            h.update(d.to_bytes(16, "little"))
            memo[d] = str(int.from_bytes(h.digest(), "little") & _ID_MASK)
            derived += 1
        self.derived += derived

    def session_id(self, value) -> str:
        """Keyed hash of a session key (16 hex digits): equal inside a capture, opaque outside."""
        return hashlib.blake2b(b"session\0" + str(value).encode(), key=self._key, digest_size=8).hexdigest()
