"""Cache-aware cluster routing (pure logic: no LMDeploy import).

The same code routes in ``lmdeploy serve proxy --routing-strategy cache_aware``
(``integration/proxy_routing.py``) and in the planner's ``routing: cache_aware``
(``planner/cluster_routing.py``).  Modules, one concern each:

* ``ids``: ``publish_id``, the one map from a node's block digest to a published id;
* ``table``: ``BlockTable``, published id -> which nodes hold it in which tier (numpy);
* ``cost``: ``NodeProfile`` and the expected-prefill-cost formula;
* ``approx``: ``ApproxNode``, the two-LRU model of a node that publishes nothing;
* ``feed``: the node cache-state feed (``FeedPublisher`` on the node, ``FeedCursor`` at the proxy);
* ``request``: ``RoutingRequest``, prompt tokens -> chained digests -> ids per namespace, text fallback;
* ``router``: ``CacheAwareRouter``, the decision (affinity, balance guard, lowest cost).

docs/routing.md describes the design and the measured figures.
"""
from .cost import NodeProfile
from .feed import FEED_PATH, FeedCursor, FeedError, FeedPublisher, NamespaceKey
from .ids import publish_id
from .request import RoutingRequest
from .router import CacheAwareRouter, Decision

__all__ = ["FEED_PATH", "CacheAwareRouter", "Decision", "FeedCursor", "FeedError", "FeedPublisher",
           "NamespaceKey", "NodeProfile", "RoutingRequest", "publish_id"]
