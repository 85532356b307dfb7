"""Issue 16, protected cache-state surfaces: keyed published ids, an authenticated node feed, the
proxy sending its credentials, loopback by default."""
from __future__ import annotations

import pytest
import requests

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.integration import cache_state_feed as csf
from lmdeploy_hostcache.routing import ids
from lmdeploy_hostcache.routing.feed import FEED_PATH, FeedPublisher
from lmdeploy_hostcache.routing.table import GPU

SECRET = "cluster-secret-0123456789"


def _digests():
    ns = Namespace(model="m", block_size=4)
    return chain_digests(ns, list(range(40)))[0]


def test_unkeyed_ids_are_unchanged_without_a_secret(monkeypatch):
    monkeypatch.delenv(ids.CLUSTER_SECRET_ENV, raising=False)
    for d in _digests():
        fold = (d ^ (d >> 64)) & ((1 << 64) - 1)
        assert ids.publish_id(d) == (fold if fold >= 2 else fold + 2)


def test_keyed_ids_depend_on_the_secret_and_not_only_on_the_digest(monkeypatch):
    ds = _digests()
    monkeypatch.setenv(ids.CLUSTER_SECRET_ENV, SECRET)
    keyed = [ids.publish_id(d) for d in ds]
    assert keyed == [ids.publish_id(d) for d in ds]          # stable for one secret
    assert keyed == ids.publish_ids(ds).tolist()
    assert all(k >= ids.RESERVED_IDS for k in keyed)
    unkeyed = [ids.publish_id(d, keyed=False) for d in ds]
    assert not set(keyed) & set(unkeyed)                      # an observer's guess (bare fold) misses
    monkeypatch.setenv(ids.CLUSTER_SECRET_ENV, SECRET + "x")
    assert not set(keyed) & {ids.publish_id(d) for d in ds}   # another cluster's ids do not match


def test_a_short_secret_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ids.CLUSTER_SECRET_ENV, "short")
    with pytest.raises(ValueError, match=ids.CLUSTER_SECRET_ENV):
        ids.publish_id(12345)


def test_node_feed_and_proxy_request_ids_agree_under_one_secret(monkeypatch):
    from lmdeploy_hostcache.routing.request import RoutingRequest
    from lmdeploy_hostcache.routing.feed import NamespaceKey

    monkeypatch.setenv(ids.CLUSTER_SECRET_ENV, SECRET)
    ns = Namespace(model="m", block_size=4)
    tokens = list(range(40))
    pub = FeedPublisher(gpu_blocks=8, host_blocks=8, namespace=ns)
    for d in chain_digests(ns, tokens)[0]:
        pub.stored(GPU, d)
    gpu, _ = pub.contents()
    assert set(RoutingRequest(tokens).ids(NamespaceKey.of(ns)).tolist()) == gpu


class _Feed:
    enabled = True

    def poll(self, epoch=None, since=None, max_events=None):
        return {"ok": True}


def test_a_feed_read_without_credentials_is_refused():
    server = csf.serve_feed(_Feed(), "127.0.0.1", 0, api_keys=("k-one", "k-two"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{FEED_PATH}"
        r = requests.get(url, timeout=5)
        assert r.status_code == 401 and r.content == b""
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert requests.get(url, headers={"Authorization": "Basic k-one"}, timeout=5).status_code == 401
        r = requests.get(url, headers={"Authorization": "Bearer k-two"}, timeout=5)
        assert r.status_code == 200 and r.json() == {"ok": True}
    finally:
        server.shutdown()
        server.server_close()


def test_an_unauthenticated_feed_is_loopback_only(monkeypatch):
    monkeypatch.delenv(csf.ENV_FEED_UNAUTHENTICATED, raising=False)
    assert csf.parse_addr("23400") == ("127.0.0.1", 23400)
    for host in ("127.0.0.1", "::1", "localhost"):
        csf.check_exposure(host, ())
    with pytest.raises(ValueError, match=csf.ENV_FEED_API_KEYS):
        csf.check_exposure("0.0.0.0", ())
    csf.check_exposure("0.0.0.0", ("k",))
    monkeypatch.setenv(csf.ENV_FEED_UNAUTHENTICATED, "1")
    csf.check_exposure("0.0.0.0", ())
    assert csf.feed_api_keys({csf.ENV_FEED_API_KEYS: " a, ,b "}) == ("a", "b")


def test_the_proxy_sends_its_feed_key(monkeypatch):
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService

    class Nodes:
        nodes = {}

    pub = FeedPublisher(gpu_blocks=8, host_blocks=8, namespace=Namespace(model="m", block_size=4))

    class Feed:
        enabled = True

        def poll(self, epoch=None, since=None, max_events=None):
            return pub.poll(epoch, since, max_events)

    server = csf.serve_feed(Feed(), "127.0.0.1", 0, api_keys=("node-key",))
    try:
        node = f"http://127.0.0.1:{server.server_address[1]}"
        Nodes.nodes = {node: None}
        opts = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "balance": 1.3,
                "block_size": 4, "gpu_blocks": 8, "host_blocks": 0, "feed_api_key": None}
        monkeypatch.delenv("LMDEPLOY_HOSTCACHE_FEED_API_KEY", raising=False)
        svc = RoutingService(opts, node_manager=Nodes())
        svc.poll_once()
        assert not svc.router.nodes[node].exact          # refused: no key
        svc = RoutingService(dict(opts, feed_api_key="node-key"), node_manager=Nodes())
        svc.poll_once()
        assert svc.router.nodes[node].exact              # the node's feed applied
    finally:
        server.shutdown()
        server.server_close()


def test_the_engine_does_not_start_an_open_feed_on_a_public_address(monkeypatch, caplog):
    import logging

    monkeypatch.setenv(csf.ENV_FEED_ADDR, "0.0.0.0:0")
    monkeypatch.delenv(csf.ENV_FEED_API_KEYS, raising=False)
    monkeypatch.delenv(csf.ENV_FEED_UNAUTHENTICATED, raising=False)

    class Side:
        feed = None

    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.cache_state_feed"):
        assert csf.attach_from_env(Side(), scheduler=None) is None
    assert Side.feed is None and csf.ENV_FEED_API_KEYS in caplog.text
