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
    # the node's own restore-vs-prefill ratio (assumed figures here: 10k prefill tokens/s, 20 GB/s), not a constant
    assert side.block_transfer_bytes > 0
    assert info["host_weight"] == pytest.approx(10_000 * side.block_transfer_bytes / side.block_size / 20e9)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine():
    return build_host_tier_engine(harness.HarnessModel(dtype=torch.float16),
                                  harness.HarnessCacheSpec(num_gpu_blocks=16, quant_policy=0, max_prefill_token_num=512),
                                  HostTierSpec(host_slots=24, min_restore_tokens=16))


def test_closing_the_engine_stops_its_feed_and_frees_its_port(monkeypatch):
    """Engine close: reads are refused, the port can be bound again (a new engine in the same process
    serves its own feed there), and the closed feed is detached from the index and the eviction chain."""
    import socket

    import requests

    port = _free_port()
    monkeypatch.setenv(ENV_FEED_ADDR, f"127.0.0.1:{port}")
    engine = _engine()
    side = scheduler_side(engine)
    feed = side.feed or attach_from_env(side, engine.scheduler)
    url = f"http://127.0.0.1:{port}{FEED_PATH}"
    assert requests.get(url, timeout=5).status_code == 200
    lifecycle = engine.scheduler.block_trie._kv_lifecycle
    assert lifecycle._host_tier_observer != side.on_evict and len(side.index._listeners) == 1  # the feed's chain
    engine.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert side.feed is None and not feed.enabled
    assert side.index._listeners == [] and lifecycle._host_tier_observer == side.on_evict
    with socket.socket() as s:                            # the port is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    engine2 = _engine()
    try:
        feed2 = scheduler_side(engine2).feed or attach_from_env(scheduler_side(engine2), engine2.scheduler)
        assert feed2 is not None and feed2 is not feed
        assert requests.get(url, timeout=5).json()["epoch"] == feed2.poll()["epoch"] != feed.poll()["epoch"]
    finally:
        engine2.close()


def test_a_feed_whose_port_is_taken_attaches_nothing(monkeypatch, caplog):
    """The port is bound before the feed attaches: a failed bind leaves no listener and no observer."""
    import logging
    import socket

    engine = _engine()
    side = scheduler_side(engine)
    assert side.feed is None
    lifecycle = engine.scheduler.block_trie._kv_lifecycle
    observer, listeners = lifecycle._host_tier_observer, list(side.index._listeners)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv(ENV_FEED_ADDR, f"127.0.0.1:{taken.getsockname()[1]}")
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.cache_state_feed"):
            assert attach_from_env(side, engine.scheduler) is None
    assert "not started" in caplog.text
    assert side.feed is None and side.index._listeners == listeners and lifecycle._host_tier_observer is observer
    engine.close()


def test_installing_the_hook_again_keeps_the_served_feed_and_its_eviction_chain(monkeypatch):
    """With the feed address set before the build (the activated ``Scheduler.__init__`` installs the hook),
    one feed is served, and installing the hook again (the harness used to) keeps it and its GPU-eviction
    withdrawals: events alone give the exact GPU view."""
    from lmdeploy_hostcache.integration.connector import install_scheduler_hook

    monkeypatch.setenv(ENV_FEED_ADDR, f"127.0.0.1:{_free_port()}")
    engine = _engine()
    side = scheduler_side(engine)
    feed = side.feed
    assert feed is not None and len(side.index._listeners) == 1
    install_scheduler_hook(engine.scheduler)
    lifecycle = engine.scheduler.block_trie._kv_lifecycle
    assert side.feed is feed and len(side.index._listeners) == 1 and lifecycle._host_tier_observer is feed._observer
    feed.gpu_refresh_s = float("inf")  # on_step never walks: withdrawals come from the eviction chain only
    convs = harness.weka_conversations(files=["trace_0019.json", "trace_0086.json", "trace_0624.json"], max_turns=6)
    harness.WorkloadDriver(engine, convs, max_active=3).run()
    gpu, host = _truth(engine)
    got_gpu, got_host = feed.publisher.contents()
    assert got_host == host and got_gpu == gpu, (len(got_gpu), len(gpu), len(got_gpu ^ gpu))
    engine.close()


