"""Store-tier paths between the host slots and the shared store, with the real connector roles over an
in-memory store (the Mooncake client's four methods): what a checksummed node may publish, and how a
successful store restore ends its staged blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lmdeploy.pytorch.kv_connector")

from lmdeploy_hostcache.integration.connector import HostLoad, HostTierMetadata  # noqa: E402
from lmdeploy_hostcache.integration.l3_tier import SchedulerL3, WorkerL3  # noqa: E402
from lmdeploy_hostcache.integration.worker import corrupt_slot_marker  # noqa: E402
from lmdeploy_hostcache.l3.chain import SchedulerChain, WorkerChain  # noqa: E402
from lmdeploy_hostcache.l3.client import L3Client  # noqa: E402
from lmdeploy_hostcache.l3.keys import StoreKeyspace  # noqa: E402
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests  # noqa: E402
from lmdeploy_hostcache.tier.metrics import L3TierMetrics  # noqa: E402


class DictStore:
    """The Mooncake store client's methods over a dict (put keeps the first object of a key); with
    ``removable``, its ``remove(key, force)`` too (Mooncake's error code for a missing key otherwise)."""

    def __init__(self, removable: bool = False):
        self.objects: dict[str, bytes] = {}
        if removable:
            self.remove = self._remove

    def batch_is_exist(self, keys):
        return [1 if k in self.objects else 0 for k in keys]

    def put(self, key, value):
        self.objects.setdefault(key, bytes(value))
        return 0

    def get_batch(self, keys):
        return [self.objects.get(k, b"") for k in keys]

    def _remove(self, key, force=False):
        return 0 if self.objects.pop(key, None) is not None else -704

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


def _worker_with_store(checksum: bool = False):
    """A real worker role over a CPU cache of random blocks, with a store tier over a ``DictStore``."""
    from test_connector_worker import CpuCache, cache_config, random_bytes, worker_for

    store = DictStore()
    cc = cache_config(checksum=checksum)
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    _attach_store(w, store)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    return w, cache, store


def test_a_checksummed_node_never_publishes_a_slot_whose_bytes_changed():
    """With ``checksum: true`` a host slot whose bytes no longer match their hash is refused for a local load;
    its write-back to the store is refused too: the store object would wrap the bad bytes in a fresh, valid
    checksum, and another node would restore them as sound. A sound slot is still written back."""
    from test_connector_worker import run

    w, cache, store = _worker_with_store(checksum=True)
    assert run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2), (6, 3)))).completed_save_ids == {0}
    w.worker_side.pool.slot_view(2).numpy()[100] ^= 0xFF   # host-memory corruption in slot 2
    assert run(w, HostTierMetadata(step=2, loads=(HostLoad(77, (2,), (9,)),))).invalid_block_ids == \
        {9, corrupt_slot_marker(2)}
    run(w, HostTierMetadata(step=3, l3_write_backs=((0x1234, bytes(32), 2), (0x5678, bytes(range(32)), 3))))
    assert len(store.objects) == 1, "only the sound slot's block is published"
    assert w.worker_side.corrupt_write_backs == 1
    w.shutdown()


def test_a_slot_never_written_in_this_pool_is_never_published():
    """A write-back names a slot by the scheduler's index, which can be older than the worker's pool (a
    rebuild the scheduler has not noticed yet): a slot the pool never had written holds no KV, so it is not
    put to the store, where every node would trust it. A slot written in this pool is put."""
    from test_connector_worker import run

    w, cache, store = _worker_with_store()
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2),)))    # slot 2 written in this pool
    run(w, HostTierMetadata(step=2, l3_write_backs=((0x1111, bytes(32), 2), (0x2222, bytes(range(32)), 4))))
    assert len(store.objects) == 1, "slot 4 was never written in this pool"
    w.shutdown()


def test_a_checksummed_node_restores_a_staged_store_block():
    """With ``checksum: true`` a block staged from the store into a host slot gets its checksum there, so its
    load to the GPU is sound: the staged bytes land in the GPU block, nothing is reported invalid."""
    from test_connector_worker import run

    w, cache, store = _worker_with_store(checksum=True)
    tokens = bytes(range(32))
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2),)))
    run(w, HostTierMetadata(step=2, l3_write_backs=((0xABC, tokens, 2),)))       # block 5's KV is in the store
    assert len(store.objects) == 1
    out = run(w, HostTierMetadata(step=3, l3_stages=((77, (0xABC,), (tokens,), (6,)),),
                                  loads=(HostLoad(77, (6,), (9,)),)))
    assert not out.invalid_block_ids, out.invalid_block_ids
    assert torch.equal(cache.block(9), cache.block(5)), "the staged store block must restore block 5's bytes"
    w.shutdown()


