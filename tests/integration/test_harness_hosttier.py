"""Engine-in-the-loop CPU harness, stage 2: LMDeploy + both HostTierConnector roles + copy engine.

LMDeploy's real Scheduler (with the eviction hook), KVLoadCoordinator and engine-loop order run
the host tier over CPU tensors laid out by LMDeploy's cache plan; after every engine step every
valid block must hold the prefix oracle's bytes (lossy host formats: the transfer reference's
quantise -> dequantise of them). Runs multi-turn WEKA sessions under tight GPU and host
capacity with aborts (also in the middle of loads) and injected copy failures.

The full matrix (every quant_policy x host_kv_format) runs at a small size with the product's
default eviction policy (``eviction.DEFAULT_POLICY``, also the harness default), and a smaller
matrix with every other policy; set ``HOSTCACHE_HARNESS_FULL=1`` for the larger cells.
"""
from __future__ import annotations

import os

import pytest
import torch

from lmdeploy_hostcache.testing.harness import (HarnessCacheSpec, HarnessModel, WorkloadDriver, assign_aborts,
                      check_gpu_refcounts_balanced, mooncake_conversations, weka_conversations)
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine, check_host_tier_balanced,
                                rank_checkers, scheduler_side, worker_side)
from lmdeploy_hostcache.testing.harness.faults import FaultInjector

transfer = pytest.importorskip('lmdeploy_hostcache.transfer')
if not hasattr(transfer, 'make_copy_engine'):
    pytest.skip('lmdeploy_hostcache.transfer has no make_copy_engine yet', allow_module_level=True)
pytest.importorskip('lmdeploy_hostcache.integration.connector')

from lmdeploy_hostcache.tier.eviction import DEFAULT_POLICY, POLICIES  # noqa: E402

FULL = bool(os.environ.get('HOSTCACHE_HARNESS_FULL'))
OTHER_POLICIES = sorted(p for p in POLICIES if p != DEFAULT_POLICY)
# Prompts here are <= 256 tokens: a 512-token prefill budget keeps LMDeploy's long-context chunking
# out of the matrix runs (chunking + a loaded request deadlocked stock LMDeploy 0.18.0; the fix and
# its end-to-end check are at the end of this file). The stock-LMDeploy harness tests cover chunking.
NO_LONG_CHUNKS = 512
WEKA_FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json', 'trace_0228.json', 'trace_0277.json',
              'trace_0291.json']


def run_host_tier(*, quant_policy: int, dtype: torch.dtype, host_kv_format: str, gpu_blocks: int = 24,
                  host_slots: int = 24, files=WEKA_FILES[:3], max_turns: int = 6, abort_rate: float = 0.25,
                  fail_load_every: int = 0, fail_store_every: int = 0, min_restore_tokens: int = 16,
                  max_active: int = 3, conversations=None, copy_delay_polls: int = 0, fault_rank: int = 0,
                  max_prefill_token_num: int = NO_LONG_CHUNKS, checksum: bool = False,
                  eviction_policy: str = DEFAULT_POLICY, **engine_kw):
    engine = build_host_tier_engine(HarnessModel(dtype=dtype),
                                    HarnessCacheSpec(num_gpu_blocks=gpu_blocks, quant_policy=quant_policy,
                                                     max_prefill_token_num=max_prefill_token_num),
                                    HostTierSpec(host_slots=host_slots, host_kv_format=host_kv_format,
                                                 min_restore_tokens=min_restore_tokens,
                                                 copy_delay_polls=copy_delay_polls, checksum=checksum,
                                                 eviction_policy=eviction_policy),
                                    **engine_kw)
    checkers = rank_checkers(engine, host_kv_format)
    slots = HostSlotChecker(engine)
    if conversations is None:
        conversations = weka_conversations(files=list(files), max_turns=max_turns)
    assign_aborts(conversations, rate=abort_rate, seed=7)
    faults = FaultInjector(engine, load_every=fail_load_every, store_every=fail_store_every, rank=fault_rank)
    driver = WorkloadDriver(engine, conversations, checker=checkers + [slots], max_active=max_active,
                            on_iteration=faults)
    report = driver.run()
    slots.verify('end of run')
    engine.host_slot_checker = slots
    return engine, checkers[0] if len(checkers) == 1 else checkers, report, faults


