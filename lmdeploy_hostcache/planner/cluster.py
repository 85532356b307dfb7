"""Heterogeneous clusters: route a trace over nodes with their own GPU+host tiers, and size
each node's host tier.

Cluster YAML (every field validated; errors name the file and the field)::

    model: Llama-3-8B          # preset or path to a config.json      (default Llama-3-8B)
    quant_policy: 0            # 0 | 4 | 8                              (default 0)
    host_kv_format: same       # same | int8 | int4                     (default same)
    tp: 1                      # tensor-parallel ranks per node         (default 1)
    host_policy: lru           # host-tier eviction policy              (default lru, the server's)
    min_restore_tokens: 256    # shorter host hits are recomputed; auto (default 256, the server's)
    routing: session           # session | random | prefix | cache_aware (required)
    seed: 0                    # for random routing                     (default 0)
    nodes:                     # at least one
      - {name: big, gpu_kv_gb: 20, host_gb: 200}
      - {name: small, gpu_kv_gb: 8, host_gb: 20}

Routing policies:

* ``session``: a stable hash (xxh3) of the request's session key picks the node, so every turn
  of a conversation lands on one node; nodes get equal shares of sessions;
* ``random``: a uniformly random node per request (``random.Random(seed)``);
* ``cache_aware``: the proxy's router (``routing/``, see ``planner/cluster_routing.py``): lowest
  expected prefill cost per node from exact per-tier feeds of every node, with a balance guard;
* ``prefix``: cache-aware with a balance guard (the shape of SGLang's and Dynamo's routers).
  A node is *overloaded* when it received more than ``1.25 x`` the mean (+1) of the last
  ``64 x nodes`` routed requests; among the other nodes the one with the longest cached prefix
  (GPU + host blocks, probed without side effects) wins, ties going to more GPU blocks, then
  to the lighter recent load, then to node order.  Without the guard every request would
  follow the system prompt every conversation shares to the first node that cached it.

Recommendation rule (``recommend_host_gb``): the cluster is replayed with every node's host tier
at fractions 0, 1/8, 1/4, 1/2, 3/4 and 1 of its ``host_gb``; a node's recommended
``host_cache_gb`` is the smallest of those sizes whose hit rate on that node is within one point
(0.01) of the hit rate at its full ``host_gb``.
"""
from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import xxhash

from ..config import _show   # bounded: a YAML alias bomb or a huge int stays one short line
from ..routing.table import MAX_TABLE_NODES
from ..tier.eviction import DEFAULT_POLICY, POLICIES
from .geometry import HOST_KV_FORMATS, MAX_GIB, QUANT_POLICIES, BlockSizing, CacheFormat, KVGeometry, resolve_model
from .replay import SERVER_MIN_RESTORE_TOKENS, PreparedRequest, ReplayStats, TwoTierCache, progress

ROUTING_POLICIES = ("session", "random", "prefix", "cache_aware")
PREFIX_WINDOW_PER_NODE = 64
PREFIX_OVERLOAD = 1.25
RECOMMEND_FRACTIONS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
RECOMMEND_TOLERANCE = 0.01


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpu_kv_gb: float
    host_gb: float


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    routing: str
    model: str = "Llama-3-8B"
    quant_policy: int = 0
    host_kv_format: str = "same"
    tp: int = 1
    host_policy: str = DEFAULT_POLICY
    seed: int = 0
    # a number, or "auto": ``plan`` resolves it for the model and format (cli.resolve_min_restore) before replaying
    min_restore_tokens: int | str = SERVER_MIN_RESTORE_TOKENS
    kernel_block_size: int | None = None

    @property
    def cache_format(self) -> CacheFormat:
        return CacheFormat(self.quant_policy, self.host_kv_format, self.tp, self.kernel_block_size)

    def geometry(self) -> KVGeometry:
        return resolve_model(self.model)


