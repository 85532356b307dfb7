"""HostTierConnector worker role with the real copy engine over CPU rows laid out by LMDeploy's
own cache plan, and both roles end to end around LMDeploy's real ``Scheduler``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lmdeploy.pytorch.engine.cache_engine.plan")

from lmdeploy.messages import KVTransferConfig  # noqa: E402
from lmdeploy.pytorch.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan  # noqa: E402
from lmdeploy.pytorch.kv_connector import KVConnectorRole  # noqa: E402
from lmdeploy.pytorch.messages import MessageStatus, SequenceMeta, UpdateTokenMode  # noqa: E402
from lmdeploy.pytorch.paging.scheduler import Scheduler  # noqa: E402
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy  # noqa: E402

from lmdeploy_hostcache.tier.digest import chain_digests  # noqa: E402
from lmdeploy_hostcache.integration.connector import (  # noqa: E402
    CONNECTOR_NAME,
    HostLoad,
    HostTierMetadata,
    build_host_tier_connector,
    install_scheduler_hook,
)
from lmdeploy_hostcache.integration.worker import (  # noqa: E402
    corrupt_slot_marker,
    failed_demotion_marker,
    pool_reset_marker,
)
from lmdeploy_hostcache.transfer import reference  # noqa: E402

BS, KBS = 8, 4
# CPU always; CUDA too where there is a GPU (the CudaCopyEngine's stream ordering is then exercised).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cache_config(quant_policy=0, num_gpu_blocks=12, host_blocks=8, host_kv_format="same", min_restore_tokens=0,
                 checksum=False):
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"min_restore_tokens": min_restore_tokens, "host_kv_format": host_kv_format,
                             "checksum": checksum},
        "host_cache_blocks": host_blocks, "model_identity": "toy"})
    return CacheConfig(max_batches=4, block_size=BS, kernel_block_size=KBS, num_cpu_blocks=0,
                       num_gpu_blocks=num_gpu_blocks, enable_prefix_caching=True, quant_policy=quant_policy,
                       device_type="cuda", kv_transfer_config=tc)


class CpuCache:
    """LMDeploy's block-cache plan realised on 'cpu'; rows as ``CacheEngine.connector_kv_caches``."""

    def __init__(self, cc: CacheConfig, device: str = "cpu"):
        mc = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=[2], head_dim=16, dtype=torch.float16, vocab_size=100)
        self.plan = build_block_cache_plan(mc, cc, 1)
        self.alloc = self.plan.allocate(cc.num_gpu_blocks, device)
        self.ppb = self.plan.kernel_blocks_per_logical_block
        self.rows = {f"cache_pool.{p}.row.{r}": row
                     for p, pool in enumerate(self.alloc.pools) for r, row in enumerate(pool.tensor)}
        self.views = dict(zip((s.name for s in self.plan.tensor_specs), self.alloc.tensor_views))

    def block(self, b: int) -> torch.Tensor:
        """All bytes of scheduler block ``b`` (every row), a copy."""
        return torch.cat([row[b * self.ppb:(b + 1) * self.ppb].reshape(-1) for row in self.rows.values()]).cpu()

    def write_block(self, b: int, data: torch.Tensor) -> None:
        off = 0
        for row in self.rows.values():
            seg = row[b * self.ppb:(b + 1) * self.ppb]
            n = seg.numel()
            seg.copy_(data[off:off + n].view(seg.shape).to(seg.device))
            off += n


def worker_for(cc, cache, **engine_kwargs):
    w = build_host_tier_connector(KVConnectorRole.WORKER, cc)
    w.worker_side.engine_kwargs.update(engine_kwargs)
    fmt = cc.kv_transfer_config.kv_connector_extra_config["hostcache_config"]["host_kv_format"]
    w.register_kv_caches(cache.rows, tensor_specs=cache.plan.tensor_specs if fmt != "same" else None)
    return w


def run(w, meta):
    """One connector step; waits for the copies so their completion is in this step's output."""
    w.bind_connector_metadata(meta)
    w.start_load_kv()
    w.start_save_kv()
    if getattr(w.worker_side.engine, "delay_polls", 0) == 0:
        w.worker_side.engine.wait_all()
    out = w.get_finished()
    w.clear_connector_metadata()
    return out