def assert_run_clean(engine, checker, report):
    for c in checker if isinstance(checker, list) else [checker]:
        assert c.stats.wrong_blocks == 0, c.stats.first_error
        assert c.stats.checks == report.iterations
    slots = engine.host_slot_checker.stats
    assert slots.wrong_blocks == 0 and slots.checks == report.iterations, slots
    assert slots.unknown_resident == 0, f'{slots.unknown_resident} resident host blocks of unknown prefix'
    assert report.finished + report.aborted == report.requests
    check_gpu_refcounts_balanced(engine.scheduler)
    check_host_tier_balanced(engine)


MATRIX = [  # (quant_policy, dtype, host_kv_format, copy_delay_polls): every quant_policy x allowed host format
    (0, torch.float16, 'same', 0),
    (0, torch.float16, 'int8', 1),
    (0, torch.float16, 'int4', 0),
    (0, torch.bfloat16, 'int8', 0),
    (0, torch.bfloat16, 'int4', 2),
    (4, torch.float16, 'same', 2),
    (8, torch.bfloat16, 'same', 1),
]


# every cell with the product's default policy; a lossless and a lossy cell with each other policy
POLICY_MATRIX = ([(DEFAULT_POLICY, *cell) for cell in MATRIX]
                 + [(policy, *MATRIX[i]) for policy in OTHER_POLICIES for i in (0, 4)])


@pytest.mark.parametrize('eviction_policy,quant_policy,dtype,host_kv_format,copy_delay_polls', POLICY_MATRIX)
def test_host_tier_restores_oracle_bytes(eviction_policy, quant_policy, dtype, host_kv_format, copy_delay_polls):
    engine, checker, report, faults = run_host_tier(quant_policy=quant_policy, dtype=dtype,
                                                    host_kv_format=host_kv_format, fail_load_every=37,
                                                    fail_store_every=53, copy_delay_polls=copy_delay_polls,
                                                    eviction_policy=eviction_policy)
    assert type(scheduler_side(engine).index.policy) is POLICIES[eviction_policy]
    assert_run_clean(engine, checker, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert m['demotions'] > 0 and m['bytes_to_host'] > 0, m
    assert m['lookups'] > 0 and m['hit_blocks'] > 0 and m['hit_tokens'] > 0, m
    assert m['restored_tokens'] > 0 and m['bytes_to_gpu'] > 0 and m['restore_latency_count'] > 0, m
    assert report.seen_remote_loading > 0
    if host_kv_format != 'same':
        assert checker.stats.lossy_blocks > 0, 'no restored block was checked against the lossy reference'
    assert engine.host_slot_checker.stats.slots_checked > 0


@pytest.mark.parametrize('host_kv_format', ['same', 'int4'])
def test_host_slot_checker_catches_a_corrupted_resident_slot(host_kv_format):
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format=host_kv_format,
                                               abort_rate=0.0)
    slots = engine.host_slot_checker
    resident = [d for d in slots.prefixes if d in scheduler_side(engine).index]
    assert resident, 'no resident host block to corrupt'
    slot = scheduler_side(engine).index.get(resident[0]).slot
    view = worker_side(engine).pool.slot_view(slot)
    view[len(view) // 3] ^= 0x10
    from lmdeploy_hostcache.testing.harness import KVMismatch
    with pytest.raises(KVMismatch, match=f'host slot {slot} '):
        slots.verify('after corruption')


@pytest.mark.parametrize('quant_policy,dtype,host_kv_format', [(0, torch.float16, 'same'), (8, torch.bfloat16, 'same'),
                                                               (0, torch.bfloat16, 'int4')])
def test_tensor_parallel_ranks_aggregate_like_the_ray_executor(quant_policy, dtype, host_kv_format):
    """TP=2: one worker connector per rank, completions merged by LMDeploy's aggregator; a copy
    failure on rank 1 only must fail the whole load (rank 0 wrote its shard) and fall back."""
    engine, checkers, report, faults = run_host_tier(quant_policy=quant_policy, dtype=dtype,
                                                     host_kv_format=host_kv_format, tp=2, fault_rank=1,
                                                     fail_load_every=11, fail_store_every=23, copy_delay_polls=1)
    assert len(checkers) == 2
    assert_run_clean(engine, checkers, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert m['restored_tokens'] > 0 and m['restore_failures'] > 0, m
    assert all(c.stats.trie_blocks > 0 for c in checkers)


@pytest.mark.parametrize('quant_policy,host_kv_format', [(8, 'int8'), (4, 'int4'), (8, 'int4')])
def test_lossy_host_format_over_quantized_cache_is_refused(quant_policy, host_kv_format):
    with pytest.raises(ValueError, match='quant'):
        build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=8, quant_policy=quant_policy),
                               HostTierSpec(host_kv_format=host_kv_format))


