"""Bounded randomized soak of the host tier over the engine-in-the-loop CPU harness.

``lmdeploy-hostcache soak --seconds S --seed N`` runs scenarios seeded ``N, N+1, ...`` until the wall
time is spent (a scenario starts only while the time left covers the longest scenario seen so far)
and stops at the first failure, printing the seed that reproduces it.

One scenario (``run_scenario``), its configuration drawn by ``random_scenario(seed)`` from the
supported combinations only (lossy host formats only over unquantized caches; TP divides the
harness model's KV heads; policies from ``eviction.POLICIES``):

- LMDeploy's real scheduler + both ``HostTierConnector`` roles + the copy engine run a seeded
  synthetic multi-turn workload (shared system prefixes, each turn extending the previous turn's
  prompt) under GPU capacity smaller than the working set, so blocks are demoted, restored and
  preempted all the time; optionally with chunked prefill, slow copies, injected load/store
  failures on one rank, aborts (waiting / mid-load / decoding) and one sleep + wakeup mid-run;
- after every engine step every GPU block LMDeploy considers valid is compared with the prefix
  oracle on every TP rank (``rank_checkers``; lossy formats: the transfer reference of exactly the
  round trips that block made), restored blocks included, and every resident host slot is compared
  with its oracle slot image (``HostSlotChecker``, every step and once at the end);
- after the run, the leak checks: GPU refcounts (only the trie holds blocks), the host index
  invariants with no slot pinned or leaked, no resident host block of unknown prefix, no copy in
  flight on any rank, every per-request map of the scheduler side empty (its failed-copy markers and held
  block count too, and, for an engine that has them, the capture's noted arrivals and the store tier's
  staged blocks: the soak's own scenarios have neither), the worker checksum cache
  bounded by the slot count, the eviction policy's candidate count equal to the index's candidates
  and its per-segment counts equal to the index's blocks outside the kept-restore queue (kept
  restores leave the policy, ``HostIndex``), and every host pool's bytes equal to
  ``num_slots * slot_bytes`` with its pinned bytes matching ``pool.pinned``; then ``close`` must
  leave nothing in flight.

Any exception is the scenario's failure; its summary carries the phase ('build', 'run', 'leaks')
and the message. Nothing here is random except through the scenario seed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_mod
import sys
import time
from dataclasses import asdict, dataclass

BLOCK_SIZE = 16                     # HarnessCacheSpec's default block size
NO_CHUNKING = 4096                  # prefill budget above every prompt: LMDeploy never chunks
CHUNKED_PREFILL_TOKENS = (64, 128, 256)   # prefill budgets below most prompts: long prefills are chunked
CORRUPTION_BYTE = 0x5A
PROGRESS_EVERY_S = 60.0            # a long soak prints one progress line a minute
COVERAGE_FIELDS = ('quant_policy', 'dtype', 'host_kv_format', 'tp', 'eviction_policy', 'checksum', 'chunked_prefill',
                   'copy_delay_polls', 'fail_loads', 'fail_stores', 'aborts', 'sleep')


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything one scenario depends on (JSON-serialisable through ``asdict``)."""

    seed: int
    quant_policy: int               # 0, 4, 8
    dtype: str                      # 'float16' | 'bfloat16'
    host_kv_format: str             # 'same'; 'int8'/'int4' only with quant_policy 0
    tp: int                         # 1 | 2 (divides HarnessModel.num_kv_heads)
    eviction_policy: str            # a key of eviction.POLICIES
    checksum: bool
    max_prefill_token_num: int      # < longest prompt: LMDeploy chunks long prefills
    gpu_blocks: int                 # includes LMDeploy's one reserved block
    host_slots: int
    copy_delay_polls: int           # 0-3 extra polls before a copy completes
    fail_load_every: int            # 0 = off; else a load fails every N iterations (on fault_rank)
    fail_store_every: int
    fault_rank: int
    abort_rate: float
    sleep_at: int | None            # iteration after which the engine sleeps and wakes up again
    sleep_level: int
    max_active: int
    systems: int                    # shared system prefixes
    system_blocks: int              # full blocks per system prefix
    conversations: int
    turns: int
    max_new_tokens: int

    @property
    def chunked_prefill(self) -> bool:
        return self.max_prefill_token_num < NO_CHUNKING

    def coverage(self) -> dict[str, object]:
        """The values this scenario contributes to the soak's coverage table."""
        return {'quant_policy': self.quant_policy, 'dtype': self.dtype, 'host_kv_format': self.host_kv_format,
                'tp': self.tp, 'eviction_policy': self.eviction_policy, 'checksum': self.checksum,
                'chunked_prefill': self.chunked_prefill, 'copy_delay_polls': self.copy_delay_polls,
                'fail_loads': self.fail_load_every > 0, 'fail_stores': self.fail_store_every > 0,
                'aborts': self.abort_rate > 0, 'sleep': self.sleep_at is not None}


