"""Store-tier paths between the host slots and the shared store, with the real connector roles over an
in-memory store (the Mooncake client's four methods): what a checksummed node may publish, and how a
successful store restore ends its staged blocks."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lmdeploy.pytorch.kv_connector")

from lmdeploy_hostcache.integration.connector import HostLoad, HostTierMetadata  # noqa: E402
from lmdeploy_hostcache.integration.l3_tier import SchedulerL3, WorkerL3  # noqa: E402
from lmdeploy_hostcache.l3.chain import SchedulerChain, WorkerChain  # noqa: E402
from lmdeploy_hostcache.l3.client import L3Client  # noqa: E402
from lmdeploy_hostcache.l3.keys import StoreKeyspace  # noqa: E402
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests  # noqa: E402
from lmdeploy_hostcache.tier.metrics import L3TierMetrics  # noqa: E402


class DictStore:
    """The Mooncake store client's methods over a dict (put keeps the first object of a key)."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def batch_is_exist(self, keys):
        return [1 if k in self.objects else 0 for k in keys]

    def put(self, key, value):
        self.objects.setdefault(key, bytes(value))
        return 0

    def get_batch(self, keys):
        return [self.objects.get(k, b"") for k in keys]

    def close(self):
        pass


def _attach_store(worker, store: DictStore) -> None:
    ws = worker.worker_side
    pool = ws.pool
    space = StoreKeyspace(Namespace(model="toy", block_size=8), block_nbytes=pool.slot_bytes)

    def write_slot(slot, payload):
        pool.slot_view(slot).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)

    ws.l3 = WorkerL3(WorkerChain(L3Client(store), space, pool.slot_bytes, lambda s: pool.slot_view(s).numpy(),
                                 write_slot))


def test_a_checksummed_node_never_publishes_a_slot_whose_bytes_changed():
    """With ``checksum: true`` a host slot whose bytes no longer match their hash is refused for a local load;
    its write-back to the store is refused too: the store object would wrap the bad bytes in a fresh, valid
    checksum, and another node would restore them as sound. A sound slot is still written back."""
    from test_connector_worker import CpuCache, cache_config, random_bytes, run, worker_for

    store = DictStore()
    cc = cache_config(checksum=True)
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    _attach_store(w, store)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    assert run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2), (6, 3)))).completed_save_ids == {0}
    w.worker_side.pool.slot_view(2).numpy()[100] ^= 0xFF   # host-memory corruption in slot 2
    assert run(w, HostTierMetadata(step=2, loads=(HostLoad(77, (2,), (9,)),))).invalid_block_ids == {9}
    run(w, HostTierMetadata(step=3, l3_write_backs=((0x1234, bytes(32), 2), (0x5678, bytes(range(32)), 3))))
    assert len(store.objects) == 1, "only the sound slot's block is published"
    assert w.worker_side.corrupt_write_backs == 1
    w.shutdown()


def test_a_successful_store_restore_keeps_the_host_blocks_chained_under_it():
    """A store hit is staged in host slots, then loaded to the GPU. When that load succeeds, the staged
    blocks end as restored host blocks do; they are not released through the failure path, which would
    doom a host block demoted under them meanwhile and count a store failure for a restore that worked."""
    from test_connector import BS, Rig, ns, prompt

    rig = Rig(num_gpu_blocks=16, host_blocks=16)
    store = DictStore()
    space = StoreKeyspace(ns(), block_nbytes=1000)
    rig.side.l3 = SchedulerL3(SchedulerChain(rig.side.index, L3Client(store), [space]), L3TierMetrics())
    toks = prompt(1, 4 * BS)
    digests, _ = chain_digests(ns(), toks)
    for d in digests:   # another node wrote this prefix to the store
        store.objects[space.key(d)] = b"x"
    rig.add(toks + [5, 5])
    _, meta = rig.step()
    assert meta.loads and meta.l3_stages
    staged = meta.l3_stages[0][1]
    assert tuple(staged) == tuple(digests)
    # meanwhile the GPU evicts another request's block that continues the staged prefix: it is demoted
    # to the host as a child of the last staged block
    longer = toks + prompt(900, BS)
    child_digests, child_bytes = chain_digests(ns(), longer)
    idx = rig.side.index
    assert idx.prepare_store(child_digests[4], staged[-1], child_bytes[4]) is not None
    idx.complete_store(child_digests[4], True)
    failures = idx.stats.store_failures
    rig.poll(rig.complete(meta))   # the staged load succeeded on every rank
    assert rig.side.metrics.restore_failures == 0
    assert rig.side.metrics.restored_tokens == 4 * BS
    assert idx.is_resident(child_digests[4]), "the host block chained under the restored prefix was dropped"
    assert idx.stats.store_failures == failures
    for d in staged:   # each staged block ended as a restore does: kept (its GPU copy) or promoted away
        b = idx.get(d)
        assert b is None or b.on_gpu
    idx.check_invariants()
    rig.side.check_balanced()


def test_a_failed_store_restore_still_releases_the_staged_slots():
    """The failure path is unchanged: the staged slots are freed, and the turn recomputes."""
    from test_connector import BS, Rig, ns, prompt

    rig = Rig(num_gpu_blocks=16, host_blocks=16)
    store = DictStore()
    space = StoreKeyspace(ns(), block_nbytes=1000)
    rig.side.l3 = SchedulerL3(SchedulerChain(rig.side.index, L3Client(store), [space]), L3TierMetrics())
    toks = prompt(1, 4 * BS)
    for d in chain_digests(ns(), toks)[0]:
        store.objects[space.key(d)] = b"x"
    rig.add(toks + [5, 5])
    _, meta = rig.step()
    staged = meta.l3_stages[0][1]
    rig.poll(rig.complete(meta, fail_loads={meta.loads[0].request_id}))
    assert rig.side.metrics.restore_failures == 1
    assert all(d not in rig.side.index for d in staged)
    assert rig.side.index.num_free_slots == rig.side.index.num_slots
    rig.side.index.check_invariants()
