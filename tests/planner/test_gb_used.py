"""A single run reports the configured capacity and the memory the tiers used, each under its own name
(audit of 2026-12-05: "capacity (GiB, used)" and ``host_gb_used`` showed the configured size, which a
trace with fewer distinct blocks never fills; docs/planner.md "Memory follows the trace").
"""
import json
import re

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner.replay import TwoTierCache, distinct_blocks, prepare_trace, replay
from lmdeploy_hostcache.planner.traces import Request, Trace

CHAT = ["--chat", "--chat-sessions", "20", "--limit", "200", "--quiet", "--no-concurrency"]
GIB = 2**30


def _plan(capsys, argv):
    rc = main(["plan", *CHAT, *argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def test_a_huge_host_tier_reports_its_capacity_and_the_little_it_used(capsys):
    d = json.loads(_plan(capsys, ["--host-gb", "100000", "--json"]))
    distinct, gpu_bytes, host_bytes = d["distinct_blocks"], d["gpu_block_bytes"], d["host_block_bytes_per_rank"]
    assert d["host_gb_capacity"] == pytest.approx(100000) and d["gpu_gb_capacity"] == pytest.approx(20)
    # the 20 GiB GPU tier (2,560 blocks) holds every distinct block of this trace: one request at a time, every full
    # prompt block is stored and none is ever evicted, so the GPU used exactly the distinct blocks and the host
    # tier received nothing (was: host_gb_used 100000.0)
    assert 2560 >= distinct and d["demotions"] == 0
    assert d["gpu_peak_blocks"] == distinct and d["host_peak_blocks"] == 0
    assert d["gpu_gb_used"] == pytest.approx(distinct * gpu_bytes / GIB)
    assert d["host_gb_used"] == 0.0
    assert d["host_gb_used"] <= distinct * host_bytes / GIB < d["host_gb_capacity"]


def test_squeezed_tiers_use_their_whole_capacity(capsys):
    d = json.loads(_plan(capsys, ["--gpu-blocks", "60", "--host-blocks", "200", "--json"]))
    assert d["demotions"] > 200 and d["host_evictions"] > 0         # both tiers filled up
    assert (d["gpu_peak_blocks"], d["host_peak_blocks"]) == (60, 200)
    assert d["gpu_gb_used"] == d["gpu_gb_capacity"] == pytest.approx(60 * d["gpu_block_bytes"] / GIB)
    assert d["host_gb_used"] == d["host_gb_capacity"] == pytest.approx(200 * d["host_block_bytes_per_rank"] / GIB)


def test_the_table_shows_capacity_and_use_on_rows_of_their_own(capsys):
    text = _plan(capsys, ["--host-gb", "100000"])
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines())
            if "(GiB" in cells[0]}
    assert rows["capacity (GiB)"] == ["20.0", "20.0 + 100000.0"], rows
    # 1,245 blocks of 8 MiB: the chat's prompts' blocks and its requests' output blocks (the generator names them
    # since it models the trie keeping a reply for the next turn; 1,114 before, the prompts' alone)
    assert rows["used (GiB, at the peak)"] == ["9.7", "9.7 + 0.0"], rows
    assert "capacity (GiB, used)" not in text


def test_the_peak_is_the_most_blocks_a_tier_held_at_once():
    # one request at a time; the peak is never above the capacity nor the distinct blocks, and equals a count of
    # resident blocks taken after every request (nothing is pinned between requests in this replay)
    reqs = [Request(float(i), 4 * n, 1, tuple(range(100 * (i % 3), 100 * (i % 3) + n)), i % 3)
            for i, n in enumerate((3, 5, 2, 6, 4, 7, 1, 8, 3))]
    prepared = prepare_trace(Trace("t", 4, reqs))
    distinct = distinct_blocks(prepared)
    for gpu, host in ((2, 0), (4, 3), (6, 100), (100, 100)):
        cache = TwoTierCache(gpu, host, "lru", 4)
        most = [0, 0]
        for p in prepared:
            cache.serve(p)
            most = [max(most[0], len(cache.gpu)), max(most[1], len(cache.host))]
        st = cache.finish()
        assert (st.gpu_peak_blocks, st.host_peak_blocks) == tuple(most), (gpu, host)
        assert st.gpu_peak_blocks <= min(gpu, distinct) and st.host_peak_blocks <= min(host, distinct)
        assert replay(prepared, gpu, host, "lru", 4).as_dict()["gpu_peak_blocks"] == st.gpu_peak_blocks
