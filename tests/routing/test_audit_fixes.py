"""Audit fixes of the cache-aware router and the proxy strategy: feed validation (non-finite seed), bounded
views (capacity checks, table shrinking, mask width), the proxy lock off the request path, exact in-flight
accounting per request, LoRA adapter requests, and the route benchmark's fidelity to the proxy."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from lmdeploy_hostcache.routing.cost import NodeProfile
from lmdeploy_hostcache.routing.feed import (MAX_FEED_BLOCKS, FeedCursor, FeedError, FeedPublisher, NamespaceKey,
                                             capacity_slack)
from lmdeploy_hostcache.routing.request import RoutingRequest
from lmdeploy_hostcache.routing.router import SNAPSHOT_CHUNK, CacheAwareRouter
from lmdeploy_hostcache.routing.table import GPU, HOST, BlockTable
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests

from .test_routing_core import _proxy_request

OPTS = dict(model=None, feed_interval=1.0, feed_timeout=10.0, feed_port=None, feed_api_key=None, error_cooldown=10.0,
            balance=1.3, block_size=16, gpu_blocks=4096, host_blocks=0, feed_urls={})
INFO = {"version": 1, "gpu_blocks": 100, "host_blocks": 50, "block_size": 4,
        "namespace": {"root": "%032x" % 12345, "seed": 7}, "host_weight": 0.2, "speed": 1.0}


def _b64(a) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<u8").tobytes()).decode()


def _snapshot(gpu, host, info=None, epoch="e1", seq=0) -> dict:
    return {"info": dict(info or INFO), "epoch": epoch, "seq": seq, "snapshot": {"gpu": _b64(gpu), "host": _b64(host)}}


def _events(stored_gpu, removed_gpu=(), info=None, epoch="e1", seq=1) -> dict:
    ids = np.concatenate([np.asarray(stored_gpu, dtype=np.uint64), np.asarray(removed_gpu, dtype=np.uint64)])
    ops = np.array([0] * len(stored_gpu) + [1] * len(removed_gpu), dtype=np.uint8)
    return {"info": dict(info or INFO), "epoch": epoch, "seq": seq,
            "events": {"ops": base64.b64encode(ops.tobytes()).decode(), "ids": _b64(ids)}}


def _service(node_manager=None, **options):
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService

    return RoutingService({**OPTS, **options}, node_manager)


# ------------------------------------------------------------------------------------------ 1. seed
@pytest.mark.parametrize("seed", [float("inf"), float("-inf"), float("nan"), 1.5, 7.0, True, "0x10", "-3", " 7", [7],
                                  None, "9" * 50])
def test_a_seed_that_is_not_an_int_is_a_feed_error_never_another_exception(seed):
    msg = FeedPublisher(gpu_blocks=1, host_blocks=1, namespace=Namespace(model="m", block_size=4)).poll()
    msg["info"]["namespace"]["seed"] = seed
    cur = FeedCursor()
    with pytest.raises(FeedError, match="seed"):
        cur.apply(msg)
    assert cur.epoch is None


def test_json_infinity_seed_from_the_wire_is_refused_and_the_proxy_drops_the_exact_view(caplog):
    good = FeedPublisher(gpu_blocks=10, host_blocks=0, namespace=Namespace(model="m", block_size=4)).poll()
    bad_text = json.dumps(good).replace('"seed": %d' % good["info"]["namespace"]["seed"], '"seed": Infinity')
    assert json.loads(bad_text)["info"]["namespace"]["seed"] == float("inf")   # what r.json() hands the proxy
    svc = _service()
    svc._sync_nodes(["http://x"])

    class Session:
        body = json.dumps(good)

        def get(self, *a, **k):
            return SimpleNamespace(status_code=200, json=lambda: json.loads(self.body))

    s = Session()
    svc.poll_once(s)
    assert svc.router.nodes["http://x"].exact
    s.body = bad_text
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
        svc.poll_once(s)
        svc.poll_once(s)
    assert not svc.router.nodes["http://x"].exact
    assert sum("invalid cache-state feed" in r.getMessage() for r in caplog.records) == 1


def test_a_decimal_string_seed_is_accepted_as_before():
    msg = FeedPublisher(gpu_blocks=1, host_blocks=1, namespace=Namespace(model="m", block_size=4)).poll()
    seed = msg["info"]["namespace"]["seed"]
    msg["info"]["namespace"]["seed"] = str(seed)
    cur = FeedCursor()
    cur.apply(msg)
    assert cur.info["namespace_key"].seed == seed


# ------------------------------------------------------------------------------------------ 2. bounded views
def _router_with_exact_node(**kw):
    r = CacheAwareRouter(max_nodes=64, **kw)
    r.add_node("n", NodeProfile(10, 0, 4))
    r.add_node("other", NodeProfile(10, 0, 4))
    r.apply_feed("n", _snapshot(np.arange(10, 20), np.arange(100, 105)))
    return r


@pytest.mark.parametrize("k, value", [("gpu_blocks", MAX_FEED_BLOCKS + 1), ("host_blocks", 1 << 60)])
def test_advertised_capacity_is_bounded(k, value):
    with pytest.raises(FeedError, match=f"info.{k}"):
        FeedCursor().apply(_snapshot([], [], info=dict(INFO, **{k: value})))
    FeedCursor().apply(_snapshot([], [], info=dict(INFO, **{k: MAX_FEED_BLOCKS})))


@pytest.mark.parametrize("tier", ["gpu", "host"])
def test_a_snapshot_larger_than_its_capacity_is_refused_before_anything_changes(tier):
    r = _router_with_exact_node()
    st = r.nodes["n"]
    before = (st.cursor.epoch, st.cursor.seq, r.table.entries, r.table.count(st.slot, GPU),
              r.table.count(st.slot, HOST))
    big = np.arange(1000, 1000 + (INFO["gpu_blocks"] if tier == "gpu" else INFO["host_blocks"]) + 1)
    msg = _snapshot(big, [], epoch="e2") if tier == "gpu" else _snapshot([], big, epoch="e2")
    with pytest.raises(FeedError, match=f"snapshot.{tier}"):
        r.apply_feed("n", msg)
    assert (st.cursor.epoch, st.cursor.seq, r.table.entries, r.table.count(st.slot, GPU),
            r.table.count(st.slot, HOST)) == before
    # at capacity exactly: fine
    ok = np.arange(1000, 1000 + INFO["gpu_blocks"])
    r.apply_feed("n", _snapshot(ok, [], epoch="e2"))
    assert r.table.count(st.slot, GPU) == INFO["gpu_blocks"]


def test_one_events_message_storing_more_than_capacity_plus_slack_is_refused_before_anything_changes():
    r = _router_with_exact_node()
    st = r.nodes["n"]
    too_many = np.arange(5000, 5000 + INFO["gpu_blocks"] + capacity_slack(INFO["gpu_blocks"]) + 1)
    with pytest.raises(FeedError, match="events"):
        r.apply_feed("n", _events(too_many))
    assert st.cursor.seq == 0 and r.table.count(st.slot, GPU) == 10


def test_events_that_grow_a_view_past_capacity_drop_the_exact_view_and_free_the_table():
    info = dict(INFO, gpu_blocks=2000, host_blocks=0)
    r = CacheAwareRouter(max_nodes=64)
    r.add_node("evil", NodeProfile(10, 0, 4))
    r.add_node("good", NodeProfile(10, 0, 4))
    r.apply_feed("good", _snapshot(np.arange(2, 1000), [], info=info))
    r.apply_feed("evil", _snapshot([], [], info=info))
    st = r.nodes["evil"]
    limit = 2000 + capacity_slack(2000)
    seq, nxt, raised = 0, 10**6, None
    for _ in range(40):   # stored-only ids, 1000 per poll, never removed
        seq += 1000
        try:
            r.apply_feed("evil", _events(np.arange(nxt, nxt + 1000), info=info, seq=seq))
        except FeedError as exc:
            raised = exc
            break
        nxt += 1000
        assert r.table.count(st.slot, GPU) <= limit
    assert raised is not None and "evil" in str(raised)
    assert r.table.count(st.slot, GPU) == 0 and st.cursor.epoch is None   # forgotten; next poll: a snapshot
    assert r.table.entries == 998 and r.table.count(r.nodes["good"].slot, GPU) == 998   # the other node intact
    assert st.held == [0, 0]


def test_a_node_at_capacity_that_churns_for_long_is_never_refused_and_counts_rarely():
    """A legitimate node at full capacity: every poll stores as many blocks as it withdraws."""
    cap = 1000
    info = dict(INFO, gpu_blocks=cap, host_blocks=0)
    pub = FeedPublisher(gpu_blocks=cap, host_blocks=0, namespace=NamespaceKey(12345, 7, 4), max_events=300)
    r = CacheAwareRouter(max_nodes=64)
    r.add_node("n", NodeProfile(10, 0, 4))
    counts = []
    orig = r.table.count
    r.table.count = lambda *a: counts.append(1) or orig(*a)
    live = list(range(2, 2 + cap))
    for d in live:
        pub.stored(GPU, d)
    nxt = 10**6
    for step in range(60):
        for _ in range(100):
            pub.removed(GPU, live.pop(0))
            pub.stored(GPU, nxt)
            live.append(nxt)
            nxt += 1
        while True:
            msg = pub.poll(**r.nodes["n"].cursor.params())
            r.apply_feed("n", msg)
            if not msg.get("more"):
                break
    assert orig(r.nodes["n"].slot, GPU) == cap
    assert r.nodes["n"].cursor.epoch == pub.epoch   # never refused (a refusal resets the cursor)
    assert len(counts) <= 60 * 100 // capacity_slack(cap) + 1   # an exact count per slack's worth of stores


def test_the_proxy_logs_a_growing_feed_once_and_routes_the_node_approximately(caplog):
    info = dict(INFO, gpu_blocks=10, host_blocks=0)
    svc = _service()
    svc._sync_nodes(["http://x"])
    state = {"seq": 0, "next": 10**6}

    class Session:
        def get(self, url, params=None, **k):
            if not params:
                return SimpleNamespace(status_code=200, json=lambda: _snapshot([], [], info=info))
            state["seq"] += 500
            ids = np.arange(state["next"], state["next"] + 500)
            state["next"] += 500
            msg = _events(ids, info=info, seq=state["seq"])
            msg["more"] = False
            return SimpleNamespace(status_code=200, json=lambda: msg)

    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
        for _ in range(8):
            svc.poll_once(Session())
    warnings = [r for r in caplog.records if "invalid cache-state feed" in r.getMessage()]
    assert len(warnings) == 1
    st = svc.router.nodes["http://x"]
    assert svc.router.table.count(st.slot, GPU) <= 10 + capacity_slack(10)
    assert svc.router.table.entries <= 10 + capacity_slack(10) + 500


def test_the_table_shrinks_after_a_big_node_leaves_and_stays_exact():
    rng = np.random.default_rng(3)
    big = np.unique(rng.integers(2, 2**63, size=300_000, dtype=np.uint64))
    small = np.unique(rng.integers(2, 2**63, size=2_000, dtype=np.uint64))
    r = CacheAwareRouter(max_nodes=64)
    r.add_node("big", NodeProfile(10, 0, 4))
    r.add_node("small", NodeProfile(10, 0, 4))
    info = dict(INFO, gpu_blocks=len(big), host_blocks=len(big))
    r.apply_feed("big", _snapshot(big[:1000], big[1000:], info=info))
    r.apply_feed("small", _snapshot(small, big[:500], info=info))
    initial = BlockTable(64).nbytes
    grown = r.table.nbytes
    assert grown > 20 * initial
    r.remove_node("big")
    assert r.table.nbytes < grown / 8 and r.table.entries == len(small) + 500
    g, h = r.table.match(np.concatenate([small, big[:600]]))
    slot = 1 << r.nodes["small"].slot
    assert (g[:len(small)] == slot).all() and (g[len(small):] == 0).all()
    assert (h[len(small):len(small) + 500] == slot).all() and (h[len(small) + 500:] == 0).all()
    r.remove_node("small")
    assert r.table.entries == 0 and r.table.nbytes == initial


def test_table_with_shrinks_and_widening_equals_a_set_model():
    rng = np.random.default_rng(5)
    t = BlockTable(max_nodes=64, initial_blocks=16)
    model: set[tuple[int, int, int]] = set()
    pool = rng.integers(2, 2**63, size=4000, dtype=np.uint64)
    shrinks = 0
    for step in range(300):
        node = int(rng.choice([0, 1, 2, 9, 20, 40]))
        tier = int(rng.integers(2))
        op = rng.random() * (1.0 if step < 150 else 0.55) + (0.0 if step < 150 else 0.45)   # then mostly removals
        ids = pool[rng.integers(0, len(pool), size=int(rng.integers(1, 400)))]
        before = t.slots
        if op < 0.5:
            t.add(ids, node, tier)
            model |= {(int(i), node, tier) for i in ids}
        elif op < 0.85:
            t.remove(ids, node, tier)
            model -= {(int(i), node, tier) for i in ids}
        else:
            t.clear_node(node)
            model = {m for m in model if m[1] != node}
        shrinks += t.slots < before
        if step % 25 == 0 or step == 299:
            g, h = t.match(pool)
            for k, i in enumerate(pool.tolist()):
                for n in (0, 1, 2, 9, 20, 40):
                    assert bool(int(g[k]) >> n & 1) == ((i, n, GPU) in model)
                    assert bool(int(h[k]) >> n & 1) == ((i, n, HOST) in model)
            assert t.entries == len({i for i, _, _ in model})
            for n in (0, 9, 40):
                assert t.count(n, GPU) == sum(1 for m in model if m[1] == n and m[2] == GPU)
    assert shrinks > 0 and t.mask_bits == 64


def test_masks_are_as_narrow_as_the_nodes_in_use_and_widen_when_a_higher_slot_joins():
    r = CacheAwareRouter(max_nodes=64)
    for k in range(4):
        r.add_node(f"n{k}", NodeProfile(10, 0, 4))
        r.apply_feed(f"n{k}", _snapshot(np.arange(10 + k, 20 + k), [], info=dict(INFO)))
    assert r.table.mask_dtype is np.uint8 and r.status()["table_mask_bits"] == 8
    r.remove_node("n1")
    r.add_node("again", NodeProfile(10, 0, 4))
    assert r.nodes["again"].slot == 1   # the lowest free slot is reused: masks stay narrow
    for k in range(4, 12):
        r.add_node(f"n{k}", NodeProfile(10, 0, 4))
    r.apply_feed("n11", _snapshot(np.arange(10, 12), [], info=dict(INFO)))
    assert r.nodes["n11"].slot == 11 and r.table.mask_dtype is np.uint16
    m = r.matches(RoutingRequest.from_ids(np.arange(10, 20, dtype=np.uint64), 41), ["n0", "n11", "n3"])
    assert m == {"n0": (10, 0), "n11": (2, 0), "n3": (0, 0)}


# ------------------------------------------------------------------------------------------ 3. the lock
def test_choose_falls_back_to_the_stock_strategy_when_the_router_is_busy():
    from lmdeploy_hostcache.integration.proxy_routing import CHOOSE_LOCK_TIMEOUT_S, _current

    svc = _service()
    nodes = ["http://x", "http://y"]
    svc._sync_nodes(nodes)
    held, release = threading.Event(), threading.Event()

    def busy():   # the poller applying a large snapshot
        with svc.lock:
            held.set()
            release.wait(10)

    th = threading.Thread(target=busy)
    th.start()
    try:
        held.wait(5)
        _current.set(RoutingRequest.from_text("hello " * 40))
        t = time.perf_counter()
        assert svc.choose(nodes) is None
        waited = time.perf_counter() - t
        t_end = time.perf_counter()
        svc.finished("http://x", 12345)   # a request's end and a node's error do not wait at all: queued
        svc.node_error("http://y")
        assert time.perf_counter() - t_end < CHOOSE_LOCK_TIMEOUT_S / 2
    finally:
        release.set()
        th.join()
    assert CHOOSE_LOCK_TIMEOUT_S * 0.9 <= waited < CHOOSE_LOCK_TIMEOUT_S + 0.5
    assert svc.status()["lock_timeouts"] == 1
    _current.set(RoutingRequest.from_text("hello " * 40))
    assert svc.choose(nodes) == "http://x"   # the queued node error was applied by this holder: y is skipped
    assert not svc.router.nodes["http://y"].healthy


def test_a_feed_parsed_outside_the_lock_is_not_applied_when_the_node_was_reset_meanwhile():
    r = _router_with_exact_node()
    pending = r.prepare_feed("n", _snapshot(np.arange(500, 510), [], epoch="e9"))
    r.remove_node("n")
    r.add_node("n", NodeProfile(10, 0, 4))   # the same name (and slot), a new node state
    assert r.commit_feed(pending) is None
    st = r.nodes["n"]
    assert not st.exact and r.table.count(st.slot, GPU) == 0 and st.cursor.epoch is None
    # the cursor moved between the parse and the commit: nothing applied either
    r.apply_feed("n", _snapshot(np.arange(10, 20), [], epoch="e1"))
    p1 = r.prepare_feed("n", _events([30, 31], epoch="e1", seq=2))
    r.apply_feed("n", _events([40], epoch="e1", seq=1))
    assert r.commit_feed(p1) is None and st.cursor.seq == 1 and r.table.count(st.slot, GPU) == 11
    # an invalid message changes nothing (the parse refuses it)
    with pytest.raises(FeedError):
        r.prepare_feed("n", _events([50], epoch="other", seq=3))
    assert st.cursor.seq == 1


def test_a_large_snapshot_is_applied_in_chunks_and_a_request_gets_the_lock_between_them():
    from lmdeploy_hostcache.integration.proxy_routing import _current

    svc = _service()
    nodes = ["http://x", "http://y"]
    svc._sync_nodes(nodes)
    n = 5 * SNAPSHOT_CHUNK
    ids = np.arange(10**6, 10**6 + n, dtype=np.uint64)
    info = dict(INFO, gpu_blocks=n, host_blocks=0)
    msg = _snapshot(ids, [], info=info)
    seen = []

    def request_meanwhile():   # what the event loop's choose() does while the poller pauses
        def go():
            _current.set(RoutingRequest.from_ids(ids[:8], 8 * 4 + 1))
            seen.append((svc.choose(nodes), svc.router.table.count(svc.router.nodes["http://x"].slot, GPU)))
        th = threading.Thread(target=go)
        th.start()
        th.join(10)

    def pause():   # the service's own pause, with a request let in deterministically
        svc.lock.release()
        try:
            request_meanwhile()
        finally:
            svc.lock.acquire()

    svc._let_requests_in = pause

    class Session:
        def get(self, url, **k):
            return SimpleNamespace(status_code=200, json=lambda: msg if "x" in url else _snapshot([], [], info=info))

    svc.poll_once(Session())
    assert len(seen) == n // SNAPSHOT_CHUNK - 1
    assert all(node is not None for node, _ in seen)                    # routed, not timed out
    assert [c for _, c in seen] == [SNAPSHOT_CHUNK * k for k in range(1, n // SNAPSHOT_CHUNK)]   # part of it
    assert svc.router.table.count(svc.router.nodes["http://x"].slot, GPU) == n
    assert svc.status()["lock_timeouts"] == 0


def test_the_pollers_pause_hands_the_lock_to_a_waiting_request():
    svc = _service()
    got = []
    with svc.lock:
        waiter = threading.Thread(target=lambda: got.append(svc.lock.acquire(timeout=5)) or svc.lock.release())
        waiter.start()
        time.sleep(0.05)             # the request is waiting for the lock
        for _ in range(100):         # between snapshot chunks (best effort each: the OS schedules the waiter)
            svc._let_requests_in()
            if got:
                break
        assert got == [True]         # it had the lock while the poller paused
    waiter.join(5)


def test_table_growth_is_built_outside_the_lock_and_refused_if_the_table_changed():
    t = BlockTable(max_nodes=64, initial_blocks=16)
    t.add(np.arange(2, 100, dtype=np.uint64), 0, GPU)
    v = t.version
    nb = t.plan_reserve(10_000)
    built = t.build_resized(nb)
    t.add(np.array([500], dtype=np.uint64), 1, HOST)          # the table changed meanwhile
    assert not t.install_resized(built, v) and t.num_buckets < nb
    v = t.version
    built = t.build_resized(nb)
    assert t.install_resized(built, v) and t.num_buckets >= nb
    g, h = t.match(np.array([2, 99, 500, 100], dtype=np.uint64))
    assert g.tolist() == [1, 1, 0, 0] and h.tolist() == [0, 0, 2, 0] and t.entries == 99


# ------------------------------------------------------------------------------------------ 4. in-flight
def test_finished_ends_exactly_the_ticketed_request():
    r = CacheAwareRouter(max_nodes=8, approx_block_size=4)
    r.add_node("x", NodeProfile(100, 0, 4))
    long_req, short_req = RoutingRequest(list(range(20001))), RoutingRequest(list(range(50, 61)))
    a = r.route(long_req)
    ta = r.dispatched(a, long_req)
    c = r.route(short_req)
    tc = r.dispatched(c, short_req)
    assert ta != tc and a.ticket == ta and c.ticket == tc
    st = r.nodes["x"]
    assert st.inflight_tokens == a.miss_tokens + c.miss_tokens
    r.finished("x", tc)                     # the short one ends first
    assert st.inflight_tokens == a.miss_tokens
    r.finished("x", tc)                     # again, or a ticket of another request: nothing
    r.finished("x", 10**9)
    assert st.inflight_tokens == a.miss_tokens
    r.finished("x", ta)
    assert st.inflight_tokens == 0 and not st.inflight
    # without a ticket (the planner's sequential replay): the oldest
    t1 = r.dispatched(r.route(long_req), long_req)
    r.dispatched(r.route(short_req), short_req)
    r.finished("x")
    assert list(st.inflight) == [t1 + 1]


class _StockManager:
    """The stock NodeManager's Hybrid path as LMDeploy 0.18 writes it (get_node_url, pre_call, post_call)."""

    def __init__(self, nodes: dict[str, list[str]]) -> None:
        self.nodes = {u: SimpleNamespace(models=m, unfinished=0, latency=[], role=None, speed=None)
                      for u, m in nodes.items()}

    def get_nodes(self, role):
        return dict(self.nodes)

    def get_node_url(self, model_name, role=None):
        return next(u for u, s in self.nodes.items() if model_name in s.models)

    def pre_call(self, node_url):
        self.nodes[node_url].unfinished += 1
        return time.time()

    def post_call(self, node_url, start):
        if node_url in self.nodes:
            self.nodes[node_url].unfinished -= 1
            self.nodes[node_url].latency.append(time.time() - start)


