"""What a request LMDeploy cannot admit yet costs the scheduler thread at every pass.

    python scripts/bench_blocked_request.py [--blocks 100 1000 4000] [--passes 30]

LMDeploy's real ``Scheduler`` on CPU (block size 64): one running request holds most of the GPU, so the
waiting request of ``--blocks`` full blocks cannot be admitted, and every prefill pass tries it again. Per
pass (``schedule`` + the connector's ``build_connector_meta``), the mean time of ``--passes`` passes:

* ``stock``: no connector (LMDeploy alone);
* ``miss``: the host tier on, the prompt not in it;
* ``host``: the host tier on, the whole prompt in it (the connector looks it up, holds it for the pass and
  releases it at every pass).

Printed figures are measured in this run on this machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from lmdeploy.messages import KVTransferConfig
from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig
from lmdeploy.pytorch.kv_connector import KVConnectorRole
from lmdeploy.pytorch.messages import SequenceMeta, UpdateTokenMode
from lmdeploy.pytorch.paging.scheduler import Scheduler
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy

from lmdeploy_hostcache.integration.connector import CONNECTOR_NAME, build_host_tier_connector, install_scheduler_hook
from lmdeploy_hostcache.tier.digest import chain_digests

BS = 64


def _scheduler(gpu_blocks: int, host_blocks: int, connector: bool):
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"min_restore_tokens": 0}, "host_cache_blocks": host_blocks, "host_slot_bytes": 1000,
        "model_identity": "bench"}) if connector else None
    cc = CacheConfig(max_batches=256, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=gpu_blocks,
                     enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc,
                     max_prefill_token_num=1 << 20)
    conn = build_host_tier_connector(KVConnectorRole.SCHEDULER, cc) if connector else None
    s = Scheduler(SchedulerConfig(max_batches=256, max_session_len=1 << 20), cc,
                  seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=conn)
    if conn is not None:
        install_scheduler_hook(s)
    return s, (conn.scheduler_side if conn is not None else None)


def measure(blocks: int, mode: str, passes: int) -> float:
    """Mean seconds per pass while a ``blocks``-block request waits for GPU room (``mode`` as above)."""
    s, side = _scheduler(blocks + 300, 4 * blocks + 64, connector=mode != "stock")
    rng = np.random.default_rng(blocks)
    tokens = rng.integers(0, 32000, size=blocks * BS + 1)
    if mode == "host":   # the whole prompt in the host tier, as demotions would have left it
        ns = side.namespaces.for_adapter(None)
        digests, token_bytes = chain_digests(ns, tokens[:blocks * BS])
        parent = ns.root
        for d, b in zip(digests, token_bytes):
            side.index.prepare_store(d, parent, b)
            side.index.complete_store(d, True)
            parent = d
    big = s.add_session(0).add_sequence(rng.integers(40000, 50000, size=(blocks // 2 + 250) * BS))
    out = s.schedule(is_prefill=True)
    assert out.running == [big]
    s.activate_seqs(out.running)
    big.update_token_ids(np.array([7]), mode=UpdateTokenMode.PREFILL)
    s.release_completed_prefill_reservations(out.running)
    s.add_session(1).add_sequence(tokens)

    def one_pass() -> None:
        assert not s.schedule(is_prefill=True).running, "the waiting request was admitted"
        if side is not None:
            side.build_connector_meta(None)

    one_pass()
    t0 = time.perf_counter()
    for _ in range(passes):
        one_pass()
    return (time.perf_counter() - t0) / passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[100, 1000, 4000])
    p.add_argument("--passes", type=int, default=30)
    args = p.parse_args()
    for blocks in args.blocks:
        row = "  ".join(f"{mode} {measure(blocks, mode, args.passes) * 1e3:7.3f} ms"
                        for mode in ("stock", "miss", "host"))
        print(f"waiting request of {blocks:5d} blocks, per pass: {row}", flush=True)


if __name__ == "__main__":
    main()
