"""``CacheAwareRouter``: pick the node with the lowest expected prefill cost for a request.

State (all in this object, no I/O):

* a ``BlockTable`` with, per node slot and tier, the published ids the node holds: **exact**
  for nodes that publish a cache-state feed (``apply_feed``), **approximate** (``ApproxNode``:
  what this router sent there, in two LRU tiers sized by the node's registered capacity) for
  nodes that do not, or whose feed stopped (``set_approximate``);
* per node: its ``NodeProfile`` (capacities, host restore weight, speed), its namespace key
  (exact nodes: from the feed; approximate nodes share one proxy-local namespace), health,
  prefill tokens in flight, and a sliding window of the prefill tokens it was given.

``route(request)``:

1. candidates: healthy nodes (optionally restricted by the caller, e.g. to a model);
2. **affinity**: an explicit session key (``session_id``/``user``) seen before goes to its
   node while that node is a healthy candidate the balance guard (5) does not skip (a key that
   many clients share cannot herd every request onto one node) **and** is predicted to reuse at
   least as many of the prompt's tokens (GPU + host match, 3) as any node the guard keeps: affinity
   breaks ties (a prefix equally cached, or one nothing predicts: a cold start, text mode on exact
   nodes), it never sends a conversation to prefill what another node holds (its node restarted or
   evicted it); otherwise the request is routed by cost and the key moves to the chosen node;
3. per namespace group, one table lookup of the prompt's ids gives each node's GPU match ``g``
   (consecutive GPU blocks from the start) and host match ``h`` (consecutive host blocks
   after that); nodes of another namespace never match (their ids differ);
4. ``cost.cost`` with the node's in-flight prefill tokens as the queue;
5. **balance guard**: a node whose share of the recent window's prefill (computed) tokens
   exceeds ``balance x`` its speed-weighted share is skipped (unless every node is, or it has
   less prefill queued than every other node), so a prefix every request shares cannot herd all
   traffic onto one node, nor the guard push traffic onto a node that is already backed up;
6. lowest cost wins; ties go to the lighter recent load, then to the earlier node.

Feeds (``apply_feed``, or ``prepare_feed`` without the caller's lock then ``commit_feed`` under it):
an exact node's view per tier is bounded by its advertised capacity: a snapshot tier larger than
the capacity is refused by the parse (nothing changes); for events, ``NodeState.held`` keeps a
cheap upper bound of the ids held per tier (the snapshot's size, plus every stored id since), and
only when it passes capacity + ``feed.capacity_slack`` is the exact ``BlockTable.count`` taken
(O(table)); if that passes it too, the node's exact view is forgotten (its bits cleared, its cursor
reset: the next poll asks for a snapshot) and ``FeedOverflow`` (a ``FeedError``) is raised.

In-flight prefill: ``dispatched`` returns a ticket (also ``Decision.ticket``) and
``finished(node, ticket)`` ends exactly that request's queued prefill (a ticket not queued on the
node, e.g. already finished, changes nothing); ``finished(node)`` without a ticket ends the node's
oldest one, for sequential callers only (the planner's replay, where one request is in flight).

A request for a LoRA adapter (``RoutingRequest.adapter``) matches nothing exact (nodes publish the
base model's blocks only, and key an adapter's blocks under another namespace); on the approximate
index it has its own partition per adapter.

Session keys are remembered as ``session_digest(key)`` (16 bytes, blake2b), never as the client's text: an
affinity entry costs the same (about 140 bytes, docs/routing.md "Limits") however long the ``user`` a client
sends, and no client text outlives the request.

Invariants: a node's bits in the table are only ever set from its own feed (exact) or from
what was routed to it (approximate), never both; removing a node clears its bits, its session
entries and its entries in the recent window (per-node state is kept for registered nodes only, so
node churn leaves nothing behind); a request with no candidate returns ``None``.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..tier.digest import Namespace
from .approx import ApproxNode
from .cost import NodeProfile, cost
from .feed import FeedCursor, FeedError, FeedOverflow, FeedUpdate, NamespaceKey, capacity_slack
from .request import RoutingRequest
from .table import GPU, HOST, BlockTable

DEFAULT_BALANCE = 1.3
WINDOW_PER_NODE = 64
WARM_FRACTION = 0.25
MAX_SESSIONS = 1 << 20   # affinity entries kept (least recently used dropped first)
_SESSION_PERSON = b"hc-route-sess"   # blake2b personalization of session digests
MAX_INFLIGHT = 1 << 16   # queued prefill entries kept per node (oldest dropped: a request whose end never came)
SNAPSHOT_CHUNK = 1 << 14  # ids a snapshot adds between two ``pause`` calls of ``commit_feed``


def session_digest(key: str) -> bytes:
    """The 16 bytes ``CacheAwareRouter.sessions`` keys an explicit session key by (the key's text is not kept)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, person=_SESSION_PERSON).digest()


@dataclass
class Decision:
    node: str
    gpu_blocks: int
    host_blocks: int
    prompt_tokens: int
    miss_tokens: int
    cost: float
    reason: str  # "cost" | "affinity" | "guard" (the cheapest node was over its share) | "only"
    ticket: int | None = None   # set by ``dispatched``: pass it to ``finished``


@dataclass
class NodeState:
    name: str
    slot: int
    profile: NodeProfile
    key: NamespaceKey | None            # None: approximate
    approx: ApproxNode | None
    healthy: bool = True
    inflight: OrderedDict = field(default_factory=OrderedDict)  # ticket -> miss tokens of a request not finished
    inflight_tokens: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    gpu_hit_tokens: int = 0
    host_hit_tokens: int = 0
    miss_tokens: int = 0
    cursor: FeedCursor = field(default_factory=FeedCursor)
    held: list = field(default_factory=lambda: [0, 0])   # exact nodes: upper bound of ids held per tier

    @property
    def exact(self) -> bool:
        return self.approx is None

    def as_dict(self) -> dict:
        return {"name": self.name, "exact": self.exact, "healthy": self.healthy,
                "gpu_blocks": self.profile.gpu_blocks, "host_blocks": self.profile.host_blocks,
                "block_size": self.profile.block_size, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "predicted_gpu_hit_tokens": self.gpu_hit_tokens,
                "predicted_host_hit_tokens": self.host_hit_tokens, "predicted_prefill_tokens": self.miss_tokens,
                "inflight_prefill_tokens": self.inflight_tokens, "feed_seq": self.cursor.seq}


class CacheAwareRouter:
    """See the module docstring."""

    def __init__(self, *, balance: float = DEFAULT_BALANCE, max_nodes: int = 32,
                 approx_model: str = "approx", approx_block_size: int = 64,
                 window_per_node: int = WINDOW_PER_NODE, initial_blocks: int = 1 << 12) -> None:
        if not balance >= 1.0:
            raise ValueError(f"balance must be >= 1, got {balance!r}")
        self.balance = float(balance)
        self.table = BlockTable(max_nodes, initial_blocks)
        self.nodes: dict[str, NodeState] = {}
        self._free_slots = list(range(max_nodes - 1, -1, -1))   # lowest last: narrow table masks
        self._tickets = itertools.count(1)
        self.approx_key = NamespaceKey.of(Namespace(model=f"approx:{approx_model}", block_size=approx_block_size))
        # session_digest(session key) -> node, least recent first
        self.sessions: OrderedDict[bytes, str] = OrderedDict()
        self.window_per_node = int(window_per_node)
        self._window: deque[tuple[str, int]] = deque()   # (node, prefill tokens) of recent decisions
        self._window_load: dict[str, int] = {}   # registered node -> its prefill tokens in the window
        self.decisions = 0

    # ------------------------------------------------------------------ membership
    def add_node(self, name: str, profile: NodeProfile, key: NamespaceKey | None = None) -> NodeState:
        """Register a node: exact (``key`` from its feed) or approximate (``key`` None)."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} is already registered")
        if not self._free_slots:
            raise ValueError(f"at most {self.table.max_nodes} nodes")
        st = NodeState(name, self._free_slots.pop(), profile, key,
                       None if key is not None else ApproxNode(profile.gpu_blocks, profile.host_blocks))
        self.nodes[name] = st
        self._window_load.setdefault(name, 0)
        return st

    def remove_node(self, name: str) -> None:
        st = self.nodes.pop(name, None)
        if st is None:
            return
        self.table.clear_node(st.slot)
        self._free_slots.append(st.slot)
        self._free_slots.sort(reverse=True)
        for s in [s for s, n in self.sessions.items() if n == name]:
            del self.sessions[s]
        # its share of the recent window goes too (a node that comes back under this name starts afresh; the
        # window names registered nodes only, so _window_load holds no key of a node that left)
        if any(n == name for n, _ in self._window):
            self._window = deque(e for e in self._window if e[0] != name)
        self._window_load.pop(name, None)

    def set_health(self, name: str, healthy: bool) -> None:
        if name in self.nodes:
            self.nodes[name].healthy = bool(healthy)

    def set_approximate(self, name: str, profile: NodeProfile | None = None) -> None:
        """The node's feed stopped (or it never had one): forget its exact contents and model it."""
        st = self.nodes[name]
        if profile is not None:
            st.profile = profile
        if st.approx is None or profile is not None:
            self.table.clear_node(st.slot)
            st.approx = ApproxNode(st.profile.gpu_blocks, st.profile.host_blocks)
            st.key = None
            st.cursor = FeedCursor()
            st.held = [0, 0]

    # ------------------------------------------------------------------ feeds
    def apply_feed(self, name: str, msg) -> FeedUpdate:
        """Apply one feed message of ``name`` (raises FeedError, changing nothing, when invalid; see the module
        docstring for a view that outgrows the node's capacity)."""
        upd = self.commit_feed(self.prepare_feed(name, msg))
        if upd is None:   # cannot happen without another thread moving the cursor
            raise FeedError("feed update is stale (the node's cursor moved)")
        return upd

    def prepare_feed(self, name: str, msg) -> "PendingFeed":
        """Validate and decode one feed message of ``name`` against its cursor, changing nothing (the slow part:
        base64, numpy; the proxy runs it outside its lock). Raises FeedError when invalid, KeyError for an
        unknown node."""
        st = self.nodes[name]
        cursor = st.cursor
        return PendingFeed(name, st, cursor, cursor.parse(msg))

    def plan_room(self, pending: "PendingFeed") -> tuple[int, int] | None:
        """(table version, bucket count) of the table growth ``commit_feed(pending)`` will need, or None: the
        caller (holding its lock for this call only) may build it with ``table.build_resized`` without the lock
        and install it (``table.install_resized``) right before the commit, so the commit does not rebuild the
        whole table under the lock."""
        st = self.nodes.get(pending.name)
        if st is None:
            return None
        upd = pending.update
        if upd.snapshot is not None:   # the node's old view goes first (an estimate: shared ids stay)
            new = int(upd.snapshot[0].size + upd.snapshot[1].size) - (sum(st.held) if st.approx is None else 0)
        else:
            new = int(upd.stored[0].size + upd.stored[1].size)
        nb = self.table.plan_reserve(max(new, 0))
        return None if nb is None else (self.table.version, nb)

    def _pending_current(self, pending: "PendingFeed") -> bool:
        st = self.nodes.get(pending.name)
        return st is pending.state and st.cursor is pending.cursor and st.cursor.current(pending.update)

    def commit_feed(self, pending: "PendingFeed", pause=None) -> FeedUpdate | None:
        """Apply a ``prepare_feed`` result: None (nothing changed) when the node left, or its cursor moved, since
        the parse; FeedError when the node's view outgrew its capacity (its exact view is then forgotten).

        ``pause``: called between chunks of ``SNAPSHOT_CHUNK`` ids of a snapshot (the proxy releases its lock
        there, so requests are not held up by a large snapshot). Between chunks the table is consistent, and
        the node's view is part of the snapshot: the old view is gone, the new one partly in (a reader may
        predict fewer hits on that node, never a block it does not hold). If the node left or was reset
        during a pause, the rest is not applied (the node's bits were cleared by that) and None is returned."""
        st = self.nodes.get(pending.name)
        upd = pending.update
        if not self._pending_current(pending):
            return None
        info = upd.info
        key = info["namespace_key"]
        profile = NodeProfile(info["gpu_blocks"], info["host_blocks"], info["block_size"],
                              min(float(info.get("host_weight", st.profile.host_weight)), 1.0),
                              float(info.get("speed", st.profile.speed)) or 1.0)
        t = self.table
        if st.approx is not None or st.key != key:
            t.clear_node(st.slot, shrink=upd.snapshot is None)   # a scan only if the slot has bits
            st.approx = None
            st.held = [0, 0]
        st.key, st.profile = key, profile
        if upd.snapshot is not None:
            t.clear_node(st.slot, shrink=False)   # refilled at once: shrink (if at all) after
            st.held = [int(upd.snapshot[0].size), int(upd.snapshot[1].size)]   # <= capacity (parse checked)
            t.reserve(sum(st.held))
            first = True
            for tier in (GPU, HOST):
                arr = upd.snapshot[tier]
                for k in range(0, arr.size, SNAPSHOT_CHUNK if pause is not None else max(arr.size, 1)):
                    if pause is not None and not first:
                        pause()
                        if not self._pending_current(pending):
                            return None
                    first = False
                    t.add(arr[k:k + SNAPSHOT_CHUNK] if pause is not None else arr, st.slot, tier)
            t.maybe_shrink()
        else:
            for tier in (GPU, HOST):
                t.remove(upd.removed[tier], st.slot, tier)
                t.add(upd.stored[tier], st.slot, tier)
                st.held[tier] += int(upd.stored[tier].size)
            for tier, name in ((GPU, "gpu"), (HOST, "host")):
                cap = upd.capacity(tier)
                limit = cap + capacity_slack(cap)
                if st.held[tier] <= limit:
                    continue
                st.held[tier] = t.count(st.slot, tier)   # exact, O(table): only past capacity + slack
                if st.held[tier] > limit:
                    held = st.held[tier]
                    t.clear_node(st.slot)
                    st.held = [0, 0]
                    st.cursor = FeedCursor()   # the next poll asks for a snapshot
                    raise FeedOverflow(f"feed of node {pending.name!r} holds {held} {name} ids, more than "
                                    f"'info.{name}_blocks' ({cap}) + {capacity_slack(cap)}: its exact view is dropped")
        st.cursor.commit(upd)
        return upd

    # ------------------------------------------------------------------ decisions
    def matches(self, req: RoutingRequest, names: list[str]) -> dict[str, tuple[int, int]]:
        """(GPU blocks, host blocks) each node would reuse for ``req`` now (no side effects)."""
        groups: dict[NamespaceKey, list[NodeState]] = {}
        for n in names:
            st = self.nodes[n]
            groups.setdefault(st.key if st.key is not None else self.approx_key, []).append(st)
        out: dict[str, tuple[int, int]] = {}
        for key, members in groups.items():
            ids = req.ids(key)
            if (req.text_mode or req.adapter) and key != self.approx_key:
                ids = ids[:0]   # text, or a LoRA adapter's prompt: no node publishes such ids
            m = min(len(ids), req.matchable(key.block_size))
            if m == 0:
                for st in members:
                    out[st.name] = (0, 0)
                continue
            gm, hm = self.table.match(ids[:m])
            slots = np.array([st.slot for st in members], dtype=np.uint64)
            one = np.uint64(1)
            gb = ((gm.astype(np.uint64)[:, None] >> slots[None, :]) & one).astype(bool)
            hb = ((hm.astype(np.uint64)[:, None] >> slots[None, :]) & one).astype(bool)
            g = np.where(gb.all(0), m, gb.argmin(0))
            after = np.arange(m)[:, None] < g[None, :]
            x = hb | after
            end = np.where(x.all(0), m, x.argmin(0))
            h = end - g
            for k, st in enumerate(members):
                out[st.name] = (int(g[k]), int(h[k]))
        return out

    def route(self, req: RoutingRequest, candidates: list[str] | None = None) -> Decision | None:
        names = [n for n, st in self.nodes.items() if st.healthy and (candidates is None or n in candidates)]
        if not names:
            return None
        matched = self.matches(req, names)
        scored = []
        for n in names:
            st = self.nodes[n]
            g, h = matched[n]
            c = cost(req.prompt_tokens, g, h, st.profile, st.inflight_tokens)
            scored.append((c, self._window_load.get(n, 0), n))
        scored.sort(key=lambda s: (s[0], s[1]))
        reason = "cost" if len(names) > 1 else "only"
        chosen = None
        over = self._over_share(names)
        if over:  # an over-share node with less queued prefill than every other node stays eligible
            floor = min((self.nodes[n].inflight_tokens for n in names if n not in over), default=0.0)
            over = {n for n in over if self.nodes[n].inflight_tokens >= floor}
        skey = session_digest(req.session) if req.session else None
        sticky = self.sessions.get(skey) if skey is not None else None
        # affinity yields to the balance guard (one key many clients share, a `user`, cannot herd a node) and to
        # cost: it holds only while the sticky node is predicted to reuse at least as many prompt tokens as any
        # node the guard keeps (a tie-break, never a reason to prefill what another node holds)
        if sticky in names and sticky not in over and self._reuse(sticky, matched) >= max(
                self._reuse(n, matched) for n in names if n not in over):
            chosen, reason = sticky, "affinity"
        else:
            for c, _, n in scored:
                if n not in over:
                    chosen = n
                    break
            if chosen is None:
                chosen = scored[0][2]
            elif chosen != scored[0][2] or sticky in over:
                reason = "guard"
        st = self.nodes[chosen]
        g, h = matched[chosen]
        c = next(s[0] for s in scored if s[2] == chosen)
        bs = st.profile.block_size
        miss = max(req.prompt_tokens - (g + h) * bs, 0)
        if skey is not None:
            self.sessions[skey] = chosen
            self.sessions.move_to_end(skey)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return Decision(chosen, g, h, req.prompt_tokens, miss, c, reason)

    def _reuse(self, name: str, matched: dict[str, tuple[int, int]]) -> int:
        """Prompt tokens ``name`` is predicted to reuse (GPU + host match; block sizes may differ per node)."""
        g, h = matched[name]
        return (g + h) * self.nodes[name].profile.block_size

    def _over_share(self, names: list[str]) -> set[str]:
        total = sum(self._window_load.get(n, 0) for n in names)
        cap = self.window_per_node * len(self.nodes)
        if total == 0 or len(self._window) < WARM_FRACTION * cap:
            return set()
        speed = {n: self.nodes[n].profile.speed for n in names}
        ssum = sum(speed.values())
        return {n for n in names if self._window_load.get(n, 0) > self.balance * total * speed[n] / ssum}

    def dispatched(self, d: Decision, req: RoutingRequest) -> int | None:
        """The request was sent to ``d.node``: count it, queue its prefill, update an approximate index.
        Returns the request's ticket for ``finished`` (also set as ``d.ticket``); None for an unknown node."""
        st = self.nodes.get(d.node)
        if st is None:
            return None
        self.decisions += 1
        bs = st.profile.block_size
        st.requests += 1
        st.prompt_tokens += d.prompt_tokens
        st.gpu_hit_tokens += d.gpu_blocks * bs
        st.host_hit_tokens += d.host_blocks * bs
        st.miss_tokens += d.miss_tokens
        ticket = d.ticket = next(self._tickets)
        st.inflight[ticket] = d.miss_tokens
        st.inflight_tokens += d.miss_tokens
        while len(st.inflight) > MAX_INFLIGHT:
            st.inflight_tokens -= st.inflight.popitem(last=False)[1]
        cap = self.window_per_node * len(self.nodes)
        self._window.append((d.node, d.miss_tokens))
        self._window_load[d.node] = self._window_load.get(d.node, 0) + d.miss_tokens
        while len(self._window) > cap:
            n, t = self._window.popleft()
            self._window_load[n] = self._window_load.get(n, 0) - t
        if st.approx is not None:
            ids = req.ids(self.approx_key)
            full = len(ids) if req.text_mode else min(len(ids), req.prompt_tokens // self.approx_key.block_size)
            self._apply_events(st, st.approx.record(ids[:full].tolist()))
        return ticket

    def finished(self, node: str, ticket: int | None = None) -> None:
        """The request of ``ticket`` (from ``dispatched``) sent to ``node`` finished: its prefill is no longer
        queued. A ticket not queued on the node changes nothing. Without a ticket the node's oldest request
        ends: for sequential callers only (the planner's replay), never for concurrent requests."""
        st = self.nodes.get(node)
        if st is None or not st.inflight:
            return
        if ticket is None:
            tokens = st.inflight.popitem(last=False)[1]
        else:
            tokens = st.inflight.pop(ticket, None)
            if tokens is None:
                return
        st.inflight_tokens = st.inflight_tokens - tokens if st.inflight else 0.0

    def _apply_events(self, st: NodeState, events) -> None:
        """Apply (op, tier, id) events as sets: the last op of an id in a tier wins."""
        if not events:
            return
        last: tuple[dict[int, int], dict[int, int]] = ({}, {})
        for op, tier, i in events:
            last[tier][i] = op
        t = self.table
        for tier in (GPU, HOST):
            if not last[tier]:
                continue
            rem = [i for i, op in last[tier].items() if op < 0]
            add = [i for i, op in last[tier].items() if op > 0]
            if rem:
                t.remove(np.array(rem, dtype=np.uint64), st.slot, tier)
            if add:
                t.add(np.array(add, dtype=np.uint64), st.slot, tier)

    def status(self) -> dict:
        return {"nodes": [st.as_dict() for st in self.nodes.values()], "decisions": self.decisions,
                "table_entries": self.table.entries, "table_bytes": self.table.nbytes,
                "table_slots": self.table.slots, "table_mask_bits": self.table.mask_bits,
                "balance": self.balance}


@dataclass
class PendingFeed:
    """A parsed feed message waiting for ``CacheAwareRouter.commit_feed`` (the node and cursor it was parsed
    against)."""

    name: str
    state: NodeState
    cursor: FeedCursor
    update: FeedUpdate
