"""The node cache-state feed: what a node publishes about its tiers, and how a reader applies it.

Node side, ``FeedPublisher``: the node's tier listeners call ``stored(tier, digest)`` and
``removed(tier, digest)``; a reader calls ``poll(epoch, since)`` and gets a JSON-ready dict:

* ``info``: format version, capacities (GPU blocks, host blocks, block size), the namespace
  (``root`` as hex and ``seed``: enough to compute the node's chained digests for any tokens,
  and nothing more: a tenant salt never leaves the node) and its fingerprint (model, KV
  format, TP), ``host_weight`` and ``speed`` for the cost model;
* either ``events`` since the reader's cursor: two base64 arrays, ``ops`` (uint8:
  bit 0 = stored/removed, bit 1 = tier) and ``ids`` (little-endian uint64 published ids),
  at most ``max_events`` per poll (the reader polls again when ``more`` is true);
* or a ``snapshot`` (both tiers' ids, same encoding) when the reader is new, was restarted
  (``epoch`` differs), or fell further behind than the bounded event ring remembers.

Bounded: the ring keeps ``ring_events`` events; a reader that falls behind gets a snapshot,
whose size is what the node holds (8 bytes per block before base64).

Reader side, ``FeedCursor.apply(msg)`` validates a message and returns what changed, for the
router (``CacheAwareRouter.apply_feed``); ``apply`` is ``parse`` (validate and decode, no change:
the proxy runs it outside its lock) then ``commit`` (move the cursor, refused when the cursor moved
since the parse).

Bounded: a node advertises at most ``MAX_FEED_BLOCKS`` (2**32) blocks per tier; a snapshot tier
with more ids than its advertised capacity, or one events message storing more than capacity +
``capacity_slack`` ids in a tier, is refused (``FeedError``) before anything changes; the router
refuses a feed whose view grows past capacity + slack through events (``CacheAwareRouter``).

Invariants: every id goes through ``ids.publish_id`` (the one place to key ids later); after
applying every message in order, a reader's view equals the publisher's ``contents()``;
a message that fails validation changes nothing and raises ``FeedError`` naming the field
(never another exception: non-finite or huge numbers included).
"""
from __future__ import annotations

import base64
import itertools
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ids import RESERVED_IDS, publish_id
from .table import GPU, HOST

FEED_VERSION = 1
# info.host_weight (a restore's cost relative to a prefill) and info.speed (prefill throughput relative to the
# reference GPU): what a sane node can state; outside is refused, so a hostile feed cannot herd the cluster
FEED_NUMBER_RANGES = {"host_weight": (0.0, 1.0), "speed": (0.01, 100.0)}
# info.gpu_blocks / info.host_blocks: the largest capacity a node may advertise per tier (the proxy's table holds at
# most this many of one node's ids per tier, plus the event slack below)
MAX_FEED_BLOCKS = 1 << 32
# a node's view may pass its advertised capacity by this many ids per tier between two snapshots (events of one
# batch are applied as sets, a node may store before it withdraws): capacity // 4, at least 1024
FEED_SLACK_MIN = 1024
FEED_PATH = "/hostcache/cache_state"
DEFAULT_RING_EVENTS = 1 << 16
DEFAULT_MAX_EVENTS = 1 << 15
_STORED, _REMOVED = 0, 1


class FeedError(ValueError):
    """A feed message that cannot be applied (names the field)."""


class FeedOverflow(FeedError):
    """A node's view grew past its advertised capacity through events (``CacheAwareRouter.commit_feed``)."""