# -- workload ----------------------------------------------------------------------------------


def build_workload(seed: int, *, systems: int, system_blocks: int, conversations: int, turns: int,
                   max_new_tokens: int, vocab: int = 32000):
    """Seeded multi-turn conversations: conversation ``c`` starts with system prefix ``c % systems``
    plus a user part; turn ``k``'s prompt is turn ``k-1``'s prompt extended by 1-4 blocks and a
    partial block (the parts end mid-block, so most prompts end in a partial block)."""
    import numpy as np

    from .harness import TurnSpec

    rng = np.random.default_rng([seed, 0x50A4])
    prefixes = [rng.integers(10, vocab, system_blocks * BLOCK_SIZE + int(rng.integers(0, BLOCK_SIZE)))
                for _ in range(systems)]
    out = []
    for c in range(conversations):
        name = f'soak/{seed}/{c}'
        prompt = np.concatenate([prefixes[c % systems],
                                 rng.integers(10, vocab, int(rng.integers(1, 4)) * BLOCK_SIZE
                                              + int(rng.integers(1, BLOCK_SIZE)))])
        conv = []
        for k in range(turns):
            if k:
                prompt = np.concatenate([prompt, rng.integers(10, vocab, int(rng.integers(1, 5)) * BLOCK_SIZE
                                                              + int(rng.integers(1, BLOCK_SIZE)))])
            conv.append(TurnSpec(name, k, prompt.copy(), int(rng.integers(1, max_new_tokens + 1)),
                                 think_steps=int(rng.integers(1, 4))))
        out.append(conv)
    return out


def max_prompt_blocks(systems: int, system_blocks: int, turns: int) -> int:
    """Upper bound of ``build_workload``'s longest prompt, in blocks (partials rounded up)."""
    return system_blocks + 1 + 4 + (turns - 1) * 5