def test_a_failed_stage_leaves_its_slot_unreadable():
    """A stage writes a store object into a host slot that may have held a sound copy; when it fails (the
    object vanished) the slot's bytes are no block's: its load is refused, and so is any later load of it."""
    from test_connector_worker import run

    w, cache, store = _worker_with_store()
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 6),)))     # slot 6 readable
    before = cache.block(9)
    out = run(w, HostTierMetadata(step=2, l3_stages=((77, (0xABC,), (bytes(32),), (6,)),),
                                  loads=(HostLoad(77, (6,), (9,)),)))            # not in the store
    assert 9 in out.invalid_block_ids and torch.equal(cache.block(9), before)
    out = run(w, HostTierMetadata(step=3, loads=(HostLoad(78, (6,), (9,)),)))
    assert 9 in out.invalid_block_ids and torch.equal(cache.block(9), before)
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


def test_a_store_hit_found_on_a_retry_is_chained_after_the_block_before_it():
    """A request's digest chain is cached across its admission attempts; when a retry looks up from a later
    block (its GPU match grew), the planned store hit's parent is the digest of the block before it, not the
    chain's root, so the staged blocks are indexed under the prefix they continue."""
    from test_connector import BS, ns

    rig, toks = _store_rig()
    digests, _ = chain_digests(ns(), toks)
    _, seq = rig.add(toks + [5, 5])
    side = rig.side
    assert side.get_num_new_matched_tokens(seq, 0) == (4 * BS, True)
    assert side._plans[int(seq.seq_id)].parent != digests[0]
    assert side.get_num_new_matched_tokens(seq, BS) == (3 * BS, True)   # the retry: block 0 now on the GPU
    plan = side._plans[int(seq.seq_id)]
    assert plan.first_block == 1 and plan.digests == tuple(digests[1:]) and plan.parent == digests[0]


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


def _store_rig(blocks: int = 4):
    """A rig whose store holds a ``blocks``-block prefix another node wrote; the host tier is empty."""
    from test_connector import BS, Rig, ns, prompt

    rig = Rig(num_gpu_blocks=16, host_blocks=16)
    store = DictStore()
    space = StoreKeyspace(ns(), block_nbytes=1000)
    metrics = L3TierMetrics()   # shared with the client, as SchedulerL3.build does
    rig.side.l3 = SchedulerL3(SchedulerChain(rig.side.index, L3Client(store, metrics=metrics), [space]), metrics)
    toks = prompt(1, blocks * BS)
    for d in chain_digests(ns(), toks)[0]:
        store.objects[space.key(d)] = b"x"
    return rig, toks


def _l3(rig) -> dict:
    return {k: v for k, v in rig.side.l3.metrics.snapshot().items()
            if k in ("lookups", "lookup_blocks", "hit_blocks", "get_blocks", "bytes_from_l3", "errors")}


def test_a_store_restore_cancelled_after_its_copy_is_a_read_not_an_error():
    """A store restore cancelled (client abort) while the workers staged and copied it: the store blocks
    were read, so they count in get_blocks; a cancellation is not a store error (it used to be counted
    in l3 errors, and the read left out)."""
    rig, toks = _store_rig()
    sid, _ = rig.add(toks + [5, 5])
    _, meta = rig.step()
    assert meta.l3_stages and len(meta.l3_stages[0][1]) == 4
    rig.s.end_session(sid)                      # cancelled while the workers stage and copy
    rig.poll(rig.complete(meta))                # which succeeded on every rank
    got = _l3(rig)
    assert (got["errors"], got["get_blocks"], got["bytes_from_l3"]) == (0, 4, 4000), got
    assert rig.side.metrics.restore_failures == 1 and rig.side.metrics.bytes_to_gpu == 4000
    # the staged slots hold the store's verified bytes: they stay as host blocks (they used to be freed)
    staged = meta.l3_stages[0][1]
    assert all(rig.side.index.is_resident(d) for d in staged)
    rig.side.check_balanced()


def test_a_store_restore_cancelled_before_it_was_shipped_counts_nothing():
    """Cancelled before its metadata reached the workers: nothing was read and nothing failed."""
    rig, toks = _store_rig()
    sid, c = rig.add(toks + [5, 5])
    rig.s.schedule(is_prefill=True)            # admitted with its staged store blocks, not shipped yet
    rig.s.end_session(sid)
    meta = rig.s.build_connector_meta([])
    assert meta is not None and meta.loads == () and meta.l3_stages == ()
    rig.poll(rig.complete(meta))
    got = _l3(rig)
    assert (got["errors"], got["get_blocks"]) == (0, 0), got
    assert rig.side.metrics.restore_failures == 1
    rig.side.check_balanced()


def test_a_store_restore_the_workers_report_failed_is_one_error_and_no_read():
    rig, toks = _store_rig()
    rig.add(toks + [5, 5])
    _, meta = rig.step()
    rig.poll(rig.complete(meta, fail_loads={meta.loads[0].request_id}))
    got = _l3(rig)
    assert (got["errors"], got["get_blocks"], got["bytes_from_l3"]) == (1, 0, 0), got
    assert rig.side.metrics.bytes_to_gpu == 0
    rig.side.check_balanced()


