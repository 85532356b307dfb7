"""`lmdeploy serve proxy --help` lists cache_aware after install (post-import hook); the stock
strategies pass through the wrapped command untouched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LMDEPLOY = str(Path(sys.executable).with_name("lmdeploy"))


def _help(env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([LMDEPLOY, "serve", "proxy", "--help"], capture_output=True, text=True, timeout=120,
                          env=env)


def test_proxy_help_lists_cache_aware_next_to_the_stock_strategies():
    p = _help()
    assert p.returncode == 0, p.stderr
    assert "{random,min_expected_latency,min_observed_latency,cache_aware}" in p.stdout
    assert "--cache-aware-model" in p.stdout


def test_feed_url_is_the_node_url_or_its_host_at_the_feed_port():
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService

    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
            "block_size": 64, "gpu_blocks": 16, "host_blocks": 0}
    assert RoutingService(opts).feed_url("http://10.0.0.5:23333/") == "http://10.0.0.5:23333/hostcache/cache_state"
    opts["feed_port"] = 23400
    assert RoutingService(opts).feed_url("http://10.0.0.5:23333") == "http://10.0.0.5:23400/hostcache/cache_state"


def test_feed_url_mapping_wins_and_a_malformed_pair_is_refused_naming_the_option(monkeypatch):
    import argparse

    import pytest

    from lmdeploy_hostcache.integration import proxy_routing
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService, parse_feed_urls

    urls = parse_feed_urls(["http://127.0.0.1:23333/=http://127.0.0.1:24001",
                            "http://127.0.0.1:23334=http://127.0.0.1:24002/hostcache/cache_state"])
    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": 23400, "balance": 1.3,
            "block_size": 64, "gpu_blocks": 16, "host_blocks": 0, "feed_urls": urls}
    svc = RoutingService(opts)
    assert svc.feed_url("http://127.0.0.1:23333") == "http://127.0.0.1:24001/hostcache/cache_state"
    assert svc.feed_url("http://127.0.0.1:23334/") == "http://127.0.0.1:24002/hostcache/cache_state"
    assert svc.feed_url("http://127.0.0.1:23335") == "http://127.0.0.1:23400/hostcache/cache_state"  # unmapped

    monkeypatch.setattr(proxy_routing, "install", lambda opts: None)
    wrapped = proxy_routing.wrap_proxy(lambda args: None)
    p = argparse.ArgumentParser()
    p.add_argument("--routing-strategy", choices=["random", "min_expected_latency", "min_observed_latency"])
    proxy_routing.add_proxy_arguments(p)
    with pytest.raises(SystemExit, match="--cache-aware-feed-url: expected NODE_URL=FEED_URL"):
        wrapped(p.parse_args(["--routing-strategy", "cache_aware", "--cache-aware-feed-url", "127.0.0.1:24001"]))


def test_stock_strategies_pass_through_untouched_and_cache_aware_installs(monkeypatch):
    import argparse

    from lmdeploy_hostcache.integration import proxy_routing

    seen, installed = [], []
    monkeypatch.setattr(proxy_routing, "install", lambda opts: installed.append(opts))
    wrapped = proxy_routing.wrap_proxy(lambda args: seen.append(vars(args).copy()))
    p = argparse.ArgumentParser()
    p.add_argument("--routing-strategy", choices=["random", "min_expected_latency", "min_observed_latency"])
    p.add_argument("--serving-strategy", default="Hybrid")
    proxy_routing.add_proxy_arguments(p)
    wrapped(p.parse_args(["--routing-strategy", "random"]))
    assert seen[-1]["routing_strategy"] == "random" and not installed
    wrapped(p.parse_args(["--routing-strategy", "cache_aware", "--cache-aware-balance", "1.5"]))
    assert installed and installed[0]["balance"] == 1.5 and installed[0]["model"] is None
    assert seen[-1]["routing_strategy"] == proxy_routing.STOCK_DEFAULT  # what LMDeploy's enum knows


def test_without_a_tokenizer_the_log_says_text_prefix(caplog):
    import logging

    from lmdeploy_hostcache.integration.proxy_routing import RoutingService

    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
            "block_size": 64, "gpu_blocks": 16, "host_blocks": 0}
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.proxy_routing"):
        svc = RoutingService(opts)
    assert "text prefix" in caplog.text and svc.status()["mode"].startswith("text-prefix")


def test_a_feed_that_always_says_more_cannot_starve_the_other_nodes_and_an_invalid_one_keeps_its_index(caplog):
    """poll_once reads each node at most FEED_READS_PER_POLL times a round; a node whose feed stays invalid
    is warned about once and keeps the approximate index the proxy built from what it sent it."""
    import copy
    import logging
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration import proxy_routing
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService
    from lmdeploy_hostcache.routing.feed import FeedPublisher
    from lmdeploy_hostcache.routing.request import RoutingRequest
    from lmdeploy_hostcache.tier.digest import Namespace

    good, chatty, broken = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"
    pub = FeedPublisher(gpu_blocks=8, host_blocks=8, namespace=Namespace(model="m", block_size=4))
    reads = {good: 0, chatty: 0, broken: 0}

    class Session:
        def get(self, url, params=None, timeout=None, headers=None):
            node = next(n for n in reads if url.startswith(n))
            reads[node] += 1
            msg = copy.deepcopy(pub.poll(**(params or {})))   # the publisher's own info dict stays untouched
            if node == chatty:
                msg["more"] = True
            if node == broken:
                msg["info"]["speed"] = 1e9
            return SimpleNamespace(status_code=200, json=lambda msg=msg: msg)

    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
            "block_size": 4, "gpu_blocks": 16, "host_blocks": 0}
    svc = RoutingService(opts)
    svc._sync_nodes([good, chatty, broken])
    with svc.lock:   # the proxy sent the broken node a request: its approximate index holds the prompt
        d = svc.router.route(RoutingRequest(list(range(16))), [broken])
        svc.router.dispatched(d, RoutingRequest(list(range(16))))
    before = svc.router.nodes[broken].approx
    with caplog.at_level(logging.WARNING, logger=proxy_routing.logger.name):
        for _ in range(3):
            svc.poll_once(session=Session())
    assert reads[chatty] == 3 * proxy_routing.FEED_READS_PER_POLL and reads[good] == 3 and reads[broken] == 3
    assert svc.router.nodes[good].exact and svc.router.nodes[chatty].exact
    assert not svc.router.nodes[broken].exact and svc.router.nodes[broken].approx is before
    assert sum("invalid cache-state feed" in r.getMessage() for r in caplog.records) == 1


def test_a_feed_port_that_does_not_answer_leaves_the_node_routable_and_only_its_api_down_skips_it(caplog):
    """With --cache-aware-feed-port the feed is another server than the node's API: a stock node (no
    feed there) is routed to with an approximate model, not skipped. A node whose feed is read at its
    own API address and does not answer is down."""
    import logging

    import requests

    from lmdeploy_hostcache.integration import proxy_routing
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService

    class Refused:
        def get(self, url, params=None, timeout=None, headers=None):
            raise requests.exceptions.ConnectionError(f"refused: {url}")

    import socket

    api = socket.socket()                         # the node's API answers (a stock node without a feed)
    api.bind(("127.0.0.1", 0))
    api.listen(4)
    node = f"http://127.0.0.1:{api.getsockname()[1]}"
    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": 23400, "balance": 1.3,
            "block_size": 4, "gpu_blocks": 16, "host_blocks": 0}
    try:
        svc = RoutingService(opts)
        svc._sync_nodes([node])
        with caplog.at_level(logging.WARNING, logger=proxy_routing.logger.name):
            for _ in range(2):
                svc.poll_once(session=Refused())
        assert svc.router.nodes[node].healthy and not svc.router.nodes[node].exact
        assert sum("does not answer" in r.getMessage() for r in caplog.records) == 1
    finally:
        api.close()
    opts["feed_port"] = None                      # the feed is read at the node's API address
    same = RoutingService(opts)
    same._sync_nodes([node])
    same.poll_once(session=Refused())
    assert not same.router.nodes[node].healthy


def test_only_node_faults_bench_a_node():
    """A client's bad request (LMDeploy's 400 error object) does not put the node in the error cooldown;
    the proxy's own timeout answer, a server-side error and a non-JSON answer do."""
    import json

    from lmdeploy_hostcache.integration.proxy_routing import RoutingService, is_node_fault

    bad_request = json.dumps({"object": "error", "message": "max_tokens must be positive", "type": "invalid", "code": 400})
    assert not is_node_fault(bad_request)
    assert not is_node_fault(json.dumps({"id": "x", "object": "chat.completion", "choices": []}))
    assert is_node_fault(json.dumps({"object": "error", "message": "engine died", "code": 500}))
    assert is_node_fault(json.dumps({"object": "error", "message": "no code"}))
    assert is_node_fault(json.dumps({"error_code": 10302, "text": "api timeout"}))
    assert is_node_fault("<html>502 Bad Gateway</html>")
    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
            "block_size": 4, "gpu_blocks": 16, "host_blocks": 0}
    svc = RoutingService(opts)
    svc.node_error("http://127.0.0.1:5")          # before the poller ever saw the node: the cooldown holds
    assert not svc.router.nodes["http://127.0.0.1:5"].healthy


def test_more_nodes_than_the_table_holds_falls_back_to_stock_routing_with_one_warning(caplog):
    import logging
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration import proxy_routing
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService
    from lmdeploy_hostcache.routing.request import RoutingRequest

    opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
            "block_size": 4, "gpu_blocks": 16, "host_blocks": 0}
    limit = RoutingService(opts).router.table.max_nodes
    nodes = {f"http://127.0.0.1:{20000 + i}": None for i in range(limit + 1)}
    svc = RoutingService(opts, SimpleNamespace(nodes=nodes))
    with caplog.at_level(logging.WARNING, logger=proxy_routing.logger.name):
        for _ in range(3):
            proxy_routing._current.set(RoutingRequest(list(range(16))))
            assert svc.choose(list(nodes)) is None          # stock routing, no exception
        svc.poll_once(session=SimpleNamespace(get=None))     # nothing polled
    assert sum("at most" in r.getMessage() for r in caplog.records) == 1
    nodes.pop(next(iter(nodes)))                             # back to the limit: cache-aware again
    proxy_routing._current.set(RoutingRequest(list(range(16))))
    assert svc.choose(list(nodes)) in nodes
