"""The node-side feed on LMDeploy's real scheduler (CPU harness): what it publishes is what the
engine holds, per tier, and the proxy's reader rebuilds exactly that over HTTP."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
harness = pytest.importorskip("lmdeploy_hostcache.testing.harness")
from lmdeploy_hostcache.testing.harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side  # noqa: E402

from lmdeploy_hostcache.tier.digest import block_digest, encode_tokens  # noqa: E402
from lmdeploy_hostcache.integration.cache_state_feed import (ENV_FEED_ADDR, NodeCacheFeed, attach_from_env,  # noqa: E402
                                                             parse_addr, serve_feed)
from lmdeploy_hostcache.routing.feed import FEED_PATH, FeedCursor  # noqa: E402
from lmdeploy_hostcache.routing.ids import publish_id  # noqa: E402
from lmdeploy_hostcache.routing.table import GPU, HOST  # noqa: E402


def _truth(engine):
    """(GPU ids, host ids) computed independently: chain every trie path's tokens; resident host blocks."""
    side = scheduler_side(engine)
    ns = side.namespaces.for_adapter(None)
    gpu = set()
    root = engine.scheduler.block_trie._roots.get(None)
    stack = [(c, ns.root) for c in (root.children.values() if root is not None else ())]
    while stack:
        node, parent = stack.pop()
        d = block_digest(parent, encode_tokens(node.token_ids), ns.seed)
        gpu.add(publish_id(d))
        stack.extend((c, d) for c in node.children.values())
    host = {publish_id(b.digest) for b in list(side.index._blocks.values()) if side.index.is_resident(b.digest)}
    return gpu, host


def test_feed_publishes_what_the_engine_holds_and_a_reader_rebuilds_it_over_http(monkeypatch):
    import requests

    engine = build_host_tier_engine(harness.HarnessModel(dtype=torch.float16),
                                    harness.HarnessCacheSpec(num_gpu_blocks=16, quant_policy=0,
                                                             max_prefill_token_num=512),
                                    HostTierSpec(host_slots=24, min_restore_tokens=16))
    side = scheduler_side(engine)
    monkeypatch.setenv(ENV_FEED_ADDR, "127.0.0.1:0")  # port 0: any free port
    feed = attach_from_env(side, engine.scheduler)
    assert feed is not None and side.feed is feed
    port = feed.server.server_address[1]
    url = f"http://127.0.0.1:{port}{FEED_PATH}"
    cur, view = FeedCursor(), (set(), set())

    def read():
        while True:
            msg = requests.get(url, params=cur.params(), timeout=5).json()
            upd = cur.apply(msg)
            for t in (GPU, HOST):
                if upd.snapshot is not None:
                    view[t].clear()
                    view[t].update(upd.snapshot[t].tolist())
                else:
                    view[t].difference_update(upd.removed[t].tolist())
                    view[t].update(upd.stored[t].tolist())
            if not msg.get("more"):
                return

    checks = []

    def on_iteration(driver):
        if driver.iteration % 3 == 0:
            feed.on_step(force=True)
            read()
            gpu, host = _truth(engine)
            assert view[GPU] == gpu and view[HOST] == host
            checks.append((len(gpu), len(host)))

    convs = harness.weka_conversations(files=["trace_0019.json", "trace_0086.json", "trace_0624.json"], max_turns=6)
    report = harness.WorkloadDriver(engine, convs, max_active=3, on_iteration=on_iteration).run()
    assert report.finished == report.requests
    feed.on_step(force=True)
    read()
    gpu, host = _truth(engine)
    assert view[GPU] == gpu and view[HOST] == host
    side = scheduler_side(engine)
    kept = {publish_id(b.digest) for b in list(side.index._blocks.values()) if b.on_gpu}
    assert gpu & host <= kept, "only kept restores (keep_restored_blocks) are in both tiers"
    assert any(h for _, h in checks) and any(g for g, _ in checks), checks
    info = cur.info
    assert info["gpu_blocks"] == 16 and info["host_blocks"] == 24 and info["block_size"] == side.block_size
    assert info["namespace_key"].root == side.namespaces.for_adapter(None).root
    feed.server.shutdown()