def _cache_aware_manager(nodes: dict[str, list[str]]):
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService, _cache_aware_class

    nm = _StockManager(nodes)
    nm.__class__ = _cache_aware_class(_StockManager)
    nm._hostcache_routing = RoutingService(dict(OPTS), nm)
    return nm


def test_the_proxy_ends_the_queued_prefill_of_the_request_that_finished_and_of_no_other():
    """Two requests in flight on one node; the short one ends first. Then a request the stock strategy routed
    (no prompt the router can read) ends on the same node: the long one's queued prefill stays."""
    nm = _cache_aware_manager({"http://x": ["m"]})
    svc = nm._hostcache_routing

    def inflight():
        return {n["name"]: n["inflight_prefill_tokens"] for n in svc.status()["nodes"]}

    async def endpoint(body, started: asyncio.Event, finish: asyncio.Event):
        """The stock Hybrid endpoint: dependency, get_node_url, pre_call, (response), post_call."""
        await svc.capture(_proxy_request(body))
        url = nm.get_node_url(body["model"])
        start = nm.pre_call(url)
        started.set()
        await finish.wait()
        nm.post_call(url, start)

    async def main():
        ev = {k: (asyncio.Event(), asyncio.Event()) for k in ("long", "short", "stock")}
        tasks = [asyncio.create_task(endpoint({"model": "m", "prompt": "A" * 80000}, *ev["long"]))]
        await ev["long"][0].wait()
        tasks.append(asyncio.create_task(endpoint({"model": "m", "prompt": "C" * 400}, *ev["short"])))
        await ev["short"][0].wait()
        both = inflight()["http://x"]
        ev["short"][1].set()
        await tasks[1]
        after_short = inflight()["http://x"]
        tasks.append(asyncio.create_task(endpoint({"model": "m", "input_ids": [1, 2, 3]}, *ev["stock"])))
        await ev["stock"][0].wait()
        ev["stock"][1].set()
        await tasks[2]
        after_stock = inflight()["http://x"]
        ev["long"][1].set()
        await tasks[0]
        return both, after_short, after_stock, inflight()["http://x"]

    both, after_short, after_stock, end = asyncio.run(main())
    assert both == 20000 + 100
    assert after_short == 20000          # the long request is still prefilling
    assert after_stock == 20000          # a stock-routed request's end changes nothing
    assert end == 0
    assert nm.nodes["http://x"].unfinished == 0   # the stock counters still run