def random_bytes(cache, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (cache.block(0).numel(),), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_policy", [0, 4, 8])
def test_demotion_and_load_of_the_same_page_in_one_step(quant_policy, device):
    cc = cache_config(quant_policy)
    cache = CpuCache(cc, device)
    w = worker_for(cc, cache)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    orig3, orig5 = cache.block(3), cache.block(5)
    # step 1: demote block 5 -> slot 2
    out = run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2),)))
    assert out.completed_save_ids == {0} and not out.invalid_block_ids and out.finished_receiving is None
    # step 2: block 3 is demoted to slot 0 AND is the destination of slot 2's load
    out = run(w, HostTierMetadata(step=2, demotion_batch=1, demotions=((3, 0),),
                                  loads=(HostLoad(request_id=77, slots=(2,), gpu_blocks=(3,)),)))
    assert out.completed_save_ids == {1} and out.finished_receiving == {77} and not out.invalid_block_ids
    assert torch.equal(cache.block(3), orig5), "load must land after the demotion read the page"
    # step 3: restore slot 0 into block 9: the bytes block 3 had before step 2
    run(w, HostTierMetadata(step=3, loads=(HostLoad(request_id=78, slots=(0,), gpu_blocks=(9,)),)))
    assert torch.equal(cache.block(9), orig3)
    w.shutdown()


def test_a_load_from_a_slot_the_same_step_demotes_into_is_refused():
    """The engine gathers a step's demotions before its loads, so a load reading a slot that the same
    step demotes another block into would restore the new block's bytes. The scheduler's read pins
    never plan that; the worker refuses it anyway (recompute), without resetting the sound pool."""
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    assert run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((5, 2),))).completed_save_ids == {0}
    before = cache.block(3)
    out = run(w, HostTierMetadata(step=2, demotion_batch=1, demotions=((4, 2),),
                                  loads=(HostLoad(request_id=77, slots=(2,), gpu_blocks=(3,)),)))
    assert out.completed_save_ids == {1} and out.finished_receiving == {77}
    assert out.invalid_block_ids == {3}, "refused, and no pool reset marker"
    assert torch.equal(cache.block(3), before), "nothing may move into the refused load's block"
    # slot 2 now holds block 4's bytes, and a later load of it reads them
    orig4 = cache.block(4)
    out = run(w, HostTierMetadata(step=3, loads=(HostLoad(request_id=78, slots=(2,), gpu_blocks=(9,)),)))
    assert out.finished_receiving == {78} and not out.invalid_block_ids and torch.equal(cache.block(9), orig4)
    w.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_injected_failures_are_reported_per_kind(device):
    cc = cache_config()
    cache = CpuCache(cc, device)
    w = worker_for(cc, cache)
    out = run(w, HostTierMetadata(step=1, demotion_batch=3, demotions=((8, 3), (9, 4))))
    assert out.completed_save_ids == {3} and not out.invalid_block_ids
    w.worker_side.engine.fail_next(1, kind="load")
    out = run(w, HostTierMetadata(step=2, demotion_batch=4, demotions=((1, 0),),
                                  loads=(HostLoad(7, (3, 4), (5, 6)),)))
    assert out.completed_save_ids == {4} and out.finished_receiving == {7}
    assert out.invalid_block_ids == {5, 6}
    w.worker_side.engine.fail_next(1, kind="store")
    out = run(w, HostTierMetadata(step=3, demotion_batch=5, demotions=((2, 1),), loads=(HostLoad(8, (0,), (7,)),)))
    assert out.invalid_block_ids == {failed_demotion_marker(5)} and out.finished_receiving == {8}
    # a failed store leaves its slot unreadable: a load of it is refused before any byte moves
    before = cache.block(10)
    out = run(w, HostTierMetadata(step=4, loads=(HostLoad(9, (1,), (10,)),)))
    assert out.finished_receiving == {9} and out.invalid_block_ids == {10, pool_reset_marker(1)}
    assert torch.equal(cache.block(10), before)
    # a plan the engine rejects (slot out of range) fails the op instead of raising into LMDeploy
    out = run(w, HostTierMetadata(step=5, demotion_batch=6, demotions=((3, 999),)))
    assert out.completed_save_ids == {6} and out.invalid_block_ids == {failed_demotion_marker(6)}
    # a failed store into a slot that held a sound copy (slot 3, step 1) leaves it unreadable too
    w.worker_side.engine.fail_next(1, kind="store")
    out = run(w, HostTierMetadata(step=6, demotion_batch=7, demotions=((2, 3),)))
    assert out.invalid_block_ids == {failed_demotion_marker(7)}
    before = cache.block(10)
    out = run(w, HostTierMetadata(step=7, loads=(HostLoad(10, (3,), (10,)),)))
    assert 10 in out.invalid_block_ids and torch.equal(cache.block(10), before)
    w.shutdown()


