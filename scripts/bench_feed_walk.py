"""What the node cache-state feed costs the engine's scheduler thread (``integration/cache_state_feed.py``).

    python scripts/bench_feed_walk.py [--gpu-blocks 8192 32768 131072] [--host-blocks 100000 1000000]

For each GPU trie size: LMDeploy's real ``Scheduler`` (CPU, block size 64, the host tier's connector) is
filled with that many trie blocks (requests of 512 blocks), then it times one whole reconciliation pass
(``on_step(force=True)``: what a plain ``on_step`` ran in one step every 0.5 s before the walk was
budgeted) and the budgeted ``on_step`` of three passes over an unchanged trie (steps per pass; median,
p90 and largest step). For each host tier size: how long a new reader's snapshot poll and a 32,768-event
poll hold ``NodeCacheFeed.lock`` (which the scheduler thread's host-index listener takes), against the
whole ``FeedPublisher.poll`` (what was done under that lock before).
"""
from __future__ import annotations

import argparse
import random
import threading
import time

import numpy as np
from lmdeploy.messages import KVTransferConfig
from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig
from lmdeploy.pytorch.kv_connector import KVConnectorRole
from lmdeploy.pytorch.messages import SequenceMeta, UpdateTokenMode
from lmdeploy.pytorch.paging.scheduler import Scheduler
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy

from lmdeploy_hostcache.integration.cache_state_feed import NodeCacheFeed
from lmdeploy_hostcache.integration.connector import CONNECTOR_NAME, build_host_tier_connector, install_scheduler_hook
from lmdeploy_hostcache.routing.feed import FeedPublisher
from lmdeploy_hostcache.routing.table import HOST

BS, PER_REQUEST = 64, 512


def engine(gpu_blocks: int):
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"min_restore_tokens": 0}, "host_cache_blocks": 16, "host_slot_bytes": 1000,
        "model_identity": "bench"})
    cc = CacheConfig(max_batches=8, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=gpu_blocks,
                     enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc,
                     max_prefill_token_num=1 << 20)
    conn = build_host_tier_connector(KVConnectorRole.SCHEDULER, cc)
    s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=1 << 20), cc,
                  seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=conn)
    install_scheduler_hook(s)
    return s, conn.scheduler_side


def fill(s, blocks: int) -> None:
    rng = np.random.default_rng(0)
    for sid in range(blocks // PER_REQUEST):
        seq = s.add_session(sid).add_sequence(rng.integers(0, 32000, size=PER_REQUEST * BS + 1))
        out = s.schedule(is_prefill=True)
        assert out.running == [seq]
        s.activate_seqs(out.running)
        seq.update_token_ids(np.array([7]), mode=UpdateTokenMode.PREFILL)
        s.release_completed_prefill_reservations(out.running)
        seq.state.finish()
        s.end_session(sid)


def bench_walk(blocks: int) -> None:
    s, side = engine(blocks + 64)
    fill(s, blocks)
    feed = NodeCacheFeed(side, s.block_trie, blocks + 64, gpu_refresh_s=0.0)
    feed.on_step(force=True)            # the first pass hashes every node (memoised on the nodes after)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        feed.on_step(force=True)
    whole = (time.perf_counter() - t0) / reps
    times, units, first = [], [], feed.passes
    while feed.passes < first + 3:
        t0 = time.perf_counter()
        feed.on_step()
        times.append(time.perf_counter() - t0)
        units.append(feed.last_step_units)
    times.sort()
    median, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
    print(f"GPU trie {len(feed.published_gpu()):7d} blocks: whole pass {whole * 1e3:7.2f} ms; budgeted on_step "
          f"(walk_budget {feed.walk_budget}): {len(times) / 3:4.0f} steps/pass, median {median * 1e3:.3f} ms, "
          f"p90 {p90 * 1e3:.3f} ms, max {times[-1] * 1e3:.3f} ms, max units {max(units)}", flush=True)


class TimedLock:
    def __init__(self):
        self.lock, self.held = threading.Lock(), []

    def __enter__(self):
        self.lock.acquire()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.held.append(time.perf_counter() - self.t0)
        self.lock.release()


def bench_poll(host_blocks: int) -> None:
    s, side = engine(64)
    feed = NodeCacheFeed(side, s.block_trie, 64)
    ns = side.namespaces.for_adapter(None)
    pub = feed.publisher = FeedPublisher(gpu_blocks=64, host_blocks=host_blocks, namespace=ns)
    r = random.Random(1)
    for _ in range(host_blocks):
        pub.stored(HOST, r.getrandbits(128))
    feed.lock = TimedLock()
    for label, args in (("snapshot poll", (None, None)), ("32,768-event poll", (pub.epoch, pub.seq - len(pub._ring)))):
        t0 = time.perf_counter()
        whole = pub.poll(*args)
        t_whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = feed.poll(*args)
        t_feed = time.perf_counter() - t0
        assert got == whole
        print(f"host tier {host_blocks:8d} blocks: {label}: FeedPublisher.poll {t_whole * 1e3:6.1f} ms; "
              f"NodeCacheFeed.poll {t_feed * 1e3:6.1f} ms, of which under the lock {feed.lock.held[-1] * 1e3:5.1f} ms",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-blocks", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--host-blocks", type=int, nargs="*", default=[100_000, 1_000_000])
    args = ap.parse_args()
    for n in args.gpu_blocks:
        bench_walk(n)
    for n in args.host_blocks:
        bench_poll(n)


if __name__ == "__main__":
    main()