def random_scenario(seed: int) -> ScenarioConfig:
    """A supported configuration, a deterministic function of ``seed``."""
    import random

    from lmdeploy_hostcache.tier.eviction import POLICIES

    rng = random.Random(f'lmdeploy-hostcache-soak/{int(seed)}')
    quant_policy = rng.choice((0, 4, 8))
    host_kv_format = rng.choice(('same', 'int8', 'int4')) if quant_policy == 0 else 'same'
    tp = rng.choice((1, 2))
    systems = rng.randint(1, 3)
    system_blocks = rng.randint(32, 96)
    conversations = rng.randint(5, 9)
    turns = rng.randint(3, 7)
    longest = max_prompt_blocks(systems, system_blocks, turns)
    max_new_tokens = rng.randint(2, 6)
    # GPU: the longest request plus a little (it must fit alone; two long ones preempt each other)
    gpu_blocks = longest + 2 + (max_new_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE + rng.randint(0, 8)
    working_set = systems * system_blocks + conversations * (4 + (turns - 1) * 5)
    host_slots = max(gpu_blocks, int(working_set * rng.uniform(0.5, 1.1)))
    sleep_at = rng.randint(8, 60) if rng.random() < 0.25 else None
    return ScenarioConfig(
        seed=int(seed), quant_policy=quant_policy, dtype=rng.choice(('float16', 'bfloat16')),
        host_kv_format=host_kv_format, tp=tp, eviction_policy=rng.choice(sorted(POLICIES)),
        checksum=rng.random() < 0.5,
        max_prefill_token_num=rng.choice(CHUNKED_PREFILL_TOKENS) if rng.random() < 0.4 else NO_CHUNKING,
        gpu_blocks=gpu_blocks, host_slots=host_slots, copy_delay_polls=rng.randint(0, 3),
        fail_load_every=rng.choice((0, 0, 0, 23, 41, 61)), fail_store_every=rng.choice((0, 0, 11, 23, 41)),
        fault_rank=rng.randrange(tp), abort_rate=rng.choice((0.0, 0.1, 0.25)),
        sleep_at=sleep_at, sleep_level=rng.choice((1, 2)), max_active=rng.randint(2, 3),
        systems=systems, system_blocks=system_blocks, conversations=conversations, turns=turns,
        max_new_tokens=max_new_tokens)


# -- one scenario ------------------------------------------------------------------------------


class _SleepWakeup:
    """At ``iteration == at``: ``Engine.sleep(level)`` then ``wakeup`` with fresh GPU and host
    memory holding a byte pattern (new memory is undefined), as LMDeploy's RL flow does; the
    checkers keep running through it (a restore that reads a slot the new pool never got, or a
    trie block the new cache never got, is a mismatch)."""

    PATTERN = 0xA5

    def __init__(self, engine, at: int | None, level: int):
        self.engine = engine
        self.at = at
        self.level = level
        self.done = False
        self.rejected = 0        # requests in flight when the engine went to sleep (LMDeploy rejects them)

    def __call__(self, driver) -> None:
        if self.done or self.at is None or driver.iteration != self.at:
            return
        self.rejected = sum(1 for _, _, h in driver._active.values() if not (h.finished or h.aborted))
        self.engine.sleep(self.level)
        self.engine.wakeup(host_fill=self.PATTERN, gpu_fill=self.PATTERN)
        self.done = True


class _Corruptor:
    """Test-only fault: from iteration ``start`` on, each iteration flip one byte (on every rank)
    of the deepest prefix-trie block not flipped yet; the real checkers must report it."""

    def __init__(self, engine, start: int):
        self.engine = engine
        self.start = start
        self.flipped: set[tuple[int, int]] = set()     # (physical block, prefix length)

    def __call__(self, driver) -> None:
        import numpy as np
        import torch

        if driver.iteration < self.start:
            return
        sched = self.engine.scheduler
        allocator = sched.block_manager.allocator
        best = None
        for root in sched.block_trie._roots.values():
            stack = [root]
            while stack:
                node = stack.pop()
                for child in node.children.values():
                    stack.append(child)
                    phys = int(allocator.get_physical_blocks(np.array([child.block_id]))[0])
                    if (phys, child.prefix_len) not in self.flipped and (best is None or child.prefix_len > best[1]):
                        best = (phys, child.prefix_len)
        if best is None:
            return
        self.flipped.add(best)
        for kv in self.engine.kvs:
            view = kv.views[next(iter(kv.views))]          # [layers, pages, kernel_block, *payload]
            row = view[(0, best[0] * kv.pages_per_block) + (0,) * (view.dim() - 3)]
            row.view(torch.uint8)[0] ^= CORRUPTION_BYTE


def _chain(*callbacks):
    def on_iteration(driver):
        for cb in callbacks:
            cb(driver)
    return on_iteration


def ghost_overflow(policy, num_slots: int) -> str | None:
    """What is wrong with a policy's ghost lists (digests of evicted blocks), or None: each list is
    bounded on its own by ``ghost_ratio`` x (the slots + 1) (ARC keeps two, S3-FIFO one), so metadata
    never grows with the traffic."""
    ghosts = getattr(policy, '_ghost', None)
    if ghosts is None:
        return None
    lists = ghosts if isinstance(ghosts, tuple) else (ghosts,)
    bound = int(getattr(policy, 'ghost_ratio', 1.0) * (num_slots + 1)) + 2
    longest = max(len(g) for g in lists)
    if longest > bound:
        return f'{policy.name} ghost list holds {longest} digests, bound {bound} per list'
    return None


def check_bookkeeping(engine) -> dict[str, int]:
    """Leak checks beyond ``check_host_tier_balanced`` (see the module docstring); returns figures."""
    import torch

    from .harness.host_tier import scheduler_side, worker_side

    side = scheduler_side(engine)
    maps = ('_chains', '_plans', '_holds', '_counted_lookup', '_failed_turns', '_host_only_turns', '_owed_results', '_pending_loads',
            '_inflight_loads', '_pending_demotions', '_inflight_demotions', '_pending_demote_gpu', '_invalid')
    for name in maps:
        left = getattr(side, name, None)
        if left:
            raise AssertionError(f'scheduler side {name} still holds {len(left)} entries after every request ended')
    if getattr(side, '_held_blocks', 0):
        raise AssertionError(f'scheduler side still counts {side._held_blocks} held blocks after every request ended')
    capture = getattr(side, 'capture', None)
    if capture is not None and capture._arrival:
        raise AssertionError(f'trace capture still notes {len(capture._arrival)} arrivals after every request ended')
    l3 = getattr(side, 'l3', None)
    if l3 is not None and l3.chain._staging:
        raise AssertionError(f'the store tier still stages {len(l3.chain._staging)} blocks after every request ended')
    index = side.index
    blocks = index._blocks
    candidates = sum(1 for b in blocks.values() if b.candidate)
    policy = index.policy
    heaps = [policy._heap] if hasattr(policy, '_heap') else [h for h in getattr(policy, '_heaps', ()) if h is not None]
    if heaps:
        live = sum(h.live for h in heaps)
        if live != candidates:
            raise AssertionError(f'{policy.name} policy counts {live} eviction candidates, index has {candidates}')
    per_segment = getattr(policy, '_n', None)
    tracked = sum(1 for b in blocks.values() if not b.on_gpu)   # kept restores left the policy (HostIndex)
    if per_segment is not None and sum(per_segment) != tracked:
        raise AssertionError(f'{policy.name} policy tracks {sum(per_segment)} blocks, index holds {tracked} '
                             f'outside the kept-restore queue')
    overflow = ghost_overflow(policy, index.num_slots)
    if overflow is not None:
        raise AssertionError(overflow)
    pool_bytes = pinned_bytes = 0
    for rank in range(engine.tp):
        worker = worker_side(engine, rank)
        if worker.num_inflight or worker._failed_submits or worker._rejected_loads:
            raise AssertionError(f'rank {rank} worker still tracks ops {worker.num_inflight}, failed submits '
                                 f'{len(worker._failed_submits)}, rejected loads {len(worker._rejected_loads)}')
        if len(worker._checksums) > worker.num_slots or any(not 0 <= s < worker.num_slots for s in worker._checksums):
            raise AssertionError(f'rank {rank} checksum cache holds {len(worker._checksums)} entries for '
                                 f'{worker.num_slots} slots')
        pool = worker.pool
        chunk_bytes = sum(int(c.numel()) for c in pool.chunks)
        if chunk_bytes != pool.nbytes or pool.nbytes != pool.num_slots * pool.slot_bytes:
            raise AssertionError(f'rank {rank} host pool holds {chunk_bytes} B, expected {pool.num_slots} x '
                                 f'{pool.slot_bytes} B')
        pinned = sum(int(c.numel()) for c in pool.chunks if torch.cuda.is_available() and c.is_pinned())
        if pinned != (pool.nbytes if pool.pinned else 0):
            raise AssertionError(f'rank {rank} host pool: {pinned} B pinned, pool.pinned={pool.pinned}')
        pool_bytes += pool.nbytes
        pinned_bytes += pinned
    return {'host_candidates': candidates, 'pool_bytes': pool_bytes, 'pinned_bytes': pinned_bytes}


def run_scenario(cfg: ScenarioConfig, *, corrupt_from: int | None = None, max_iterations: int = 6000) -> dict:
    """Build, drive and leak-check one scenario; never raises (failures are in the summary)."""
    import torch

    from .harness import HarnessCacheSpec, HarnessModel, WorkloadDriver, assign_aborts, check_gpu_refcounts_balanced
    from .harness.faults import FaultInjector
    from .harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine, check_host_tier_balanced,
                                    rank_checkers, scheduler_side)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    summary: dict = {'seed': cfg.seed, 'config': asdict(cfg), 'ok': False, 'phase': 'build', 'error': None,
                     'iterations': 0, 'requests': 0, 'finished': 0, 'aborted': 0, 'aborted_while_loading': 0,
                     'sleep_rejected': 0, 'restored_blocks': 0, 'restored_verified': 0, 'checked_blocks': 0,
                     'lossy_blocks': 0, 'host_slots_checked': 0, 'restore_failures': 0, 'wrong_blocks': 0,
                     'leaks': 0}
    engine = checkers = slots = None
    try:
        engine = build_host_tier_engine(
            HarnessModel(dtype=getattr(torch, cfg.dtype)),
            HarnessCacheSpec(num_gpu_blocks=cfg.gpu_blocks, quant_policy=cfg.quant_policy,
                             max_prefill_token_num=cfg.max_prefill_token_num),
            HostTierSpec(host_slots=cfg.host_slots, host_kv_format=cfg.host_kv_format,
                         copy_delay_polls=cfg.copy_delay_polls, checksum=cfg.checksum,
                         eviction_policy=cfg.eviction_policy),
            tp=cfg.tp)
        checkers = rank_checkers(engine, cfg.host_kv_format)
        slots = HostSlotChecker(engine)
        conversations = build_workload(cfg.seed, systems=cfg.systems, system_blocks=cfg.system_blocks,
                                       conversations=cfg.conversations, turns=cfg.turns,
                                       max_new_tokens=cfg.max_new_tokens)
        assign_aborts(conversations, rate=cfg.abort_rate, seed=cfg.seed)
        faults = FaultInjector(engine, load_every=cfg.fail_load_every, store_every=cfg.fail_store_every,
                               rank=cfg.fault_rank)
        sleeper = _SleepWakeup(engine, cfg.sleep_at, cfg.sleep_level)
        hooks = [faults, sleeper] + ([_Corruptor(engine, corrupt_from)] if corrupt_from is not None else [])
        driver = WorkloadDriver(engine, conversations, checker=checkers + [slots], max_active=cfg.max_active,
                                max_iterations=max_iterations, on_iteration=_chain(*hooks))
        summary['phase'] = 'run'
        try:
            report = driver.run()
        finally:
            summary['iterations'] = driver.iteration
            summary['requests'] = driver.report.requests
        slots.verify('end of run')
        summary['phase'] = 'leaks'
        summary.update(finished=report.finished, aborted=report.aborted,
                       aborted_while_loading=report.aborted_while_loading, sleep_rejected=sleeper.rejected)
        if report.finished + report.aborted + sleeper.rejected != report.requests:
            raise AssertionError(f'{report.requests} requests but {report.finished} finished, {report.aborted} '
                                 f'aborted, {sleeper.rejected} rejected by sleep')
        for c in checkers:
            if c.stats.checks != report.iterations:
                raise AssertionError(f'a rank checker ran {c.stats.checks} checks over {report.iterations} iterations')
        if slots.stats.unknown_resident:
            raise AssertionError(f'{slots.stats.unknown_resident} resident host blocks of unknown prefix')
        check_gpu_refcounts_balanced(engine.scheduler)
        check_host_tier_balanced(engine)
        summary.update(check_bookkeeping(engine))
        engine.close()
        if scheduler_side(engine).has_inflight():
            raise AssertionError('host-tier copies still tracked after close')
        summary['ok'] = True
        summary['phase'] = 'done'
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its seed
        summary['error'] = f'{type(exc).__name__}: {exc}'.splitlines()[0][:2000]
        if summary['phase'] == 'leaks':
            summary['leaks'] = 1
    finally:
        if checkers:
            summary['restored_verified'] = min(c.stats.restored_verified for c in checkers)
            summary['checked_blocks'] = sum(c.stats.seq_blocks + c.stats.trie_blocks for c in checkers)
            summary['lossy_blocks'] = sum(c.stats.lossy_blocks for c in checkers)
            summary['wrong_blocks'] = sum(c.stats.wrong_blocks for c in checkers)
        if slots is not None:
            summary['host_slots_checked'] = slots.stats.slots_checked
            summary['wrong_blocks'] += slots.stats.wrong_blocks
        if engine is not None and engine.scheduler_connector is not None:
            m = scheduler_side(engine).metrics.snapshot()
            summary['restored_blocks'] = int(m['restored_tokens']) // BLOCK_SIZE
            summary['restore_failures'] = int(m['restore_failures'])
        summary['cpu_s'] = round(time.process_time() - cpu0, 3)
        summary['wall_s'] = round(time.perf_counter() - wall0, 3)
    return summary