_TOP_KEYS = {"model", "quant_policy", "host_kv_format", "tp", "host_policy", "routing", "seed", "nodes",
             "min_restore_tokens", "kernel_block_size"}
_NODE_KEYS = {"name", "gpu_kv_gb", "host_gb"}


def _number(v, where: str, minimum: float = 0.0, maximum: float = MAX_GIB) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not minimum <= v <= maximum:
        shown = f"an int of {v.bit_length()} bits" if isinstance(v, int) and v.bit_length() > 64 else _show(v)
        raise ValueError(f"{where} must be a number in [{minimum:g}, {maximum:g}], got {shown}")
    return float(v)


def _one_of(v, options) -> bool:
    """``v in options`` for any YAML value (a mapping or list is unhashable: never an option)."""
    try:
        return v in options
    except TypeError:
        return False


def parse_cluster(doc, where: str = "cluster") -> ClusterSpec:
    """Validate a parsed YAML document; raises ValueError naming the bad field."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping at the top level")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown, key=repr)}; allowed: {sorted(_TOP_KEYS)}")
    if "routing" not in doc:
        raise ValueError(f"{where}: routing is missing; it is required: one of {', '.join(ROUTING_POLICIES)}")
    routing = doc["routing"]
    if not _one_of(routing, ROUTING_POLICIES):
        raise ValueError(f"{where}: routing must be one of {ROUTING_POLICIES}, got {_show(routing)}")
    model = doc.get("model", "Llama-3-8B")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: model must be a preset name or a config.json path, got {_show(model)}")
    try:   # resolved here, so that an unknown model or a bad config.json is named with this file
        resolve_model(model)
    except ValueError as exc:   # every message of resolve_model starts with "model ...": the field
        raise ValueError(f"{where}: {exc}") from None
    qp = doc.get("quant_policy", 0)
    if not _one_of(qp, QUANT_POLICIES) or isinstance(qp, bool):
        raise ValueError(f"{where}: quant_policy must be one of {QUANT_POLICIES}, got {_show(qp)}")
    fmt = doc.get("host_kv_format", "same")
    if not _one_of(fmt, HOST_KV_FORMATS):
        raise ValueError(f"{where}: host_kv_format must be one of {HOST_KV_FORMATS}, got {_show(fmt)}")
    tp = doc.get("tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
        raise ValueError(f"{where}: tp must be a positive int, got {_show(tp)}")
    policy = doc.get("host_policy", DEFAULT_POLICY)
    if not _one_of(policy, POLICIES):
        raise ValueError(f"{where}: host_policy must be one of {sorted(POLICIES)}, got {_show(policy)}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: seed must be an int >= 0, got {_show(seed)}")
    min_restore = doc.get("min_restore_tokens", SERVER_MIN_RESTORE_TOKENS)
    if isinstance(min_restore, str) and min_restore.strip().lower() == "auto":
        min_restore = "auto"
    elif isinstance(min_restore, bool) or not isinstance(min_restore, int) or min_restore < 0:
        raise ValueError(f"{where}: min_restore_tokens must be an int >= 0 or auto, got {_show(min_restore)}")
    nodes_doc = doc.get("nodes")
    if not isinstance(nodes_doc, list) or not nodes_doc:
        raise ValueError(f"{where}: nodes must be a non-empty list of {{name, gpu_kv_gb, host_gb}}")
    nodes = []
    names = set()
    for i, n in enumerate(nodes_doc):
        w = f"{where}: nodes[{i}]"
        if not isinstance(n, dict):
            raise ValueError(f"{w} must be a mapping with name, gpu_kv_gb, host_gb")
        unknown = set(n) - _NODE_KEYS
        if unknown:
            raise ValueError(f"{w}: unknown field(s) {sorted(unknown, key=repr)}; allowed: {sorted(_NODE_KEYS)}")
        for k in _NODE_KEYS:
            if k not in n:
                raise ValueError(f"{w}: missing field {k!r}")
        name = n["name"]
        if not isinstance(name, (str, int)) or isinstance(name, bool) or str(name) == "":
            raise ValueError(f"{w}.name must be a non-empty string, got {_show(name)}")
        name = str(name)
        if name in names:
            raise ValueError(f"{w}.name {_show(name)} is used by another node")
        names.add(name)
        gpu = _number(n["gpu_kv_gb"], f"{w}.gpu_kv_gb")
        if gpu <= 0:
            raise ValueError(f"{w}.gpu_kv_gb must be > 0 (a node needs a GPU KV cache), got {_show(gpu)}")
        nodes.append(NodeSpec(name, gpu, _number(n["host_gb"], f"{w}.host_gb")))
    spec = ClusterSpec(tuple(nodes), routing, model, qp, fmt, tp, policy, seed, min_restore,
                       doc.get("kernel_block_size"))   # checked with the format below
    try:
        spec.cache_format
        spec.geometry().heads_per_rank(tp)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if routing == "cache_aware" and len(nodes) > MAX_TABLE_NODES:
        raise ValueError(f"{where}: nodes: cache_aware routing takes at most {MAX_TABLE_NODES} nodes "
                         f"(its block table's node masks), got {len(nodes)}")
    return spec


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster YAML file (``yamlio``: strict, duplicate keys refused, ``1.0e9``
    is a number); raises ValueError naming the file and the field."""
    from ..yamlio import load_yaml_file

    p = Path(path)
    if not os.path.lexists(p):
        raise ValueError(f"cluster file {p} does not exist")
    doc = load_yaml_file(p)  # YamlError is a ValueError naming the file
    return parse_cluster(doc, str(p))


