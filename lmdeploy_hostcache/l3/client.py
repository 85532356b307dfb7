"""Batched exists/put/get on a shared store, every call under a deadline.

``L3Client`` wraps a *backend* (the Mooncake Store client, or any object with the same four
methods: ``batch_is_exist(keys) -> list[int]``, ``put(key, bytes) -> int``,
``get_batch(keys) -> list[bytes]``, ``close()``; ``put_batch(keys, values) -> int`` is used
when present, and so are ``batch_remove(keys, force) -> list[int]`` or ``remove(key, force) -> int``
for ``remove``; a backend with neither cannot remove an object). The Mooncake client has no per-call timeout
and blocks while its master is unresponsive, so every backend call runs on one worker thread
and the caller waits at most ``timeout_s`` for it.

Mooncake moves every object through the client's local buffer (``l3.local_buffer_gb``); a batch
that does not fit it fails as a whole (``get_batch`` answers empty bytes for every key, a put
status -600). With ``buffer_bytes`` given (``backend.connect`` passes the buffer's size), puts
and gets of objects whose sizes are known are split into consecutive backend calls that each fit
(``buffer_need``: the buffer's allocator rounds every object up to its size class), at least one
object per call; a single object that cannot fit still gets a call of its own, and fails there.

Invariants:
* each backend call has its own deadline: one that misses it raises ``L3Timeout``, so a put or
  get split into ``n`` calls waits at most ``n x timeout_s``; until that stuck call returns,
  every further call raises ``L3Unavailable`` at once (no pile-up of blocked threads), and the
  remaining calls of a split batch are not made;
* after a call that missed its deadline or raised, the client backs off: for ``BACKOFF_MIN_S``,
  doubling at each further failure up to ``BACKOFF_MAX_S``, every call raises ``L3Unavailable`` at
  once (a master that is down costs no caller its ``timeout_s`` more than once per interval; before,
  one call stalled its thread for ``timeout_s`` every few seconds for as long as the master was
  down); when the interval ends, ``probe`` (``backend.connect``: a TCP connect to the master) is
  asked first where one is given, and a master that refuses it keeps the client backing off without
  a backend call; the first call that succeeds ends the backoff;
* a negative status from the backend (master gone, RPC failure) raises ``L3Unavailable``;
  a put refused for space returns ``False`` for that block (``L3Full`` only from ``put_blocks``
  when ``strict``); nothing is retried silently;
* ``get_blocks`` returns payloads only for objects whose header, key, token ids and checksum
  all match (``objects.decode``); a missing block, a corrupt one or a short batch raises, so a
  caller never uses part of a prefix it did not fully verify: all or nothing per call, in the
  order asked, however many backend calls it took; an ``L3Corrupt`` it raises names the
  offending object's key (``exc.key``);
* a put on a key that already holds an object keeps that object (Mooncake's ``put``), so an
  object found corrupt must be ``remove``d before a good one can be written under its key;
* a put split into several calls may raise after earlier calls stored their objects (each a
  complete, checksummed object, counted as stored);
* every outcome is counted in ``metrics`` (an ``L3TierMetrics`` or anything with ``add`` and
  ``observe(op, seconds)``; latency per backend call) when one is given;
* ``close`` is idempotent and waits at most ``max(timeout_s, 10 s)`` for the backend's close; after
  a call missed its deadline it returns at once and a daemon thread closes the backend when that
  call returns (never while it runs; a process exiting before that leaves the backend to Mooncake's
  own exit handler). The wait is only as good as Mooncake lets it be: with a master that stops
  answering (hung, partitioned; not one that died), Mooncake 0.3.13's close, and its destructor at
  exit, block while holding Python's GIL until its RPC gives up, about a minute, so no thread of the
  process runs meanwhile (an engine's sleep or stop then takes that long; LMDeploy force-kills an
  engine that does not stop within 60 s). Measured, not fixed: docs/integration.md.
"""
from __future__ import annotations

import threading
import time
import queue
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from . import objects
from .errors import L3Corrupt, L3Full, L3Missing, L3Timeout, L3Unavailable
from .keys import StoreKeyspace

# Mooncake ErrorCode values seen from the Python client (mooncake-transfer-engine 0.3.x).
NO_SPACE_CODES = frozenset({-200, -201, -202})   # no available handle / segment / replica space
BACKOFF_MIN_S = 1.0     # after a failed call, calls fail at once this long, doubling per failure ...
BACKOFF_MAX_S = 60.0    # ... up to this
NO_SPACE_CODES_FIRST = -200

# Mooncake's client buffer allocator (an offset allocator, mooncake-store 0.3.x) indexes at most
# 3.75 GiB of units: a larger buffer counts in units of the smallest power of two that brings it there.
_MAX_BIN_UNITS = 4026531840