def test_metadata_survives_pickling():
    """Distributed executors ship the metadata to workers through multiprocessing RPC."""
    import pickle

    meta = HostTierMetadata(step=3, demotion_batch=2, demotions=((1, 0), (4, 5)),
                            loads=(HostLoad(9, (3, 4), (6, 7)),))
    again = pickle.loads(pickle.dumps(meta))
    assert again == meta and again.get_save_block_leases() == ()


def test_pending_copies_are_reported_once_when_done():
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache, delay_polls=2)
    out = run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((1, 0),)))
    assert out.completed_save_ids is None
    out = run(w, HostTierMetadata(step=2))      # polling-only step
    assert out.completed_save_ids is None and w.worker_side.num_inflight == 1
    out = run(w, HostTierMetadata(step=3))
    assert out.completed_save_ids == {0} and w.worker_side.num_inflight == 0
    out = run(w, HostTierMetadata(step=4))
    assert out.completed_save_ids is None


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lossy_host_format_matches_the_transfer_reference(fmt):
    cc = cache_config(0, host_kv_format=fmt)
    cache = CpuCache(cc)
    g = torch.Generator().manual_seed(1)
    for name in ("k_cache", "v_cache"):
        v = cache.views[name]
        v.copy_(torch.randn(v.shape, generator=g).to(v.dtype))
    w = worker_for(cc, cache)
    layout, pool = w.worker_side.layout, w.worker_side.pool
    assert pool.format.lossy and pool.host_kv_format == fmt  # tiny pages: padding, so no size check
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((2, 0),)))
    run(w, HostTierMetadata(step=2, loads=(HostLoad(1, (0,), (6,)),)))
    # expected: the torch reference round trip of block 2's bytes
    rows = layout.check_caches(cache.rows)
    staging = torch.empty((1, pool.slot_bytes), dtype=torch.uint8)
    reference.gather(rows, layout, pool.format, torch.tensor([2]), staging)
    expect = CpuCache(cc)
    exp_rows = layout.check_caches(expect.rows)
    reference.scatter(staging, layout, pool.format, torch.tensor([6]), exp_rows)
    for name in ("k_cache", "v_cache"):
        got = cache.views[name][:, 6 * cache.ppb:7 * cache.ppb]
        want = expect.views[name][:, 6 * cache.ppb:7 * cache.ppb]
        assert torch.equal(got, want)
        orig = cache.views[name][:, 2 * cache.ppb:3 * cache.ppb].float()
        assert (got.float() - orig).abs().max() < (0.1 if fmt == "int8" else 0.6)


def _planned_config(host_kv_format, quant_policy=0, **kw):
    """A cache config whose extra config went through the executor hook's planning, as LMDeploy
    ships it to its workers (``host_slot_bytes`` and ``host_tensor_specs`` from the cache plan)."""
    from lmdeploy_hostcache.integration.engine_config import plan_host_slots

    cc = cache_config(quant_policy, host_kv_format=host_kv_format, **kw)
    plan = CpuCache(cc).plan
    slots = plan_host_slots([plan.logical_block_nbytes], host_kv_format, plan)
    extra = cc.kv_transfer_config.kv_connector_extra_config
    extra["host_slot_bytes"] = slots.slot_bytes[0]
    if slots.tensor_specs is not None:
        extra["host_tensor_specs"] = [dict(x) for x in slots.tensor_specs]
    return cc


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lossy_format_takes_the_specs_the_executor_planned(fmt):
    """LMDeploy's ``build_cache_engine`` calls ``register_kv_caches(rows)`` with the rows only; the
    specs come from the cache config the executor shipped, and the pool's slot is the planned one."""
    import copy

    cc = _planned_config(fmt)
    cache = CpuCache(cc)
    shipped = copy.deepcopy(cc)  # what a Ray/mp worker unpickles
    w = build_host_tier_connector(KVConnectorRole.WORKER, shipped)
    w.register_kv_caches(cache.rows)
    pool = w.worker_side.pool
    assert pool.format.lossy and pool.format.name == fmt
    assert pool.slot_bytes == cc.kv_transfer_config.kv_connector_extra_config["host_slot_bytes"]
    w.shutdown()