# -- the soak ----------------------------------------------------------------------------------


def _reproduce(seed: int, corrupt_from: int | None) -> str:
    extra = '' if corrupt_from is None else f' --inject-corruption {corrupt_from}'
    return f'lmdeploy-hostcache soak --scenario {seed}{extra}'


def _quiet() -> None:
    """One thread per scenario process (tiny tensors), and no per-fault log lines: injected copy
    failures are expected and every failure that matters is in the summary."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger('lmdeploy_hostcache').setLevel(logging.ERROR)


def _scenario_loop(first_seed: int, stride: int, deadline: float, corrupt_from, emit, stop) -> None:
    """Run seeds ``first_seed, first_seed + stride, ...`` while time is left; ``emit`` each summary."""
    _quiet()
    seed, longest = first_seed, 0.0
    while not stop() and time.monotonic() + longest < deadline:
        summary = run_scenario(random_scenario(seed), corrupt_from=corrupt_from)
        longest = max(longest, summary['wall_s'])
        emit(summary)
        if not summary['ok']:
            return
        seed += stride


def _worker(first_seed, stride, deadline_in, corrupt_from, results, stop_event) -> None:
    deadline = time.monotonic() + deadline_in
    try:
        _scenario_loop(first_seed, stride, deadline, corrupt_from, results.put, stop_event.is_set)
    finally:
        results.put(None)


def soak(seconds: float, seed: int = 0, workers: int = 1, *,
         corrupt_from: int | None = None, out=sys.stdout) -> dict:
    """Run scenarios for ``seconds`` of wall time; returns the summary."""
    start = time.monotonic()
    summaries: list[dict] = []

    progress = {'next': start + PROGRESS_EVERY_S, 'verified': 0}

    def emit(summary: dict) -> None:
        summaries.append(summary)
        progress['verified'] += int(summary.get('restored_verified', 0))
        if not summary['ok']:
            print(f"FAILED scenario seed={summary['seed']}: {summary['error']}; reproduce: "
                  f"{_reproduce(summary['seed'], corrupt_from)}", file=out, flush=True)
        now = time.monotonic()
        if now >= progress['next']:      # one line a minute on long runs (nothing on short ones)
            progress['next'] = now + PROGRESS_EVERY_S
            print(f"soak: {(now - start) / 60:.1f} min, {len(summaries)} scenarios, "
                  f"{progress['verified']} restored blocks verified, "
                  f"{sum(not s['ok'] for s in summaries)} failed", file=out, flush=True)

    if workers == 1:
        _scenario_loop(seed, 1, start + seconds, corrupt_from, emit, lambda: False)
    else:
        ctx = multiprocessing.get_context('spawn')
        results, stop_event = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_worker, args=(seed + w, workers, seconds - (time.monotonic() - start),
                                                   corrupt_from, results, stop_event), daemon=True)
                 for w in range(workers)]
        for p in procs:
            p.start()
        running = workers
        while running:
            try:
                item = results.get(timeout=5.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if item is None:
                running -= 1
                continue
            emit(item)
            if not item['ok']:
                stop_event.set()
        for p in procs:
            p.join(timeout=60)
    return summarize(summaries, seconds=seconds, seed=seed, workers=workers,
                     wall_s=time.monotonic() - start, corrupt_from=corrupt_from)


def summarize(summaries: list[dict], *, seconds: float, seed: int, workers: int, wall_s: float,
              corrupt_from: int | None = None) -> dict:
    keys = ('requests', 'finished', 'aborted', 'aborted_while_loading', 'sleep_rejected', 'iterations',
            'restored_blocks', 'restored_verified', 'checked_blocks', 'lossy_blocks', 'host_slots_checked',
            'restore_failures', 'wrong_blocks', 'leaks')
    totals = {'scenarios': len(summaries), 'passed': sum(s['ok'] for s in summaries),
              'failed': sum(not s['ok'] for s in summaries)}
    totals.update({k: sum(int(s[k]) for s in summaries) for k in keys})
    cpu_s = sum(s['cpu_s'] for s in summaries)
    coverage: dict[str, dict[str, int]] = {f: {} for f in COVERAGE_FIELDS}
    for s in summaries:
        cfg = ScenarioConfig(**s['config'])
        for f, v in cfg.coverage().items():
            coverage[f][str(v)] = coverage[f].get(str(v), 0) + 1
    per_minute = (lambda n, secs: round(n * 60.0 / secs, 1) if secs > 0 else 0.0)
    return {
        'seed': seed, 'seconds': seconds, 'workers': workers, 'ok': totals['failed'] == 0 and bool(summaries),
        'totals': totals, 'cpu_s': round(cpu_s, 3), 'wall_s': round(wall_s, 3),
        'rates': {'restored_verified_per_cpu_minute': per_minute(totals['restored_verified'], cpu_s),
                  'restored_verified_per_wall_minute': per_minute(totals['restored_verified'], wall_s),
                  'restored_blocks_per_cpu_minute': per_minute(totals['restored_blocks'], cpu_s),
                  'scenarios_per_wall_minute': per_minute(len(summaries), wall_s)},
        'per_scenario_cpu_s': {'mean': round(cpu_s / len(summaries), 3) if summaries else 0.0,
                               'max': max((s['cpu_s'] for s in summaries), default=0.0)},
        'failures': [{'seed': s['seed'], 'phase': s['phase'], 'error': s['error'],
                      'reproduce': _reproduce(s['seed'], corrupt_from)} for s in summaries if not s['ok']],
        'coverage': coverage,
        'scenarios': [{k: s[k] for k in ('seed', 'ok', 'cpu_s', 'wall_s', 'iterations', 'requests',
                                         'restored_blocks', 'restored_verified')} for s in summaries],
    }


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def one_line_error(message: str):
        print(f'error: lmdeploy-hostcache soak: {message}', file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    # numbers are parsed in run() so a bad value is one line naming the flag (exit 2)
    parser.add_argument('--seconds', metavar='S', help='wall-time budget in seconds (default: 2 minutes)')
    parser.add_argument('--minutes', metavar='M', help='wall-time budget in minutes (instead of --seconds)')
    parser.add_argument('--seed', metavar='N', default='0', help='first scenario seed (default 0)')
    parser.add_argument('--workers', metavar='W', default='1', help='worker processes (default 1)')
    parser.add_argument('--json', metavar='PATH', help='write the JSON summary here')
    parser.add_argument('--scenario', metavar='N', help='run only the scenario of this seed and print its summary')
    parser.add_argument('--inject-corruption', metavar='ITER', help=argparse.SUPPRESS)   # test-only fault


def _check_json_path(path: str) -> None:
    """``--json PATH`` can be written (``outfile.output_problem``), checked before the run and creating
    nothing: the file appears only once the run's summary is complete."""
    from ..outfile import output_problem

    problem = 'an empty path' if not path else output_problem(path)
    if problem:
        raise _BadArgument(f'--json {path}: cannot write it ({problem})')


