"""The chain in the engine: two harness "nodes" (two processes: LMDeploy's real scheduler, both
connector roles, the prefix-oracle checker of every GPU block and host slot after every step)
share one real mooncake_master on 127.0.0.1. Node B restores, byte-exact, prefixes only node A
computed; a master killed or hung mid-run falls back to recompute with zero wrong bytes and no
leaked slot (the node checks its slot accounting at the end: check_host_tier_balanced)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l3_helpers import needs_mooncake

from lmdeploy_hostcache.l3.master import LoopbackMaster, loopback_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NODE = HERE / "l3_engine_node.py"


pytestmark = needs_mooncake


def _env():
    return {**os.environ, "TRITON_INTERPRET": "1", "MC_TCP_BIND_ADDRESS": "127.0.0.1", "L3_HOST_SLOTS": "12"}


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _clean(r: dict) -> None:
    assert r["wrong_blocks"] == 0, r["first_error"]
    assert r["checks"] == r["iterations"] and r["finished"] + r["aborted"] == r["requests"]
    assert r["balanced"]["host_free"] == r["balanced"]["host_slots"] - r["balanced"]["host_resident"]


def _with_node_a(fn):
    loopback_env()
    with LoopbackMaster() as master:
        a = subprocess.Popen([sys.executable, str(NODE), master.address, "A"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                             start_new_session=True)
        try:
            out = ""
            for line in a.stdout:
                out += line
                if line.startswith("RESULT "):
                    break
            ra = _result(out)
            _clean(ra)
            assert ra["l3_put_blocks"] > 0
            return ra, fn(master)
        finally:
            try:
                a.stdin.close()
                a.wait(30)
            except Exception:  # noqa: BLE001
                pass
            if a.poll() is None:
                os.killpg(a.pid, 9)
                a.wait(10)


def _node_b(master, *fault, read_only: bool = False) -> dict:
    extra = [*fault, str(master.proc.pid)] if fault else []
    env = {**_env(), "L3_READ_ONLY": "1"} if read_only else _env()
    out = subprocess.run([sys.executable, str(NODE), master.address, "B", *extra], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return _result(out.stdout)


def test_node_b_restores_byte_exact_prefixes_only_node_a_computed():
    # Node B writes nothing to the store (L3_READ_ONLY), so every block it restores from there is one
    # node A wrote. Counting, per restored block, whether B's own write-backs had put it was timing-
    # dependent: B computes the same blocks and may write one back before it looks it up (a CI run of
    # 2026-12-03 restored 34 blocks, all after B's own write-back).
    loopback_env()
    with LoopbackMaster() as master:      # baseline: node B alone, on an empty store
        alone = _node_b(master, read_only=True)
    _clean(alone)
    assert alone["l3_get_blocks"] == 0 and alone["l3_restored_from_others"] == 0, alone
    # How many of A's blocks B finds and restores depends on both nodes' timing (LMDeploy's long-prompt
    # aging reads the wall clock, and the store's writes are asynchronous): usually 6 to 12 restored
    # blocks, but one fresh-clone CI run of 2026-12-04, on a loaded machine, found 2 and restored none.
    # Every attempt is checked byte for byte; a restore from the store must happen in one of three.
    for _attempt in range(3):
        ra, rb = _with_node_a(lambda m: _node_b(m, read_only=True))
        _clean(rb)                        # every GPU block and host slot byte-checked, every step
        assert rb["l3_errors"] == 0, rb
        assert rb["l3_restored_own"] == 0 and rb["l3_restored_from_others"] == rb["l3_get_blocks"], rb
        if rb["l3_get_blocks"] > 0:
            break
    assert rb["l3_hit_blocks"] > 0 and rb["l3_get_blocks"] > 0 and rb["l3_bytes_from_l3"] > 0, rb
    assert rb["restored_tokens"] > 0


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_master_fault_mid_run_recomputes_with_zero_wrong_bytes(fault):
    ra, rb = _with_node_a(lambda m: _node_b(m, fault, "8"))
    _clean(rb)
    assert rb["l3_errors"] > 0, rb        # the store failed under it ...
    assert rb["restored_tokens"] > 0      # ... and the node kept serving (host hits, recompute)


@pytest.mark.parametrize("on_unreachable", ["error", "warn"])
def test_unreachable_store_at_engine_start(on_unreachable, caplog):
    """No master at the address: the engine refuses to start naming it, or (warn) starts with the
    GPU and host tiers only."""
    from lmdeploy_hostcache.testing.harness import HarnessCacheSpec, HarnessModel
    from lmdeploy_hostcache.testing.harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side, worker_side

    from lmdeploy_hostcache.l3 import L3Unavailable
    from lmdeploy_hostcache.l3.master import free_port

    addr = f"127.0.0.1:{free_port()}"
    spec = HostTierSpec(host_slots=4, l3={"master_address": addr, "on_unreachable": on_unreachable,
                                          "global_segment_gb": 1 / 64, "local_buffer_gb": 1 / 64})
    build = lambda: build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=8), spec)  # noqa: E731
    if on_unreachable == "error":
        with pytest.raises(L3Unavailable, match=addr.replace(".", r"\.")):
            build()
        return
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache.l3"):
        engine = build()
    assert scheduler_side(engine).l3 is None and worker_side(engine).l3 is None
    assert caplog.text.count(addr) >= 1 and "without the shared L3 tier" in caplog.text
    if hasattr(engine, "close"):
        engine.close()
