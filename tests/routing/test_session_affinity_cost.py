"""Session affinity is a tie-break, never a reason to prefill what another node holds; the planner's
``cache_aware`` replay passes each request's session key to the router as the proxy does, so both run
the same decision on the same state."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmdeploy_hostcache.integration.proxy_routing import session_key
from lmdeploy_hostcache.planner.cluster_routing import CacheAwareClusterRouter, trace_session_key
from lmdeploy_hostcache.planner.replay import PreparedRequest, TwoTierCache
from lmdeploy_hostcache.planner.traces import Request as TraceRequest
from lmdeploy_hostcache.routing.cost import NodeProfile
from lmdeploy_hostcache.routing.feed import NamespaceKey
from lmdeploy_hostcache.routing.request import RoutingRequest
from lmdeploy_hostcache.routing.router import CacheAwareRouter, session_digest
from lmdeploy_hostcache.routing.table import GPU, HOST
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests

KEY = NamespaceKey(1, 2, 16)


def _router(names=("a", "b"), gpu=100, host=0):
    r = CacheAwareRouter()
    for n in names:
        r.add_node(n, NodeProfile(gpu, host, 16), KEY)
    return r


# ------------------------------------------------------------------------------------------ the router's rule
def test_the_auditors_scenario_proxy_and_planner_now_agree():
    """A conversation's first turn went to ``a``; then ``b`` came to hold its whole prompt and ``a`` none of it
    (``a`` restarted or evicted it, or another client's request left it on ``b``). The proxy (the body carries
    ``user``) and a caller without a session key now both send turn 2 to ``b``, by cost."""
    ids = np.arange(2, 12, dtype=np.uint64)
    got = {}
    for who, sess in (("proxy", session_key({"user": "u1"})), ("no key", None)):
        r = _router()
        first = RoutingRequest.from_ids(ids[:1], 161, session=sess)
        d = r.route(first)
        r.dispatched(d, first)
        assert d.node == "a"
        r.table.add(ids, r.nodes["b"].slot, GPU)   # b holds the conversation's 10 blocks, a none of them
        d2 = r.route(RoutingRequest.from_ids(ids, 161, session=sess))
        got[who] = (d2.node, d2.reason, d2.gpu_blocks)
        if sess:
            assert r.sessions[session_digest(sess)] == "b"          # the key follows the conversation's cache
    assert got["proxy"] == got["no key"] == ("b", "cost", 10)


def _sticky_on_the_heavier_node(r, sess):
    """Send ``sess``'s first turn to ``a`` and make ``a`` the node with the heavier recent load, so that without
    affinity every cost tie goes to ``b`` (the lighter-load tie-break)."""
    first = RoutingRequest.from_ids(np.array([900], dtype=np.uint64), 161, session=sess)
    d = r.route(first)
    r.dispatched(d, first)
    r.finished(d.node)
    assert d.node == "a"
    assert r._window_load["a"] > r._window_load["b"]


def test_affinity_holds_on_a_tie_with_nothing_cached():
    r = _router()
    _sticky_on_the_heavier_node(r, "session:3")
    cold = np.arange(50, 60, dtype=np.uint64)
    assert r.route(RoutingRequest.from_ids(cold, 161)).node == "b"          # no key: the lighter node
    d = r.route(RoutingRequest.from_ids(cold, 161, session="session:3"))
    assert (d.node, d.reason) == ("a", "affinity")


def test_affinity_holds_on_a_tie_with_the_prefix_equally_cached():
    """Both nodes hold the same prefix, one in its host tier: the sticky node's reuse equals the best's."""
    r = _router(host=100)
    _sticky_on_the_heavier_node(r, "user:u")
    ids = np.arange(70, 80, dtype=np.uint64)
    r.table.add(ids[:4], r.nodes["a"].slot, GPU)
    r.table.add(ids[4:6], r.nodes["a"].slot, HOST)
    r.table.add(ids[:6], r.nodes["b"].slot, GPU)
    d = r.route(RoutingRequest.from_ids(ids, 161, session="user:u"))
    assert (d.node, d.reason, d.gpu_blocks, d.host_blocks) == ("a", "affinity", 4, 2)


def test_affinity_yields_when_another_node_holds_more_of_the_prompt():
    r = _router()
    _sticky_on_the_heavier_node(r, "user:u")
    ids = np.arange(70, 80, dtype=np.uint64)
    r.table.add(ids[:5], r.nodes["a"].slot, GPU)
    r.table.add(ids[:6], r.nodes["b"].slot, GPU)   # one block more
    d = r.route(RoutingRequest.from_ids(ids, 161, session="user:u"))
    assert (d.node, d.reason, d.gpu_blocks) == ("b", "cost", 6)


def test_reuse_is_compared_in_tokens_across_block_sizes():
    """Nodes of different block sizes: the sticky ``b`` reuses 4 blocks of 16 tokens (64), ``a`` 2 blocks of 64
    (128): ``b`` holds more blocks but fewer tokens, so affinity yields."""
    r = CacheAwareRouter()
    ka, kb = NamespaceKey(1, 2, 64), NamespaceKey(1, 2, 16)
    r.add_node("a", NodeProfile(100, 0, 64), ka)
    r.add_node("b", NodeProfile(100, 0, 16), kb)
    r.sessions[session_digest("session:1")] = "b"
    req = RoutingRequest(list(range(300)), session="session:1")
    r.table.add(req.ids(ka)[:2], r.nodes["a"].slot, GPU)
    r.table.add(req.ids(kb)[:4], r.nodes["b"].slot, GPU)
    d = r.route(req)
    assert (d.node, d.reason, d.gpu_blocks) == ("a", "cost", 2)


def test_affinity_holds_in_text_mode_where_nothing_is_predictable():
    """A proxy without a tokenizer routes exact nodes on text, which matches nothing they publish: every node ties
    at zero and affinity keeps the conversation on its node."""
    r = _router()
    _sticky_on_the_heavier_node(r, "user:t")
    d = r.route(RoutingRequest.from_text("hello there " * 20, session="user:t"))
    assert (d.node, d.reason) == ("a", "affinity")


def test_the_balance_guard_still_overrides_affinity_on_a_tie():
    r = _router(names=("a", "b", "c"))
    r.sessions[session_digest("user:x")] = "a"
    for _ in range(100):   # a takes every recent prefill token: far over its share
        req = RoutingRequest.from_ids(np.arange(1000, 1010, dtype=np.uint64), 161)
        d = r.route(req, ["a"])
        r.dispatched(d, req)
        r.finished("a")
    d = r.route(RoutingRequest.from_ids(np.arange(5000, 5010, dtype=np.uint64), 161, session="user:x"))
    assert d.node != "a" and d.reason == "guard"


# ------------------------------------------------------------------------------------------ the planner
def _prepared(ns: Namespace, tokens: list[int], session) -> PreparedRequest:
    digests, blocks = chain_digests(ns, tokens)
    bs = ns.block_size
    r = TraceRequest(0.0, len(tokens), 1, tuple(range(10_000, 10_000 + len(digests))), session)
    return PreparedRequest(r, tuple(digests), tuple(blocks), max(len(tokens) - 1, 0) // bs, -(-len(tokens) // bs),
                           ns.root)


def test_trace_session_keys_are_the_proxys():
    """An int record key is read as the proxy reads ``session_id``, a string as ``user``; a negative int and a
    Mooncake record's derived key (no client sends one) are none."""
    def rec(session, ids=(5, 6, 7)):
        return TraceRequest(0.0, 100, 1, tuple(ids), session)

    assert trace_session_key(rec(7)) == session_key({"session_id": 7}) == "session:7"
    assert trace_session_key(rec(0)) == session_key({"session_id": 0})
    assert trace_session_key(rec("conv/agent-2")) == session_key({"user": "conv/agent-2"})
    assert trace_session_key(rec(-1)) is None and session_key({"session_id": -1}) is None
    assert trace_session_key(TraceRequest(0.0, 100, 1, (5, 6, 7), 6, session_given=False)) is None   # derived
    assert trace_session_key(rec(6)) == "session:6"   # a key the record states, even one a reader could derive