@pytest.mark.parametrize('host_kv_format', ['same', 'int4'])
def test_checksums_agree_end_to_end(host_kv_format):
    """checksum on: every restore re-hashes its slots; with no corruption none may be refused."""
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format=host_kv_format,
                                               abort_rate=0.0, checksum=True)
    assert_run_clean(engine, checker, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert m['restored_tokens'] > 0 and m['restore_failures'] == 0, m
    assert worker_side(engine)._checksums, 'no slot was ever hashed'


def test_failed_loads_fall_back_to_recompute():
    engine, checker, report, faults = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                                    abort_rate=0.0, fail_load_every=5)
    assert_run_clean(engine, checker, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert faults.armed_loads > 0 and m['restore_failures'] > 0, m
    assert report.aborted == 0 and report.finished == report.requests


def test_aborts_in_the_middle_of_loads_settle_slots_and_refcounts():
    conversations = weka_conversations(files=WEKA_FILES[:3], max_turns=6)
    for turns in conversations:
        for turn in turns[1:]:
            turn.abort = 'loading'
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               conversations=conversations, abort_rate=0.0, copy_delay_polls=2)
    assert_run_clean(engine, checker, report)
    assert report.aborted_while_loading > 0, 'no abort happened while a load was in flight'
    assert scheduler_side(engine).metrics.snapshot()['restore_failures'] >= report.aborted_while_loading


def test_short_restores_are_skipped_below_min_restore_tokens():
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               abort_rate=0.0, min_restore_tokens=10 ** 6)
    assert_run_clean(engine, checker, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert m['restored_tokens'] == 0 and report.seen_remote_loading == 0, m


def test_mooncake_conversations_with_host_tier():
    engine, checker, report, _ = run_host_tier(quant_policy=8, dtype=torch.float16, host_kv_format='same',
                                               gpu_blocks=20, host_slots=16,
                                               conversations=mooncake_conversations(max_requests=20),
                                               abort_rate=0.2, fail_load_every=41, max_active=4)
    assert_run_clean(engine, checker, report)
    assert scheduler_side(engine).metrics.snapshot()['restored_tokens'] > 0


@pytest.mark.skipif(not FULL, reason='larger cells: set HOSTCACHE_HARNESS_FULL=1')
@pytest.mark.parametrize('quant_policy,dtype,host_kv_format,copy_delay_polls', MATRIX)
def test_host_tier_full_size(quant_policy, dtype, host_kv_format, copy_delay_polls):
    engine, checker, report, _ = run_host_tier(quant_policy=quant_policy, dtype=dtype, host_kv_format=host_kv_format,
                                               files=WEKA_FILES, max_turns=12, gpu_blocks=28, host_slots=40,
                                               fail_load_every=29, fail_store_every=31, max_active=4,
                                               copy_delay_polls=copy_delay_polls)
    assert_run_clean(engine, checker, report)
    assert scheduler_side(engine).metrics.snapshot()['restored_tokens'] > 0


def test_activated_lmdeploy_factory_and_scheduler_hook_drive_the_host_tier():
    """With the activation patches live, LMDeploy's own factory and Scheduler wire the host tier."""
    activate = pytest.importorskip('lmdeploy_hostcache.integration.activate')
    from lmdeploy.pytorch.kv_connector import factory  # noqa: F401 - importing it lets the hook patch it

    state = activate.status()
    if state.get('status') != 'active':
        pytest.skip(f"activation is not active in this process: {state.get('status')} {state.get('reason')}")
    from lmdeploy_hostcache.integration.connector import HostTierConnector
    from lmdeploy_hostcache.integration.lifecycle import HostTierKVBlockLifecycle

    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               abort_rate=0.0, via_lmdeploy_factory=True)
    assert isinstance(engine.scheduler_connector, HostTierConnector)
    assert type(engine.scheduler.block_trie._kv_lifecycle) is HostTierKVBlockLifecycle
    assert_run_clean(engine, checker, report)
    assert scheduler_side(engine).metrics.snapshot()['restored_tokens'] > 0