def test_planned_specs_describe_unplanned_packed_fields_as_a_raw_tail():
    """A plan rebuilt without operator-requested caches lacks fields LMDeploy packs after K/V:
    the worker copies those bytes raw, so the slot keeps the size the executor planned."""
    from lmdeploy_hostcache.integration.worker import planned_tensor_specs

    cc = _planned_config("int8")
    extra = cc.kv_transfer_config.kv_connector_extra_config
    cache = CpuCache(cc)
    full = planned_tensor_specs(extra, cache.rows)
    assert [(x.name, x.shape, x.dtype, x.size, x.aligned_size) for x in full] == [
        (x.name, tuple(x.desc.shape), x.desc.dtype, x.desc.size, x.desc.aligned_size) for x in cache.plan.tensor_specs]
    extra["host_tensor_specs"] = extra["host_tensor_specs"][:1]  # as if v_cache were unplanned
    cut = planned_tensor_specs(extra, cache.rows)
    assert [x.name for x in cut] == ["k_cache", "unplanned_tail"]
    assert cut[1].aligned_size == full[1].aligned_size and cut[1].dtype == torch.uint8


def test_worker_refuses_a_slot_larger_than_planned_before_allocating(monkeypatch):
    from lmdeploy_hostcache.transfer import host_pool

    cc = _planned_config("int8")
    extra = cc.kv_transfer_config.kv_connector_extra_config
    extra["host_slot_bytes"] -= 1
    allocated = []
    monkeypatch.setattr(host_pool.HostPool, "__init__", lambda *a, **k: allocated.append(1))
    w = build_host_tier_connector(KVConnectorRole.WORKER, cc)
    with pytest.raises(ValueError, match=r"host_slot_bytes=\d+"):
        w.register_kv_caches(CpuCache(cc).rows)
    assert not allocated and w.worker_side.pool is None and w.worker_side.engine is None


def test_bad_planned_specs_name_the_entry():
    cc = _planned_config("int8")
    cc.kv_transfer_config.kv_connector_extra_config["host_tensor_specs"][1]["dtype"] = "float17"
    w = build_host_tier_connector(KVConnectorRole.WORKER, cc)
    with pytest.raises(ValueError, match=r"host_tensor_specs'\]\[1\]\.dtype 'float17'"):
        w.register_kv_caches(CpuCache(cc).rows)


def test_lossy_format_on_quantized_cache_is_refused():
    cc = cache_config(8, host_kv_format="int4")
    cache = CpuCache(cc)
    w = build_host_tier_connector(KVConnectorRole.WORKER, cc)
    with pytest.raises(ValueError, match="same"):
        w.register_kv_caches(cache.rows, tensor_specs=cache.plan.tensor_specs)
    with pytest.raises(ValueError, match="tensor_specs"):
        build_host_tier_connector(KVConnectorRole.WORKER, cache_config(0, host_kv_format="int8")) \
            .register_kv_caches(CpuCache(cache_config(0)).rows)


# ---------------------------------------------------------------------------------------------
# both roles around the real Scheduler, with byte checks