def capacity_slack(capacity: int) -> int:
    """Ids past ``capacity`` one tier of a node's exact view may hold before its feed is refused."""
    return max(FEED_SLACK_MIN, int(capacity) // 4)


def _seed(v: Any) -> int:
    """``info.namespace.seed``: an int (``FeedPublisher`` sends one), or a decimal string of one."""
    if isinstance(v, str) and 0 < len(v) <= 40 and v.isascii() and v.isdigit():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FeedError(f"feed field 'info.namespace.seed' must be an int (or a decimal string), got {v!r}")
    return v


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def _unb64(text: Any, dtype, field: str) -> np.ndarray:
    if not isinstance(text, str):
        raise FeedError(f"feed field {field!r} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except Exception:
        raise FeedError(f"feed field {field!r} is not valid base64") from None
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise FeedError(f"feed field {field!r} has {len(raw)} bytes, not a multiple of {size}")
    out = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    if dtype is np.uint64 and out.size and int(out.min()) < RESERVED_IDS:
        # 0 marks an empty routing-table slot (an id 0 would lend its bit to the next id placed there)
        raise FeedError(f"feed field {field!r} holds a reserved id ({int(out.min())}); published ids are >= "
                        f"{RESERVED_IDS}")
    return out


@dataclass(frozen=True)
class NamespaceKey:
    """What the proxy needs to chain a node's digests: root, seed and block size.

    Duck-types ``digest.Namespace`` for ``digest.ChainHasher``.
    """

    root: int
    seed: int
    block_size: int

    @classmethod
    def of(cls, ns) -> "NamespaceKey":
        return cls(int(ns.root), int(ns.seed), int(ns.block_size))


class FeedPublisher:
    """Node side; see the module docstring."""

    def __init__(self, *, gpu_blocks: int, host_blocks: int, namespace, fingerprint: dict | None = None,
                 host_weight: float = 0.2, speed: float = 1.0, ring_events: int = DEFAULT_RING_EVENTS,
                 max_events: int = DEFAULT_MAX_EVENTS) -> None:
        key = NamespaceKey.of(namespace)
        self.info = {
            "version": FEED_VERSION,
            "gpu_blocks": int(gpu_blocks),
            "host_blocks": int(host_blocks),
            "block_size": key.block_size,
            "namespace": {"root": f"{key.root:032x}", "seed": key.seed, **(fingerprint or {})},
            "host_weight": float(host_weight),
            "speed": float(speed),
        }
        self.epoch = os.urandom(8).hex()
        self.seq = 0
        self.max_events = int(max_events)
        self._ring: deque[tuple[int, int]] = deque(maxlen=int(ring_events))  # (op, id); seq implied
        self._contents: tuple[dict[int, None], dict[int, None]] = ({}, {})
        self.enabled = True

    # -- listeners -----------------------------------------------------------------------------
    def stored(self, tier: int, digest: int) -> None:
        i = publish_id(digest)
        self._contents[tier][i] = None
        self._push((tier << 1) | _STORED, i)

    def removed(self, tier: int, digest: int) -> None:
        i = publish_id(digest)
        if self._contents[tier].pop(i, 0) is None:
            self._push((tier << 1) | _REMOVED, i)

    def _push(self, op: int, i: int) -> None:
        self._ring.append((op, i))
        self.seq += 1

    def listener(self, tier: int):
        """(on_stored, on_removed) callables for ``HostIndex.add_listener`` of one tier."""
        return (lambda b: self.stored(tier, b.digest)), (lambda b: self.removed(tier, b.digest))

    def contents(self) -> tuple[set[int], set[int]]:
        return set(self._contents[GPU]), set(self._contents[HOST])

    # -- reader protocol -----------------------------------------------------------------------
    def poll(self, epoch: str | None = None, since: int | None = None, max_events: int | None = None) -> dict:
        return encode_poll(self.take_poll(epoch, since, max_events))

    def take_poll(self, epoch: str | None = None, since: int | None = None, max_events: int | None = None) -> dict:
        """What a poll answers, copied now (plain lists: one C-level copy), for ``encode_poll`` to encode later:
        a caller that guards this publisher with a lock holds it only for this part."""
        limit = self.max_events if max_events is None else max(1, min(int(max_events), self.max_events))
        out: dict[str, Any] = {"info": self.info, "epoch": self.epoch}
        first = self.seq - len(self._ring)  # seq of the oldest event kept
        if epoch != self.epoch or since is None or not first <= since <= self.seq:
            out["seq"] = self.seq
            out["snapshot"] = (list(self._contents[GPU]), list(self._contents[HOST]))
            return out
        n = min(self.seq - since, limit)
        start = since - first
        out["seq"] = since + n
        out["more"] = since + n < self.seq
        out["events"] = list(itertools.islice(self._ring, start, start + n))
        return out


def encode_poll(taken: dict) -> dict:
    """``FeedPublisher.take_poll``'s copy as the feed message (ids base64-encoded)."""
    out = dict(taken)
    if "snapshot" in out:
        gpu, host = out["snapshot"]
        out["snapshot"] = {"gpu": _b64(np.array(gpu, dtype=np.uint64)), "host": _b64(np.array(host, dtype=np.uint64))}
    else:
        events = out["events"]
        out["events"] = {
            "ops": _b64(np.array([e[0] for e in events], dtype=np.uint8)),
            "ids": _b64(np.array([e[1] for e in events], dtype=np.uint64)),
        }
    return out


@dataclass
class FeedUpdate:
    """What one message changes: a full replacement per tier, or stored/removed ids per tier.

    ``FeedCursor.parse`` also records where the message leaves the cursor (``epoch``, ``seq``,
    ``info``) and the cursor state it was parsed against (``base``); ``FeedCursor.commit`` moves
    the cursor only if it is still there."""

    snapshot: tuple[np.ndarray, np.ndarray] | None
    stored: tuple[np.ndarray, np.ndarray]
    removed: tuple[np.ndarray, np.ndarray]
    epoch: str | None = None
    seq: int | None = None
    info: dict | None = None
    base: tuple[str | None, int | None] | None = None

    def capacity(self, tier: int) -> int:
        return int(self.info["gpu_blocks" if tier == GPU else "host_blocks"]) if self.info else 0


def parse_info(info: Any) -> dict:
    """Validate a feed's ``info``; returns it with ``namespace_key`` added (raises FeedError)."""
    if not isinstance(info, dict):
        raise FeedError("feed field 'info' must be an object")
    if info.get("version") != FEED_VERSION:
        raise FeedError(f"feed field 'info.version' must be {FEED_VERSION}, got {info.get('version')!r}")
    for k in ("gpu_blocks", "host_blocks", "block_size"):
        v = info.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "block_size" else 0):
            raise FeedError(f"feed field 'info.{k}' must be a non-negative int, got {v!r}")
        if k != "block_size" and v > MAX_FEED_BLOCKS:   # the proxy keeps up to this many of the node's ids
            raise FeedError(f"feed field 'info.{k}' must be at most 2**32, got {v!r}")
    ns = info.get("namespace")
    if not isinstance(ns, dict):
        raise FeedError("feed field 'info.namespace' must be an object")
    try:
        root = int(ns.get("root"), 16)
        seed = _seed(ns.get("seed"))
    except FeedError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise FeedError("feed field 'info.namespace' needs 'root' (hex) and 'seed' (int)") from None
    if not (0 <= root < 1 << 128 and 0 <= seed < 1 << 64):   # a digest root and an xxh3 seed
        raise FeedError("feed field 'info.namespace' needs 'root' below 2**128 and 'seed' below 2**64, both >= 0")
    for k, (low, high) in FEED_NUMBER_RANGES.items():
        v = info.get(k, 1.0)
        # finite and bounded: one node's feed must not take every request (speed divides its cost)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise FeedError(f"feed field 'info.{k}' must be a number in [{low:g}, {high:g}], got {v!r}")
    return {**info, "namespace_key": NamespaceKey(root, seed, info["block_size"])}


class FeedCursor:
    """Reader side of one node's feed: where it is, and how to turn a message into a change."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.seq: int | None = None
        self.info: dict | None = None

    def params(self) -> dict:
        return {} if self.epoch is None else {"epoch": self.epoch, "since": self.seq}

    def apply(self, msg: Any) -> FeedUpdate:
        """``parse`` then ``commit``: validates first, changes nothing on error (FeedError)."""
        upd = self.parse(msg)
        self.commit(upd)
        return upd

    def parse(self, msg: Any) -> FeedUpdate:
        """Validate ``msg`` against this cursor and decode it, changing nothing (raises FeedError naming the
        field). The cursor moves only with ``commit`` (the proxy parses outside its lock and commits the update
        with the table change, under it)."""
        if not isinstance(msg, dict):
            raise FeedError("feed message must be a JSON object")
        info = parse_info(msg.get("info"))
        epoch, seq = msg.get("epoch"), msg.get("seq")
        if not isinstance(epoch, str) or isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise FeedError("feed fields 'epoch' (string) and 'seq' (int >= 0) are required")
        base = (self.epoch, self.seq)
        caps = (info["gpu_blocks"], info["host_blocks"])
        empty = np.zeros(0, dtype=np.uint64)
        if "snapshot" in msg:
            snap = msg["snapshot"]
            if not isinstance(snap, dict):
                raise FeedError("feed field 'snapshot' must be an object")
            tiers = (_unb64(snap.get("gpu"), np.uint64, "snapshot.gpu"),
                     _unb64(snap.get("host"), np.uint64, "snapshot.host"))
            for tier, name in ((GPU, "gpu"), (HOST, "host")):
                # a snapshot is one state of the node: never more ids than it says it can hold
                if tiers[tier].size > caps[tier]:
                    raise FeedError(f"feed field 'snapshot.{name}' holds {tiers[tier].size} ids, more than "
                                    f"'info.{name}_blocks' ({caps[tier]})")
            return FeedUpdate(tiers, (empty, empty), (empty, empty), epoch, seq, info, base)
        ev = msg.get("events")
        if not isinstance(ev, dict):
            raise FeedError("feed message needs 'events' or 'snapshot'")
        if epoch != self.epoch or seq < (self.seq or 0):
            raise FeedError("feed 'events' do not continue this reader's cursor (epoch/seq)")
        ops = _unb64(ev.get("ops"), np.uint8, "events.ops")
        ids = _unb64(ev.get("ids"), np.uint64, "events.ids")
        if ops.size != ids.size:
            raise FeedError(f"feed fields 'events.ops' ({ops.size}) and 'events.ids' ({ids.size}) differ in length")
        stored, removed = [], []
        for tier in (GPU, HOST):
            stored.append(ids[ops == ((tier << 1) | _STORED)])
            removed.append(ids[ops == ((tier << 1) | _REMOVED)])
        # events of one batch are applied as sets: an id stored then removed (or the reverse)
        # in the same batch ends in its last state
        for tier in (GPU, HOST):
            sel = (ops >> 1) == tier
            tids, tops = ids[sel], ops[sel] & 1
            if tids.size and np.unique(tids).size != tids.size:
                last = {}
                for i, o in zip(tids.tolist(), tops.tolist()):
                    last[i] = o
                s = np.array([i for i, o in last.items() if o == _STORED], dtype=np.uint64)
                r = np.array([i for i, o in last.items() if o == _REMOVED], dtype=np.uint64)
                stored[tier], removed[tier] = s, r
        for tier, name in ((GPU, "gpu"), (HOST, "host")):
            # one batch cannot store more distinct ids than the tier holds (plus the slack)
            if stored[tier].size > caps[tier] + capacity_slack(caps[tier]):
                raise FeedError(f"feed field 'events' stores {stored[tier].size} {name} ids in one message, more "
                                f"than 'info.{name}_blocks' ({caps[tier]}) allows")
        return FeedUpdate(None, (stored[0], stored[1]), (removed[0], removed[1]), epoch, seq, info, base)

    def current(self, upd: FeedUpdate) -> bool:
        """Whether ``upd`` was parsed against this cursor's present position."""
        return upd.base == (self.epoch, self.seq)

    def commit(self, upd: FeedUpdate) -> None:
        """Move the cursor past ``upd`` (parsed by ``parse`` of this cursor at its present position)."""
        if not self.current(upd):
            raise FeedError("feed update was parsed against another cursor position (stale)")
        self.epoch, self.seq, self.info = upd.epoch, upd.seq, upd.info
