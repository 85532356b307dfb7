"""The planner's shared L3 tier (planner/l3.py) and `plan --cluster --l3-gb`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_hostcache.planner.cluster import parse_cluster, simulate_cluster
from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
from lmdeploy_hostcache.planner.geometry import BlockSizing
from lmdeploy_hostcache.planner.l3 import SharedStore, ThreeTierCache, simulate_cluster_l3
from lmdeploy_hostcache.planner.replay import prepare_trace
from lmdeploy_hostcache.planner.traces import Request, Trace

REPO = Path(__file__).resolve().parents[2]


def _spec(routing="session"):
    return parse_cluster({"routing": routing, "nodes": [{"name": "a", "gpu_kv_gb": 4, "host_gb": 8},
                                                       {"name": "b", "gpu_kv_gb": 2, "host_gb": 2}]})


def test_zero_store_is_exactly_the_nodes_alone():
    t = generate_chat(ChatWorkload(sessions=60, seed=3))
    prepared = prepare_trace(t)
    spec = _spec()
    sizing = BlockSizing.build(spec.geometry(), spec.cache_format, t.block_size)
    alone = simulate_cluster(prepared, spec, sizing).totals()
    none = simulate_cluster_l3(prepared, spec, sizing, 0.0)
    assert none.totals["l3_hit_blocks"] == 0
    for k in ("gpu_hit_blocks", "host_hit_blocks", "prompt_blocks"):
        assert none.totals[k] == alone[k]
    big = simulate_cluster_l3(prepared, spec, sizing, 64.0)
    assert big.totals["hit_rate"] >= alone["hit_rate"]
    assert big.totals["l3_hit_blocks"] > 0 and big.store["write_backs"] > 0


def _req(ts, ids, session):
    return Request(timestamp=ts, input_length=len(ids) * 4 + 1, output_length=1, hash_ids=tuple(ids), session=session)


def test_node_b_hits_what_node_a_wrote_back():
    # node A computes a 6-block prefix, then enough other prompts to push it through its GPU (8 blocks)
    # and host (2 blocks) tiers into the store; node B then asks for the same prefix.
    store = SharedStore(64)
    a = ThreeTierCache(8, 2, store, "lru", 4)
    reqs = [_req(0, [1, 2, 3, 4, 5, 6], "s")] + [_req(1 + i, [100 + 10 * i + j for j in range(4)], "t")
                                                 for i in range(6)] + [_req(9, [1, 2, 3, 4, 5, 6, 7], "u")]
    prepared = prepare_trace(Trace("t", 4, reqs))
    for pr in prepared[:-1]:
        a.serve(pr)
    assert store.puts > 0
    b = ThreeTierCache(8, 14, store, "lru", 4)
    g, h = b.serve(prepared[-1])
    assert (g, h) == (0, 0) and b.l3_hit_blocks == 6      # all six from the store, none recomputed
    store.index.check_invariants()
    # as the connector: store hits are staged through host slots, at most half of them per request
    small = ThreeTierCache(8, 8, store, "lru", 4)
    assert small.serve(prepared[-1]) == (0, 0) and small.l3_hit_blocks == 4
    # and a node without a host tier (host_cache_gb 0: the connector is off) reads nothing from the store
    none = ThreeTierCache(8, 0, store, "lru", 4)
    assert none.serve(prepared[-1]) == (0, 0) and none.l3_hit_blocks == 0


def test_cli_reports_the_store_and_refuses_it_without_cluster(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("routing: session\nnodes:\n  - {name: a, gpu_kv_gb: 4, host_gb: 8}\n"
                 "  - {name: b, gpu_kv_gb: 2, host_gb: 2}\n")
    cmd = [sys.executable, "-m", "lmdeploy_hostcache.cli", "plan", "--chat", "--chat-sessions", "40",
           "--cluster", str(y), "--l3-gb", "64", "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["l3"]["l3_gb"] == 64 and doc["l3"]["l3_gbps_assumed"] is True
    assert doc["l3"]["totals"]["hit_rate"] >= doc["hit_rate"]
    bad = subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "plan", "--chat", "--l3-gb", "64"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "--cluster" in bad.stderr and "Traceback" not in bad.stderr
