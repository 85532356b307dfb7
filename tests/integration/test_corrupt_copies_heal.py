"""A corrupt copy must cost one restore, not every later one.

* Host tier (``checksum: true``): a host slot whose bytes changed after its demotion is refused by
  the worker, which reports the slot (``corrupt_slot_marker``); the scheduler drops that block (and
  its host subtree), so the block the GPU recomputes is demoted again into a fresh slot and the
  prefix restores again. Before, the corrupt block stayed indexed: every later turn counted a host
  hit, shipped a load, was refused and recomputed, and the recomputed block's demotion was skipped
  as "already on host".
* Store tier: an object that fails its checks when staged is removed from the store, so no node's
  lookup finds it any more and the next write-back of its block puts a good one (a put never
  replaces an object).

Every engine step is byte-checked against the prefix oracle (GPU blocks and host slots).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lmdeploy.pytorch.kv_connector")

from lmdeploy_hostcache.integration import l3_tier  # noqa: E402
from lmdeploy_hostcache.integration.worker import (corrupt_slot, corrupt_slot_marker, failed_demotion_marker,  # noqa: E402
                                                   pool_reset_step)
from lmdeploy_hostcache.l3.chain import WorkerChain, WriteBack  # noqa: E402
from lmdeploy_hostcache.l3.client import L3Client  # noqa: E402
from lmdeploy_hostcache.l3.keys import StoreKeyspace  # noqa: E402
from lmdeploy_hostcache.testing.harness import (HarnessCacheSpec, HarnessModel, TurnSpec,  # noqa: E402
                                                WorkloadDriver, check_gpu_refcounts_balanced)
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec,  # noqa: E402
                                                          build_host_tier_engine, check_host_tier_balanced,
                                                          rank_checkers, scheduler_side, worker_side)
from lmdeploy_hostcache.tier.digest import ChainHasher, Namespace  # noqa: E402
from lmdeploy_hostcache.tier.metrics import L3TierMetrics  # noqa: E402
from tests.integration.test_l3_restore_paths import DictStore  # noqa: E402

BS = 16


def _hot_conversation(rounds: int, prefix_blocks: int, filler_blocks: int = 14, seed: int = 11):
    """One session: a hot prefix asked again every other turn, with filler turns evicting it between."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(10, 30000, prefix_blocks * BS)
    turns = []
    for r in range(rounds):
        hot = np.concatenate([prefix, rng.integers(10, 30000, BS // 2)])
        turns.append(TurnSpec("hot", 2 * r, hot, 2, think_steps=1))
        turns.append(TurnSpec("hot", 2 * r + 1, rng.integers(10, 30000, filler_blocks * BS + 3), 2, think_steps=1))
    return [turns], prefix


def _build(gpu_blocks=16, host_slots=32, tp=1, **host):
    return build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                  HarnessCacheSpec(num_gpu_blocks=gpu_blocks, max_prefill_token_num=512),
                                  HostTierSpec(host_slots=host_slots, **host), tp=tp)


def _prefix_digests(side, prefix):
    h = ChainHasher(side.namespaces.for_adapter(None))
    h.extend([int(t) for t in prefix])
    return list(h.digests)


# -- host tier ----------------------------------------------------------------------------------

def test_the_worker_reports_every_corrupt_slot_once_with_its_refused_load():
    from test_connector_worker import CpuCache, cache_config, random_bytes, run, worker_for
    from lmdeploy_hostcache.integration.connector import HostLoad, HostTierMetadata

    cc = cache_config(checksum=True)
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    out = run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1), (5, 2), (6, 3))))
    assert out.completed_save_ids == {0}
    w.worker_side.pool.slot_view(1)[3] ^= 0x01
    w.worker_side.pool.slot_view(3)[3] ^= 0x01
    out = run(w, HostTierMetadata(step=2, loads=(HostLoad(5, (1, 2, 3), (9, 10, 11)),)))
    assert out.finished_receiving == {5}
    assert out.invalid_block_ids == {9, 10, 11, corrupt_slot_marker(1), corrupt_slot_marker(3)}
    assert run(w, HostTierMetadata(step=3)).invalid_block_ids == set(), "reported once"
    w.shutdown()