# -- the harness must catch a broken transfer path ------------------------------------------------
# Each mutation below is a real bug class (stream order, plan translation, slot mapping); it is
# applied through the worker's public step API so the mutations do not depend on internals.


def _mutate_worker(monkeypatch, mutate_meta_and_submit):
    from lmdeploy_hostcache.integration.worker import HostTierWorker

    original = HostTierWorker.start_load_kv
    monkeypatch.setattr(HostTierWorker, 'start_load_kv',
                        lambda self, meta: mutate_meta_and_submit(original, self, meta))


def _expect_detection():
    from lmdeploy_hostcache.testing.harness import KVMismatch
    with pytest.raises(KVMismatch):
        run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same', abort_rate=0.0)


def test_harness_catches_loads_submitted_before_demotions(monkeypatch):
    import dataclasses

    def loads_first(original, worker, meta):
        original(worker, dataclasses.replace(meta, demotions=(), demotion_batch=None))
        if meta.demotions:
            original(worker, dataclasses.replace(meta, loads=()))

    _mutate_worker(monkeypatch, loads_first)
    _expect_detection()


def test_harness_catches_loads_reported_before_they_land(monkeypatch):
    """The CPU copy engine lands an op's copies as late as a CUDA stream may (at its poll, or at the
    next submit), so a worker that reports a load finished before its copy engine does lets the
    request's forward run on KV that is not there yet, and the checker sees it."""
    from lmdeploy_hostcache.integration.worker import HostTierWorker
    from lmdeploy_hostcache.testing.harness import KVMismatch

    original = HostTierWorker.get_finished

    def early(self):
        out = original(self)
        reported = self.__dict__.setdefault('_reported_early', set())
        finished = set(out.finished_receiving or ()) - reported   # each request reported once
        for op in self._ops.values():                               # still in flight: reported done anyway
            new = set(op.request_ids) - reported
            finished |= new
            reported |= new
        return type(out)(completed_save_ids=out.completed_save_ids, finished_receiving=finished or None,
                         invalid_block_ids=out.invalid_block_ids)

    monkeypatch.setattr(HostTierWorker, 'get_finished', early)
    with pytest.raises(KVMismatch):
        run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same', abort_rate=0.0, gpu_blocks=16,
                      copy_delay_polls=2)


def test_harness_catches_demotions_copied_after_the_forward(monkeypatch):
    import dataclasses

    from lmdeploy_hostcache.integration.connector import HostTierConnector
    from lmdeploy_hostcache.integration.worker import HostTierWorker

    deferred = {}
    original = HostTierWorker.start_load_kv

    def loads_now(self, meta):
        if meta.demotions:
            deferred[id(self)] = dataclasses.replace(meta, loads=())
        return original(self, dataclasses.replace(meta, demotions=(), demotion_batch=None))

    def demote_after_forward(self):
        meta = deferred.pop(id(self.worker_side), None)
        if meta is not None:
            original(self.worker_side, meta)

    monkeypatch.setattr(HostTierWorker, 'start_load_kv', loads_now)
    monkeypatch.setattr(HostTierConnector, 'start_save_kv', demote_after_forward)
    _expect_detection()