# ------------------------------------------------------------------------------------------ 5. adapters
def test_a_lora_adapter_request_matches_nothing_a_node_published_for_the_base_model():
    from lmdeploy_hostcache.integration.proxy_routing import _current
    from lmdeploy_hostcache.routing.ids import publish_id

    nm = _cache_aware_manager({"http://a": ["tiny", "my-lora"], "http://b": ["tiny", "my-lora"]})
    svc = nm._hostcache_routing
    nodes = ["http://a", "http://b"]
    svc._sync_nodes(nodes)
    base = Namespace(model="tiny", block_size=16)
    tokens = list(range(1000, 1000 + 16 * 20 + 1))
    for url in nodes:
        pub = FeedPublisher(gpu_blocks=100, host_blocks=0, namespace=base)
        if url == "http://a":   # node a served the base model's request
            for d in chain_digests(base, tokens)[0]:
                pub.stored(GPU, d)
        svc.router.apply_feed(url, pub.poll())

    def hits():
        return {n["name"]: n["predicted_gpu_hit_tokens"] for n in svc.status()["nodes"]}

    _current.set(RoutingRequest(tokens))
    url = svc.choose(nodes, "my-lora")
    assert url is not None
    assert hits() == {"http://a": 0, "http://b": 0} and svc.status()["adapter_requests"] == 1
    svc.finished(url, svc.take_ticket(url))
    _current.set(RoutingRequest(tokens))
    assert svc.choose(nodes, "tiny") == "http://a"      # the base model's request matches its blocks
    assert hits()["http://a"] == 20 * 16
    assert len({publish_id(d) for d in chain_digests(base, tokens)[0]}) == 20