class Engine:
    """Scheduler + both connector roles + a forward that writes each block's oracle bytes.

    Oracle: a full block's bytes are a function of its chained prefix digest, so every block a
    request reads (GPU match, host restore or its own forward) can be checked exactly.
    """

    def __init__(self, quant_policy, num_gpu_blocks=10, host_blocks=8, device="cpu"):
        self.cc = cache_config(quant_policy, num_gpu_blocks=num_gpu_blocks, host_blocks=host_blocks)
        self.cache = CpuCache(self.cc, device)
        self.sconn = build_host_tier_connector(KVConnectorRole.SCHEDULER, self.cc)
        self.side = self.sconn.scheduler_side
        self.s = Scheduler(SchedulerConfig(max_batches=4, max_session_len=4096), self.cc,
                           seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=self.sconn)
        install_scheduler_hook(self.s)
        self.w = worker_for(self.cc, self.cache)
        self.nbytes = self.cache.block(0).numel()
        self.checked_blocks = 0

    def oracle(self, digest: int) -> torch.Tensor:
        base = np.frombuffer(digest.to_bytes(16, "little"), dtype=np.uint8)
        reps = -(-self.nbytes // 16)
        return torch.from_numpy(np.tile(base, reps)[:self.nbytes].copy())

    def digests(self, seq):
        ns = self.side.namespaces.for_adapter(seq.adapter_name)
        return chain_digests(ns, seq.all_ids[:seq.num_all_ids // BS * BS])[0]

    def check_history(self, seq):
        """Every full block before ``num_history_ids`` holds its oracle bytes."""
        table = self.s.block_manager.get_block_table(seq)
        digests = self.digests(seq)
        for i in range(int(seq.num_history_ids) // BS):
            assert torch.equal(self.cache.block(int(table[i])), self.oracle(digests[i])), \
                f"seq {seq.seq_id} block {i} (page {int(table[i])}) holds wrong bytes"
            self.checked_blocks += 1

    def step(self):
        out = self.s.schedule(is_prefill=True)
        meta = self.s.build_connector_meta(out.running)
        output = None
        if meta is not None:
            self.w.bind_connector_metadata(meta)
            self.w.start_load_kv()
        for seq in out.running:                       # the forward: reads history, writes the rest
            self.check_history(seq)
            table = self.s.block_manager.get_block_table(seq)
            digests = self.digests(seq)
            for i in range(int(seq.num_history_ids) // BS, len(digests)):
                self.cache.write_block(int(table[i]), self.oracle(digests[i]))
        if meta is not None:
            self.w.start_save_kv()
            output = self.w.get_finished()
            self.w.clear_connector_metadata()
            self.s.update_connector_output(output)
        self.s.activate_seqs(out.running)
        for seq in out.running:
            seq.update_token_ids(np.array([3]), mode=UpdateTokenMode.PREFILL)
        self.s.release_completed_prefill_reservations(out.running)
        for seq in out.running:
            seq.state.finish()
        return out.running


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_policy", [0, 4, 8])
def test_end_to_end_restores_exact_bytes(quant_policy, device, monkeypatch):
    from lmdeploy.pytorch.paging.block_manager.base_block_manager import LogicalAllocator

    clock = iter(range(1, 1 << 40))  # distinct access times: LRU never ties on id(node), runs repeat

    def update_access_time(self, blocks):
        blocks = np.atleast_1d(np.asarray(blocks))
        self._log_mem.access_time[blocks] = [next(clock) for _ in range(len(blocks))]

    monkeypatch.setattr(LogicalAllocator, "update_access_time", update_access_time)
    eng = Engine(quant_policy, device=device, host_blocks=16)
    rng = np.random.default_rng(quant_policy)
    stems = [list(range(100 * k, 100 * k + 24)) for k in range(1, 6)]
    live = []
    for it in range(30):
        stem = stems[int(rng.integers(len(stems)))]
        sess = eng.s.add_session(it)
        sess.add_sequence(np.asarray(stem + list(rng.integers(1, 90, size=int(rng.integers(1, 12)))),
                                     dtype=np.int64))
        live.append(it)
        if it % 10 == 3:
            eng.w.worker_side.engine.fail_next(1, kind="load")
        for _ in range(3):
            eng.step()
        while len(live) > 2:
            sid = live.pop(0)
            if sid in eng.s.sessions:
                eng.s.end_session(sid)
    for _ in range(20):
        eng.step()
        if not eng.s.has_unfinished() and not eng.side.has_inflight():
            break
    for sid in list(eng.s.sessions):
        eng.s.end_session(sid)
    while eng.side.has_inflight():
        eng.step()
    assert not any(seq.status == MessageStatus.WAITING_FOR_REMOTE_KVS
                   for seq in eng.s.seq_manager.get_all_sequences())
    eng.side.check_balanced()
    m = eng.side.metrics
    assert m.hit_blocks > 0 and m.restored_tokens >= 4 * BS and m.restore_failures > 0, m.snapshot()
    assert eng.checked_blocks > 0
    eng.w.shutdown()


def test_two_tp_ranks_through_lmdeploys_aggregator():
    """Rank 1 completes one poll later than rank 0 and fails its part of a restore: the load
    completes only when both ranks reported, and one rank's failure rolls the request back."""
    from lmdeploy.pytorch.kv_connector import KVConnectorOutputAggregator

    cc = cache_config(0, num_gpu_blocks=10, host_blocks=8)
    caches = [CpuCache(cc), CpuCache(cc)]
    slot_bytes = caches[0].block(0).numel()
    cc.kv_transfer_config.kv_connector_extra_config["host_slot_bytes"] = slot_bytes
    workers = [worker_for(cc, caches[0]), worker_for(cc, caches[1], delay_polls=1)]
    sconn = build_host_tier_connector(KVConnectorRole.SCHEDULER, cc, tp_size=2)
    s = Scheduler(SchedulerConfig(max_batches=4, max_session_len=4096), cc,
                  seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=sconn)
    install_scheduler_hook(s)
    agg = KVConnectorOutputAggregator(2)

    def poll(meta):
        outs = []
        for w in workers:
            w.bind_connector_metadata(meta)
            w.start_load_kv()
            outs.append(w.get_finished())
            w.clear_connector_metadata()
        s.update_connector_output(agg.aggregate(outs))

    def step():
        out = s.schedule(is_prefill=True)
        meta = s.build_connector_meta(out.running)
        if meta is not None:
            poll(meta)
        s.activate_seqs(out.running)
        for seq in out.running:
            seq.update_token_ids(np.array([3]), mode=UpdateTokenMode.PREFILL)
        s.release_completed_prefill_reservations(out.running)
        for seq in out.running:
            seq.state.finish()
        return meta

    a_tokens = list(range(1, 34))                     # 4 full blocks
    s.add_session(0).add_sequence(np.asarray(a_tokens, dtype=np.int64))
    step()
    s.end_session(0)
    s.add_session(1).add_sequence(np.asarray(range(200, 250), dtype=np.int64))
    meta = step()
    assert meta.demotions
    batch = meta.demotion_batch
    assert batch in sconn.scheduler_side._inflight_demotions   # rank 1 has not reported yet
    poll(s.build_connector_meta([]))
    assert batch not in sconn.scheduler_side._inflight_demotions
    s.end_session(1)
    s.add_session(2).add_sequence(np.asarray(a_tokens[:32] + [7, 7], dtype=np.int64))
    c = s.sessions[2].sequences[next(iter(s.sessions[2].sequences))]
    workers[1].worker_side.engine.fail_next(1, kind="load")
    meta = step()
    assert meta.loads and c.status == MessageStatus.WAITING_FOR_REMOTE_KVS   # rank 1 still copying
    poll(s.build_connector_meta([]))
    assert c.status == MessageStatus.WAITING
    side = sconn.scheduler_side
    assert side.metrics.restore_failures == 1 and side.metrics.restored_tokens == 0
    # byte counters: blocks x host_slot_bytes x TP ranks
    assert side.block_transfer_bytes == 2 * slot_bytes
    assert side.metrics.bytes_to_host == 2 * slot_bytes * (side.metrics.demotions - side.metrics.demotion_failures
                                                           - sum(len(d) for d in side._inflight_demotions.values()))
    while side.has_inflight():
        poll(s.build_connector_meta([]))
    side.check_balanced()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_policy", [0, 4])
def test_checksum_refuses_a_corrupted_host_slot_and_moves_nothing(quant_policy, device):
    cc = cache_config(quant_policy, checksum=True)
    cache = CpuCache(cc, device)
    w = worker_for(cc, cache)
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    orig4, orig6 = cache.block(4), cache.block(6)
    out = run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1), (6, 2))))
    assert out.completed_save_ids == {0} and not out.invalid_block_ids
    # a stray write into slot 1 after its demotion completed
    w.worker_side.pool.slot_view(1)[17] ^= 0xFF
    before10, before11 = cache.block(10), cache.block(11)
    out = run(w, HostTierMetadata(step=2, loads=(HostLoad(request_id=5, slots=(1,), gpu_blocks=(10,)),
                                                 HostLoad(request_id=6, slots=(2,), gpu_blocks=(11,)))))
    assert out.finished_receiving == {5, 6}
    assert out.invalid_block_ids == {10, corrupt_slot_marker(1)}, \
        "the corrupted slot's load must be reported failed, and the slot as corrupt"
    assert torch.equal(cache.block(10), before10), "a refused load must not move a byte"
    assert torch.equal(cache.block(11), orig6) and not torch.equal(before11, orig6)
    # the uncorrupted copy of block 4's bytes is still restorable after a fresh demotion
    cache.write_block(4, orig4)
    run(w, HostTierMetadata(step=3, demotion_batch=1, demotions=((4, 3),)))
    out = run(w, HostTierMetadata(step=4, loads=(HostLoad(request_id=7, slots=(3,), gpu_blocks=(9,)),)))
    assert out.finished_receiving == {7} and not out.invalid_block_ids
    assert torch.equal(cache.block(9), orig4)
    w.shutdown()


def test_checksum_off_does_not_hash():
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1),)))
    assert w.worker_side._checksums == {}
    w.shutdown()


