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