def test_adapter_requests_have_their_own_partition_of_the_approximate_index():
    r = CacheAwareRouter(approx_block_size=4)
    r.add_node("stock", NodeProfile(100, 0, 4))
    toks = list(range(41))
    req = RoutingRequest(toks)
    req.set_adapter("lora-1")
    r.dispatched(r.route(req), req)
    assert r.matches(RoutingRequest(toks), ["stock"])["stock"] == (0, 0)      # the base model: no
    other = RoutingRequest(toks)
    other.set_adapter("lora-2")
    assert r.matches(other, ["stock"])["stock"] == (0, 0)                       # another adapter: no
    same = RoutingRequest(toks)
    same.set_adapter("lora-1")
    assert r.matches(same, ["stock"])["stock"] == (10, 0)                       # the same adapter: yes
    salted = RoutingRequest(toks, partition="lora-1")                          # a salt named like it: no
    assert r.matches(salted, ["stock"])["stock"] == (0, 0)


def test_the_base_model_is_the_first_model_a_node_lists():
    nm = _cache_aware_manager({"http://a": ["base", "ad1"], "http://b": ["base"]})
    svc = nm._hostcache_routing
    assert svc.adapter_of("ad1", ["http://a"]) == "ad1"
    assert svc.adapter_of("base", ["http://a", "http://b"]) == ""
    assert svc.adapter_of(None, ["http://a"]) == ""
    assert _service().adapter_of("ad1", ["http://a"]) == ""   # no node manager: no statuses to read


