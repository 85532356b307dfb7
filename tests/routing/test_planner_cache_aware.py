"""The planner's cache_aware routing runs the proxy's router, fed by every node's feed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmdeploy_hostcache.planner.cluster import load_cluster, simulate_cluster
from lmdeploy_hostcache.planner.cluster_routing import CacheAwareClusterRouter
from lmdeploy_hostcache.planner.geometry import BlockSizing
from lmdeploy_hostcache.planner.replay import prepare_trace
from lmdeploy_hostcache.planner.traces import read_mooncake
from lmdeploy_hostcache.routing.ids import publish_id
from lmdeploy_hostcache.routing.table import GPU, HOST

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def conversation():
    from lmdeploy_hostcache.planner.cli import bundled_trace_path

    trace = read_mooncake(bundled_trace_path())
    spec = load_cluster(REPO / "examples" / "cluster.yaml")
    sizing = BlockSizing.build(spec.geometry(), spec.cache_format, trace.block_size)
    return prepare_trace(trace), spec, sizing


def _run(conversation, routing, limit=None):
    prepared, spec, sizing = conversation
    return simulate_cluster(prepared[:limit] if limit else prepared, dataclasses.replace(spec, routing=routing),
                            sizing, show_progress=False)


def test_router_view_equals_every_node_tier_after_a_replay(conversation, monkeypatch):
    seen = {}
    orig = CacheAwareClusterRouter.served

    def served(self, i):
        orig(self, i)
        seen["router"] = self

    monkeypatch.setattr(CacheAwareClusterRouter, "served", served)
    _run(conversation, "cache_aware", limit=1500)
    router = seen["router"]
    for name, cache in zip(router.names, router.caches):
        slot = router.router.nodes[name].slot
        for tier, idx in ((GPU, cache.gpu), (HOST, cache.host)):
            want = {publish_id(b.digest) for b in list(idx._blocks.values()) if idx.is_resident(b.digest)}
            assert router.router.table.count(slot, tier) == len(want)
            assert want == router.publishers[router.names.index(name)].contents()[tier]


def test_cache_aware_meets_the_targets_on_the_bundled_conversation_trace(conversation):
    """Issue 10's targets: >= 0.125 cluster hit rate, above session routing, and no node above
    1.5x its (equal, speed-weighted) share of the prefill tokens."""
    ca = _run(conversation, "cache_aware")
    se = _run(conversation, "session")
    hit = ca.totals()["hit_rate"]
    assert hit >= 0.125 and hit > se.totals()["hit_rate"], (hit, se.totals()["hit_rate"])
    prefill = [n.stats.recomputed_tokens for n in ca.nodes]
    share = [p / sum(prefill) * len(prefill) for p in prefill]
    assert max(share) <= 1.5, share


def test_plan_cluster_cli_reports_requests_hit_rates_and_load_per_node(tmp_path):
    import json
    import subprocess
    import sys

    text = (REPO / "examples" / "cluster.yaml").read_text()
    y = tmp_path / "c.yaml"
    y.write_text(text.replace("routing: session", "routing: cache_aware", 1))
    p = subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "plan", "--cluster", str(y), "--limit", "400",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["routing"] == "cache_aware" and out["requests"] == 400
    nodes = out["nodes"]
    assert sum(n["requests"] for n in nodes) == 400
    assert abs(sum(n["prefill_tokens_share"] for n in nodes) - 1.0) < 1e-9
    assert all(0 <= n["hit_rate"] <= 1 for n in nodes)
