"""Routing core: the block table against a dict model, the feed protocol, the router's choices."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.host_index import HostIndex
from lmdeploy_hostcache.routing.approx import ApproxNode
from lmdeploy_hostcache.routing.cost import NodeProfile, cost, host_weight
from lmdeploy_hostcache.routing.feed import FeedCursor, FeedError, FeedPublisher, NamespaceKey
from lmdeploy_hostcache.routing.ids import publish_id
from lmdeploy_hostcache.routing.request import RoutingRequest
from lmdeploy_hostcache.routing.router import CacheAwareRouter
from lmdeploy_hostcache.routing.table import GPU, HOST, BlockTable


def _model_match(model, ids, slot):
    g = 0
    while g < len(ids) and (ids[g], slot, GPU) in model:
        g += 1
    h = g
    while h < len(ids) and (ids[h], slot, HOST) in model:
        h += 1
    return g, h - g


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 1), st.lists(st.integers(2, 60), max_size=12)),
                max_size=40))
def test_table_equals_a_set_model(ops):
    t = BlockTable(max_nodes=4, initial_blocks=4)  # tiny: forces growth
    model = set()
    for add, node, tier, ids in ops:
        arr = np.array(ids, dtype=np.uint64)
        if add:
            t.add(arr, node, tier)
            model |= {(i, node, tier) for i in ids}
        else:
            t.remove(arr, node, tier)
            model -= {(i, node, tier) for i in ids}
    probe = np.arange(0, 64, dtype=np.uint64)
    g, h = t.match(probe)
    for k, i in enumerate(probe.tolist()):
        for node in range(4):
            assert bool(int(g[k]) >> node & 1) == ((i, node, GPU) in model)
            assert bool(int(h[k]) >> node & 1) == ((i, node, HOST) in model)
    assert t.entries == len({i for i, _, _ in model})


def test_table_grows_without_losing_ids_and_clears_nodes():
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(2, 2**63, size=50_000, dtype=np.uint64))
    t = BlockTable(max_nodes=16, initial_blocks=16)
    t.add(ids, 3, HOST)
    t.add(ids[:100], 5, GPU)
    g, h = t.match(ids)
    assert (h == 1 << 3).all() and (g[:100] == 1 << 5).all() and (g[100:] == 0).all()
    t.clear_node(3)
    g, h = t.match(ids)
    assert (h == 0).all() and t.entries == 100


def test_cost_prices_host_tokens_by_restore_weight():
    p = NodeProfile(gpu_blocks=10, host_blocks=10, block_size=64, host_weight=0.25)
    assert cost(640, 0, 0, p) == 640
    assert cost(640, 5, 0, p) == 320
    assert cost(640, 0, 5, p) == 320 + 0.25 * 320
    assert cost(640, 5, 0, p, queued_tokens=100) == 420
    assert host_weight(30_000, 131072, 25e9) == pytest.approx(0.157, abs=1e-3)
    with pytest.raises(ValueError, match="host_weight"):
        NodeProfile(1, 1, 64, host_weight=2)


def _ns(model="m", bs=4, salt=""):
    return Namespace(model=model, block_size=bs, tenant_salt=salt)


def test_feed_reader_view_equals_the_node_index_through_events_and_snapshots():
    ns = _ns()
    idx = HostIndex(8, policy="lru")
    pub = FeedPublisher(gpu_blocks=0, host_blocks=8, namespace=ns, ring_events=16, max_events=5)
    idx.add_listener(*pub.listener(HOST))
    rng = random.Random(1)
    cur = FeedCursor()
    seen: set[int] = set()

    def sync():
        while True:
            msg = pub.poll(**cur.params())
            upd = cur.apply(msg)
            nonlocal seen
            if upd.snapshot is not None:
                seen = set(upd.snapshot[HOST].tolist())
            else:
                seen -= set(upd.removed[HOST].tolist())
                seen |= set(upd.stored[HOST].tolist())
            if not msg.get("more"):
                break

    for step in range(300):
        toks = [rng.randrange(50) for _ in range(4 * rng.randrange(1, 4))]
        ds, bb = chain_digests(ns, toks)
        parent = ns.root
        for d, b in zip(ds, bb):
            if idx.prepare_store(d, parent, b) is not None:
                idx.complete_store(d, rng.random() > 0.1)
            parent = d
        if rng.random() < 0.3:
            n = idx.lookup(ds, bb)
            if n:
                idx.prepare_load(ds[:n])
                idx.complete_load(ds[:n], True)
        if step % rng.choice([1, 3, 40]) == 0:  # sometimes fall behind the 16-event ring: snapshot
            sync()
            want = {publish_id(b.digest) for b in idx._blocks.values() if idx.is_resident(b.digest)}
            assert seen == want == pub.contents()[HOST]


def test_feed_rejects_bad_messages_naming_the_field():
    cur = FeedCursor()
    with pytest.raises(FeedError, match="info"):
        cur.apply({"epoch": "x", "seq": 0})
    pub = FeedPublisher(gpu_blocks=1, host_blocks=1, namespace=_ns())
    msg = pub.poll()
    msg["snapshot"]["gpu"] = "not base64!"
    with pytest.raises(FeedError, match="snapshot.gpu"):
        cur.apply(msg)
    assert cur.epoch is None  # nothing applied


@pytest.mark.parametrize("where, value, match", [
    ("speed", 1e6, r"info.speed' must be a number in \[0.01, 100\]"),
    ("speed", float("inf"), "info.speed"),
    ("speed", 0, "info.speed"),
    ("host_weight", 1.5, r"info.host_weight' must be a number in \[0, 1\]"),
    ("root", "-1", r"root' below 2\*\*128"),
    ("root", "f" * 40, r"root' below 2\*\*128"),
    ("seed", str(1 << 64), r"seed' below 2\*\*64"),
    ("id", 0, r"holds a reserved id \(0\)"),
    ("id", 1, r"holds a reserved id \(1\)"),
])
def test_feed_refuses_values_that_would_herd_or_corrupt_the_router(where, value, match):
    """A hostile or broken node: a huge speed took every request, an out-of-range root turned cache-aware
    routing off for the whole cluster, an id 0 lent its bit to the next id placed in its table slot."""
    import base64

    pub = FeedPublisher(gpu_blocks=1, host_blocks=1, namespace=_ns())
    msg = pub.poll()
    if where in ("speed", "host_weight"):
        msg["info"][where] = value
    elif where in ("root", "seed"):
        msg["info"]["namespace"][where] = value
    else:
        msg["snapshot"]["host"] = base64.b64encode(np.array([value, 7], dtype="<u8").tobytes()).decode()
    with pytest.raises(FeedError, match=match):
        FeedCursor().apply(msg)


def _router_with(nodes, **kw):
    r = CacheAwareRouter(**kw)
    for name, gpu, host in nodes:
        r.add_node(name, NodeProfile(gpu, host, 4, host_weight=0.2), NamespaceKey.of(_ns()))
    return r


def _req(tokens, session=None):
    return RoutingRequest(tokens, session=session)


def test_router_prefers_gpu_over_host_over_miss_and_counts_tiers_disjointly():
    ns = _ns()
    key = NamespaceKey.of(ns)
    r = _router_with([("a", 100, 100), ("b", 100, 100), ("c", 100, 100)])
    toks = list(range(4 * 10 + 1))  # 10 full blocks + 1 token: 10 matchable
    ids = _req(toks).ids(key)
    r.table.add(ids[:3], r.nodes["a"].slot, GPU)
    r.table.add(ids[3:8], r.nodes["a"].slot, HOST)   # a: 3 GPU + 5 host
    r.table.add(ids[:6], r.nodes["b"].slot, GPU)     # b: 6 GPU
    r.table.add(ids[1:10], r.nodes["c"].slot, GPU)   # c: nothing (block 0 missing)
    m = r.matches(_req(toks), ["a", "b", "c"])
    assert m == {"a": (3, 5), "b": (6, 0), "c": (0, 0)}
    d = r.route(_req(toks))
    # a: miss 8 tokens + 0.2 * 20 = 12 + 1 partial... costs: a=(41-32)+4=13, b=41-24=17
    assert d.node == "a" and (d.gpu_blocks, d.host_blocks) == (3, 5)


def test_router_namespaces_never_share_blocks():
    r = CacheAwareRouter()
    r.add_node("x", NodeProfile(10, 10, 4), NamespaceKey.of(_ns(salt="A")))
    r.add_node("y", NodeProfile(10, 10, 4), NamespaceKey.of(_ns(salt="B")))
    toks = list(range(17))
    ids_x = _req(toks).ids(NamespaceKey.of(_ns(salt="A")))
    r.table.add(ids_x, r.nodes["x"].slot, GPU)
    m = r.matches(_req(toks), ["x", "y"])
    assert m["x"] == (4, 0) and m["y"] == (0, 0)
    # y holding x's ids (as if published) still never matches y's namespace
    r.table.add(ids_x, r.nodes["y"].slot, GPU)
    assert r.matches(_req(toks), ["y"])["y"] == (0, 0)


def test_balance_guard_stops_herding_on_a_shared_prefix():
    r = _router_with([("a", 1000, 0), ("b", 1000, 0), ("c", 1000, 0)], balance=1.3)
    key = NamespaceKey.of(_ns())
    shared = list(range(40))
    counts = {"a": 0, "b": 0, "c": 0}
    rng = random.Random(0)
    for i in range(600):
        toks = shared + [1000 + rng.randrange(10**6) for _ in range(40)]
        req = _req(toks)
        d = r.route(req)
        r.dispatched(d, req)
        r.table.add(req.ids(key), r.nodes[d.node].slot, GPU)  # the node now holds the prompt
        r.finished(d.node)
        counts[d.node] += 1
    assert max(counts.values()) < 1.5 * 600 / 3, counts
    assert min(counts.values()) > 0


def test_session_affinity_while_healthy_then_rerouted():
    r = _router_with([("a", 10, 0), ("b", 10, 0)])
    req = _req(list(range(9)), session="s1")
    d = r.route(req)
    r.dispatched(d, req)
    again = r.route(_req(list(range(100, 109)), session="s1"))
    assert again.node == d.node and again.reason == "affinity"
    r.set_health(d.node, False)
    moved = r.route(_req(list(range(100, 109)), session="s1"))
    assert moved.node != d.node


def test_one_session_key_every_client_shares_cannot_herd_a_node():
    """An application that sends the same ``user`` for every client: affinity yields to the balance
    guard once the sticky node is over its share, so the load spreads like keyless traffic."""
    r = _router_with([("a", 1000, 0), ("b", 1000, 0), ("c", 1000, 0)], balance=1.3)
    rng = random.Random(1)
    counts = {"a": 0, "b": 0, "c": 0}
    reasons = set()
    for _ in range(600):
        req = _req([rng.randrange(10**6) for _ in range(80)], session="user:the-app")
        d = r.route(req)
        r.dispatched(d, req)
        r.finished(d.node)
        counts[d.node] += 1
        reasons.add(d.reason)
    assert max(counts.values()) < 1.5 * 600 / 3, counts
    assert {"affinity", "guard"} <= reasons, reasons


def test_approximate_node_learns_what_it_was_sent_within_capacity():
    r = CacheAwareRouter(approx_block_size=4)
    r.add_node("stock1", NodeProfile(2, 1, 4))
    r.add_node("stock2", NodeProfile(2, 1, 4))
    toks = list(range(13))  # 3 full blocks
    req = _req(toks)
    d = r.route(req)
    r.dispatched(d, req)
    m = r.matches(_req(toks), ["stock1", "stock2"])
    assert m[d.node] == (2, 1)  # GPU holds blocks 0, 1 (prefix first, like leaf-first eviction); 2 went to host
    other = "stock2" if d.node == "stock1" else "stock1"
    assert m[other] == (0, 0)
    an = r.nodes[d.node].approx
    assert len(an.gpu) == 2 and len(an.host) == 1


def test_approx_node_tiers_are_exclusive_and_bounded():
    a = ApproxNode(3, 2)
    ev = a.record(range(2, 10))
    assert len(a.gpu) == 3 and len(a.host) == 2 and not set(a.gpu) & set(a.host)
    state = {}
    for op, tier, i in ev:
        state[(tier, i)] = op
    assert {i for (t, i), op in state.items() if t == GPU and op > 0} == set(a.gpu)
    assert {i for (t, i), op in state.items() if t == HOST and op > 0} == set(a.host)


def test_text_fallback_matches_only_the_approximate_index():
    r = CacheAwareRouter(approx_block_size=4)
    r.add_node("stock", NodeProfile(100, 0, 4))
    r.add_node("exact", NodeProfile(100, 0, 4), NamespaceKey.of(_ns()))
    text = "hello world, a long shared system prompt " * 4
    req = RoutingRequest.from_text(text + "q1")
    r.dispatched(r.route(req, ["stock"]), req)
    m = r.matches(RoutingRequest.from_text(text + "q2"), ["stock", "exact"])
    assert m["stock"][0] > 0 and m["exact"] == (0, 0)


def _proxy_request(body: dict, authorization: str | None = None, path: str = "/v1/completions"):
    """A Starlette request as the proxy's endpoint receives it (JSON ``body``, read once)."""
    import json as _json

    from starlette.requests import Request

    raw, sent = _json.dumps(body).encode(), []
    headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": path, "headers": headers,
                    "query_string": b""}, receive)


