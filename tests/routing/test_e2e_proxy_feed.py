"""A real ``lmdeploy serve api_server`` with the host tier publishing its feed, behind the real
``lmdeploy serve proxy --routing-strategy cache_aware`` (CPU, LMDeploy's real engine and server
through ``lmdeploy_hostcache.testing``; everything on 127.0.0.1).

The engine process serves its cache-state feed (``LMDEPLOY_HOSTCACHE_FEED_ADDR``); the proxy
reads it (``--cache-aware-feed-port``) and tokenizes requests with the tiny model's tokenizer and
chat template. After the first turn of a chat, the proxy must predict GPU hits for the second
turn: the ids it computes from the request equal the ids the engine published for its own trie
blocks, i.e. the proxy's digests equal the node's on the real engine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.e2e

LMDEPLOY = str(Path(sys.executable).with_name("lmdeploy"))
COMMON = ["--cache-block-seq-len", "16", "--session-len", "1024", "--max-batch-size", "2", "--num-gpu-blocks", "64"]
GREEDY = {"max_tokens": 2, "temperature": 0, "top_k": 1, "ignore_eos": True}


def _wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (requests.RequestException, IndexError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(proxy):
    """Stop the proxy's process group (SIGTERM, then SIGKILL after 10 s)."""
    if proxy is not None and proxy.poll() is None:
        os.killpg(proxy.pid, signal.SIGTERM)
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.pid, signal.SIGKILL)


def test_real_node_feed_behind_the_real_proxy(tmp_path):
    from lmdeploy_hostcache.testing.models import write_tiny_model
    from lmdeploy_hostcache.testing.server import api_server, free_port

    model = str(write_tiny_model(tmp_path / "tiny", "llama", seed=1))
    fport, pport = free_port(), free_port()
    proxy = None
    with api_server(model, host_cache_gb=1, extra_args=COMMON, log_dir=str(tmp_path),
                    env={"LMDEPLOY_HOSTCACHE_FEED_ADDR": f"127.0.0.1:{fport}"}) as srv:
        try:
            proxy = subprocess.Popen(
                [LMDEPLOY, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(pport),
                 "--routing-strategy", "cache_aware", "--cache-aware-model", model,
                 "--cache-aware-feed-port", str(fport), "--cache-aware-feed-interval", "0.1",
                 "--disable-cache-status"],
                stdout=open(tmp_path / "proxy.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
            purl = f"http://127.0.0.1:{pport}"
            _wait(lambda: requests.get(purl + "/hostcache/routing", timeout=1).ok, 120, "the proxy")
            r = requests.post(purl + "/nodes/add", json={"url": srv.url, "status": {"models": [model]}}, timeout=5)
            assert r.ok, r.text

            def node():
                return requests.get(purl + "/hostcache/routing", timeout=5).json()["nodes"][0]

            _wait(lambda: node()["exact"] and node()["has_feed"], 30, "the node's feed at the proxy")
            info = node()
            assert info["block_size"] == 16 and info["gpu_blocks"] == 64 and info["host_blocks"] > 0

            msgs = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog, " * 4}]
            r = requests.post(purl + "/v1/chat/completions", json={"model": model, "messages": msgs, **GREEDY},
                              timeout=300)
            assert r.status_code == 200 and r.json()["choices"], r.text
            first = node()
            assert first["requests"] == 1 and first["predicted_gpu_hit_tokens"] == 0
            feed = f"http://127.0.0.1:{fport}/hostcache/cache_state"
            _wait(lambda: node()["feed_seq"] == requests.get(feed, timeout=5).json()["seq"] > 0, 30,
                  "the proxy to read the first turn's blocks")

            msgs += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or ""},
                     {"role": "user", "content": "and then?"}]
            r = requests.post(purl + "/v1/chat/completions", json={"model": model, "messages": msgs, **GREEDY},
                              timeout=300)
            assert r.status_code == 200, r.text
            second = node()
            predicted = second["predicted_gpu_hit_tokens"]
            # the first prompt is ~190 tokens: its full 16-token blocks are a prefix of the second
            assert predicted >= 16 * 8 and predicted % 16 == 0, second
        finally:
            _stop(proxy)