# ------------------------------------------------------------------------------------------ 6. bench
def test_bench_route_measures_the_proxys_own_router_and_feed_path():
    import argparse

    from lmdeploy_hostcache.bench import route
    from lmdeploy_hostcache.integration.proxy_routing import PROXY_MAX_NODES, make_router

    p = argparse.ArgumentParser()
    route.add_arguments(p)
    res = route.measure_nodes(3, p.parse_args(["--blocks-per-node", "30000", "--requests", "20"]))
    proxy = make_router(OPTS)
    assert res["table_max_nodes"] == PROXY_MAX_NODES == proxy.table.max_nodes
    assert res["table_mask_bits"] == 8 and res["table_resizes"] > 0        # the default size, grown by the feed
    assert res["table_entries"] == 90_000 and res["lock_timeouts"] == 0
    assert res["load_seconds"] > 0 and 0 < res["longest_lock_hold_ms"] < 1000 * res["load_seconds"] + 1


# ------------------------------------------------------------------------------------------ 7. bounded state
def test_a_session_entry_is_a_fixed_size_digest_whatever_the_user_sends():
    """The proxy's ``user`` is the client's text: the router keeps its 16-byte digest only, so an affinity entry
    costs the same for a 4 KB user as for a 1-character one, and affinity still holds."""
    import tracemalloc

    from lmdeploy_hostcache.integration.proxy_routing import session_key
    from lmdeploy_hostcache.routing.router import session_digest

    toks = list(range(20))
    per_entry = {}
    for ulen in (1, 4000):   # a router each: the same entry count, so the same table growth
        r = CacheAwareRouter(max_nodes=8, approx_block_size=16)
        r.add_node("a", NodeProfile(64, 128, 16))
        for _ in range(200):   # the window and in-flight structures at their steady size first
            req = RoutingRequest(toks)
            r.finished("a", r.dispatched(r.route(req), req))
        n = 3000
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                req = RoutingRequest(toks, session=session_key({"user": f"{i:06d}" + "x" * ulen}))
                r.finished("a", r.dispatched(r.route(req), req))
            del req
            per_entry[ulen] = (tracemalloc.get_traced_memory()[0] - base) / n
        finally:
            tracemalloc.stop()
        assert len(r.sessions) == n
        assert {type(k) for k in r.sessions} == {bytes} and {len(k) for k in r.sessions} == {16}
    assert per_entry[4000] < 200 and abs(per_entry[4000] - per_entry[1]) < 10, per_entry   # ~125-140 bytes each

    # affinity by the digest: a long user (and one with a lone surrogate, which JSON allows) sticks to its node
    r.add_node("b", NodeProfile(64, 128, 16))
    for user in ("u" * 100_000, "bad\ud800"):
        sess = session_key({"user": user})
        r.sessions[session_digest(sess)] = "b"
        d = r.route(RoutingRequest(list(range(500, 520)), session=sess))
        assert (d.node, d.reason) == ("b", "affinity")
        assert r.sessions[session_digest(sess)] == "b" and sess not in r.sessions
    r.remove_node("b")
    assert "b" not in r.sessions.values() and len(r.sessions) == 3000