@pytest.mark.parametrize("salt_from_key", [False, True])
def test_a_tenant_never_matches_another_tenants_prompt_in_the_router(monkeypatch, salt_from_key):
    """The nodes keep each cache_salt's blocks apart (and each API key's, with salting by key on); the router's
    approximate index did not, so a tenant could steer its probe to another tenant's node and read the
    predicted hit off the status. A bearer header alone partitions nothing unless the nodes salt by key."""
    import asyncio

    from lmdeploy_hostcache.integration.proxy_routing import RoutingService
    from lmdeploy_hostcache.integration.request_salt import ENV_SALT_FROM_API_KEY

    if salt_from_key:
        monkeypatch.setenv(ENV_SALT_FROM_API_KEY, "1")
    else:
        monkeypatch.delenv(ENV_SALT_FROM_API_KEY, raising=False)
    svc = RoutingService(dict(model=None, feed_interval=1.0, feed_timeout=10.0, feed_port=None, feed_api_key=None,
                              error_cooldown=10.0, balance=1.3, block_size=16, gpu_blocks=4096, host_blocks=0,
                              feed_urls={}), None)
    nodes = ["http://n1", "http://n2"]
    seen = [0]

    def hit(body, authorization=None) -> int:
        """Predicted GPU hit tokens of this request (the status counters' growth)."""
        async def go():
            await svc.capture(_proxy_request(body, authorization))
            node = svc.choose(nodes)
            return node, svc.take_ticket(node)   # what pre_call does

        node, ticket = asyncio.run(go())
        svc.finished(node, ticket)
        total = sum(n["predicted_gpu_hit_tokens"] for n in svc.status()["nodes"])
        got, seen[0] = total - seen[0], total
        return got

    secret = "a tenant's system prompt, long enough for several blocks of text. " * 8
    assert hit({"prompt": secret + "question 1", "cache_salt": "tenant-a"}) == 0
    assert hit({"prompt": secret + "question 2", "cache_salt": "tenant-b"}) == 0       # another salt: no hit
    assert hit({"prompt": secret + "question 3"}) == 0                                  # unsalted: no hit
    assert hit({"prompt": secret + "question 4", "cache_salt": "tenant-a"}) > 0         # same salt: a hit
    assert hit({"prompt": secret + "question 5"}) > 0                                   # unsalted shares as stock
    # a bearer header is another partition only where the nodes salt by key
    keyed = hit({"prompt": secret + "question 6"}, authorization="Bearer k2")
    assert (keyed == 0) == salt_from_key


def test_the_routing_status_answers_clients_on_the_proxys_host_only():
    from types import SimpleNamespace

    from starlette.requests import Request

    from lmdeploy_hostcache.integration.proxy_routing import _status_endpoint

    nm = SimpleNamespace(_hostcache_routing=SimpleNamespace(status=lambda: {"nodes": []}))
    endpoint = _status_endpoint(nm)

    def get(host):
        return endpoint(Request({"type": "http", "method": "GET", "path": "/hostcache/routing", "headers": [],
                                 "query_string": b"", "client": (host, 5000)}))

    for host in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"):
        assert get(host) == {"nodes": []}, host
    for host in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "", "testclient"):
        assert get(host).status_code == 403, host
