"""The host tier across LMDeploy 0.18.0's teardown and rebuild paths (issue 9, items 1 and 2).

The CPU harness replays ``Engine.sleep`` / ``wakeup`` / ``update_params`` / ``close`` in LMDeploy's
order (``harness.cpu_engine.CpuEngine``): the sleep drain drops the prefetched batch and its
output, every worker connector is shut down (its host pool released), then the scheduler hears
``finish_kv_transfers_after_worker_drain``; wakeup builds new worker connectors whose new pools
hold a byte pattern (new memory is undefined). Every engine step is byte-checked (every GPU
block LMDeploy considers valid, every resident host slot), so a restore that reads a slot the
new pool never got is a ``KVMismatch``.

After a sleep the new GPU KV cache holds a pattern too: LMDeploy 0.18.0 keeps its prefix trie
across sleep (and the drain can discard a forward whose blocks the trie already lists), so the
scheduler side empties the trie at the drain; the byte checks cover those trie blocks. A rebuild
the scheduler never sees keeps the GPU bytes (``gpu_fill=None``): nothing can tell LMDeploy's
trie before the first refused host load, and these tests are about the host tier.
"""
from __future__ import annotations

import inspect

import pytest

from lmdeploy_hostcache.testing.harness import HarnessCacheSpec, HarnessModel, KVMismatch, WorkloadDriver, check_gpu_refcounts_balanced
from lmdeploy_hostcache.testing.harness import weka_conversations
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine, check_host_tier_balanced,
                                rank_checkers, scheduler_side, worker_side)

pytest.importorskip('lmdeploy_hostcache.integration.connector')

FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json']
PATTERN = 0xA5   # what a new host pool holds before any demotion writes it


class _Stop(Exception):
    pass


class Run:
    """One harness engine with its byte checkers, driven in phases."""

    def __init__(self, *, copy_delay_polls: int = 0, tp: int = 1, host_slots: int = 24, gpu_blocks: int = 24):
        self.engine = build_host_tier_engine(
            HarnessModel(), HarnessCacheSpec(num_gpu_blocks=gpu_blocks, max_prefill_token_num=512),
            HostTierSpec(host_slots=host_slots, copy_delay_polls=copy_delay_polls), tp=tp)
        self.checkers = rank_checkers(self.engine)
        self.slots = HostSlotChecker(self.engine, every=1)
        self.side = scheduler_side(self.engine)

    def phase(self, *, max_turns: int = 4, stop_when=None):
        """Run the conversations (the same prefixes every phase); ``stop_when(driver)`` ends the
        phase early (returns the driver, mid-run) when it returns True after an iteration."""
        conversations = weka_conversations(files=FILES, max_turns=max_turns)

        def on_iteration(driver):
            if stop_when is not None and stop_when(driver):
                raise _Stop
        driver = WorkloadDriver(self.engine, conversations, checker=self.checkers + [self.slots], max_active=3,
                                on_iteration=on_iteration)
        try:
            driver.run()
        except _Stop:
            pass
        return driver

    def assert_clean(self):
        for c in self.checkers:
            assert c.stats.wrong_blocks == 0, c.stats.first_error
        assert self.slots.stats.wrong_blocks == 0, self.slots.stats.first_error
        self.slots.verify('end')
        assert self.slots.stats.unknown_resident == 0, 'resident host blocks of unknown prefix'
        assert self.slots.stats.slots_checked > 0
        check_gpu_refcounts_balanced(self.engine.scheduler)
        check_host_tier_balanced(self.engine)

    def host_blocks(self) -> int:
        return len(self.side.index)