def test_slow_headers_cannot_hold_the_feed_slots(monkeypatch):
    """The request line and headers must all arrive within FEED_SOCKET_TIMEOUT_S (one deadline per
    connection, not per read): clients dribbling a header byte at a time are cut there, and a real
    read then gets its answer."""
    import socket
    import threading
    import time
    import urllib.request
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration import cache_state_feed

    monkeypatch.setattr(cache_state_feed, "FEED_SOCKET_TIMEOUT_S", 0.5)
    server = serve_feed(SimpleNamespace(enabled=True, poll=lambda *a: {"ok": 1}), "127.0.0.1", 0,
                        api_keys=("secret",))
    port = server.server_address[1]
    stop, cut = threading.Event(), []

    def dribble():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        try:
            s.sendall(b"GET / HTTP/1.1\r\n")
            while not stop.is_set():
                s.sendall(b"X")                    # one header byte, well inside the per-read timeout
                time.sleep(0.1)
        except OSError:
            cut.append(time.monotonic() - t0)
        finally:
            s.close()

    threads = [threading.Thread(target=dribble, daemon=True) for _ in range(cache_state_feed.FEED_MAX_CONNECTIONS)]
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 5
        for t in threads:                           # each dribbler ends when its connection is cut
            t.join(max(0.0, end - time.monotonic()))
        assert len(cut) == len(threads) and max(cut) < 1.5, cut   # from its connect: 0.5 s and a send or two
        req = urllib.request.Request(f"http://127.0.0.1:{port}{FEED_PATH}", headers={"Authorization": "Bearer secret"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        server.shutdown()
        server.server_close()


def test_the_harness_installs_the_scheduler_hook_once(monkeypatch):
    """The activated ``Scheduler.__init__`` installs the hook; the harness does not install it again."""
    from lmdeploy_hostcache.integration import connector

    calls, install = [], connector.install_scheduler_hook
    monkeypatch.setattr(connector, "install_scheduler_hook", lambda s: (calls.append(s), install(s))[1])
    monkeypatch.delenv(ENV_FEED_ADDR, raising=False)
    engine = _engine()
    assert calls == [engine.scheduler] and scheduler_side(engine)._trie is engine.scheduler.block_trie
    engine.close()


def test_a_data_parallel_engine_warns_that_the_feed_address_is_shared(monkeypatch, caplog):
    """Every DP engine reads the same LMDEPLOY_HOSTCACHE_FEED_ADDR (docs/routing.md): say so, naming the rank."""
    import logging
    from types import SimpleNamespace

    side = SimpleNamespace(feed=None, data_parallel=2, dp_rank=1)
    monkeypatch.setenv(ENV_FEED_ADDR, "127.0.0.1:0")
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.cache_state_feed"):
        assert attach_from_env(side, scheduler=None) is None   # not a real engine: not started either
    assert "all 2 data-parallel engines" in caplog.text and "DP rank 1" in caplog.text
    caplog.clear()
    side.data_parallel, side.dp_rank = 1, None                # no DP: no such warning
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.cache_state_feed"):
        attach_from_env(side, scheduler=None)
    assert "data-parallel" not in caplog.text and "not started" in caplog.text


def _port_freed(port: int, within_s: float) -> bool:
    """Whether nothing accepts connections on 127.0.0.1:``port`` within ``within_s`` seconds."""
    import socket
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


_ORPHAN_SCRIPT = r'''
import multiprocessing as mp, os, sys, time, types

def engine(q):
    from lmdeploy_hostcache.integration.cache_state_feed import serve_feed
    server = serve_feed(types.SimpleNamespace(enabled=True, poll=lambda *a: {"ok": 1}), "127.0.0.1", 0)
    q.put((server.server_address[1], os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ctx.Process(target=engine, args=(q,)).start()
    port, pid = q.get(timeout=60)
    print(port, pid, flush=True)
    time.sleep(120)
'''


def test_an_engine_process_whose_api_server_died_stops_its_feed_and_frees_the_port(tmp_path):
    """``lmdeploy serve api_server`` runs the engine in a multiprocessing child; SIGKILL of the server's main
    process leaves that engine running. Its feed must not go on publishing a node that is gone (a proxy
    would route on it, and a node restarted at the address could not bind its own feed): it answers 503
    and frees the port."""
    import http.client
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    script = tmp_path / "server.py"
    script.write_text(_ORPHAN_SCRIPT)
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    engine_pid = None
    try:
        port, engine_pid = map(int, server.stdout.readline().split())
        url = f"http://127.0.0.1:{port}{FEED_PATH}"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
        server.kill()                                   # the api_server's main process, SIGKILL
        server.wait(10)
        try:                                            # 503 if a poll comes first; the port closes anyway
            urllib.request.urlopen(url, timeout=5)
            pytest.fail("the orphaned engine still answered its feed")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass                                        # refused, or closed under the read
        assert _port_freed(port, 10), "the orphaned engine kept the feed's port"
    finally:
        server.kill()
        if engine_pid:
            try:
                os.kill(engine_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_engine_with_no_multiprocessing_parent_is_never_orphaned():
    from lmdeploy_hostcache.integration import cache_state_feed

    assert cache_state_feed._orphaned() is False        # the test process: no multiprocessing parent


def test_the_parent_watcher_ends_with_its_feed_and_fires_only_for_a_live_one(monkeypatch, caplog):
    """A feed closed before the parent dies ends its watcher thread and is never reported orphaned; a live
    feed is closed (port freed) when the parent's sentinel fires."""
    import multiprocessing
    import os
    import threading
    import time
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration.cache_state_feed import NodeCacheFeed

    parent_r, parent_w = os.pipe()                      # the parent's sentinel: readable once it "dies"
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: SimpleNamespace(sentinel=parent_r))

    def watchers():
        return sum(t.name == "hostcache-feed-parent" for t in threading.enumerate())

    base = watchers()
    closed = serve_feed(SimpleNamespace(enabled=True, poll=lambda *a: {"ok": 1}), "127.0.0.1", 0)
    assert watchers() == base + 1
    NodeCacheFeed.close(SimpleNamespace(lock=threading.Lock(), server=closed, enabled=True,
                                        side=SimpleNamespace(index=SimpleNamespace(remove_listener=lambda *a: None)),
                                        _listener=(), _lifecycle=None, _observer=None, _first=None))
    deadline = time.monotonic() + 5
    while watchers() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watchers() == base                           # ended with its feed
    live = serve_feed(SimpleNamespace(enabled=True, poll=lambda *a: {"ok": 1}), "127.0.0.1", 0)
    port = live.server_address[1]
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache"):
        os.close(parent_w)                              # the parent dies
        assert _port_freed(port, 5), "the live feed kept its port after its parent died"
    gone = [r.getMessage() for r in caplog.records if "api_server is gone" in r.getMessage()]
    assert len(gone) == 1 and str(port) in gone[0]      # the closed feed logged nothing
    os.close(parent_r)


def test_the_feed_publishes_salted_paths_that_only_the_same_salt_matches(monkeypatch):
    """A salted request's GPU path is published chained from its salted root (the salt stays in the node):
    the proxy's ids for a request with that salt match it, another salt's and an unsalted request's do not.
    Before, salted GPU paths were never published, so a tenant's prefix still on a node's GPU looked
    uncached to the router (its host-tier blocks were published)."""
    import numpy as np

    from lmdeploy_hostcache.integration.salted_trie import install_salted_trie
    from lmdeploy_hostcache.routing.feed import NamespaceKey
    from lmdeploy_hostcache.routing.request import RoutingRequest

    engine = build_host_tier_engine(harness.HarnessModel(dtype=torch.float16),
                                    harness.HarnessCacheSpec(num_gpu_blocks=32, quant_policy=0,
                                                             max_prefill_token_num=512),
                                    HostTierSpec(host_slots=8, min_restore_tokens=16))
    install_salted_trie(engine.scheduler.block_trie)
    side = scheduler_side(engine)
    monkeypatch.setenv(ENV_FEED_ADDR, "127.0.0.1:0")
    feed = attach_from_env(side, engine.scheduler)
    try:
        bs = side.block_size
        prompt = np.random.default_rng(5).integers(1, 30000, size=4 * bs + 3)
        h = engine.add_request(prompt, 2)
        engine.sequence_of(h.session_id).cache_salt = "tenant-a"
        while not h.finished:
            engine.step()
        for force in (False, True):     # the request's end published it; a whole walk keeps it
            if force:
                feed.on_step(force=True)
            gpu, _ = feed.publisher.contents()
            key = NamespaceKey.of(side.namespaces.for_adapter(None))
            ids = {salt: set(RoutingRequest(prompt.tolist(), partition=salt).ids(key).tolist())
                   for salt in ("tenant-a", "tenant-b", "")}
            assert len(ids["tenant-a"]) >= 4 and ids["tenant-a"] <= gpu
            assert not ids["tenant-b"] & gpu and not ids[""] & gpu
    finally:
        feed.close()


def test_the_published_host_weight_follows_the_nodes_calibration_and_block_bytes(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration.cache_state_feed import node_host_weight
    from lmdeploy_hostcache.restore_cost import ENV_CALIBRATION
    from lmdeploy_hostcache.routing.cost import DEFAULT_HOST_WEIGHT

    side = SimpleNamespace(block_transfer_bytes=64 * 131072, block_size=64)      # Llama-3-8B bf16: 128 KiB/token
    monkeypatch.delenv(ENV_CALIBRATION, raising=False)
    assert node_host_weight(side) == pytest.approx(10_000 * 131072 / 20e9)       # the assumed figures
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"restore_gbps": 50, "prefill_tokens_per_s": 40_000, "restore_overhead_ms": 5}))
    monkeypatch.setenv(ENV_CALIBRATION, str(cal))
    assert node_host_weight(side) == pytest.approx(40_000 * 131072 / 50e9)       # the kit's measured ones
    assert node_host_weight(SimpleNamespace(block_transfer_bytes=0, block_size=64)) == DEFAULT_HOST_WEIGHT
    cal.write_text("not json")
    assert node_host_weight(side) == DEFAULT_HOST_WEIGHT                          # unusable: the default
    side.block_transfer_bytes *= 100                                              # restoring dearer than prefill
    monkeypatch.delenv(ENV_CALIBRATION)
    assert node_host_weight(side) == 1.0                                          # clamped, as the router expects
