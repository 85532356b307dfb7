"""Batched exists/put/get on a shared store, every call under a deadline.

``L3Client`` wraps a *backend* (the Mooncake Store client, or any object with the same four
methods: ``batch_is_exist(keys) -> list[int]``, ``put(key, bytes) -> int``,
``get_batch(keys) -> list[bytes]``, ``close()``; ``put_batch(keys, values) -> int`` is used
when present). The Mooncake client has no per-call timeout
and blocks while its master is unresponsive, so every call runs on one worker thread and the
caller waits at most ``timeout_s``.

Invariants:
* a call that misses its deadline raises ``L3Timeout``; until that stuck call returns, every
  further call raises ``L3Unavailable`` at once (no pile-up of blocked threads);
* a negative status from the backend (master gone, RPC failure) raises ``L3Unavailable``;
  a put refused for space returns ``False`` for that block (``L3Full`` only from ``put_blocks``
  when ``strict``); nothing is retried silently;
* ``get_blocks`` returns payloads only for objects whose header, key, token ids and checksum
  all match (``objects.decode``); a missing block, a corrupt one or a short batch raises, so a
  caller never uses part of a prefix it did not fully verify;
* every outcome is counted in ``metrics`` (an ``L3TierMetrics`` or anything with ``add`` and
  ``observe(op, seconds)``) when one is given.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from . import objects
from .errors import L3Corrupt, L3Full, L3Missing, L3Timeout, L3Unavailable
from .keys import StoreKeyspace

# Mooncake ErrorCode values seen from the Python client (mooncake-transfer-engine 0.3.x).
NO_SPACE_CODES = frozenset({-200, -201, -202})   # no available handle / segment / replica space
NO_SPACE_CODES_FIRST = -200


class L3Client:
    """A store client with deadlines; see the module docstring for the guarantees."""

    def __init__(self, backend: Any, timeout_s: float = 2.0, metrics: Any = None,
                 name: str = "l3") -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-call")
        self._stuck: Future | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        if self.metrics is not None:
            self.metrics.add(**deltas)

    def _call(self, op: str, fn: Callable, *args) -> Any:
        with self._lock:
            if self._closed:
                raise L3Unavailable("the store client is closed")
            if self._stuck is not None:
                if not self._stuck.done():
                    self._count(errors=1)
                    raise L3Unavailable(f"{op}: a previous store call is still blocked "
                                        f"(master unresponsive?)")
                self._stuck = None
            t0 = time.perf_counter()
            fut = self._pool.submit(fn, *args)
            try:
                out = fut.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._stuck = fut
                self._count(errors=1, timeouts=1)
                raise L3Timeout(f"{op}: no answer from the store within {self.timeout_s:g} s") from None
            except Exception as exc:  # the backend raised: treat as unreachable
                self._count(errors=1)
                raise L3Unavailable(f"{op}: store call failed: {exc}") from exc
            if self.metrics is not None:
                self.metrics.observe(op, time.perf_counter() - t0)
            return out

    def _reply(self, op: str, out, n: int) -> list:
        """A batched reply as a list of ``n`` answers; anything else (None, an int, a string, another
        length) is a store failure, ``L3Unavailable``, so the turn recomputes."""
        if not isinstance(out, (list, tuple)) or len(out) != n:
            self._count(errors=1)
            got = f"{len(out)} answers" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise L3Unavailable(f"{op}: store answered {got} for {n} keys")
        return list(out)

    # -- raw keys ---------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """One batched existence check; raises ``L3Unavailable``/``L3Timeout`` on failure."""
        if not keys:
            return []
        states = self._reply("exists", self._call("exists", self.backend.batch_is_exist, list(keys)), len(keys))
        if any(not isinstance(s, int) or s not in (0, 1) for s in states):   # Mooncake: 1, 0 or a negative code
            self._count(errors=1)
            bad = next((s for s in states if s not in (0, 1)), None)
            raise L3Unavailable(f"exists: store answered {len(states)} states for {len(keys)} keys"
                                + (f" (status {bad})" if bad is not None else ""))
        return [s == 1 for s in states]

    def put(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Store objects; per item True (stored, or the key already held an object) or False
        (refused: store full). Raises on an unreachable store."""
        if not items:
            return []

        batch = getattr(self.backend, "put_batch", None)

        def run():
            # one batched RPC when every object is new; per-key puts otherwise (to learn which
            # keys were refused, and because a batch holding an existing key fails as a whole)
            keys = [k for k, _ in items]
            if batch is not None and len(items) > 1:
                if batch(keys, [v for _, v in items]) == 0:
                    return [0] * len(items)
                codes = [self.backend.put(k, v) for k, v in items]
                # a failed batch can leave keys half-written, and a put on such a key answers 0:
                # believe only what the store now says exists
                there = self.backend.batch_is_exist(keys)
                return [c if c != 0 or e == 1 else NO_SPACE_CODES_FIRST for c, e in zip(codes, there)]
            return [self.backend.put(k, v) for k, v in items]

        codes = self._reply("put", self._call("put", run), len(items))
        out = []
        for (key, value), code in zip(items, codes):
            if code == 0:
                out.append(True)
                self._count(put_blocks=1, bytes_to_l3=len(value))
            elif code in NO_SPACE_CODES:
                out.append(False)
                self._count(put_refused=1)
            else:
                self._count(errors=1)
                raise L3Unavailable(f"put {key}: store returned status {code}")
        return out

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Objects by key in one batch; ``None`` where absent."""
        if not keys:
            return []
        blobs = self._reply("get", self._call("get", self.backend.get_batch, list(keys)), len(keys))
        bad = next((b for b in blobs if b is not None and not isinstance(b, (bytes, bytearray, memoryview))), None)
        if bad is not None:
            self._count(errors=1)
            raise L3Unavailable(f"get: store answered a {type(bad).__name__} where an object's bytes belong")
        return [b if b else None for b in blobs]

    # -- blocks -----------------------------------------------------------------------
    def count_prefix(self, space: StoreKeyspace, digests: Sequence[int]) -> int:
        """How many blocks from ``digests[0]`` on are in the store, consecutively (batched)."""
        self._count(lookups=1, lookup_blocks=len(digests))
        n = 0
        for present in self.exists(space.keys(digests)):
            if not present:
                break
            n += 1
        self._count(hit_blocks=n)
        return n

    def put_blocks(self, space: StoreKeyspace, digests: Sequence[int], token_bytes: Sequence[bytes],
                   payloads: Sequence[Any], strict: bool = False) -> list[bool]:
        """Write blocks (checksummed objects). ``strict``: raise ``L3Full`` on a refusal."""
        if not len(digests) == len(token_bytes) == len(payloads):
            raise ValueError("put_blocks: digests, token_bytes and payloads differ in length")
        items = []
        for d, t, p in zip(digests, token_bytes, payloads):
            key = space.key(d)
            items.append((key, objects.encode(key, t, p)))
        stored = self.put(items)
        if strict and not all(stored):
            raise L3Full(f"store refused {stored.count(False)} of {len(stored)} blocks (full)")
        return stored

    def get_blocks(self, space: StoreKeyspace, digests: Sequence[int],
                   token_bytes: Sequence[bytes], payload_len: int | None = None) -> list[memoryview]:
        """Every block's verified payload, or an ``L3Error``: never part of a batch."""
        if len(digests) != len(token_bytes):
            raise ValueError("get_blocks: digests and token_bytes differ in length")
        keys = space.keys(digests)
        blobs = self.get(keys)
        out = []
        for key, blob, tokens in zip(keys, blobs, token_bytes):
            if blob is None:
                self._count(errors=1, missing=1)
                raise L3Missing(f"get {key}: object vanished from the store (evicted since the lookup)")
            try:
                out.append(objects.decode(key, blob, tokens, payload_len))
            except L3Corrupt:
                self._count(errors=1, corrupt=1)
                raise
        self._count(get_blocks=len(out), bytes_from_l3=sum(len(b) for b in blobs))
        return out

    def close(self) -> None:
        """Close the backend (bounded by the deadline when the master is gone)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        fut = self._pool.submit(self.backend.close)
        try:
            fut.result(timeout=max(self.timeout_s, 10.0))
        except Exception:  # noqa: BLE001 - closing a dead store is best effort
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> L3Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