@pytest.mark.parametrize('level,tp', [(1, 1), (2, 1), (1, 2)])
def test_sleep_then_wakeup_never_restores_from_the_released_pool(level, tp):
    """Item 1: Engine.sleep releases every host pool; wakeup's new pools hold garbage. Before the
    fix the index still listed every block and the next request "restored" the pattern."""
    run = Run(tp=tp)
    run.phase()
    assert run.host_blocks() > 0, 'nothing reached the host tier before sleep'
    restored_before = run.side.metrics.restored_tokens
    run.engine.sleep(level)
    after_sleep = (run.host_blocks(), run.side.has_inflight())
    run.engine.wakeup(host_fill=PATTERN)      # GPU bytes kept: only the host tier can go wrong here
    assert worker_side(run.engine).pool.slot_view(0)[0] == PATTERN
    run.phase()                               # the same prefixes again, every step byte-checked
    run.assert_clean()
    assert after_sleep == (0, False), 'the index must not outlive the pools sleep released'
    m = run.side.metrics.snapshot()
    assert m['restored_tokens'] > restored_before, 'the host tier must work again after wakeup'
    assert m['demotion_failures'] == 0 and m['restore_failures'] == 0, m


def test_sleep_empties_lmdeploys_gpu_prefix_trie():
    """LMDeploy 0.18.0 keeps its prefix trie across sleep while the KV cache behind it is
    released; with the host tier active the drain evicts every trie block (nothing demoted), so
    a new KV cache full of garbage is never served from the trie."""
    run = Run()
    run.phase()
    trie = run.engine.scheduler.block_trie
    assert trie.leaves, 'the trie holds nothing before sleep'
    demotions = run.side.metrics.demotions
    run.engine.sleep(1)
    assert not trie.leaves and run.side.metrics.demotions == demotions
    run.engine.wakeup(host_fill=PATTERN, gpu_fill=PATTERN)
    run.phase()
    run.assert_clean()


def test_partial_wakeup_weights_only_keeps_the_tier_empty_until_kv_cache_wakes():
    """wakeup(['weights']) builds no cache engine; the host tier stays dropped until ['kv_cache']."""
    run = Run()
    run.phase(max_turns=2)
    run.engine.sleep(2)
    run.engine.wakeup(['weights'])
    assert run.engine.worker_connectors == [None] and run.host_blocks() == 0
    run.engine.wakeup(['kv_cache'], host_fill=PATTERN, gpu_fill=PATTERN)
    run.phase()
    run.assert_clean()


@pytest.mark.parametrize('tp', [1, 2])
def test_a_cache_rebuild_the_scheduler_never_sees_is_refused_by_the_worker(tp):
    """Item 1, multi-process case: ``wakeup(['kv_cache'])`` on an awake engine rebuilds the cache
    engine and the worker connectors, and nothing tells the scheduler. The new worker refuses
    the first load of a slot its pool never had written (nothing moves), reports the pool reset
    (through LMDeploy's TP aggregator with 2 ranks), and the scheduler drops the stale index."""
    run = Run(tp=tp)
    run.phase()
    assert run.host_blocks() > 0
    failures_before = run.side.metrics.restore_failures
    run.engine.wakeup(['kv_cache'], host_fill=PATTERN)   # not asleep: the scheduler is not told
    assert run.host_blocks() > 0, 'the scheduler still lists the old pool'
    run.phase()
    run.assert_clean()
    assert run.side.tier_resets == 1, 'the worker must report the rebuilt pool once'
    m = run.side.metrics.snapshot()
    assert m['restore_failures'] > failures_before, 'a stale load must have been refused'


def test_close_drops_the_host_tier_and_releases_the_pools():
    run = Run()
    run.phase(max_turns=3)
    assert run.host_blocks() > 0
    workers = [worker_side(run.engine, r) for r in range(run.engine.tp)]
    run.engine.close()
    assert run.host_blocks() == 0 and not run.side.has_inflight()
    run.side.check_balanced()
    assert all(w.pool is None and w.engine is None for w in workers)