def test_harness_catches_loads_into_the_wrong_blocks(monkeypatch):
    import dataclasses

    from lmdeploy_hostcache.integration.worker import HostLoad

    def reversed_destinations(original, worker, meta):
        loads = tuple(HostLoad(ld.request_id, ld.slots, tuple(reversed(ld.gpu_blocks))) for ld in meta.loads)
        return original(worker, dataclasses.replace(meta, loads=loads))

    _mutate_worker(monkeypatch, reversed_destinations)
    _expect_detection()


def test_harness_catches_demotions_into_the_wrong_slots(monkeypatch):
    import dataclasses

    def rotated_slots(original, worker, meta):
        dem = meta.demotions
        if len(dem) > 1:
            dem = tuple((gpu, dem[(k + 1) % len(dem)][1]) for k, (gpu, _) in enumerate(dem))
        return original(worker, dataclasses.replace(meta, demotions=dem))

    _mutate_worker(monkeypatch, rotated_slots)
    _expect_detection()


# -- known liveness bug found by this harness ----------------------------------------------------


def _reclaim_fix_active() -> bool:
    from lmdeploy_hostcache.integration import activate

    return activate.status().get('status') == 'active'


# LMDeploy 0.18.0 + any external-load connector: a loaded ("remote ready") request pins its blocks
# and was never reclaimed, while a long prefill admitted later in chunks ignores that soft
# reservation; both then waited for blocks the other held. The activation layer patches
# RecomputeEvictionHelper._reclaim_candidate (patches/0007-*.diff); tests/integration/
# test_reclaim_fix.py shows the stall with the stock method. This is the end-to-end check.
@pytest.mark.skipif(not _reclaim_fix_active(), reason='activation patches are not live in this interpreter '
                    '(LMDEPLOY_HOSTCACHE_DISABLE set, or the .pth is not installed): stock LMDeploy deadlocks here')
def test_long_prefill_chunks_and_a_remote_ready_load_do_not_deadlock():
    from lmdeploy_hostcache.testing.harness import HarnessError
    # GPU LRU ties (LMDeploy stores access times as whole seconds) make the exact interleaving
    # vary between runs; these three small cells each reached the deadlock on every try here.
    cells = [(16, 64, ['trace_0019.json', 'trace_0086.json', 'trace_0228.json']),
             (16, 48, ['trace_0019.json', 'trace_0086.json', 'trace_0228.json']),
             (16, 64, ['trace_0228.json', 'trace_0277.json', 'trace_0291.json'])]
    for gpu_blocks, max_prefill, files in cells:
        engine = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=gpu_blocks,
                                                                         max_prefill_token_num=max_prefill),
                                        HostTierSpec(host_slots=24))
        conversations = weka_conversations(files=files, max_turns=4, max_blocks=12)
        try:
            WorkloadDriver(engine, conversations, max_active=3, max_idle=10).run()
        except HarnessError as exc:
            loads = engine.scheduler.kv_load_coordinator
            ready = [s.seq_id for s in engine.scheduler.seq_manager.get_all_sequences() if loads.is_remote_ready(s)]
            chunker = engine.inputs_maker.long_context_chunker
            raise AssertionError(f'{exc}; remote-ready requests {ready}, active long prefill '
                                 f'{chunker.seq.seq_id if chunker.enabled() else None}, free GPU blocks '
                                 f'{engine.scheduler.block_manager.get_num_free_gpu_blocks()}') from exc


def test_harness_catches_a_tp_executor_that_trusts_the_leader_only(monkeypatch):
    """A rank-1 copy failure hidden by skipping LMDeploy's aggregation must show up as wrong bytes."""
    from lmdeploy_hostcache.testing.harness import KVMismatch
    from lmdeploy_hostcache.testing.harness.cpu_engine import CpuExecutor
    original = CpuExecutor.forward

    def leader_only(self, forward_inputs, running):
        aggregator, self.aggregator = self.aggregator, None
        try:
            original(self, forward_inputs, running)
        finally:
            self.aggregator = aggregator

    monkeypatch.setattr(CpuExecutor, 'forward', leader_only)
    with pytest.raises(KVMismatch, match='rank 1'):
        run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same', tp=2, fault_rank=1,
                      fail_load_every=11, abort_rate=0.0, copy_delay_polls=1)