def _write_json(path: str, text: str) -> int:
    """Write the summary to ``--json`` whole or not at all (``outfile``); 0, or 1 with one line naming it."""
    from ..outfile import write_text

    try:
        write_text(path, text)
    except OSError as exc:
        print(f'error: --json {path}: cannot write it ({exc.strerror or exc}); the summary above is complete',
              file=sys.stderr)
        return 1
    return 0


class _BadArgument(ValueError):
    pass


MAX_WORKERS = 256             # worker processes (each one a CPU harness of its own)
MAX_SECONDS = 30 * 86400.0    # a 30-day wall-time budget


def _number(args, name: str, kind, *, minimum=None, maximum=None, positive: bool = False):
    raw = getattr(args, name)
    if raw is None:
        return None
    flag = '--' + name.replace('_', '-')
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise _BadArgument(f'{flag} must be {"an integer" if kind is int else "a number"}, got {raw!r}') from None
    if kind is float and not value == value or value in (float('inf'), float('-inf')):
        raise _BadArgument(f'{flag} must be finite, got {raw!r}')
    if positive and not value > 0:
        raise _BadArgument(f'{flag} must be > 0, got {raw!r}')
    if minimum is not None and value < minimum:
        raise _BadArgument(f'{flag} must be >= {minimum}, got {raw!r}')
    if maximum is not None and value > maximum:
        raise _BadArgument(f'{flag} must be <= {maximum:.0f}, got {raw!r}')
    return value