def test_a_fault_in_one_half_of_a_copy_op_spares_the_other_half(monkeypatch):
    """A load that dies part-way leaves the same op's demotions stored (their slots readable and
    restorable later); a demotion that dies part-way leaves the same op's loads restored."""
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    ws = w.worker_side
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    orig = {b: cache.block(b) for b in range(cc.num_gpu_blocks)}
    assert run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((1, 0), (2, 1)))).completed_save_ids == {0}

    def dies_after_first(name):
        real = getattr(ws.engine, name)

        def broken(slots, x):
            real(slots[:1], x[:1])
            raise RuntimeError(f"{name} died")
        monkeypatch.setattr(ws.engine, name, broken)

    dies_after_first("_load")
    out = run(w, HostTierMetadata(step=2, demotion_batch=1, demotions=((3, 2), (4, 3)),
                                  loads=(HostLoad(7, (0, 1), (8, 9)),)))
    assert out.completed_save_ids == {1} and out.finished_receiving == {7}
    assert out.invalid_block_ids == {8, 9}, "the loads failed, the demotion batch did not"
    monkeypatch.undo()
    out = run(w, HostTierMetadata(step=3, loads=(HostLoad(8, (2, 3), (10, 11)),)))
    assert out.finished_receiving == {8} and not out.invalid_block_ids
    assert torch.equal(cache.block(10), orig[3]) and torch.equal(cache.block(11), orig[4])

    dies_after_first("_write_slots")
    out = run(w, HostTierMetadata(step=4, demotion_batch=2, demotions=((5, 4), (6, 5)),
                                  loads=(HostLoad(9, (0, 1), (8, 9)),)))
    assert out.completed_save_ids == {2} and out.finished_receiving == {9}
    assert out.invalid_block_ids == {failed_demotion_marker(2)}, "the demotions failed, the loads did not"
    assert torch.equal(cache.block(8), orig[1]) and torch.equal(cache.block(9), orig[2])
    monkeypatch.undo()
    # the failed demotion's slots stay unreadable: a load of one is refused before a byte moves
    before = cache.block(7)
    out = run(w, HostTierMetadata(step=5, loads=(HostLoad(10, (4,), (7,)),)))
    assert out.finished_receiving == {10} and out.invalid_block_ids == {7, pool_reset_marker(1)}
    assert torch.equal(cache.block(7), before)
    w.shutdown()