def test_a_mooncake_record_without_session_carries_no_key(tmp_path):
    from lmdeploy_hostcache.planner.replay import prepare_trace
    from lmdeploy_hostcache.planner.traces import read_mooncake

    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in (
        {"timestamp": 0, "input_length": 40, "output_length": 1, "hash_ids": [0, 1, 2]},
        {"timestamp": 1, "input_length": 40, "output_length": 1, "hash_ids": [0, 4, 5], "session": 9},
        {"timestamp": 2, "input_length": 40, "output_length": 1, "hash_ids": [0, 7, 8], "session": "chat-1"})) + "\n")
    prs = prepare_trace(read_mooncake(p, block_size=16))
    caches = [TwoTierCache(50, 0, "lru", 16) for _ in range(2)]
    router = CacheAwareClusterRouter(caches, ["a", "b"], 16, 0.2)
    assert [router.request(pr).session for pr in prs] == [None, "session:9", "user:chat-1"]


def test_the_planner_passes_session_keys_and_follows_the_conversations_cache():
    """The planner's replay of the auditor's scenario: turn 1 of session 7 lands on one node; then the other node
    comes to hold turn 2's whole prompt (another client's request). The planner's router got the proxy's key
    for every request, and turn 2 goes where its prompt is, as the proxy sends it."""
    ns = Namespace(model="m", block_size=16)
    caches = [TwoTierCache(100, 0, "lru", 16) for _ in range(2)]
    router = CacheAwareClusterRouter(caches, ["a", "b"], 16, 0.2)
    seen = []
    route = router.router.route

    def spy(req, candidates=None):
        seen.append(req.session)
        return route(req, candidates)

    router.router.route = spy
    turn1 = list(range(20))
    turn2 = turn1 + list(range(100, 100 + 150))
    pr1 = _prepared(ns, turn1, 7)
    i = router.route(pr1)
    caches[i].serve(pr1)
    router.served(i)
    other = 1 - i
    caches[other].serve(_prepared(ns, turn2, -1))   # another client's request left turn 2's prompt there
    router.served(other)
    pr2 = _prepared(ns, turn2, 7)
    j = router.route(pr2)
    assert seen == ["session:7", "session:7"]
    assert j == other and router._last.reason == "cost" and router._last.gpu_blocks == pr2.matchable
    # the proxy's request for the same body on the same state decides the same
    proxy_req = RoutingRequest.from_ids(router.request(pr2).precomputed, pr2.request.input_length,
                                        session=session_key({"session_id": 7}))
    assert router.router.route(proxy_req).node == router.names[j]