def test_two_real_nodes_behind_the_real_proxy_keep_each_chat_on_its_node(tmp_path):
    """Two real CPU api_servers (host tier on, each publishing its feed on its own port) behind the
    real proxy: two chats start on different nodes (balance guard), and each chat's second turn is
    routed to the node whose published blocks hold its first turn (predicted GPU hits there)."""
    import contextlib

    from lmdeploy_hostcache.testing.models import write_tiny_model
    from lmdeploy_hostcache.testing.server import api_server, free_port

    model = str(write_tiny_model(tmp_path / "tiny", "llama", seed=1))
    feed_ports = [free_port(), free_port()]
    pport = free_port()
    proxy = None
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(api_server(model, host_cache_gb=1, extra_args=COMMON, log_dir=str(tmp_path),
                                                  env={"LMDEPLOY_HOSTCACHE_FEED_ADDR": f"127.0.0.1:{fp}"}))
                   for fp in feed_ports]
        try:
            feed_args = []
            for srv, fp in zip(servers, feed_ports):
                feed_args += ["--cache-aware-feed-url", f"{srv.url}=http://127.0.0.1:{fp}"]
            proxy = subprocess.Popen(
                [LMDEPLOY, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(pport),
                 "--routing-strategy", "cache_aware", "--cache-aware-model", model,
                 "--cache-aware-feed-interval", "0.1", "--disable-cache-status", *feed_args],
                stdout=open(tmp_path / "proxy.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
            purl = f"http://127.0.0.1:{pport}"
            _wait(lambda: requests.get(purl + "/hostcache/routing", timeout=1).ok, 120, "the proxy")
            for srv in servers:
                r = requests.post(purl + "/nodes/add", json={"url": srv.url, "status": {"models": [model]}}, timeout=5)
                assert r.ok, r.text

            def nodes():
                return {n["name"].rstrip("/"): n for n in requests.get(purl + "/hostcache/routing", timeout=5)
                        .json()["nodes"]}

            _wait(lambda: len(nodes()) == 2 and all(n["exact"] and n["has_feed"] for n in nodes().values()), 60,
                  "both nodes' feeds at the proxy")

            def chat(msgs):
                before = nodes()
                r = requests.post(purl + "/v1/chat/completions",
                                  json={"model": model, "messages": msgs, **GREEDY}, timeout=300)
                assert r.status_code == 200 and r.json()["choices"], r.text
                after = nodes()
                served = [u for u in after if after[u]["requests"] == before[u]["requests"] + 1]
                assert len(served) == 1, (before, after)
                return served[0], r.json()["choices"][0]["message"]["content"] or "", before, after

            def wait_feeds_caught_up():
                for srv, fp in zip(servers, feed_ports):
                    feed = f"http://127.0.0.1:{fp}/hostcache/cache_state"
                    _wait(lambda: nodes()[srv.url.rstrip("/")]["feed_seq"]
                          == requests.get(feed, timeout=5).json()["seq"], 30, "the proxy to read the feeds")

            chats = {"a": [{"role": "user", "content": "the quick brown fox jumps over the lazy dog, " * 4}],
                     "b": [{"role": "user", "content": "pack my box with five dozen liquor jugs, " * 4}]}
            home = {}
            for name, msgs in chats.items():
                home[name], reply, _, _ = chat(msgs)
                msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
                wait_feeds_caught_up()
            assert home["a"] != home["b"], home   # the second chat did not herd onto the first one's node
            for name, msgs in chats.items():
                served, _, before, after = chat(msgs)
                assert served == home[name], (name, served, home)
                predicted = after[served]["predicted_gpu_hit_tokens"] - before[served]["predicted_gpu_hit_tokens"]
                assert predicted >= 16 * 8 and predicted % 16 == 0, (name, before[served], after[served])
        finally:
            _stop(proxy)