def test_the_recent_window_keeps_no_state_of_nodes_that_left():
    r = CacheAwareRouter(max_nodes=8, approx_block_size=16)
    r.add_node("stable", NodeProfile(64, 128, 16))
    for i in range(500):   # a node that comes and goes under a new name, given requests while it is there
        name = f"tmp{i}"
        r.add_node(name, NodeProfile(64, 128, 16))
        for n in (name, "stable"):
            req = RoutingRequest(list(range(i, i + 40)))
            r.dispatched(r.route(req, [n]), req)
        r.remove_node(name)
        assert set(r._window_load) <= set(r.nodes) and {n for n, _ in r._window} <= set(r.nodes)
    assert set(r._window_load) == {"stable"}
    assert r._window_load["stable"] == sum(t for _, t in r._window)
    r.add_node("tmp499", NodeProfile(64, 128, 16))   # back under an old name: it starts afresh
    assert r._window_load["tmp499"] == 0


def test_the_proxys_per_node_state_stays_bounded_under_node_churn():
    """Autoscaled nodes on new URLs, one of them erroring often: the router's window, the feed state and the error
    cooldowns keep entries for the nodes of the proxy only (and an expired cooldown goes at the next error)."""
    from lmdeploy_hostcache.integration.proxy_routing import _current

    nm = _cache_aware_manager({"http://stable": ["m"]})
    svc = nm._hostcache_routing
    for i in range(300):
        churn = f"http://10.0.0.{i % 7}:{20000 + i}"
        nm.nodes = {u: SimpleNamespace(models=["m"], unfinished=0, latency=[], role=None, speed=None)
                    for u in (churn, "http://stable")}
        _current.set(RoutingRequest(list(range(i, i + 64))))
        url = svc.choose(list(nm.nodes), "m")
        assert url in nm.nodes
        if i % 3 == 0:
            svc.node_error(churn)
        svc.finished(url, svc.take_ticket(url))
    assert set(svc._cooldown) <= set(nm.nodes) and set(svc._feed_state) <= set(nm.nodes)
    assert set(svc.router._window_load) <= set(nm.nodes) and len(svc.router._window_load) == 2

    svc.node_error("http://stable")       # a node that stays keeps its cooldown
    _current.set(RoutingRequest(list(range(64))))
    assert svc.choose(list(nm.nodes), "m") != "http://stable"
    svc._cooldown["http://gone"] = time.monotonic() - 1   # an expired cooldown of a node never tracked
    svc.node_error("http://stable")
    assert "http://gone" not in svc._cooldown and "http://stable" in svc._cooldown