def _failing(*_a, **_k):
    raise RuntimeError("injected poll failure")


def test_a_poll_that_raises_fails_the_ops_in_flight_and_loses_no_outcome(monkeypatch, caplog):
    """The copy engine's poll raising never reaches LMDeploy's step: the refused load and every op in
    flight are reported failed (recompute), after the worker waited for their copies, so nothing lands
    later in blocks LMDeploy has reused; a failed demotion's slot stays unreadable."""
    cc = cache_config(checksum=True)
    cache = CpuCache(cc)
    w = worker_for(cc, cache, delay_polls=1)
    ws = w.worker_side
    for b in range(cc.num_gpu_blocks):
        cache.write_block(b, random_bytes(cache, b))
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1), (5, 3))))
    assert run(w, HostTierMetadata(step=2)).completed_save_ids == {0}
    ws.pool.slot_view(1)[5] ^= 0xFF                     # the next load of slot 1 is refused (checksum)
    w.bind_connector_metadata(HostTierMetadata(step=3, demotion_batch=1, demotions=((6, 2),),
                                               loads=(HostLoad(9, (1,), (10,)), HostLoad(8, (3,), (11,)))))
    w.start_load_kv()
    assert ws.num_inflight == 1
    monkeypatch.setattr(ws.engine, "poll", _failing)
    with caplog.at_level("DEBUG", logger="lmdeploy_hostcache.worker"):
        out = w.get_finished()
        w.clear_connector_metadata()
        assert out.finished_receiving == {8, 9} and out.completed_save_ids == {1}
        assert out.invalid_block_ids == {10, 11, failed_demotion_marker(1), corrupt_slot_marker(1)}
        assert ws.num_inflight == 0 and ws.poll_failures == 1 and ws.engine_retired is None
        # a second failure (nothing in flight now) is counted, not logged as an error again
        assert run(w, HostTierMetadata(step=4)).finished_receiving is None and ws.poll_failures == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "polling the copy engine failed" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    monkeypatch.undo()
    # LMDeploy reused block 11; no copy of the failed op may land in it later
    cache.write_block(11, random_bytes(cache, 99))
    reused = cache.block(11)
    outs = [run(w, HostTierMetadata(step=5, demotion_batch=2, demotions=((7, 6),)))]
    outs += [run(w, HostTierMetadata(step=s)) for s in (6, 7)]
    assert torch.equal(cache.block(11), reused)
    assert [o.completed_save_ids for o in outs] == [None, {2}, None], "the failed ops are never reported again"
    assert all(not o.finished_receiving and not o.invalid_block_ids for o in outs)
    # slot 2 (batch 1's failed demotion) is unreadable; slot 6 (batch 2) is readable
    before = cache.block(9)
    out = run(w, HostTierMetadata(step=8, loads=(HostLoad(12, (2,), (9,)), HostLoad(13, (6,), (8,)))))
    assert out.finished_receiving == {12} and out.invalid_block_ids == {9, pool_reset_marker(1)}
    assert torch.equal(cache.block(9), before)
    out = run(w, HostTierMetadata(step=9))
    assert out.finished_receiving == {13} and not out.invalid_block_ids
    w.shutdown()


