"""Cost model arithmetic and the cluster planner (YAML validation, routing, recommendation)."""
from pathlib import Path

import pytest

from lmdeploy_hostcache.planner.cluster import Router, load_cluster, parse_cluster, recommend_host_gb, simulate_cluster
from lmdeploy_hostcache.planner.cost import CostModel
from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
from lmdeploy_hostcache.planner.geometry import PRESETS, BlockSizing, CacheFormat
from lmdeploy_hostcache.planner.replay import TwoTierCache, prepare_trace, replay
from lmdeploy_hostcache.planner.report import TTFTEstimate, pick_recommendation

REPO = Path(__file__).resolve().parents[2]


def test_cost_model_formula():
    c = CostModel(prefill_tokens_per_s=10_000, h2d_gbps=20, prefill_assumed=False, h2d_assumed=False)
    # 5,000 tokens restored in 2 GB: 0.5 s of prefill minus 0.1 s of copy
    assert c.restore_saving_s(5_000, 2_000_000_000) == pytest.approx(0.4)
    assert "model inputs, not measurements" in c.describe() and "assumed" not in c.describe()
    d = CostModel.for_model(70.6)
    assert d.prefill_assumed and d.h2d_assumed
    assert d.prefill_tokens_per_s == pytest.approx(30_000 * 8 / 70.6)
    assert CostModel.for_model(None, prefill_tokens_per_s=123.0).prefill_tokens_per_s == 123.0
    with pytest.raises(ValueError, match="h2d_gbps"):
        CostModel(h2d_gbps=0)


def test_ttft_estimate_uses_host_block_bytes():
    t = generate_chat(ChatWorkload(sessions=80, seed=2))
    st = replay(prepare_trace(t), 30, 300, block_size=64)
    assert st.host_hit_blocks > 0
    sizing = BlockSizing.build(PRESETS["Llama-3-8B"], CacheFormat(0, "int4"), 64)
    cost = CostModel(30_000, 25)
    e = TTFTEstimate.of(st, sizing, cost)
    expect = st.restored_tokens / 30_000 - st.host_hit_blocks * sizing.host_block_bytes / 25e9
    assert e.saving_s == pytest.approx(expect)
    assert e.gpu_only_prefill_s - e.two_tier_prefill_s == pytest.approx(expect)


def test_pick_recommendation():
    assert pick_recommendation([0, 10, 20, 40], [0.1, 0.30, 0.315, 0.32]) == 20
    assert pick_recommendation([5], [0.0]) == 5


BASE = {"routing": "session", "nodes": [{"name": "a", "gpu_kv_gb": 20, "host_gb": 200},
                                        {"name": "b", "gpu_kv_gb": 8, "host_gb": 20}]}