def test_a_node_that_leaves_while_its_feed_is_polled_leaves_no_feed_state():
    """The poller reads a node under the lock and goes on without it; a request that runs right then, after the
    node left, removes the node and its feed state.  The poll round must not put that state back: nothing would
    remove it again (the membership sync walks the router's nodes only)."""
    import requests

    from lmdeploy_hostcache.integration.proxy_routing import _current

    nm = _cache_aware_manager({})
    svc = nm._hostcache_routing

    class ReleaseHook:                       # the service's lock, running ``hook`` once right after a release
        def __init__(self, inner):
            self.inner, self.hook = inner, None

        def acquire(self, *args, **kwargs):
            return self.inner.acquire(*args, **kwargs)

        def release(self):
            self.inner.release()
            hook, self.hook = self.hook, None
            if hook:
                hook()

        __enter__ = acquire

        def __exit__(self, *exc):
            self.release()

    class Refused:                           # every feed read: connection refused
        def get(self, *args, **kwargs):
            raise requests.exceptions.ConnectionError("refused")

    svc.lock = ReleaseHook(svc.lock)
    for i in range(5):
        url = f"http://127.0.0.1:{30000 + i}"
        nm.nodes[url] = SimpleNamespace(models=["m"], unfinished=0, latency=[], role=None, speed=None)
        svc.poll_once(Refused())

        def request_after_the_node_left(url=url):
            del nm.nodes[url]
            _current.set(RoutingRequest([1, 2, 3, 4]))
            svc.choose(list(nm.nodes) or [url], "m")

        svc.lock.hook = request_after_the_node_left     # at the release after the poll read the node
        svc._poll_node(url, Refused(), {}, 0.0, {svc.feed_url(url): [url]})
        assert url not in svc.router.nodes
    svc.poll_once(Refused())
    assert set(svc._feed_state) <= set(svc.router.nodes) == set(nm.nodes) == set(), svc._feed_state


def test_nodes_that_would_read_one_feed_are_routed_approximately_and_the_feed_is_not_read(caplog):
    """Data-parallel engines of one host under --cache-aware-feed-port (API ports differ, the feed port is
    the same): that feed serves one engine's cache at most, so no node takes it as its exact view; a node
    with a feed of its own is still read."""
    svc = _service(feed_port=23400)
    nodes = ["http://10.0.0.1:23333", "http://10.0.0.1:23334", "http://10.0.0.2:23333"]
    svc._sync_nodes(nodes)
    read = []

    class Session:
        def get(self, url, params=None, **k):
            read.append(url)
            return SimpleNamespace(status_code=200, json=lambda: _snapshot([5, 6], [], epoch="e-" + url))

    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
        svc.poll_once(Session())
        svc.poll_once(Session())
    assert read == ["http://10.0.0.2:23400/hostcache/cache_state"] * 2
    assert [svc.router.nodes[n].exact for n in nodes] == [False, False, True]
    shared = [r.getMessage() for r in caplog.records if "would all read" in r.getMessage()]
    assert len(shared) == 2 and "http://10.0.0.1:23333, http://10.0.0.1:23334" in shared[0]   # once per node
    svc.options["feed_urls"] = {nodes[1]: "http://10.0.0.1:23401"}   # each its own feed: both read again
    svc.poll_once(Session())
    assert [svc.router.nodes[n].exact for n in nodes] == [True, True, True]


def test_a_node_whose_feed_is_served_elsewhere_is_skipped_once_its_api_stops_answering(caplog):
    """A real node's feed is its engine's, on another port: when that feed stops answering, the node's API
    address is probed; a killed node (nothing accepts there) is skipped until it answers again, where it
    used to stay healthy on its exact view and then look idle to the balance guard. A node whose API
    answers while its feed does not is routed approximately, as before."""
    import socket

    import requests

    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(8)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))       # bound, not listening: connections are refused, as to a killed node
    nodes = [f"http://127.0.0.1:{live.getsockname()[1]}", f"http://127.0.0.1:{dead.getsockname()[1]}"]
    svc = _service(feed_urls={n: f"http://127.0.0.1:9/feed-{i}" for i, n in enumerate(nodes)})
    svc._sync_nodes(nodes)
    answering = set(nodes)

    class Session:
        def get(self, url, params=None, **k):
            node = nodes[int(url.split("feed-")[1].split("/")[0])]
            if node not in answering:
                raise requests.exceptions.ConnectionError("refused")
            return SimpleNamespace(status_code=200, json=lambda: _snapshot([5, 6], [], epoch="e-" + node))

    try:
        svc.poll_once(Session())
        assert all(svc.router.nodes[n].healthy and svc.router.nodes[n].exact for n in nodes)
        answering.clear()                         # both feeds stop; only the first node's API still answers
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
            svc.poll_once(Session())
            svc.poll_once(Session())
        assert svc.router.nodes[nodes[0]].healthy and not svc.router.nodes[nodes[1]].healthy
        down = [r.getMessage() for r in caplog.records if "does not answer (its cache-state feed" in r.getMessage()]
        assert len(down) == 1 and nodes[1] in down[0]           # once, naming the node
        answering.add(nodes[1])                   # restarted: its feed answers again
        svc.poll_once(Session())
        assert svc.router.nodes[nodes[1]].healthy and svc.router.nodes[nodes[1]].exact
    finally:
        live.close()
        dead.close()


