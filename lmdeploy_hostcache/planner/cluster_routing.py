"""The planner's ``cache_aware`` routing: the proxy's router (``routing/``) driven by replayed nodes.

Each replayed node (``replay.TwoTierCache``) gets a ``routing.feed.FeedPublisher`` listening to
both of its tiers (``HostIndex.add_listener``), exactly as a real node publishes its cache state;
after every request the node's feed is polled and applied to a ``routing.CacheAwareRouter``,
the same object ``lmdeploy serve proxy --routing-strategy cache_aware`` uses.  So the planner's
figures for ``cache_aware`` come from the proxy's code, fed by the engine's index code.

Each request carries its trace record's session key to the router (``trace_session_key``: an int
as the proxy reads a ``session_id``, a string as a ``user``), so the router's session affinity runs
as it does behind the proxy for clients that send that key. A record without a key of its own (a
Mooncake record without ``session``, whose key the reader derives from its block ids,
``traces.derive_session``: ``Request.session_given`` is False) carries none, as its client's requests
would behind the proxy.

Invariants: the router's view of every node equals the node's tiers before each decision
(the replay is sequential, feeds are applied synchronously); no prefill is in flight between
requests, so the cost's queue term is zero here and balance comes from the guard alone; the
router gets the same request (ids, prompt tokens, session key) the proxy would give it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..routing.cost import NodeProfile, host_weight
from ..routing.feed import FeedPublisher, NamespaceKey
from ..routing.ids import publish_id
from ..routing.request import RoutingRequest
from ..routing.router import DEFAULT_BALANCE, CacheAwareRouter
from ..routing.table import GPU, HOST
from .replay import PreparedRequest, TwoTierCache
from .traces import Request


def planner_host_weight(sizing, cost_model) -> float:
    """Restore/prefill cost ratio per token from the planner's cost model and block bytes."""
    bytes_per_token = sizing.host_block_bytes / sizing.block_size
    return host_weight(cost_model.prefill_tokens_per_s, bytes_per_token, cost_model.h2d_gbps * 1e9)


def trace_session_key(record: Request) -> str | None:
    """The router's session key for a trace record, as the proxy derives it from a request that carries its
    ``session`` (``proxy_routing.session_key``): an int as a ``session_id`` (a negative one is none, as the
    node's default -1), a string as a ``user``. A record without a session key of its own (a Mooncake record
    without ``session``: the reader derives one from its block ids, ``traces.derive_session``, which no client
    sends) carries none: behind the proxy, such a client's requests have no key."""
    from ..integration.proxy_routing import session_key

    session = record.session
    if not record.session_given or isinstance(session, bool):
        return None
    if isinstance(session, int):
        return session_key({"session_id": session})
    if isinstance(session, str):
        return session_key({"user": session})
    return None


class CacheAwareClusterRouter:
    """Routes prepared requests over replayed nodes with ``CacheAwareRouter``."""

    def __init__(self, caches: Sequence[TwoTierCache], names: Sequence[str], block_size: int,
                 host_weight: float, balance: float = DEFAULT_BALANCE) -> None:
        self.caches = list(caches)
        self.names = list(names)
        self.router = CacheAwareRouter(balance=balance, max_nodes=max(8, len(caches)))
        self.publishers: list[FeedPublisher] = []
        self._ids: dict[int, tuple[PreparedRequest, np.ndarray]] = {}
        self._key = None
        self.block_size = block_size
        self.host_weight = host_weight

    def _attach(self, root: int) -> None:
        key = NamespaceKey(root, 0, self.block_size)
        self._key = key
        for name, c in zip(self.names, self.caches):
            pub = FeedPublisher(gpu_blocks=c.gpu.num_slots, host_blocks=c.host.num_slots, namespace=key,
                                host_weight=self.host_weight)
            c.gpu.add_listener(*pub.listener(GPU))
            c.host.add_listener(*pub.listener(HOST))
            self.publishers.append(pub)
            self.router.add_node(name, NodeProfile(c.gpu.num_slots, c.host.num_slots, self.block_size,
                                                   self.host_weight), key)
            self.router.apply_feed(name, pub.poll())

    def request(self, pr: PreparedRequest) -> RoutingRequest:
        hit = self._ids.get(id(pr))
        if hit is not None and hit[0] is pr:  # the request itself is kept: an id is never reused
            ids = hit[1]
        else:
            ids = np.fromiter((publish_id(d) for d in pr.digests), dtype=np.uint64, count=len(pr.digests))
            self._ids[id(pr)] = (pr, ids)
        return RoutingRequest.from_ids(ids[:pr.matchable], pr.request.input_length,
                                       session=trace_session_key(pr.request))

    def route(self, pr: PreparedRequest) -> int:
        if self._key is None:
            self._attach(pr.root)
        req = self.request(pr)
        d = self.router.route(req)
        self.router.dispatched(d, req)
        self._last = d
        return self.names.index(d.node)

    def served(self, i: int) -> None:
        """Node ``i`` finished the request: apply its feed, end its prefill."""
        name = self.names[i]
        pub = self.publishers[i]
        cur = self.router.nodes[name].cursor
        while True:
            msg = pub.poll(**cur.params())
            self.router.apply_feed(name, msg)
            if not msg.get("more"):
                break
        self.router.finished(name)