def buffer_need(sizes: Sequence[int], buffer_bytes: int) -> int:
    """Bytes of a client buffer of ``buffer_bytes`` that one backend call moving objects of ``sizes``
    needs (the call fits when this is <= ``buffer_bytes``).

    Mooncake places each object of a call in the buffer on its own, rounded up to its size class
    (3 mantissa bits: less than 9/8 of it), and only in a free region whose class, rounded down (more
    than 8/9 of the region), holds that. So whatever the order, ``9/8`` of the call's bytes plus
    ``9/64`` of its largest object suffice (plus one unit per object on buffers over 3.75 GiB)."""
    return _need(sum(sizes), max(sizes), len(sizes), buffer_bytes) if len(sizes) else 0


def _need(total: int, largest: int, count: int, buffer_bytes: int) -> int:
    unit = 1
    while buffer_bytes // unit > _MAX_BIN_UNITS:
        unit *= 2
    pad = unit - 1
    return (9 * (total + count * pad) + 7) // 8 + (9 * (largest + pad) + 63) // 64 + unit + 64


def _nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, memoryview) else len(value)


class _CallThread:
    """One daemon thread running the backend's calls in order. Not a ``ThreadPoolExecutor``: the
    interpreter joins those threads at exit, so a Mooncake call that never returns (its master hung)
    would keep the engine's process from exiting."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def shutdown(self) -> None:
        """No further job runs after those already queued; returns at once."""
        self._jobs.put(None)


class L3Client:
    """A store client with deadlines; see the module docstring for the guarantees."""

    def __init__(self, backend: Any, timeout_s: float = 2.0, metrics: Any = None,
                 name: str = "l3", buffer_bytes: int | None = None,
                 probe: Callable[[], bool] | None = None) -> None:
        """``buffer_bytes``: the backend's local buffer (``L3Config.local_buffer_bytes``); ``None``
        sends every batch in one call (a backend without such a buffer). ``probe``: a quick check that
        the store can answer (True), asked before the first call after a backoff."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if buffer_bytes is not None and (isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int)
                                         or buffer_bytes <= 0):
            raise ValueError(f"buffer_bytes must be an int > 0 or None, got {buffer_bytes!r}")
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.metrics = metrics
        self.buffer_bytes = buffer_bytes
        self.name = name
        self.closer: threading.Thread | None = None   # closes the backend after a stuck call (close)
        self._pool = _CallThread(f"{name}-call")
        self._stuck: Future | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.probe = probe
        self._backoff_s = 0.0          # the current backoff interval (0: none)
        self._retry_at = 0.0           # monotonic time before which every call fails at once

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
            if self._backoff_s:
                now = time.monotonic()
                if now < self._retry_at or (self.probe is not None and not self._probe_ok()):
                    if now >= self._retry_at:     # the probe failed: back off further, no backend call
                        self._back_off()
                    self._count(errors=1)
                    raise L3Unavailable(f"{op}: the store failed recently; calls resume in "
                                        f"{max(0.0, self._retry_at - now):.1f} s (backing off)")
            t0 = time.perf_counter()
            fut = self._pool.submit(fn, *args)
            try:
                out = fut.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._stuck = fut
                self._back_off()
                self._count(errors=1, timeouts=1)
                raise L3Timeout(f"{op}: no answer from the store within {self.timeout_s:g} s") from None
            except Exception as exc:  # the backend raised: treat as unreachable
                self._back_off()
                self._count(errors=1)
                raise L3Unavailable(f"{op}: store call failed: {exc}") from exc
            self._backoff_s = 0.0
            if self.metrics is not None:
                self.metrics.observe(op, time.perf_counter() - t0)
            return out

    def _back_off(self) -> None:
        """(Under ``_lock``.) Fail every call at once for the next interval, twice the last one."""
        self._backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * self._backoff_s))
        self._retry_at = time.monotonic() + self._backoff_s

    def _probe_ok(self) -> bool:
        try:
            return bool(self.probe())
        except Exception:  # noqa: BLE001 - a probe that fails is a store that cannot answer
            return False

    def _reply(self, op: str, out, n: int) -> list:
        """A batched reply as a list of ``n`` answers; anything else (None, an int, a string, another
        length) is a store failure, ``L3Unavailable``, so the turn recomputes."""
        if not isinstance(out, (list, tuple)) or len(out) != n:
            self._count(errors=1)
            got = f"{len(out)} answers" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise L3Unavailable(f"{op}: store answered {got} for {n} keys")
        return list(out)

    def _spans(self, sizes: Sequence[int] | None, n: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` index ranges, in order, each one backend call that fits the buffer (at least
        one object each); one range when the buffer or the sizes are unknown."""
        if self.buffer_bytes is None or sizes is None or n <= 1:
            return [(0, n)] if n else []
        spans, lo, cap = [], 0, self.buffer_bytes
        while lo < n:
            hi, total, largest = lo + 1, sizes[lo], sizes[lo]
            while hi < n and _need(total + sizes[hi], max(largest, sizes[hi]), hi + 1 - lo, cap) <= cap:
                total, largest, hi = total + sizes[hi], max(largest, sizes[hi]), hi + 1
            spans.append((lo, hi))
            lo = hi
        return spans

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
        (refused: store full). Raises on an unreachable store. Split into calls that each fit the
        buffer (module docstring); a raise from a later call leaves the earlier ones' objects stored."""
        if not items:
            return []
        out: list[bool] = []
        for lo, hi in self._spans([_nbytes(v) for _, v in items], len(items)):
            out.extend(self._put_call(items[lo:hi]))
        return out

    def _put_call(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
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

    def get(self, keys: Sequence[str], sizes: Sequence[int] | None = None) -> list[bytes | None]:
        """Objects by key, ``None`` where absent; ``sizes`` (each object's bytes, when known) split
        the batch into calls that fit the buffer (module docstring)."""
        return self._get(keys, sizes, stop_at_absent=False)

    def _get(self, keys: Sequence[str], sizes: Sequence[int] | None, stop_at_absent: bool) -> list[bytes | None]:
        """``get``; with ``stop_at_absent`` no further call is made once an object is absent (the
        answer is then shorter than ``keys`` and ends in that ``None``)."""
        if sizes is not None and len(sizes) != len(keys):
            raise ValueError("get: keys and sizes differ in length")
        out: list[bytes | None] = []
        for lo, hi in self._spans(sizes, len(keys)):
            part = list(keys[lo:hi])
            blobs = self._reply("get", self._call("get", self.backend.get_batch, part), len(part))
            bad = next((b for b in blobs if b is not None and not isinstance(b, (bytes, bytearray, memoryview))),
                       None)
            if bad is not None:
                self._count(errors=1)
                raise L3Unavailable(f"get: store answered a {type(bad).__name__} where an object's bytes belong")
            got = [b if b else None for b in blobs]
            out.extend(got)
            if stop_at_absent and None in got:
                break
        return out

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
        """Every block's verified payload, in order, or an ``L3Error``: never part of a batch (however
        many backend calls the buffer split it into). The object sizes that split it come from
        ``payload_len``, else ``space.block_nbytes``; with neither, one call."""
        if len(digests) != len(token_bytes):
            raise ValueError("get_blocks: digests and token_bytes differ in length")
        keys = space.keys(digests)
        payload = payload_len if payload_len is not None else (space.block_nbytes or None)
        sizes = None if payload is None else [objects.object_nbytes(len(t), payload) for t in token_bytes]
        blobs = self._get(keys, sizes, stop_at_absent=True)   # stops at the first absent object
        out = []
        for key, blob, tokens in zip(keys, blobs, token_bytes):
            if blob is None:
                self._count(errors=1, missing=1)
                raise L3Missing(f"get {key}: object vanished from the store (evicted since the lookup)")
            try:
                out.append(objects.decode(key, blob, tokens, payload_len))
            except L3Corrupt as exc:
                self._count(errors=1, corrupt=1)
                exc.key = key   # the caller removes it (WorkerChain.stage)
                raise
        self._count(get_blocks=len(out), bytes_from_l3=sum(len(b) for b in blobs))
        return out

    def remove(self, keys: Sequence[str]) -> list[bool]:
        """Remove objects (best effort): per key True when the store removed it. For an object found
        corrupt, so that the next write-back of its block can put a good one (a put never replaces an
        object) and no node's lookup finds it any more. Forced (``force=True``: Mooncake would
        otherwise refuse while the read lease the failed get just took is live). A backend without
        ``batch_remove``/``remove`` answers False for every key; a store failure raises like any call."""
        if not keys:
            return []
        keys = list(keys)
        batch = getattr(self.backend, "batch_remove", None)
        single = getattr(self.backend, "remove", None)
        if batch is not None:
            codes = self._reply("remove", self._call("remove", batch, keys, True), len(keys))
        elif single is not None:
            codes = self._reply("remove", self._call("remove", lambda: [single(k, True) for k in keys]), len(keys))
        else:
            return [False] * len(keys)
        out = [c == 0 for c in codes]
        self._count(corrupt_removed=sum(out))
        return out

    def close(self) -> None:
        """Close the backend; idempotent. Waits at most ``max(timeout_s, 10 s)`` for it (not when a hung
        master makes Mooncake hold the GIL: see the module docstring); after a call
        missed its deadline, returns at once and leaves the close to a daemon thread (``closer``)
        that runs it once that call returned (the backend is never closed under a running call)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stuck = self._stuck if self._stuck is not None and not self._stuck.done() else None
        if stuck is not None:
            self.closer = threading.Thread(target=self._close_after, args=(stuck,), daemon=True,
                                           name=f"{self.name}-close")
            self.closer.start()
            self._pool.shutdown()
            return
        fut = self._pool.submit(self.backend.close)
        try:
            fut.result(timeout=max(self.timeout_s, 10.0))
        except Exception:  # noqa: BLE001 - closing a dead store is best effort
            pass
        self._pool.shutdown()

    def _close_after(self, stuck: Future) -> None:
        wait([stuck])
        try:
            self.backend.close()
        except Exception:  # noqa: BLE001 - closing a dead store is best effort
            pass

    def __enter__(self) -> L3Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