def run(args: argparse.Namespace) -> int:
    try:
        seconds = _number(args, 'seconds', float, positive=True, maximum=MAX_SECONDS)
        minutes = _number(args, 'minutes', float, positive=True, maximum=MAX_SECONDS / 60)
        if seconds is not None and minutes is not None:
            raise _BadArgument('give --seconds or --minutes, not both')
        seed = _number(args, 'seed', int, minimum=0)
        workers = _number(args, 'workers', int, minimum=1, maximum=MAX_WORKERS)
        scenario = _number(args, 'scenario', int, minimum=0)
        corrupt_from = _number(args, 'inject_corruption', int, minimum=0)
        if scenario is not None and (seconds is not None or minutes is not None or workers != 1):
            raise _BadArgument('--scenario runs one scenario: it takes no --seconds, --minutes or --workers')
        if args.json is not None:   # found unwritable before the run, not after it (its results would be lost)
            _check_json_path(args.json)
    except _BadArgument as exc:
        print(f'error: lmdeploy-hostcache soak: {exc}', file=sys.stderr)
        return 2
    if scenario is not None:
        _quiet()
        summary = run_scenario(random_scenario(scenario), corrupt_from=corrupt_from)
        text = json.dumps(summary, indent=2)
        print(text)
        rc = _write_json(args.json, text) if args.json else 0
        if not summary['ok']:
            print(f"FAILED scenario seed={scenario}: {summary['error']}; reproduce: "
                  f"{_reproduce(scenario, corrupt_from)}", file=sys.stderr)
            return 1
        return rc
    budget = seconds if seconds is not None else 60.0 * (minutes if minutes is not None else 2.0)
    summary = soak(budget, seed, workers, corrupt_from=corrupt_from)
    t, r = summary['totals'], summary['rates']
    print(f"soak: {t['scenarios']} scenarios ({t['failed']} failed) in {summary['wall_s']:.1f} s wall, "
          f"{summary['cpu_s']:.1f} s CPU; {t['requests']} requests, {t['restored_blocks']} restored blocks, "
          f"{t['restored_verified']} verified on every rank ({r['restored_verified_per_cpu_minute']} per CPU-minute), "
          f"{t['wrong_blocks']} wrong blocks, {t['leaks']} leaks")
    if not t['scenarios']:
        print(f"error: no scenario finished in the {budget:g} s given; give more time (--seconds/--minutes)",
              file=sys.stderr)
    rc = _write_json(args.json, json.dumps(summary, indent=2)) if args.json else 0
    return 0 if summary['ok'] and rc == 0 else 1