def test_planner_affinity_breaks_ties_on_a_sessions_trace():
    """On the chat generator (explicit session keys) the planner's router now runs affinity: some decisions are
    affinity tie-breaks, and none of them sent a request to a node reusing less of it than another could."""
    import dataclasses

    from lmdeploy_hostcache.planner.cluster import load_cluster, simulate_cluster
    from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
    from lmdeploy_hostcache.planner.geometry import BlockSizing
    from lmdeploy_hostcache.planner.replay import prepare_trace
    from pathlib import Path

    trace = generate_chat(ChatWorkload(sessions=60, block_size=64), limit=400)
    spec = load_cluster(Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml")
    sizing = BlockSizing.build(spec.geometry(), spec.cache_format, trace.block_size)
    reasons, worse = [], 0
    orig = CacheAwareRouter.route

    def route(self, req, candidates=None):
        names = [n for n, st in self.nodes.items() if st.healthy]
        m = self.matches(req, names)
        kept = [n for n in names if n not in self._over_share(names)]   # the guard skips no more than these
        d = orig(self, req, candidates)
        reasons.append(d.reason)
        nonlocal worse
        if d.reason == "affinity" and sum(m[d.node]) < max(sum(m[n]) for n in kept):
            worse += 1
        return d

    CacheAwareRouter.route = route
    try:
        simulate_cluster(prepare_trace(trace), dataclasses.replace(spec, routing="cache_aware"), sizing,
                         show_progress=False)
    finally:
        CacheAwareRouter.route = orig
    assert "affinity" in reasons and worse == 0
