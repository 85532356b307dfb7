"""The store row of `bench transfer` runs its own master and measures a byte-exact round trip."""
from __future__ import annotations

from l3_helpers import needs_mooncake

from lmdeploy_hostcache.bench.store import store_rows
from lmdeploy_hostcache.l3.master import master_binary


@needs_mooncake
def test_store_rows_measure_and_clean_up():
    import subprocess

    rows, why = store_rows([64, 256], blocks=4, repeats=2)
    assert why is None
    assert [r["block_kib"] for r in rows] == [64, 256]
    for r in rows:
        assert r["bytes"] == r["block_kib"] * 1024 * 4
        assert r["put_gbps"] > 0 and r["get_gbps"] > 0
    # the master it started is gone
    out = subprocess.run(["pgrep", "-f", master_binary()], capture_output=True, text=True)
    mine = [p for p in out.stdout.split() if p]
    assert not any(_is_child_of_us(int(p)) for p in mine)


def _is_child_of_us(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return False
    return ppid == os.getpid()


@needs_mooncake
def test_bench_transfer_has_the_store_rows_next_to_the_host_pool(capsys):
    import json

    from lmdeploy_hostcache.cli import main

    rc = main(["bench", "transfer", "--json", "--blocks", "4", "--sizes-kib", "64,256", "--layers", "4",
               "--repeats", "3", "--no-quant"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["block_kib"] for r in out["cpu"]] == [r["block_kib"] for r in out["store"]] == [64, 256]
    assert all(r["get_gbps"] > 0 and r["put_gbps"] > 0 for r in out["store"]) and out["store_note"] is None
    rc = main(["bench", "transfer", "--json", "--blocks", "2", "--sizes-kib", "64", "--layers", "4",
               "--repeats", "1", "--no-quant", "--no-store"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["store"] == [] and out["store_note"] == "--no-store given"
