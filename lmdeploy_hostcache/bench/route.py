"""Routing decision time and proxy memory per cached block (``lmdeploy-hostcache bench route``).

For each node count (default 4 and 16) it builds the proxy's own routing service
(``integration.proxy_routing.RoutingService``: the router ``make_router`` configures for
``lmdeploy serve proxy``, 64 node slots, the table's default initial size) with every node exact
and holding ``--blocks-per-node`` cached blocks (default 1M; a tenth in the GPU tier, the rest on
host), loaded by the proxy's poller (``poll_once``) from real feed snapshot messages (the
``FeedPublisher`` format: base64 ids, the node's ``info``), so parsing, validation and the chunked
apply under the proxy's lock are all measured.  Then it times the proxy's per-request router work,
``choose`` (lock, route, dispatched) + ``finished`` of its ticket, over ``--requests`` prompts of
``--prompt-blocks`` blocks whose leading blocks are cached on one node (a random run of that
node's contents) and the rest new.  It also times turning a prompt's tokens into published ids
(chained xxh3-128 + ``publish_id``), which the proxy does once per namespace.

``--compare CLUSTER_YAML [--trace PATH | --chat-sessions N]`` instead replays a trace (or the built-in
chat generator, ``planner.generator.ChatWorkload`` with N sessions) over a cluster with every routing
policy and one pooled node (the tables in docs/routing.md).

Printed figures are measured in this run on this machine: median and p99 decision time per
request, the id-chaining time per request, the load time and the longest hold of the proxy's lock
while loading, and memory per cached block (the table's bytes over the cached (node, block) pairs,
and the process RSS growth over the same pairs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..planner.cli import _nonneg_int

DEFAULT_NODES = (4, 16)


class _TimingOption(argparse.Action):
    """Stores the value and records the option in ``timing_given``: the timing run's options, which
    ``--compare`` (a trace replay over a cluster file's nodes) would ignore, so it refuses them."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.timing_given = [*(getattr(namespace, "timing_given", None) or ()), option_string]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", nargs="+", type=int, default=list(DEFAULT_NODES), metavar="N", action=_TimingOption,
                   help="node counts to measure (default 4 16)")
    p.add_argument("--blocks-per-node", type=int, default=1_000_000, metavar="B", action=_TimingOption,
                   help="cached blocks per node (default 1,000,000)")
    p.add_argument("--requests", type=int, default=2000, action=_TimingOption,
                   help="timed routing decisions per node count (default 2000)")
    p.add_argument("--prompt-blocks", type=int, default=64, action=_TimingOption,
                   help="full blocks per prompt (default 64)")
    p.add_argument("--block-size", type=int, default=64, action=_TimingOption, help="tokens per block (default 64)")
    p.add_argument("--seed", type=_nonneg_int, default=0, action=_TimingOption,
                   help="seed of the timed prompts (default 0)")
    p.add_argument("--compare", metavar="CLUSTER_YAML", default=None,
                   help="instead of timing: replay --trace over this cluster with every routing policy "
                        "(random, session, prefix, cache_aware) and one pooled node of the same total capacity, "
                        "and print hit rates, requests per node and the largest prefill share")
    p.add_argument("--trace", metavar="PATH", default=None,
                   help="trace for --compare, read as plan reads it (Mooncake layout, a capture, WEKA session "
                        "files; default: the bundled conversation trace)")
    p.add_argument("--chat-sessions", type=int, default=None, metavar="N",
                   help="for --compare: replay the built-in chat generator (N sessions, 64-token blocks, seed 0, "
                        "each reply's kept blocks named as plan --chat does) instead of a trace")
    p.add_argument("--without-session-keys", action="store_true",
                   help="for --compare: replay every request as one whose client sent no session key (no "
                        "session_id or user), so cache_aware routes without session affinity")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check(args) -> None:
    # upper bounds: the routing table is sized from these, so a typo must not ask for terabytes
    for name, low, high in (("blocks_per_node", 1, 10**8), ("requests", 1, 10**7), ("prompt_blocks", 1, 10**6),
                            ("block_size", 1, 1 << 16)):
        v = getattr(args, name)
        if not low <= v <= high:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {v}")
    for n in args.nodes:
        if not 1 <= n <= 64:
            raise ValueError(f"--nodes: each count must be in [1, 64], got {n}")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _TimedLock:
    """The service's RLock, recording how long it is held (outermost acquire to release)."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.RLock()
        self._depth = 0
        self._since = 0.0
        self.longest = 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._depth += 1
            if self._depth == 1:
                self._since = time.perf_counter()
        return got

    def release(self) -> None:
        if self._depth == 1:
            self.longest = max(self.longest, time.perf_counter() - self._since)
        self._depth -= 1
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _b64(arr) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.ascontiguousarray(arr, dtype="<u8").tobytes()).decode()


def measure_nodes(n_nodes: int, args) -> dict:
    import logging

    import numpy as np

    from ..integration import proxy_routing
    from ..routing.feed import FeedPublisher, NamespaceKey
    from ..routing.request import RoutingRequest

    rng = np.random.default_rng(args.seed + n_nodes)
    per = args.blocks_per_node
    gpu_n = per // 10
    key = NamespaceKey(12345, 678, args.block_size)
    contents = [rng.integers(2, 2**63, size=per, dtype=np.uint64) for _ in range(n_nodes)]
    urls = [f"http://127.0.0.1:{30000 + k}" for k in range(n_nodes)]
    info = FeedPublisher(gpu_blocks=gpu_n, host_blocks=per - gpu_n, namespace=key).info

    class _Reply:
        status_code = 200

        def __init__(self, k: int) -> None:
            self.k = k

        def json(self) -> dict:   # what FeedPublisher.poll answers a new reader, built when read
            ids = contents[self.k]
            return {"info": info, "epoch": f"e{self.k}", "seq": 0,
                    "snapshot": {"gpu": _b64(ids[:gpu_n]), "host": _b64(ids[gpu_n:])}}

    class _Feeds:
        def get(self, url: str, **_):
            return _Reply(urls.index(url[:url.index("/hostcache")]))

    options = {"model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "feed_api_key": None,
               "error_cooldown": 10.0, "balance": 1.3, "block_size": args.block_size, "gpu_blocks": 4096,
               "host_blocks": 0, "feed_urls": {}}
    rss0 = _rss()
    log = logging.getLogger(proxy_routing.logger.name)
    level, log.level = log.level, logging.ERROR   # the no-tokenizer notice: the bench gives ids itself
    try:
        svc = proxy_routing.RoutingService(options, None)
    finally:
        log.setLevel(level)
    svc.lock = _TimedLock()
    router = svc.router
    t0 = time.perf_counter()
    svc._sync_nodes(urls)
    svc.poll_once(_Feeds())   # every node's snapshot, as the proxy's poller reads and applies it
    load_s = time.perf_counter() - t0
    longest_hold = svc.lock.longest
    if not all(router.nodes[u].exact for u in urls):
        raise RuntimeError("bench route: a node's snapshot was not applied")
    cached = n_nodes * per
    rss_growth = _rss() - rss0
    pb = args.prompt_blocks
    reqs = []
    for _ in range(args.requests):
        k = int(rng.integers(n_nodes))
        hit = int(rng.integers(0, pb + 1))
        start = int(rng.integers(0, per - pb))
        ids = np.concatenate([contents[k][start:start + hit], rng.integers(2, 2**63, size=pb - hit, dtype=np.uint64)])
        reqs.append(RoutingRequest.from_ids(ids, prompt_tokens=pb * args.block_size + 1))
    times = []
    for req in reqs:
        t = time.perf_counter()
        proxy_routing._current.set(req)      # what the endpoint's dependency leaves for get_node_url
        url = svc.choose(urls)                # get_node_url
        svc.finished(url, svc.take_ticket(url))   # pre_call's ticket, post_call
        times.append(time.perf_counter() - t)
    times.sort()
    toks = rng.integers(0, 128256, size=pb * args.block_size + 1)
    hash_times = []
    for _ in range(min(200, args.requests)):
        t = time.perf_counter()
        RoutingRequest(toks).ids(key)
        hash_times.append(time.perf_counter() - t)
    hash_times.sort()
    table = router.table
    return {
        "nodes": n_nodes, "blocks_per_node": per, "cached_blocks": cached, "requests": len(times),
        "prompt_blocks": pb, "block_size": args.block_size,
        "decision_ms_median": 1e3 * times[len(times) // 2],
        "decision_ms_p99": 1e3 * times[min(len(times) - 1, int(len(times) * 0.99))],
        "decision_ms_mean": 1e3 * sum(times) / len(times),
        "ids_ms_median": 1e3 * hash_times[len(hash_times) // 2],
        "table_bytes": table.nbytes, "table_entries": table.entries, "table_slots": table.slots,
        "table_mask_bits": table.mask_bits, "table_max_nodes": table.max_nodes, "table_resizes": table.resizes,
        "table_bytes_per_cached_block": table.nbytes / cached,
        "rss_growth_bytes_per_cached_block": rss_growth / cached,
        "load_seconds": load_s, "longest_lock_hold_ms": 1e3 * longest_hold,
        "lock_timeouts": svc.lock_timeouts,
    }


def measure(args) -> dict:
    _check(args)
    return {"runs": [measure_nodes(n, args) for n in args.nodes], "target_decision_ms": 0.2,
            "note": "measured on this machine (CPU), through the proxy's RoutingService (64 node slots, default table "
                    "size, snapshots applied by poll_once); decision = choose (lock, route, dispatched) + finished "
                    "with the prompt's ids given; ids = chaining one prompt's tokens into published ids"}


def format_table(res: dict) -> str:
    from ..planner.report import render_table

    rows = [[str(r["nodes"]), f"{r['cached_blocks']:,}", f"{r['decision_ms_median']:.3f}", f"{r['decision_ms_p99']:.3f}",
             f"{r['ids_ms_median']:.3f}", f"{r['table_bytes_per_cached_block']:.1f}",
             f"{r['rss_growth_bytes_per_cached_block']:.1f}", f"{r['load_seconds']:.1f}",
             f"{r['longest_lock_hold_ms']:.0f}"] for r in res["runs"]]
    head = ["nodes", "cached blocks", "decision ms (median)", "decision ms (p99)", "prompt->ids ms",
            "table B/block", "RSS B/block", "load s", "longest lock hold ms"]
    r0 = res["runs"][0]
    return (render_table(rows, head) + f"\n{r0['requests']} decisions per row, prompts of {r0['prompt_blocks']} blocks x "
            f"{r0['block_size']} tokens; target <= {res['target_decision_ms']} ms per decision; {res['note']}")


def compare(yaml_path: str, trace_path: str | None, chat_sessions: int | None = None,
            session_keys: bool = True) -> dict:
    """Every routing policy (and a pooled node) over one cluster and trace (planner replays); with
    ``chat_sessions``, the trace is the built-in chat generator's (``ChatWorkload(sessions=chat_sessions)``);
    without ``session_keys``, no request carries the session key its client would send."""
    import dataclasses

    from ..planner.cli import DEFAULT_STAGGER_S, bundled_trace_path
    from ..planner.cluster import ROUTING_POLICIES, load_cluster, simulate_cluster
    from ..planner.geometry import BlockSizing
    from ..planner.replay import prepare_trace, replay, resolve_min_restore
    from ..planner.traces import read_traces, trace_warnings

    if chat_sessions is not None and trace_path is not None:
        raise ValueError("--chat-sessions replays the chat generator; do not also give --trace")
    spec = load_cluster(yaml_path)
    if chat_sessions is not None:
        from ..planner.generator import ChatWorkload, generate_chat

        trace = generate_chat(ChatWorkload(sessions=chat_sessions))
    else:
        trace_path = trace_path or str(bundled_trace_path())
        # as `plan` reads it: captures, Mooncake layout, WEKA sessions (merged ones staggered as plan does)
        trace = read_traces([trace_path], stagger_s=DEFAULT_STAGGER_S)
        if not trace.requests:
            raise ValueError(f"trace {trace_path} has no requests")
        for w in trace_warnings(trace):
            print(f"warning: {w}", file=sys.stderr)
    if not session_keys:
        trace = dataclasses.replace(trace, requests=[dataclasses.replace(r, session_given=False)
                                                     for r in trace.requests])
    sizing = BlockSizing.build(spec.geometry(), spec.cache_format, trace.block_size)
    # `auto` resolved as the server (and `plan --cluster`) resolves it
    spec = dataclasses.replace(spec, min_restore_tokens=resolve_min_restore(spec.min_restore_tokens, sizing))
    prepared = prepare_trace(trace)
    rows = []
    for routing in ROUTING_POLICIES:
        t0 = time.perf_counter()
        res = simulate_cluster(prepared, dataclasses.replace(spec, routing=routing), sizing, show_progress=False)
        tot = res.totals()
        prefill = [n.stats.recomputed_tokens for n in res.nodes]
        share = [p * len(prefill) / (sum(prefill) or 1) for p in prefill]
        rows.append({"routing": routing, "hit_rate": tot["hit_rate"], "gpu_hit_rate": tot["gpu_hit_rate"],
                     "host_hit_rate": tot["host_hit_rate"], "requests": [n.stats.requests for n in res.nodes],
                     "prefill_share_over_even": share, "max_prefill_share_over_even": max(share),
                     "seconds": time.perf_counter() - t0})
    gpu = sum(sizing.gpu_blocks(n.gpu_kv_gb) for n in spec.nodes)
    host = sum(sizing.host_blocks(n.host_gb) for n in spec.nodes)
    st = replay(prepared, gpu, host, spec.host_policy, trace.block_size, False,
                min_restore_tokens=spec.min_restore_tokens)
    rows.append({"routing": "pooled", "hit_rate": st.hit_rate, "gpu_hit_rate": st.gpu_hit_rate,
                 "host_hit_rate": st.host_hit_rate, "requests": [st.requests], "gpu_blocks": gpu, "host_blocks": host})
    return {"cluster": yaml_path, "trace": trace.name, "requests": len(trace), "host_policy": spec.host_policy,
            "session_keys": session_keys,
            "nodes": [n.name for n in spec.nodes], "rows": rows,
            "note": "planner replays measured on this machine; prefill share = a node's recomputed tokens over an "
                    "even split (1.0 = even)"}


def format_compare(res: dict) -> str:
    from ..planner.report import render_table

    rows = []
    for r in res["rows"]:
        rows.append([r["routing"], f"{r['hit_rate']:.4f}", f"{r['gpu_hit_rate']:.4f}", f"{r['host_hit_rate']:.4f}",
                     " / ".join(str(x) for x in r["requests"]) if r["routing"] != "pooled" else "-",
                     f"{r['max_prefill_share_over_even']:.2f}" if "max_prefill_share_over_even" in r else "-"])
    head = ["routing", "cluster hit", "GPU hit", "host hit", "requests per node (" + ", ".join(res["nodes"]) + ")",
            "max prefill share"]
    keys = "" if res.get("session_keys", True) else "; no session keys sent"
    return (f"{res['trace']}: {res['requests']:,} requests; cluster {res['cluster']} (host policy "
            f"{res['host_policy']}{keys})\n" + render_table(rows, head) + "\n" + res["note"])


def run(args: argparse.Namespace) -> int:
    stray = [o for o, v in (("--trace", args.trace), ("--chat-sessions", args.chat_sessions),
                            ("--without-session-keys", args.without_session_keys or None)) if v is not None]
    if stray and not args.compare:
        print(f"error: bench route: {' and '.join(stray)} appl{'y' if len(stray) > 1 else 'ies'} to --compare CLUSTER_YAML", file=sys.stderr)
        return 2
    timing = list(dict.fromkeys(getattr(args, "timing_given", None) or ()))
    if timing and args.compare:
        print(f"error: bench route: {', '.join(timing)} {'sets' if len(timing) == 1 else 'set'} the router timing "
              "run; --compare replays a trace over the cluster file's nodes: drop them", file=sys.stderr)
        return 2
    if args.compare:
        try:
            res = compare(args.compare, args.trace, args.chat_sessions, session_keys=not args.without_session_keys)
        except ValueError as exc:
            print(f"error: bench route: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(res, sort_keys=True) if args.json else format_compare(res))
        return 0
    try:
        res = measure(args)
    except ValueError as exc:
        print(f"error: bench route: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, sort_keys=True) if args.json else format_table(res))
    return 0