def test_store_lookups_are_counted_once_per_request_turn():
    """LMDeploy asks again at every admission attempt, and its GPU match may move between attempts: the
    turn is one store lookup, and each block asked for or found is counted once (every attempt used to
    count a lookup, its blocks and its hits again)."""
    from test_connector import BS

    rig, toks = _store_rig()
    _, c = rig.add(toks + [5, 5])
    side = rig.side
    for computed in (2 * BS, 0, 0, 3 * BS, 0):
        assert side.get_num_new_matched_tokens(c, computed)[1]
        side._release_all_holds()
    got = _l3(rig)
    assert (got["lookups"], got["lookup_blocks"], got["hit_blocks"]) == (1, 4, 4), got
    # the store is asked again whenever the blocks asked change; the third attempt asks what the second did
    assert side.l3.metrics.snapshot()["exists_latency_count"] == 4
    _, c2 = rig.add(toks[:2 * BS] + [9] * (2 * BS + 2))   # another request: another turn, half the prefix
    side.get_num_new_matched_tokens(c2, 0)
    side._release_all_holds()
    got = _l3(rig)
    assert (got["lookups"], got["lookup_blocks"], got["hit_blocks"]) == (2, 8, 6), got
    side.check_balanced()


def _host_blocks(rig, toks, count):
    """Put the first ``count`` blocks of ``toks`` in the host tier, as demotions would."""
    from test_connector import ns

    digests, token_bytes = chain_digests(ns(), toks)
    idx, parent = rig.side.index, ns().root
    for d, b in zip(digests[:count], token_bytes[:count]):
        assert idx.prepare_store(d, parent, b) is not None
        idx.complete_store(d, True)
        parent = d
    return digests


def test_a_store_hit_with_no_room_to_stage_still_loads_its_host_hits(monkeypatch):
    """Host hits, then store blocks with no host slot to stage them in: the load is refused before it ships,
    and the turn's next attempt loads its host hits alone (the rest is recomputed). It used to fail the
    whole turn, so the host hits were recomputed too."""
    from test_connector import BS

    rig, toks = _store_rig(blocks=4)
    _host_blocks(rig, toks, 2)
    refused = []
    monkeypatch.setattr(rig.side.l3.chain, "reserve", lambda digests, *a: refused.append(tuple(digests)))
    _, c = rig.add(toks + [5, 5])
    _, meta = rig.step()
    assert len(refused) == 1 and len(refused[0]) == 2, "the two store blocks were to be staged"
    assert meta.loads == () and meta.l3_stages == ()
    rig.poll(rig.complete(meta))                     # LMDeploy hears the refusal and frees the destinations
    assert rig.side.index.num_free_slots == rig.side.index.num_slots - 2, "the host hits stay in the tier"
    _, meta = rig.step()                              # the next attempt: host hits only, nothing staged
    assert len(refused) == 1 and meta.l3_stages == ()
    assert [len(ld.gpu_blocks) for ld in meta.loads] == [2]
    rig.poll(rig.complete(meta))
    assert rig.side.metrics.restored_tokens == 2 * BS
    assert rig.side.metrics.restore_failures == 1     # the refused attempt
    assert rig.side.index.stats.load_failures == 0, "a refused stage is not a failed load of the host blocks"
    rig.side.check_balanced()



def test_a_request_that_cannot_be_admitted_asks_the_store_once_a_second(monkeypatch):
    """LMDeploy asks again at every scheduling pass while it cannot admit a request: the store's answer for the
    same blocks is reused for STORE_ANSWER_REUSE_S (each probe is one store call of TP x blocks keys on the
    scheduler thread; a blocked 4,000-block request used to ask 32,000 keys per pass at TP 8), then asked again."""
    from lmdeploy_hostcache.integration import connector

    now = [100.0]
    monkeypatch.setattr(connector.time, "monotonic", lambda: now[0])
    rig, toks = _store_rig()
    _, c = rig.add(toks + [5, 5])
    side = rig.side
    calls = lambda: side.l3.metrics.snapshot()["exists_latency_count"]  # noqa: E731
    answers = set()
    for _ in range(20):                                   # twenty passes within one second
        answers.add(side.get_num_new_matched_tokens(c, 0))
        side._release_all_holds()
        now[0] += 0.04
    assert len(answers) == 1 and answers.pop()[1], "every pass reports the same store hit"
    assert calls() == 1
    now[0] += connector.STORE_ANSWER_REUSE_S
    side.get_num_new_matched_tokens(c, 0)
    side._release_all_holds()
    assert calls() == 2, "the answer is asked again once it is older than the reuse window"
    got = _l3(rig)
    assert (got["lookups"], got["lookup_blocks"], got["hit_blocks"]) == (1, 4, 4), got
    side.check_balanced()


def test_a_stored_answer_is_not_reused_once_the_store_tier_stopped():
    """A store tier stopped meanwhile (e.g. a weights update in place) answers nothing: the turn's cached answer
    is not reused for it, so no store blocks are planned that the stage would then refuse."""
    rig, toks = _store_rig()
    _, c = rig.add(toks + [5, 5])
    side = rig.side
    assert side.get_num_new_matched_tokens(c, 0)[1]
    side._release_all_holds()
    side.l3.chain.stop("weights updated")
    assert side.get_num_new_matched_tokens(c, 0) == (0, False)
    side.check_balanced()