def test_update_params_leaves_the_cache_engine_and_connectors_alone():
    """LMDeploy 0.18.0's weight update loads weights only: no teardown, so the host tier stays (as
    LMDeploy's own GPU prefix cache does). If a later LMDeploy rebuilds the cache there, this
    assumption must be revisited (the worker-side refusal still keeps the bytes right)."""
    from lmdeploy.pytorch.engine.engine import Engine
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent

    agent_src = inspect.getsource(BaseModelAgent.update_params)
    for word in ('kv_connector', 'build_cache_engine', 'cache_engine', 'shutdown'):
        assert word not in agent_src, f'BaseModelAgent.update_params now mentions {word!r}'
    assert 'self.executor.update_params(request)' in inspect.getsource(Engine.update_params)
    # the RL flow: sleep, update weights, wake up
    run = Run()
    run.phase(max_turns=3)
    run.engine.sleep(1)
    run.engine.update_params()
    run.engine.wakeup(host_fill=PATTERN, gpu_fill=PATTERN)
    run.phase()
    run.assert_clean()


def test_lmdeploy_sleep_shuts_worker_connectors_down_before_the_scheduler_drain():
    """The order the scheduler side relies on: at ``finish_kv_transfers_after_worker_drain`` every
    worker pool is already gone (``BaseModelAgent.sleep`` -> ``shutdown_kv_connector``)."""
    from lmdeploy.pytorch.engine.engine import Engine
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent

    sleep_src = inspect.getsource(Engine.sleep)
    assert sleep_src.index('self.executor.sleep(level)') < sleep_src.index(
        'self.scheduler.finish_kv_transfers_after_worker_drain()')
    assert 'self.shutdown_kv_connector()' in inspect.getsource(BaseModelAgent.sleep)
    # ... and sleep is its only caller (so emptying the GPU trie there never drops live KV)
    import pathlib

    import lmdeploy
    root = pathlib.Path(lmdeploy.__file__).parent
    callers = [str(p.relative_to(root)) for p in root.rglob('*.py')
               if 'finish_kv_transfers_after_worker_drain()' in p.read_text(errors='replace')]
    assert callers == [str(pathlib.Path('pytorch/engine/engine.py'))], callers
    assert 'self._shutdown_kv_connector()' in inspect.getsource(BaseModelAgent.build_cache_engine)
    assert 'self._shutdown_kv_connector()' in inspect.getsource(BaseModelAgent.release)


@pytest.mark.parametrize('discard_prefetched', [False, True])
def test_sleep_drain_reports_what_really_completed(discard_prefetched):
    """Item 2: copies in flight when the engine sleeps. LMDeploy discards the outputs that would
    report them; the worker's drain completes every op it received and says so (``last_drain``),
    an op whose forward the drain discarded unexecuted never ran, and the scheduler no longer
    records any of them as a failed demotion (before the fix: ``demotion_failures`` counted every
    in-flight block and their host subtrees were dropped as if the copies had failed)."""
    run = Run(copy_delay_polls=3)
    executor = run.engine.executor
    emitted = set()   # demotion batches the worker reported in any step output (consumed or discarded later)
    worker = worker_side(run.engine)
    get_finished = worker.get_finished

    def recording_get_finished():
        out = get_finished()
        emitted.update(out.completed_save_ids or ())
        return out
    worker.get_finished = recording_get_finished

    run.phase(max_turns=6, stop_when=lambda driver: len(run.side._inflight_demotions) >= 2)
    if discard_prefetched:
        # one more engine iteration whose prefetched forward waits in the agent's queue: the
        # sleep drain discards it unexecuted (BaseModelAgent._drain_queues)
        executor.hold = True
        assert run.engine.step()
    inflight = set(run.side._inflight_demotions)
    assert inflight, 'no demotion was in flight when the engine went to sleep'
    workers = [worker_side(run.engine, r) for r in range(run.engine.tp)]
    held = [meta for fi, _ in executor._held if (meta := fi.get('kv_connector_metadata')) is not None]
    discarded = {m.demotion_batch for m in held if m.demotion_batch is not None}
    failures_before = run.side.metrics.demotion_failures
    run.engine.sleep(1)
    executor.hold = False
    assert run.side.metrics.demotion_failures == failures_before, 'drained copies were recorded as failed'
    report = workers[0].last_drain
    assert report is not None and not report.failed_batches
    # every copy the workers received completed (in a step output LMDeploy then discarded, or in
    # the drain itself); the forward the drain discarded never ran
    assert inflight - discarded <= emitted | set(report.completed_batches)
    assert not discarded & (emitted | set(report.completed_batches))
    if discard_prefetched:
        assert discarded, 'the held forward carried no demotion'
    else:
        assert report.completed_batches, 'no copy was still pending when the worker shut down'
    assert run.host_blocks() == 0 and not run.side.has_inflight()
    run.side.check_balanced()
    run.engine.wakeup(host_fill=PATTERN, gpu_fill=PATTERN)
    run.phase()
    run.assert_clean()


