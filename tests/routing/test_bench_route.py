"""``lmdeploy-hostcache bench route`` prints measured figures (tiny sizes here)."""
from __future__ import annotations

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "bench", "route", *args],
                          capture_output=True, text=True, timeout=120)


def test_bench_route_json_has_measured_figures():
    p = _run("--nodes", "2", "5", "--blocks-per-node", "20000", "--requests", "50", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [r["nodes"] for r in res["runs"]] == [2, 5]
    for r in res["runs"]:
        assert r["cached_blocks"] == r["nodes"] * 20000 and r["table_entries"] == r["cached_blocks"]
        assert 0 < r["decision_ms_median"] <= r["decision_ms_p99"]
        assert 0 < r["table_bytes_per_cached_block"] < 64


def test_bench_route_bad_argument_is_one_line():
    p = _run("--nodes", "0")
    assert p.returncode == 2 and "--nodes" in p.stderr and "Traceback" not in p.stderr
