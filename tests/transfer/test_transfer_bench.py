"""`lmdeploy-hostcache bench transfer --json` prints measured figures."""
from __future__ import annotations

import json

from lmdeploy_hostcache.cli import main


def test_bench_transfer_json(capsys):
    rc = main(["bench", "transfer", "--json", "--blocks", "4", "--sizes-kib", "64,256", "--layers", "4",
               "--repeats", "3", "--no-quant"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["block_kib"] for r in out["cpu"]] == [64, 256]
    for r in out["cpu"]:
        assert r["bytes"] == 4 * r["block_kib"] * 1024
        assert r["gather_gbps"] > 0 and r["contiguous_gbps"] > 0 and r["gather_vs_contiguous"] > 0
    assert out["cpu_gather_vs_contiguous"] == out["cpu"][1]["gather_vs_contiguous"]
    if out["cuda"] is None:
        assert out["gpu"] is None and "not measured" in out["gpu_note"]