def test_feed_address_is_validated_and_off_by_default(monkeypatch):
    monkeypatch.delenv(ENV_FEED_ADDR, raising=False)
    assert attach_from_env(object(), object()) is None
    with pytest.raises(ValueError, match=ENV_FEED_ADDR):
        parse_addr("nohost")
    assert parse_addr("0.0.0.0:23400") == ("0.0.0.0", 23400)


def test_events_alone_keep_the_gpu_view_exact_after_requests_finish(monkeypatch):
    """No periodic trie walk: finished requests' paths and evictions alone give the GPU tier
    (while requests run, the feed may lack their newest blocks, never show a block that left)."""
    engine = build_host_tier_engine(harness.HarnessModel(dtype=torch.float16),
                                    harness.HarnessCacheSpec(num_gpu_blocks=16, quant_policy=0,
                                                             max_prefill_token_num=512),
                                    HostTierSpec(host_slots=24, min_restore_tokens=16))
    side = scheduler_side(engine)
    monkeypatch.setenv(ENV_FEED_ADDR, "127.0.0.1:0")
    feed = attach_from_env(side, engine.scheduler)
    feed.gpu_refresh_s = float("inf")  # on_step never walks
    convs = harness.weka_conversations(files=["trace_0019.json", "trace_0086.json", "trace_0624.json"], max_turns=6)
    seen = []

    def on_iteration(driver):
        if not driver.pending() or driver.iteration % 5:
            return
        gpu, host = _truth(engine)
        got_gpu, got_host = feed.publisher.contents()
        assert got_host == host
        assert got_gpu <= gpu  # never a block the trie no longer holds (evictions are withdrawn at once)
        seen.append(len(got_gpu))

    harness.WorkloadDriver(engine, convs, max_active=3, on_iteration=on_iteration).run()
    gpu, host = _truth(engine)
    got_gpu, got_host = feed.publisher.contents()
    assert got_host == host and got_gpu == gpu, (len(got_gpu), len(gpu), len(got_gpu ^ gpu))
    assert any(seen)
    feed.server.shutdown()


def test_ipv6_feed_addresses_are_parsed_and_served_by_an_ipv6_socket():
    """Tests bind 127.0.0.1 only, so the IPv6 path is checked up to the socket family it picks."""
    import socket

    from lmdeploy_hostcache.integration.cache_state_feed import address_family

    assert parse_addr("[::1]:23400") == ("::1", 23400)
    with pytest.raises(ValueError, match=r"\[IPV6\]:PORT"):
        parse_addr("::1:23400")                      # ambiguous without brackets: refused, not misread
    assert address_family(parse_addr("[fd00::5]:23400")[0]) == socket.AF_INET6
    assert address_family(parse_addr("10.0.0.5:23400")[0]) == socket.AF_INET


def test_idle_connections_cannot_pile_up_threads_in_the_engine(monkeypatch):
    """Connections that send nothing are closed after FEED_SOCKET_TIMEOUT_S, and at most
    FEED_MAX_CONNECTIONS are served at once (more are refused), so clients cannot pin threads."""
    import socket
    import threading
    import time
    import urllib.request
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration import cache_state_feed

    monkeypatch.setattr(cache_state_feed, "FEED_SOCKET_TIMEOUT_S", 0.5)
    server = serve_feed(SimpleNamespace(enabled=True, poll=lambda *a: {"ok": 1}), "127.0.0.1", 0)
    port = server.server_address[1]
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= cache_state_feed.FEED_MAX_CONNECTIONS
        time.sleep(1.0)                                 # past the idle timeout: the slots are free again
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{FEED_PATH}", timeout=5) as r:
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
        server.shutdown()