def test_corrupt_slot_markers_stay_apart_from_the_other_ids():
    for slot in (0, 1, 12345, (1 << 61) - 1):
        m = corrupt_slot_marker(slot)
        assert corrupt_slot(m) == slot and pool_reset_step(m) is None and m < -(1 << 60)
    assert corrupt_slot(-1) is None and corrupt_slot(7) is None          # a batch marker, a GPU block
    assert corrupt_slot(-(1 << 62) - 5) is None                          # a pool reset marker
    with pytest.raises(ValueError):
        corrupt_slot_marker(1 << 61)


def test_failed_demotion_markers_are_never_a_gpu_block_or_another_marker():
    """LMDeploy's ``invalid_block_ids`` carries GPU block ids (0 and up) beside the worker's markers: a
    failed demotion batch, the first one (0) included, must never read as a failed load's GPU block."""
    markers = [failed_demotion_marker(b) for b in (0, 1, 2, 1 << 40)]
    assert all(m < 0 for m in markers) and len(set(markers)) == len(markers)
    assert all(pool_reset_step(m) is None and corrupt_slot(m) is None for m in markers)


@pytest.mark.parametrize("tp,keep_restored,delay", [(1, True, 0), (1, False, 0), (2, True, 0), (2, False, 1)])
def test_a_corrupt_host_copy_is_dropped_and_the_prefix_restores_again(tp, keep_restored, delay):
    """``delay``: copies complete polls later, so the corrupt rank reports the slot steps before the
    other rank finishes the same load (the scheduler keeps the marker until the load ends)."""
    engine = _build(tp=tp, checksum=True, copy_delay_polls=delay)
    side = scheduler_side(engine)
    side.index.keep_restored = keep_restored   # the harness builds with the default (on)
    convs, prefix = _hot_conversation(rounds=10, prefix_blocks=4)
    first = _prefix_digests(side, prefix)[0]
    state = {}

    def corrupt_once(driver):
        b = side.index.get(first)
        if "slot" not in state and b is not None and side.index.is_resident(first) \
                and not side.index.allocator.pins(b.slot):
            view = worker_side(engine, engine.tp - 1).pool.slot_view(b.slot)   # one rank's copy only
            view[len(view) // 3] ^= 0x10
            state.update(slot=b.slot, restored=side.metrics.snapshot()["restored_tokens"])

    checkers = rank_checkers(engine)   # every GPU block (the host slot checker would flag the planted corruption)
    result = WorkloadDriver(engine, convs, checker=checkers, max_active=1, on_iteration=corrupt_once).run()
    m = side.stats()
    assert "slot" in state and result.finished == result.requests
    for c in checkers:
        assert c.stats.wrong_blocks == 0
    assert m["restore_failures"] == 1, "one refused restore, then the corrupt copy is gone"
    assert m["corrupt_blocks"] == 1
    assert m["restored_tokens"] - state["restored"] >= 6 * 4 * BS, "the prefix restores again on later turns"
    b = side.index.get(first)
    if b is not None and side.index.is_resident(first) and not b.on_gpu:
        assert all(worker_side(engine, r)._slot_intact(b.slot) for r in range(engine.tp))
    assert not [v for v in side._invalid if corrupt_slot(v) is not None], "no corrupt marker left behind"
    check_gpu_refcounts_balanced(engine.scheduler)
    check_host_tier_balanced(engine)


# -- store tier ---------------------------------------------------------------------------------

def _worker_chain(store, slots=4, nbytes=64):
    pool = bytearray(slots * nbytes)
    space = StoreKeyspace(Namespace(model="toy", block_size=8), block_nbytes=nbytes)

    def read(slot):
        return memoryview(pool)[slot * nbytes:(slot + 1) * nbytes]

    def write(slot, payload):
        pool[slot * nbytes:(slot + 1) * nbytes] = bytes(payload)

    metrics = L3TierMetrics()
    return WorkerChain(L3Client(store, metrics=metrics), space, nbytes, read, write), pool, space, metrics


@pytest.mark.parametrize("removable", [True, False])
def test_a_corrupt_store_object_is_removed_so_the_next_write_back_replaces_it(removable):
    store = DictStore(removable=removable)
    chain, pool, space, metrics = _worker_chain(store)
    tokens = [bytes([i]) * 32 for i in range(2)]
    good = [bytes([0x40 + i]) * 64 for i in range(2)]
    for i in range(2):
        pool[i * 64:(i + 1) * 64] = good[i]
    assert chain.write_back([WriteBack(10 + i, tokens[i], i) for i in range(2)]) == 2
    key = space.key(11)
    store.objects[key] = store.objects[key][:len(store.objects[key]) // 2]   # an interrupted write-back
    assert not chain.stage([10, 11], tokens, [2, 3])
    assert metrics.snapshot()["corrupt"] == 1
    if not removable:   # a backend that cannot remove: still only a failed stage, nothing else breaks
        assert key in store.objects and metrics.snapshot()["corrupt_removed"] == 0
        return
    assert key not in store.objects and space.key(10) in store.objects
    assert metrics.snapshot()["corrupt_removed"] == 1
    chain.write_back([WriteBack(11, tokens[1], 1)])                           # the block's next write-back
    assert chain.stage([10, 11], tokens, [2, 3])
    assert bytes(pool[2 * 64:4 * 64]) == good[0] + good[1]


def test_a_half_written_store_object_costs_one_restore_not_every_later_one(monkeypatch):
    """Host holds the hot prefix's first blocks, the store its last two, and the store object of the
    last block is half-written: the first restore through it fails (recompute); the object is removed,
    the block's next write-back puts a good one, and later turns restore the whole prefix."""
    store = DictStore(removable=True)
    monkeypatch.setattr(l3_tier, "connect", lambda cfg, metrics=None, **kw: L3Client(store, metrics=metrics))
    pb = 8
    engine = _build(gpu_blocks=16, host_slots=16,
                    l3={"master_address": "127.0.0.1:50051", "global_segment_gb": 0.0625, "local_buffer_gb": 0.03})
    side = scheduler_side(engine)
    idx = side.index
    convs, prefix = _hot_conversation(rounds=12, prefix_blocks=pb)
    digests = _prefix_digests(side, prefix)
    space = side.l3.chain.rank_spaces[0]
    state = {}

    def plant(driver):
        if state:
            return
        bs = [idx.get(d) for d in digests]
        if all(b is not None and idx.is_resident(b.digest) and not b.on_gpu and not idx.allocator.pins(b.slot)
               for b in bs):
            worker_side(engine).l3.chain.write_back([WriteBack(b.digest, b.tokens, b.slot) for b in bs[pb - 2:]])
            idx.drop_subtree(digests[pb - 3])          # the last two leave the host (they live on in the store)
            key = space.key(digests[pb - 1])
            state.update(key=key, size=len(store.objects[key]), failures=side.metrics.snapshot()["restore_failures"])
            store.objects[key] = store.objects[key][:state["size"] // 2]

    checkers = rank_checkers(engine)
    result = WorkloadDriver(engine, convs, checker=checkers + [HostSlotChecker(engine)], max_active=1,
                            on_iteration=plant).run()
    m = side.stats()
    assert state and result.finished == result.requests
    for c in checkers:
        assert c.stats.wrong_blocks == 0
    assert m["restore_failures"] - state["failures"] <= 1 and m["l3_errors"] <= 1
    assert worker_side(engine).l3.metrics.snapshot()["corrupt_removed"] == m["l3_errors"]
    assert len(store.objects.get(state["key"], b"")) in (0, state["size"]), "never a half object again"
    check_gpu_refcounts_balanced(engine.scheduler)
    check_host_tier_balanced(engine)
