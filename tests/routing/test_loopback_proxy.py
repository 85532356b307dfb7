"""The real ``lmdeploy serve proxy --routing-strategy cache_aware`` with stub nodes on 127.0.0.1.

One proxy process and four stub nodes (``stub_node.py``: LMDeploy's prompt processor on a tiny
model, the planner's GPU LRU over the real ``HostIndex`` host tier, a cache-state feed).  Phases,
in order, on the same processes:

1. a multi-turn chat replayed through the proxy over HTTP gives the same per-node hit rates
   (within 0.01) as the planner's cluster replay of the same requests with ``cache_aware``;
2. the proxy's digests for a chat request equal the node's (namespace root/seed + tokenizer);
3. a node joins mid-run in another namespace (tenant salt): its own blocks route to it; when it
   starts answering with errors it is skipped until its error cooldown ends;
4. a node's feed starts failing: it is routed on the approximate index and keeps serving;
5. a node leaves (``/nodes/remove``): no request goes to it afterwards;
6. a node dies (process killed): once the poller sees it down no request goes to it, and
   every request still succeeds;
7. load skew: a slow node holds queued prefill, so concurrent cold requests mostly go elsewhere.

Every process is killed in a ``finally``; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

HERE = Path(__file__).resolve().parent
LMDEPLOY = str(Path(sys.executable).with_name("lmdeploy"))
BS = 16
NODES = [("a", 64, 128), ("b", 64, 32), ("c", 32, 0)]   # name, GPU blocks, host blocks


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lmdeploy_hostcache.testing.models import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    try:
        specs = NODES + [("d", 24, 16)]
        for name, gpu, host in specs:
            port = _port()
            cmd = [sys.executable, str(HERE / "stub_node.py"), "--port", str(port), "--name", name,
                   "--model-path", tiny_model, "--gpu-blocks", str(gpu), "--host-blocks", str(host),
                   "--block-size", str(BS)] + (["--salt", "other-tenant"] if name == "d" else [])
            procs[name] = subprocess.Popen(cmd, stdout=open(log_dir / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)
            urls[name] = f"http://127.0.0.1:{port}"
        pport = _port()
        procs["proxy"] = subprocess.Popen(
            [LMDEPLOY, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(pport),
             "--routing-strategy", "cache_aware", "--cache-aware-model", tiny_model,
             "--cache-aware-feed-interval", "0.05", "--cache-aware-feed-timeout", "0.5",
             "--cache-aware-error-cooldown", "1",
             "--cache-aware-block-size", str(BS), "--cache-aware-gpu-blocks", "24", "--disable-cache-status"],
            stdout=open(log_dir / "proxy.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proxy = f"http://127.0.0.1:{pport}"
        for name, url in list(urls.items()) + [("proxy", proxy)]:
            _wait(lambda u=url, n=name: procs[n].poll() is None and requests.get(
                u + ("/hostcache/routing" if n == "proxy" else "/health"), timeout=1).ok, 150, f"{name} to start")
        yield {"proxy": proxy, "urls": urls, "procs": procs, "logs": log_dir}
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _register(proxy, url):
    r = requests.post(proxy + "/nodes/add", json={"url": url, "status": {"models": ["tiny"]}}, timeout=5)
    assert r.ok, r.text


def _status(proxy):
    return {n["name"]: n for n in requests.get(proxy + "/hostcache/routing", timeout=5).json()["nodes"]}


def _synced(proxy, urls):
    st = _status(proxy)
    for url in urls:
        s = requests.get(url + "/stub/stats", timeout=5).json()
        if url not in st or st[url]["feed_seq"] != s["seq"]:
            return False
    return True


def _chat(proxy, messages, **extra):
    r = requests.post(proxy + "/v1/chat/completions", json={"model": "tiny", "messages": messages, **extra},
                      timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["hostcache"]


SYSTEMS = ["You are a careful assistant for the billing team. Answer briefly. " * 3,
           "You are a helpful travel planner; always list three options. " * 3]


def _conversations(n_sessions=8, turns=5, tag="s"):
    """Requests in arrival order: (session, messages); sessions interleave, turns extend."""
    out, hist = [], {}
    for t in range(turns):
        for s in range(n_sessions):
            h = hist.setdefault(s, [{"role": "system", "content": SYSTEMS[s % 2]}])
            h.append({"role": "user", "content": f"{tag}{s} question {t}: " + "details " * (3 + (s * 7 + t) % 9)})
            out.append((s, [dict(m) for m in h]))
            h.append({"role": "assistant", "content": f"answer {t} for {tag}{s} " + "text " * (2 + t % 4)})
    return out


def _planner_rates(tiny_model, workload, names):
    """The planner's cluster replay of the same requests with the proxy's router."""
    from lmdeploy_hostcache.tier.digest import Namespace
    from lmdeploy_hostcache.planner.cluster_routing import CacheAwareClusterRouter
    from lmdeploy_hostcache.planner.replay import TwoTierCache

    sys.path.insert(0, str(HERE))
    import stub_node

    proc = stub_node.build_processor(tiny_model)
    ns = Namespace(model="tiny", block_size=BS, kv_format="native/kb64")
    caches = [TwoTierCache(g, h, "lru", BS) for _, g, h in NODES]
    router = CacheAwareClusterRouter(caches, names, BS, 0.2)
    chosen = []
    for _, msgs in workload:
        toks = asyncio.run(stub_node.encode(proc, "/v1/chat/completions", {"messages": msgs}))
        pr = stub_node.prepared(ns, toks)
        i = router.route(pr)
        chosen.append(NODES[i][0])
        caches[i].serve(pr)
        router.served(i)
    return [c.stats for c in caches], chosen


def test_loopback_cluster(cluster, tiny_model):
    proxy, urls, procs = cluster["proxy"], cluster["urls"], cluster["procs"]
    abc = [urls[n] for n, _, _ in NODES]
    for u in abc:
        _register(proxy, u)
    _wait(lambda: _synced(proxy, abc), 20, "first feeds")

    # 1. replay through the proxy, one request at a time, feeds synced between requests
    workload = _conversations()
    where = []
    for _, msgs in workload:
        where.append(_chat(proxy, msgs)["node"])
        _wait(lambda: _synced(proxy, abc), 20, "feeds to catch up")
    got = [requests.get(u + "/stub/stats", timeout=5).json() for u in abc]
    want, chosen = _planner_rates(tiny_model, workload, abc)
    assert where == chosen  # same decisions, request by request
    assert sum(g["requests"] for g in got) == len(workload)
    for g, w in zip(got, want):
        assert g["requests"] == w.requests
        rate = (g["gpu_hit_blocks"] + g["host_hit_blocks"]) / max(g["prompt_blocks"], 1)
        assert abs(rate - w.hit_rate) <= 0.01, (g, w)
    assert sum(g["gpu_hit_blocks"] + g["host_hit_blocks"] for g in got) > 0
    assert sum(g["requests"] > 0 for g in got) >= 2

    # 2. the proxy's digests equal the node's for a chat request
    from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
    from lmdeploy_hostcache.integration.proxy_routing import PromptEncoder
    from lmdeploy_hostcache.routing.feed import FeedCursor
    from lmdeploy_hostcache.routing.ids import publish_id
    from lmdeploy_hostcache.routing.request import RoutingRequest

    msgs = workload[-1][1]
    proxy_tokens = asyncio.run(PromptEncoder(tiny_model).encode("/v1/chat/completions",
                                                             {"model": "tiny", "messages": msgs}))
    sys.path.insert(0, str(HERE))
    import stub_node
    node_tokens = asyncio.run(stub_node.encode(stub_node.build_processor(tiny_model), "/v1/chat/completions",
                                               {"messages": msgs}))
    assert proxy_tokens == node_tokens
    cur = FeedCursor()
    cur.apply(requests.get(abc[0] + "/hostcache/cache_state", timeout=5).json())
    key = cur.info["namespace_key"]
    node_digests, _ = chain_digests(Namespace(model="tiny", block_size=BS, kv_format="native/kb64"), node_tokens)
    assert RoutingRequest(proxy_tokens).ids(key).tolist() == [publish_id(d) for d in node_digests]

    # 3. a node joins in another namespace; its blocks route to it, nobody else is credited
    d = urls["d"]
    _register(proxy, d)
    conv = [{"role": "system", "content": "Private tenant prompt about quarterly audits. " * 4},
            {"role": "user", "content": "first question about audits"}]
    r = requests.post(d + "/v1/chat/completions", json={"model": "tiny", "messages": conv}, timeout=10)
    assert r.ok
    _wait(lambda: _synced(proxy, abc + [d]), 20, "d's feed")
    conv += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "second question"}]
    res = _chat(proxy, conv)
    assert res["node"] == "d" and res["gpu_hit_blocks"] > 0
    st = _status(proxy)
    assert st[d]["exact"] and st[d]["predicted_gpu_hit_tokens"] > 0

    # 3b. d starts failing requests: the failed answer reaches the client, then d is skipped
    requests.post(d + "/stub/control", json={"fail": True}, timeout=5)
    conv += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "third question"}]
    r = requests.post(proxy + "/v1/chat/completions", json={"model": "tiny", "messages": conv}, timeout=30)
    assert r.json().get("object") == "error"  # it went to d (its prefix is there) and failed
    conv += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "fourth question"}]
    assert _chat(proxy, conv)["node"] != "d"
    requests.post(d + "/stub/control", json={"fail": False}, timeout=5)
    _wait(lambda: _status(proxy)[d]["healthy"], 10, "d's error cooldown to end")

    # 4. b's feed starts failing: approximate index, still served
    b = urls["b"]
    requests.post(b + "/stub/control", json={"feed": "error"}, timeout=5)
    _wait(lambda: not _status(proxy)[b]["exact"], 10, "b to fall back to the approximate index")
    assert _status(proxy)[b]["healthy"]

    # 5. c leaves
    c = urls["c"]
    before_c = requests.get(c + "/stub/stats", timeout=5).json()["requests"]
    requests.post(proxy + "/nodes/remove", json={"url": c}, timeout=5)
    # 6. a dies
    a = urls["a"]
    os.killpg(procs["a"].pid, signal.SIGTERM)
    procs["a"].wait(timeout=10)
    _wait(lambda: a in _status(proxy) and not _status(proxy)[a]["healthy"], 10, "a to be seen down")
    nodes_used = []
    for _, msgs in _conversations(n_sessions=4, turns=2, tag="late"):
        nodes_used.append(_chat(proxy, msgs)["node"])
    assert set(nodes_used) <= {"b", "d"}, nodes_used
    assert requests.get(c + "/stub/stats", timeout=5).json()["requests"] == before_c

    # 7. load skew: d is slow, so its queued prefill sends concurrent cold requests to b
    requests.post(d + "/stub/control", json={"delay": 1.5}, timeout=5)
    cold = [[{"role": "user", "content": f"cold request {i} " + "x" * (40 + i)}] for i in range(8)]

    def send(m):
        time.sleep(0.1 * cold.index(m))
        return _chat(proxy, m)["node"]

    with ThreadPoolExecutor(8) as ex:
        where = list(ex.map(send, cold))
    assert where.count("b") > where.count("d"), where