@pytest.mark.parametrize("patch, match", [
    ({"routing": "nearest"}, "routing must be one of"),
    ({"nodes": []}, "nodes must be a non-empty list"),
    ({"nodes": [{"name": "a", "gpu_kv_gb": 20}]}, r"nodes\[0\]: missing field 'host_gb'"),
    ({"nodes": [{"name": "a", "gpu_kv_gb": 20, "host_gb": -1}]}, r"nodes\[0\].host_gb must be"),
    ({"nodes": [{"name": "a", "gpu_kv_gb": 0, "host_gb": 1}]}, r"nodes\[0\].gpu_kv_gb must be > 0"),
    ({"nodes": [{"name": "a", "gpu_kv_gb": 1, "host_gb": 1}, {"name": "a", "gpu_kv_gb": 1, "host_gb": 1}]},
     r"nodes\[1\].name 'a' is used"),
    ({"nodes": [{"name": "a", "gpu_kv_gb": 1, "host_gb": 1, "ram": 3}]}, r"unknown field\(s\) \['ram'\]"),
    ({"quant_policy": 3}, "quant_policy must be one of"),
    ({"quant_policy": 8, "host_kv_format": "int4"}, "applies to fp16/bf16 caches only"),
    ({"host_policy": "mru"}, "host_policy must be one of"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ({"min_restore_tokens": -1}, "min_restore_tokens must be an int >= 0"),
    ({"min_restore_tokens": "autox"}, r"min_restore_tokens must be an int >= 0 or auto, got 'autox'"),
    ({"min_restore_tokens": True}, "min_restore_tokens must be an int"),
    ({"min_restore_tokens": 1.5}, "min_restore_tokens must be an int"),
    ({"kernel_block_size": 24}, r"c.yaml: kernel_block_size must be a power of 2 >= 16"),
    ({"kernel_block_size": 8}, "kernel_block_size must be a power of 2 >= 16"),
    ({"kernel_block_size": True}, "kernel_block_size must be a power of 2 >= 16"),
    ({"kernel_block_size": "16"}, "kernel_block_size must be a power of 2 >= 16"),
    ({"tp": 3}, r"c.yaml: tp=3 does not divide num_kv_heads=8"),
    ({"seed": -1}, r"c.yaml: seed must be an int >= 0, got -1"),
    ({"routing": "cache_aware", "nodes": [{"name": f"n{i}", "gpu_kv_gb": 8, "host_gb": 8} for i in range(65)]},
     r"c.yaml: nodes: cache_aware routing takes at most 64 nodes"),
])
def test_cluster_yaml_errors_name_the_field(patch, match):
    if match is None:
        parse_cluster({**BASE, **patch}, "c.yaml")
        return
    with pytest.raises(ValueError, match=match):
        parse_cluster({**BASE, **patch}, "c.yaml")


def test_cluster_min_restore_tokens_defaults_to_the_servers():
    from lmdeploy_hostcache.config import HostCacheConfig

    assert parse_cluster(BASE).min_restore_tokens == HostCacheConfig().min_restore_tokens == 256
    assert parse_cluster({**BASE, "min_restore_tokens": 0}).min_restore_tokens == 0


def test_example_cluster_yaml_is_valid():
    spec = load_cluster(REPO / "examples" / "cluster.yaml")
    assert len(spec.nodes) >= 2 and spec.routing in ("session", "random", "prefix")
    assert len({(n.gpu_kv_gb, n.host_gb) for n in spec.nodes}) > 1, "the example should be heterogeneous"


@pytest.fixture(scope="module")
def chat():
    t = generate_chat(ChatWorkload(sessions=120, seed=5))
    return t, prepare_trace(t)


def _spec(routing):
    doc = {"routing": routing, "model": "Qwen2.5-7B",
           "nodes": [{"name": "big", "gpu_kv_gb": 0.4, "host_gb": 4}, {"name": "small", "gpu_kv_gb": 0.2, "host_gb": 0.5}]}
    return parse_cluster(doc)


def test_session_routing_is_sticky_and_accounts_every_request(chat):
    trace, pr = chat
    spec = _spec("session")
    sizing = BlockSizing.build(PRESETS["Qwen2.5-7B"], spec.cache_format, trace.block_size)
    caches = [TwoTierCache(10, 10), TwoTierCache(10, 10)]
    r = Router("session", caches)
    where = {}
    for p in pr:
        assert where.setdefault(p.request.session, r.route(p)) == r.route(p)
    res = simulate_cluster(pr, spec, sizing)
    assert sum(n.stats.requests for n in res.nodes) == len(trace)
    assert all(n.stats.requests > 0 for n in res.nodes)
    assert res.nodes[0].gpu_blocks == sizing.gpu_blocks(0.4)
    tot = res.totals()
    assert tot["hit_rate"] == pytest.approx(tot["gpu_hit_rate"] + tot["host_hit_rate"])


def test_prefix_routing_beats_random_on_multi_turn_chat(chat):
    trace, pr = chat
    sizing = BlockSizing.build(PRESETS["Qwen2.5-7B"], CacheFormat(), trace.block_size)
    res = {p: simulate_cluster(pr, _spec(p), sizing) for p in ("random", "prefix")}
    assert res["prefix"].totals()["hit_rate"] > res["random"].totals()["hit_rate"]
    # the balance guard: no node starves even though every session shares a system prompt
    assert all(n.stats.requests > 0.3 * len(trace) for n in res["prefix"].nodes)


def test_recommendation_is_smallest_size_within_one_point(chat):
    trace, pr = chat
    spec = _spec("session")
    sizing = BlockSizing.build(PRESETS["Qwen2.5-7B"], spec.cache_format, trace.block_size)
    res = recommend_host_gb(pr, spec, sizing)
    for node in res.nodes:
        sizes = sorted(node.hit_rate_by_host_gb)
        full = node.hit_rate_by_host_gb[max(sizes)]
        assert node.stats.hit_rate == pytest.approx(full)
        rec = node.recommended_host_gb
        assert node.hit_rate_by_host_gb[rec] >= full - 0.01
        assert all(node.hit_rate_by_host_gb[s] < full - 0.01 for s in sizes if s < rec)
    assert res.nodes[0].hit_rate_by_host_gb[0.0] < res.nodes[0].stats.hit_rate  # the host tier helps here


def test_recommendation_names_a_size_that_was_replayed_even_for_a_tiny_host(chat):
    """Rounding the sizes to 0.01 GiB named sizes never replayed (0.0025 GiB reported as 0: the tier
    off) and let two sizes overwrite each other's hit rate."""
    trace, pr = chat
    doc = {"routing": "session", "model": "Qwen2.5-7B", "nodes": [{"name": "tiny", "gpu_kv_gb": 0.05, "host_gb": 0.02}]}
    spec = parse_cluster(doc)
    sizing = BlockSizing.build(PRESETS["Qwen2.5-7B"], spec.cache_format, trace.block_size)
    node = recommend_host_gb(pr, spec, sizing).nodes[0]
    assert sorted(node.hit_rate_by_host_gb) == [0.02 * f for f in (0, 0.125, 0.25, 0.5, 0.75, 1.0)]
    assert node.recommended_host_gb in node.hit_rate_by_host_gb
    assert (node.recommended_host_gb == 0) == (node.hit_rate_by_host_gb[0.0] >= node.stats.hit_rate - 0.01)