@dataclass
class NodeResult:
    spec: NodeSpec
    gpu_blocks: int
    host_blocks: int
    host_gb_capacity: float     # GiB of the host blocks configured (whole blocks); its peak use is stats.host_peak_blocks
    stats: ReplayStats
    recommended_host_gb: float | None = None
    hit_rate_by_host_gb: dict[float, float] = field(default_factory=dict)


@dataclass
class ClusterResult:
    routing: str
    nodes: list[NodeResult]
    elapsed_s: float = 0.0

    def totals(self) -> dict:
        keys = ("requests", "prompt_tokens", "prompt_blocks", "gpu_hit_blocks", "host_hit_blocks",
                "short_host_hit_blocks")
        t = {k: sum(getattr(n.stats, k) for n in self.nodes) for k in keys}
        pb = t["prompt_blocks"] or 1
        t["gpu_hit_rate"] = t["gpu_hit_blocks"] / pb
        t["host_hit_rate"] = t["host_hit_blocks"] / pb
        t["hit_rate"] = (t["gpu_hit_blocks"] + t["host_hit_blocks"]) / pb
        return t


class Router:
    """Picks a node index per request; see the module docstring for the policies."""

    def __init__(self, policy: str, caches: Sequence[TwoTierCache], seed: int = 0) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {_show(policy)}")
        self.policy = policy
        self.caches = caches
        self.rng = random.Random(seed)
        self.assigned = [0] * len(caches)
        self.recent: deque[int] = deque(maxlen=PREFIX_WINDOW_PER_NODE * len(caches))
        self.recent_load = [0] * len(caches)

    def route(self, pr: PreparedRequest) -> int:
        n = len(self.caches)
        if self.policy == "session":
            i = xxhash.xxh3_64_intdigest(str(pr.request.session).encode()) % n
        elif self.policy == "random":
            i = self.rng.randrange(n)
        else:
            i = self._prefix_route(pr)
        self.assigned[i] += 1
        if len(self.recent) == self.recent.maxlen:
            self.recent_load[self.recent[0]] -= 1
        self.recent.append(i)
        self.recent_load[i] += 1
        return i

    def served(self, i: int) -> None:
        """Node ``i`` served the request (nothing to update for these policies)."""

    def _prefix_route(self, pr: PreparedRequest) -> int:
        load = self.recent_load
        cap = PREFIX_OVERLOAD * len(self.recent) / len(self.caches) + 1
        best, i = None, 0
        for k, c in enumerate(self.caches):
            if load[k] > cap:
                continue
            g, h = c.probe(pr)
            key = (g + h, g, -load[k], -k)
            if best is None or key > best:
                best, i = key, k
        return i  # some node is always at or below the mean, hence below the cap


