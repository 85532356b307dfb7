"""A shared third tier in ``plan --cluster``: one store (Mooncake Store) under every node.

Each node keeps its GPU and host tiers (``replay.TwoTierCache``); one ``SharedStore`` of
``l3_blocks`` blocks (a ``HostIndex``, LRU, leaf-first like the master's eviction of leases) sits
under all of them. Per request on node ``n``:

1. GPU match ``g``, host continuation ``h`` (as in ``replay``), then the **store continuation**
   ``s = store.lookup(d[g+h:m])``: one batched existence check in the engine;
2. the ``g+h+s`` blocks are hits, unless ``h+s`` blocks are fewer than ``min_restore_tokens``
   tokens (the connector then recomputes both: its threshold counts host and store hits together);
   store hits are staged through host memory and loaded like host
   hits, and *stay in the store* (other nodes may need them: the store is shared, hence not
   exclusive with any node's tiers);
3. **write-back**: a block the host tier evicts is written to the store (``on_evict``); a block the
   GPU evicts that the host cannot take is lost with its host descendants, as in the engine (the
   connector writes to the store from host slots only, never from a GPU page).

Nodes share the store's contents: a prefix node A wrote-back is a store hit on node B. All nodes
of a cluster file share the model, KV format and TP size, hence the store's key space (the engine
keys per TP rank: ``l3/keys.py``). Capacity: ``l3_gb`` of host-format bytes over all ranks
(``BlockSizing.host_blocks``). Transfer rate: ``l3_gbps`` store->host (an assumption, never a
measurement; default 5 GB/s, about a 50 Gb/s TCP or a modest RDMA link), plus the host->GPU copy.

Not modelled: store latency per call, replicas, the store's lease/soft-pin policy, the node
segments' placement (one pooled capacity), failures (which fall back to recompute in the engine).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ..tier.host_index import HostBlock, HostIndex
from .geometry import _check_gb
from .replay import PreparedRequest, TwoTierCache, progress

DEFAULT_L3_GBPS = 5.0


class SharedStore:
    """The store's contents as the planner sees them: one index shared by every node."""

    def __init__(self, blocks: int) -> None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"store blocks must be an int >= 0, got {blocks!r}")
        self.index = HostIndex(blocks, policy="lru")
        self.puts = 0
        self.put_refused = 0

    def put(self, block: HostBlock) -> None:
        """Write-back of a block leaving a node (already present: refreshed)."""
        idx = self.index
        if idx.prepare_store(block.digest, block.parent, block.tokens) is not None:
            idx.complete_store(block.digest, True)
            self.puts += 1
        elif block.digest not in idx:
            self.put_refused += 1

    @property
    def evictions(self) -> int:
        return self.index.stats.evictions


class ThreeTierCache(TwoTierCache):
    """A node's GPU + host tiers with write-back to, and lookups continuing into, a shared store."""

    def __init__(self, gpu_blocks: int, host_blocks: int, store: SharedStore, host_policy: str = "lru",
                 block_size: int = 1, min_restore_tokens: int = 0) -> None:
        super().__init__(gpu_blocks, host_blocks, host_policy, block_size, min_restore_tokens=min_restore_tokens)
        self.store = store
        self.host.on_evict = store.put           # write-back on host eviction
        self.l3_hit_blocks = 0
        self.requests_with_l3_hits = 0

    def serve(self, pr: PreparedRequest) -> tuple[int, int]:
        m = pr.matchable
        g, found = self.probe_found(pr)
        half = self.host.num_slots // 2
        h = min(found, half)
        d, b = pr.digests, pr.block_bytes
        start = g + h
        s = 0
        sidx = self.store.index
        # as the connector asks the store: only when the whole host match is usable, and staged
        # through host slots, at most half of them per request with the host hits (no host tier:
        # no store either)
        if start < m and sidx.num_slots and h == found and h < half:
            end = min(m, g + half)
            s = sidx.lookup(d[start:end], b[start:end])
        if h + s < self.min_restore_blocks:  # too short to restore, host and store hits together
            s = 0
        if s:
            sidx.prepare_load(d[start:start + s])  # pinned while this request's blocks settle
        host_before = self.stats.host_hit_blocks
        self.restored_with_host = s   # the connector's threshold counts the store hit with the host hit
        try:
            g2, restored = super().serve(pr)
        finally:
            self.restored_with_host = 0
        assert g2 == g and self.stats.host_hit_blocks - host_before == restored
        # blocks the GPU tier took from g on (all of them unless the request overflowed it):
        # the host hits come first, the store hits next
        gpu = self.gpu
        inserted = 0
        for i in range(g, len(d)):
            if gpu.get(d[i]) is None:
                break
            inserted += 1
        got = min(s, max(0, inserted - restored))
        if s:
            sidx.complete_load(d[start:start + s], False)  # stays in the store (shared)
        self.l3_hit_blocks += got
        self.requests_with_l3_hits += got > 0
        return g, restored


@dataclass
class L3ClusterResult:
    """The same cluster with and without the shared store."""

    l3_gb: float
    l3_blocks: int
    l3_gbps: float
    nodes: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return {"l3_gb": self.l3_gb, "l3_blocks": self.l3_blocks, "l3_gbps": self.l3_gbps,
                "l3_gbps_assumed": True, "nodes": self.nodes, "totals": self.totals, "store": self.store,
                "replay_seconds": self.elapsed_s}