def test_a_copy_engine_whose_wait_also_raises_is_retired(monkeypatch):
    """Poll and wait both raising: the copies in flight cannot be shown to have stopped, so the engine is
    never used again; the ops in flight and every later copy are reported failed (recompute)."""
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache, delay_polls=1)
    ws = w.worker_side
    run(w, HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1),)))
    assert run(w, HostTierMetadata(step=2)).completed_save_ids == {0}
    w.bind_connector_metadata(HostTierMetadata(step=3, demotion_batch=1, demotions=((6, 2),),
                                               loads=(HostLoad(8, (1,), (11,)),)))
    w.start_load_kv()
    monkeypatch.setattr(ws.engine, "poll", _failing)
    monkeypatch.setattr(ws.engine, "wait_all", _failing)
    out = w.get_finished()
    w.clear_connector_metadata()
    assert out.finished_receiving == {8} and out.completed_save_ids == {1}
    assert out.invalid_block_ids == {11, failed_demotion_marker(1)} and ws.engine_retired is not None
    submitted = []
    monkeypatch.setattr(ws.engine, "submit", lambda *a, **k: submitted.append(a))
    out = run(w, HostTierMetadata(step=4, demotion_batch=2, demotions=((5, 3),), loads=(HostLoad(9, (1,), (10,)),)))
    assert submitted == [] and out.completed_save_ids == {2} and out.finished_receiving == {9}
    assert out.invalid_block_ids == {10, failed_demotion_marker(2)}
    w.shutdown()                                       # not drained (its wait raised), and does not raise
    assert ws.last_drain.completed_batches == () and ws.num_inflight == 0


@pytest.mark.parametrize("fails", ["wait_all", "poll", "close"])
def test_a_copy_engine_fault_at_shutdown_never_reaches_lmdeploy(monkeypatch, fails):
    """Sleep and close shut every worker down (``BaseModelAgent.shutdown_kv_connector``): a drain that
    raises there (a device error in ``wait_all``/``poll``, or in ``close``) is logged, the ops in
    flight are reported failed in ``last_drain``, and the pool is still released; nothing escapes into
    LMDeploy, which would stop its sleep half-way (cache engine kept, the scheduler's drain hook never
    run) or leave the other ranks' connectors open at close."""
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache, delay_polls=5)
    ws = w.worker_side
    w.bind_connector_metadata(HostTierMetadata(step=1, demotion_batch=0, demotions=((4, 1),)))
    w.start_load_kv()
    w.get_finished()
    w.clear_connector_metadata()
    assert ws.num_inflight == 1
    monkeypatch.setattr(ws.engine, fails, _failing)
    w.shutdown()                                       # does not raise
    assert ws.pool is None and ws.num_inflight == 0 and ws.engine is None
    if fails == "close":                               # drained before the close failed
        assert ws.last_drain.completed_batches == (0,) and ws.engine_retired is None
    else:
        assert ws.last_drain.failed_batches == (0,) and ws.engine_retired is not None


def test_refused_loads_are_kept_until_an_output_reports_them(monkeypatch):
    """A fault inside ``get_finished`` after the refused loads were read must not lose them: the next
    output still reports them (else their requests would wait for ever with their slots pinned)."""
    cc = cache_config()
    cache = CpuCache(cc)
    w = worker_for(cc, cache)
    ws = w.worker_side
    w.bind_connector_metadata(HostTierMetadata(step=1, loads=(HostLoad(9, (1,), (10,)),)))  # slot never written
    w.start_load_kv()
    monkeypatch.setattr(ws, "_poll_engine", _failing, raising=False)
    with pytest.raises(RuntimeError):
        w.get_finished()
    monkeypatch.undo()
    out = w.get_finished()
    w.clear_connector_metadata()
    assert out.finished_receiving == {9} and out.invalid_block_ids == {10, pool_reset_marker(1)}
    w.shutdown()