def test_restored_tokens_never_exceed_counted_host_hits():
    """Metrics consistency: every restored token was first counted as a host hit."""
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               abort_rate=0.0)
    assert_run_clean(engine, checker, report)
    m = scheduler_side(engine).metrics.snapshot()
    assert m['restored_tokens'] <= m['hit_tokens'], m


# -- long runs through a lossy host format ---------------------------------------------------------


def _hot_prefix_conversation(rounds: int, prefix_blocks: int = 4, block_size: int = 16, filler_blocks: int = 14,
                             seed: int = 11):
    """One conversation alternating a request on a hot shared prefix with an unrelated long prompt
    that evicts it from the GPU: each hot request restores the prefix from host (one more lossy
    round trip) and the next filler demotes those restored bytes again."""
    import numpy as np

    from lmdeploy_hostcache.testing.harness import TurnSpec
    rng = np.random.default_rng(seed)
    prefix = rng.integers(10, 30000, prefix_blocks * block_size)
    turns = []
    for r in range(rounds):
        hot = np.concatenate([prefix, rng.integers(10, 30000, block_size // 2)])
        filler = rng.integers(10, 30000, filler_blocks * block_size + 3)
        turns.append(TurnSpec('hot', 2 * r, hot, 2, think_steps=1))
        turns.append(TurnSpec('hot', 2 * r + 1, filler, 2, think_steps=1))
    return [turns]


def _distinct_lru_times(monkeypatch):
    """GPU LRU access times from a counter (LMDeploy keeps whole seconds; ties make eviction order,
    and so the number of round trips, vary from run to run)."""
    try:
        from .test_connector import deterministic_lru
    except ImportError:
        from test_connector import deterministic_lru
    deterministic_lru(monkeypatch)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_hot_prefix_round_trips_int4_many_times(dtype, monkeypatch):
    """A prefix restored through int4 more than a fixed depth of round trips (f = int4 round trip
    is not idempotent; fp16 blocks can take tens of trips to reach a fixed point): the checkers
    bound each block by its own restore count, so every byte is still checked exactly. (With the
    former fixed bound of 6 round trips this run reported wrong bytes.)"""
    from lmdeploy_hostcache.testing.harness.host_tier import round_trips
    _distinct_lru_times(monkeypatch)
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=dtype, host_kv_format='int4', gpu_blocks=16,
                                               host_slots=32, abort_rate=0.0, max_active=1,
                                               conversations=_hot_prefix_conversation(rounds=12))
    assert_run_clean(engine, checker, report)
    trips = round_trips(engine)
    assert trips.max > 6, f'the hot prefix made only {trips.max} round trips'
    assert checker.stats.lossy_blocks > 0


def test_lossy_checker_bound_follows_each_blocks_restore_count(monkeypatch):
    """The bound is the block's own history: a checker told that no block was ever restored must
    reject every lossy restored block (a block may not be 'explained' by round trips it never made)."""
    from lmdeploy_hostcache.testing.harness import KVMismatch
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=16, max_prefill_token_num=NO_LONG_CHUNKS),
                                    HostTierSpec(host_slots=32, host_kv_format='int4'))
    _distinct_lru_times(monkeypatch)
    checkers = rank_checkers(engine, 'int4')
    for c in checkers:
        c.round_trips = lambda tokens, block_index: 0
    with pytest.raises(KVMismatch):
        WorkloadDriver(engine, _hot_prefix_conversation(rounds=3), checker=checkers, max_active=1).run()