def node_sizes(spec: ClusterSpec, sizing: BlockSizing, host_fraction: float = 1.0) -> list[tuple[int, int, float]]:
    """(gpu_blocks, host_blocks, host GiB those blocks take) per node."""
    out = []
    for n in spec.nodes:
        gb = n.host_gb * host_fraction
        hb = sizing.host_blocks(gb)
        out.append((sizing.gpu_blocks(n.gpu_kv_gb), hb, sizing.host_gb_for(hb)))
    return out


def simulate_cluster(prepared: Sequence[PreparedRequest], spec: ClusterSpec, sizing: BlockSizing,
                     host_fraction: float = 1.0, show_progress: bool | None = None) -> ClusterResult:
    """Route every request to a node and replay it there."""
    import time

    t0 = time.perf_counter()
    sizes = node_sizes(spec, sizing, host_fraction)
    for n, (gb, _, _) in zip(spec.nodes, sizes):
        if gb == 0:
            raise ValueError(f"node {n.name!r}: gpu_kv_gb={n.gpu_kv_gb} holds no block of "
                             f"{sizing.gpu_block_bytes} bytes")
    caches = [TwoTierCache(gb, hb, spec.host_policy, sizing.block_size, min_restore_tokens=spec.min_restore_tokens)
              for gb, hb, _ in sizes]
    if spec.routing == "cache_aware":  # the proxy's router, fed by each node's cache-state feed
        from .cluster_routing import CacheAwareClusterRouter, planner_host_weight
        from .cost import CostModel

        weight = planner_host_weight(sizing, CostModel.for_model(spec.geometry().params_b))
        router = CacheAwareClusterRouter(caches, [n.name for n in spec.nodes], sizing.block_size, weight)
    else:
        router = Router(spec.routing, caches, spec.seed)
    for pr in progress(prepared, f"cluster x{host_fraction:g}", show_progress):
        i = router.route(pr)
        caches[i].serve(pr)
        router.served(i)
    nodes = [NodeResult(n, gb, hb, used, c.finish()) for n, (gb, hb, used), c in zip(spec.nodes, sizes, caches)]
    return ClusterResult(spec.routing, nodes, time.perf_counter() - t0)


def recommend_host_gb(prepared: Sequence[PreparedRequest], spec: ClusterSpec, sizing: BlockSizing,
                      fractions: Sequence[float] = RECOMMEND_FRACTIONS,
                      tolerance: float = RECOMMEND_TOLERANCE,
                      show_progress: bool | None = None) -> ClusterResult:
    """The full-size cluster result, each node annotated with its hit rate per host size and the
    smallest host size within ``tolerance`` of its full-size hit rate."""
    fractions = sorted(set(fractions) | {1.0})
    runs = {f: simulate_cluster(prepared, spec, sizing, f, show_progress) for f in fractions}
    full = runs[1.0]
    for k, node in enumerate(full.nodes):
        target = node.stats.hit_rate - tolerance
        # keyed and recommended by the size each run simulated (rounding it could name a size never
        # replayed, 0 included, and make two sizes collide)
        for f in fractions:
            r = runs[f].nodes[k]
            node.hit_rate_by_host_gb[node.spec.host_gb * f] = r.stats.hit_rate
        for f in fractions:
            r = runs[f].nodes[k]
            if r.stats.hit_rate >= target:
                node.recommended_host_gb = node.spec.host_gb * f
                break
    full.elapsed_s = sum(r.elapsed_s for r in runs.values())
    return full