def _router(spec, caches, sizing):
    if spec.routing == "cache_aware":  # the proxy's router, as simulate_cluster builds it
        from .cluster_routing import CacheAwareClusterRouter, planner_host_weight  # noqa: PLC0415
        from .cost import CostModel  # noqa: PLC0415

        weight = planner_host_weight(sizing, CostModel.for_model(spec.geometry().params_b))
        return CacheAwareClusterRouter(caches, [n.name for n in spec.nodes], sizing.block_size, weight)
    from .cluster import Router  # noqa: PLC0415

    return Router(spec.routing, caches, spec.seed)


def simulate_cluster_l3(prepared: Sequence[PreparedRequest], spec, sizing, l3_gb: float,
                        l3_gbps: float = DEFAULT_L3_GBPS, cost=None,
                        show_progress: bool | None = None) -> L3ClusterResult:
    """Route and replay the trace over the nodes (full ``host_gb``) with one shared store."""
    from .cluster import node_sizes  # noqa: PLC0415
    from .cost import CostModel  # noqa: PLC0415

    _check_gb("--l3-gb", l3_gb)
    if not (isinstance(l3_gbps, (int, float)) and 0 < l3_gbps < float("inf")):
        raise ValueError(f"--l3-gbps must be a finite number > 0, got {l3_gbps!r}")
    cost = cost or CostModel.for_model(spec.geometry().params_b)
    t0 = time.perf_counter()
    sizes = node_sizes(spec, sizing, 1.0)
    store = SharedStore(sizing.host_blocks(l3_gb))
    caches = [ThreeTierCache(gb, hb, store, spec.host_policy, sizing.block_size, spec.min_restore_tokens)
              for gb, hb, _ in sizes]
    router = _router(spec, caches, sizing)
    served = getattr(router, "served", None)
    for pr in progress(prepared, f"cluster+l3 {l3_gb:g}GiB", show_progress):
        i = router.route(pr)
        caches[i].serve(pr)
        if served is not None:
            served(i)
    res = L3ClusterResult(float(l3_gb), store.index.num_slots, float(l3_gbps))
    per_rank = sizing.host_block_bytes
    bs = sizing.block_size
    tot = {"requests": 0, "prompt_blocks": 0, "gpu_hit_blocks": 0, "host_hit_blocks": 0, "l3_hit_blocks": 0}
    for n, c in zip(spec.nodes, caches):
        st = c.finish()
        l3 = c.l3_hit_blocks
        pb = st.prompt_blocks or 1
        l3_saving = (cost.prefill_s(l3 * bs) - l3 * per_rank / (l3_gbps * 1e9) - cost.copy_s(l3 * per_rank))
        res.nodes.append({"name": n.name, "requests": st.requests, "prompt_blocks": st.prompt_blocks,
                          "gpu_hit_blocks": st.gpu_hit_blocks, "host_hit_blocks": st.host_hit_blocks,
                          "l3_hit_blocks": l3, "requests_with_l3_hits": c.requests_with_l3_hits,
                          "gpu_hit_rate": st.gpu_hit_blocks / pb, "host_hit_rate": st.host_hit_blocks / pb,
                          "l3_hit_rate": l3 / pb,
                          "hit_rate": (st.gpu_hit_blocks + st.host_hit_blocks + l3) / pb,
                          "l3_ttft_saving_s": l3_saving,
                          "l3_ttft_saving_ms_per_request": 1e3 * l3_saving / (st.requests or 1)})
        for k in tot:
            tot[k] += st.requests if k == "requests" else (l3 if k == "l3_hit_blocks" else getattr(st, k))
    pb = tot["prompt_blocks"] or 1
    tot.update(gpu_hit_rate=tot["gpu_hit_blocks"] / pb, host_hit_rate=tot["host_hit_blocks"] / pb,
               l3_hit_rate=tot["l3_hit_blocks"] / pb,
               hit_rate=(tot["gpu_hit_blocks"] + tot["host_hit_blocks"] + tot["l3_hit_blocks"]) / pb)
    res.totals = tot
    res.store = {"blocks": store.index.num_slots, "resident_blocks": len(store.index), "write_backs": store.puts,
                 "put_refused": store.put_refused, "evictions": store.evictions,
                 "gb_used": sizing.host_gb_for(len(store.index))}
    res.elapsed_s = time.perf_counter() - t0
    return res


def describe_l3(res: L3ClusterResult, alone_hit_rate: float) -> list[str]:
    """The lines ``plan --cluster --l3-gb`` prints under the per-node table."""
    t = res.totals
    out = [f"shared L3 store: {res.l3_gb:g} GiB ({res.l3_blocks:,} blocks) under all nodes, write-back on host "
           f"eviction, store->host {res.l3_gbps:g} GB/s (assumed, not measured)"]
    for n in res.nodes:
        out.append(f"  {n['name']}: hit rate {n['hit_rate']:.3f} with the store (L3 hits {n['l3_hit_rate']:.3f} of "
                   f"prompt blocks, {n['requests_with_l3_hits']:,} requests; est. TTFT saving from L3 "
                   f"{n['l3_ttft_saving_ms_per_request']:.1f} ms/req)")
    out.append(f"cluster hit rate: {alone_hit_rate:.3f} nodes alone -> {t['hit_rate']:.3f} with the shared store "
               f"(+{t['hit_rate'] - alone_hit_rate:.3f}; L3 hits {t['l3_hit_rate']:.3f} of prompt blocks; "
               f"{res.store['write_backs']:,} write-backs, {res.store['evictions']:,} store evictions, "
               f"{res.store['gb_used']:.1f} GiB used)")
    return out