@pytest.mark.parametrize("stall", ["timeout", "mid-body"])
def test_a_feed_that_times_out_is_not_read_for_a_growing_number_of_intervals(monkeypatch, stall):
    """A feed that answers only at the read timeout held up every node read after it, every round: after each
    such read it is not read for 1, 2, 4, then 8 poll intervals (time, not rounds: a finished request wakes the
    poller), until a read succeeds; the other nodes are read every round, and the slow node's view still goes
    approximate after --cache-aware-feed-timeout. A body that stalls after the headers (requests raises a
    ConnectionError, not a Timeout) counts as slow by the time the read took."""
    import requests

    from lmdeploy_hostcache.integration import proxy_routing

    clock = [1000.0]
    monkeypatch.setattr(proxy_routing.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(proxy_routing, "api_answers", lambda url, timeout_s=1.0: True)   # the nodes' APIs answer
    nodes = [f"http://10.0.0.{i}:23333" for i in range(1, 4)]
    svc = _service(feed_interval=1.0, feed_timeout=6.0)
    svc._sync_nodes(nodes)
    reads = {n: 0 for n in nodes}
    hung = [False]

    class Session:
        def get(self, url, params=None, **k):
            node = url.split("/hostcache")[0]
            reads[node] += 1
            if node == nodes[0] and hung[0]:
                clock[0] += proxy_routing.FEED_READ_TIMEOUT_S        # the read took its whole timeout
                if stall == "timeout":
                    raise requests.exceptions.ReadTimeout("read timed out")
                raise requests.exceptions.ConnectionError("Read timed out (while reading the body)")
            return SimpleNamespace(status_code=200, json=lambda: _snapshot([5, 6], [], epoch="e-" + node))

    svc.poll_once(Session())
    assert svc.router.nodes[nodes[0]].exact
    hung[0] = True
    read_at = []
    for _ in range(60):                               # rounds 0.25 s apart: requests finishing wake the poller
        before = reads[nodes[0]]
        t = clock[0]
        svc.poll_once(Session())
        if reads[nodes[0]] > before:
            read_at.append(t)
        clock[0] += 0.25
    gaps = [b - a - proxy_routing.FEED_READ_TIMEOUT_S for a, b in zip(read_at, read_at[1:])]
    assert [round(g) for g in gaps] == [1, 2, 4, 8, 8][:len(gaps)] and len(gaps) >= 3, gaps
    assert reads[nodes[1]] == reads[nodes[2]] == 61                  # the others: every round
    assert not svc.router.nodes[nodes[0]].exact                       # stale past feed_timeout: approximate
    hung[0] = False
    clock[0] += 10
    svc.poll_once(Session())
    assert svc.router.nodes[nodes[0]].exact and "slow" not in svc._feed_state[nodes[0]]   # read again, not skipped


def test_a_node_without_a_feed_and_a_feed_url_for_no_node_are_each_logged_once(caplog):
    nodes = ["http://127.0.0.1:23333"]
    svc = _service(feed_urls={"http://localhost:23333": "http://127.0.0.1:23401"})

    class Session:
        def get(self, url, params=None, **k):
            return SimpleNamespace(status_code=404, json=lambda: {})

    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
        svc.node_manager = SimpleNamespace(nodes={n: None for n in nodes})
        for _ in range(3):
            svc.poll_once(Session())
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("has no cache-state feed" in m and nodes[0] in m for m in msgs) == 1
    assert sum("names node http://localhost:23333, which is not a node registered now" in m for m in msgs) == 1
    assert not svc.router.nodes[nodes[0]].exact and svc.router.nodes[nodes[0]].healthy


def test_a_down_node_whose_slow_feed_is_skipped_is_routed_again_as_soon_as_it_answers(monkeypatch):
    """A node whose reads time out and whose API does not answer is down and its feed skipped; when its API
    answers again it is read (and routed to) within a poll interval, not at the end of the skip window (up
    to 8 intervals of up to 3,600 s each, before the window was capped)."""
    import requests

    from lmdeploy_hostcache.integration import proxy_routing

    clock = [1000.0]
    monkeypatch.setattr(proxy_routing.time, "monotonic", lambda: clock[0])
    api_up = [False]
    monkeypatch.setattr(proxy_routing, "api_answers", lambda url, timeout_s=1.0: api_up[0])
    node = "http://10.0.0.1:23333"
    svc = _service(feed_interval=30.0, feed_timeout=60.0, feed_port=23400)
    svc._sync_nodes([node])

    class Session:
        def get(self, url, params=None, **k):
            if not api_up[0]:
                clock[0] += proxy_routing.FEED_READ_TIMEOUT_S
                raise requests.exceptions.ConnectTimeout("connect timed out")
            return SimpleNamespace(status_code=200, json=lambda: _snapshot([5, 6], [], epoch="e1"))

    for _ in range(4):                                  # four timeouts: the window grows to 8 x 5 s
        svc.poll_once(Session())
        clock[0] = svc._feed_state[node]["skip_until"]
    assert not svc.router.nodes[node].healthy and svc._feed_state[node]["slow"] == 8
    clock[0] -= 30                                      # inside the window (40 s): the node comes back
    api_up[0] = True
    svc.poll_once(Session())
    assert svc.router.nodes[node].healthy and svc.router.nodes[node].exact