def test_a_block_filled_on_a_requests_last_step_is_checked_on_host(monkeypatch):
    """Issue 13 item 2: a request whose last forward completes a block (prompt 40 tokens, 9 new
    tokens: positions 0..47 hold KV when it finishes) leaves that block in the trie and is gone
    before the next check; fillers then demote it. The host-slot checker must know its prefix
    and compare its host bytes: no resident block may be unknown. (This block's tokens were
    already seen one step earlier in the live sequence, and it is now also registered at
    eviction; the unknown blocks a long soak reported came from counting doomed blocks still
    pinned by in-flight copies: ``test_connector_second_chance``'s harness run counted 16 of
    them before the count was restricted to resident, non-doomed blocks.)"""
    import numpy as np

    from lmdeploy_hostcache.testing.harness import TurnSpec
    _distinct_lru_times(monkeypatch)
    rng = np.random.default_rng(5)
    turns = [TurnSpec('last-step', 0, rng.integers(10, 30000, 40), 9, think_steps=1)]
    for k in range(1, 4):
        turns.append(TurnSpec('last-step', k, rng.integers(10, 30000, 12 * 16 + 5), 2, think_steps=1))
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               gpu_blocks=16, host_slots=32, abort_rate=0.0, max_active=1,
                                               conversations=[turns])
    assert_run_clean(engine, checker, report)
    slots = engine.host_slot_checker
    first = report.handles[0]
    tokens = np.concatenate([first.prompt, np.asarray(first.output_tokens[:8])])
    assert len(tokens) == 48
    from lmdeploy_hostcache.tier.digest import ChainHasher
    chain = ChainHasher(scheduler_side(engine).namespaces.for_adapter(None))
    chain.extend(tokens)
    last = chain.digests[2]
    assert scheduler_side(engine).index.is_resident(last), 'the last-step block did not reach the host tier'
    assert last in slots.prefixes and slots.stats.unknown_resident == 0


def _equal_blocks_under_another_prefix():
    """Turn 4's blocks 1-2 have exactly turn 1's tokens, after another block 0: the host tier holds
    turn 1's blocks, which must not be restored there (their KV depends on the whole prefix)."""
    import numpy as np

    from lmdeploy_hostcache.testing.harness import TurnSpec

    rng = np.random.default_rng(3)
    shared = rng.integers(10, 30000, 32)
    first = np.concatenate([rng.integers(10, 30000, 16), shared, rng.integers(10, 30000, 5)])
    other0 = rng.integers(10, 30000, 16)
    turns = [TurnSpec('x', 0, first, 2, 1), TurnSpec('x', 1, rng.integers(10, 30000, 14 * 16 + 3), 2, 1),
             TurnSpec('x', 2, np.concatenate([other0, rng.integers(10, 30000, 5)]), 2, 1),
             TurnSpec('x', 3, np.concatenate([other0, shared, rng.integers(10, 30000, 5)]), 2, 1)]
    return [turns]


def test_equal_blocks_under_another_prefix_are_never_restored():
    engine, checker, report, _ = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                               gpu_blocks=16, host_slots=32, abort_rate=0.0, max_active=1,
                                               conversations=_equal_blocks_under_another_prefix())
    assert_run_clean(engine, checker, report)
    assert scheduler_side(engine).metrics.snapshot()['demotions'] > 0


def test_the_checker_catches_a_block_restored_under_another_prefix(monkeypatch):
    """The checker itself can fail: with the product's two defences against it switched off (digests
    that ignore the parent, and no token/parent check on lookup), turn 4 restores turn 1's blocks 1-2
    and the prefix oracle reports their bytes as wrong."""
    import xxhash

    from lmdeploy_hostcache.testing.harness import KVMismatch
    from lmdeploy_hostcache.tier import digest, host_index

    real = xxhash.xxh3_128_intdigest
    monkeypatch.setattr(digest, '_xxh3_128', lambda data, seed=0: real(bytes(data)[16:], seed))
    init = host_index.HostIndex.__init__

    def no_verify(self, *a, **k):
        init(self, *a, **k)
        self.verify_tokens = False

    monkeypatch.setattr(host_index.HostIndex, '__init__', no_verify)
    with pytest.raises(KVMismatch, match='wrong bytes'):
        run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same', gpu_blocks=16, host_slots=32,
                      abort_rate=0.0, max_active=1, conversations=_equal_blocks_under_another_prefix())