def test_a_restore_from_the_released_pool_would_be_caught():
    """The harness itself: with the index kept across sleep (the old behaviour, forced here),
    the byte checks flag the restore of garbage."""
    run = Run()
    run.phase()
    index = run.side.index
    kept = index.drop_all
    index.drop_all = lambda: 0      # simulate the bug: the index survives the teardown
    try:
        run.engine.sleep(1)
    finally:
        index.drop_all = kept
    assert run.host_blocks() > 0
    run.engine.wakeup(host_fill=PATTERN, gpu_fill=PATTERN)
    for w in (worker_side(run.engine, r) for r in range(run.engine.tp)):
        w._readable[:] = b'\x01' * len(w._readable)   # and a worker that trusts every slot
    with pytest.raises(KVMismatch):
        run.phase()


@pytest.mark.parametrize('tp', [1, 2])
def test_a_cache_rebuild_the_scheduler_never_sees_with_a_load_in_flight(tp, exact_lru_clock):
    """The rebuild lands while a host load is in flight: its outcome dies with the old worker. The
    new pool reports itself at its first poll, so the load fails (the request recomputes) and its
    slots are unpinned; before, the request waited for a result that never came, its slots pinned.
    Every GPU block is byte-checked each step; the host slots are checked at the end (until the new
    pool's first poll the index still names the old pool's blocks, which the worker refuses to read)."""
    run = Run(tp=tp, copy_delay_polls=2)
    state = {'rebuilt': False}

    def on_iteration(driver):
        # The rebuild waits for an iteration where a load was shipped this very step (with copies taking two
        # polls it cannot have completed yet: an older one may have, its success already on its way) and no
        # sequence is decoding (a rebuild drops every agent's running sequences: LMDeploy would decode them on
        # a cache that no longer holds their KV, which is not what this test is about). Which iterations those
        # are depends on the step timeline, so it is looked for (on an exact LRU clock: the same every run).
        scheduler = run.engine.scheduler
        decoding = scheduler.num_running() + scheduler.num_ready() > 0
        fresh = any(load.shipped_step == run.side._step for load in run.side._inflight_loads.values())
        if not state['rebuilt'] and driver.iteration > 5 and fresh and not decoding:
            run.engine.wakeup(['kv_cache'], host_fill=PATTERN)   # not asleep: the scheduler is not told
            state['rebuilt'] = True
        assert driver.iteration < 1500, 'no progress: a load is waiting for a pool that is gone'

    WorkloadDriver(run.engine, weka_conversations(files=FILES, max_turns=4), checker=run.checkers, max_active=3,
                   on_iteration=on_iteration).run()
    assert state['rebuilt'], 'no host load was ever in flight'
    assert run.side.tier_resets == 1
    assert not run.side.has_inflight()
    assert run.side.metrics.snapshot()['restore_failures'] >= 1
    restored = run.side.metrics.restored_tokens
    run.phase()                               # the same prefixes again, host slots checked every step
    run.assert_clean()
    assert run.side.tier_resets == 1
    assert run.side.metrics.restored_tokens > restored, 'the host tier must work again on the new pool'
