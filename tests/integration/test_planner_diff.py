"""One grid row's harness run next to the step model's replay of its capture, event by event (a developer tool).

Every round of docs/planner.md "Validated against the engine" found its rules by diffing a row that missed:
the step model's schedule, per-request hits, GPU demotions and host-tier operations against what LMDeploy's
real ``Scheduler`` did in the CPU harness. This test does that diff; it is skipped unless
``HOSTCACHE_PLANNER_DIFF`` holds the row as JSON, in the grid's layout::

    HOSTCACHE_PLANNER_DIFF='["weka-6-mb40", 56, 24, [4, 4, 288], "fifo", "arc"]' TRITON_INTERPRET=1 \\
        .venv/bin/python -m pytest -s tests/integration/test_planner_diff.py

(workload, GPU blocks, host slots, [max_batches, prefill_interval, max_prefill_token_num], long-prompt order,
host eviction policy). It prints both hit rates and, for each of four event streams (the schedule, the blocks
each request's first prefill reused, GPU demotions, host-tier operations), the first place where the two
sides differ with the events around it; the whole streams go to ``HOSTCACHE_PLANNER_DIFF_OUT`` (a
folder, default the test's tmp_path) as ``harness.jsonl`` and ``model.jsonl``.

Steps: an event of harness iteration k is reported at step k + 1, the model's clock (the capture's arrival
clock counts iterations from 0, the model's steps from 1); prefill rows, scheduling decisions and the host
copies they start line up that way. Blocks are named by their capture ids (the harness's digests through the
capture key, which the test fixes; the model's through the captured ``hash_ids``); output blocks, which no
prompt holds, are ``"output"`` on both sides. Request ``r`` is the r-th request in arrival order.
"""
from __future__ import annotations

import json
import os

import pytest

from lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper import RecomputeEvictionHelper

from lmdeploy_hostcache.capture import CaptureKey
from lmdeploy_hostcache.planner.concurrency import Lifetimes
from lmdeploy_hostcache.planner.engine_steps import EngineSteps, SteppedTwoTierCache
from lmdeploy_hostcache.planner.replay import prepare_trace
from lmdeploy_hostcache.planner.traces import read_mooncake
from tests.integration import test_trace_capture as T

ROW_ENV = 'HOSTCACHE_PLANNER_DIFF'
KEY_HEX = '0f' * 16
HOST_OPS = ('prepare_store', 'complete_store', 'drop_subtree', 'prepare_load', 'complete_load', 'touch', 'hold', 'release')


def _wrap(obj, name, log):
    """Replace ``obj.name`` (an instance attribute) by a wrapper that logs ``log(args, result)``."""
    f = getattr(obj, name)

    def wrapped(*a, **k):
        out = f(*a, **k)
        log(a, out)
        return out
    setattr(obj, name, wrapped)


def _first_difference(name: str, harness: list, model: list, context: int = 5) -> None:
    """Print where two event lists (``(step, ...)`` tuples) first differ, ignoring the steps."""
    for i, (a, b) in enumerate(zip(harness, model)):
        if a[1:] != b[1:]:
            break
    else:
        i = min(len(harness), len(model))
        if len(harness) == len(model):
            print(f'{name}: identical ({len(harness)} events)')
            return
    print(f'{name}: first difference at event {i} (harness {len(harness)} events, model {len(model)})')
    for k in range(max(0, i - context), i + context):
        a = harness[k] if k < len(harness) else ''
        b = model[k] if k < len(model) else ''
        print(f'  {"*" if k == i else " "} harness {a!s:60.60}  model {b!s:60.60}')


@pytest.mark.skipif(not os.environ.get(ROW_ENV), reason=f'a developer tool: set {ROW_ENV} to a grid row as JSON')
def test_print_planner_diff(tmp_path, monkeypatch, exact_lru_clock):
    try:
        workload, gpu, host, settings, long_policy, host_policy = json.loads(os.environ[ROW_ENV])
        if workload not in T.WORKLOADS:
            raise ValueError(f'unknown workload {workload!r}')
        settings = tuple(int(x) for x in settings)
    except (ValueError, TypeError) as e:
        pytest.fail(f'{ROW_ENV} must be a grid row as JSON: [workload, GPU blocks, host slots, '
                    f'[max_batches, prefill_interval, max_prefill_token_num], size|fifo, lru|arc|s3fifo] ({e})',
                    pytrace=False)
    monkeypatch.setenv('LMDEPLOY_HOSTCACHE_CAPTURE_KEY', KEY_HEX)
    key = CaptureKey(bytes.fromhex(KEY_HEX))
    h_sched, h_demote, h_host, launched = [], [], [], []
    driver_box = []

    def pos(session_id) -> int:
        """A harness request's place in arrival order (the model's request index)."""
        return launched.index(session_id) if session_id in launched else -1

    def step() -> int:
        """The model's step of the harness's current iteration."""
        return driver_box[0].iteration + 1

    class Driver(T.WorkloadDriver):
        """The harness's driver, with hooks on the scheduler, the connector and the forward."""

        def __init__(self, engine, *a, **k):
            super().__init__(engine, *a, **k)
            driver_box.append(self)
            side = T.scheduler_side(engine)
            add = engine.add_request

            def add_request(prompt, max_new_tokens):
                handle = add(prompt, max_new_tokens)
                launched.append(handle.session_id)
                return handle
            engine.add_request = add_request
            preempt = engine.scheduler.preempt_seqs

            def preempt_seqs(seqs):
                seqs = list(seqs)
                h_sched.extend((step(), 'preempt', pos(s.session_id)) for s in seqs
                               if s.status == T.MessageStatus.RUNNING)
                return preempt(seqs)
            engine.scheduler.preempt_seqs = preempt_seqs
            _wrap(side, 'update_state_after_alloc', lambda a, out: a[2] and h_sched.append(
                (step(), 'load', pos(a[0].session_id))))
            for agent in engine.executor.agents:
                _wrap(agent, '_prefill_rows', lambda a, out: h_sched.extend(
                    (step(), 'prefill', pos(s.session_id), int(hist))
                    for s, hist in zip(a[1], a[0]['inputs'].history_lengths.tolist())))
            _wrap(side, '_demote', lambda a, out: h_demote.append(
                (step(), block_name(side.node_digest(a[0])))))
            for op in HOST_OPS:
                _wrap(side.index, op, lambda a, out, op=op: h_host.append(
                    (step(), op, names(a[0]), out is None)))
            evicted = side.index.on_evict

            def on_host_evict(block):
                h_host.append((step(), 'evicted', block_name(block.digest), False))
                if evicted is not None:
                    evicted(block)
            side.index.on_evict = on_host_evict

    monkeypatch.setattr(T, 'WorkloadDriver', Driver)
    reclaim = RecomputeEvictionHelper._reclaim_candidate

    def reclaim_candidate(self, seq):
        ok = reclaim(self, seq)
        if ok:
            h_sched.append((step(), 'reclaim', pos(seq.session_id)))
        return ok
    monkeypatch.setattr(RecomputeEvictionHelper, '_reclaim_candidate', reclaim_candidate)

    def block_name(digest):
        return None if digest is None else key.block_id(digest)

    def names(arg):
        if isinstance(arg, (list, tuple)):
            return tuple(block_name(d) for d in arg)
        return block_name(arg) if isinstance(arg, int) else arg

    # the capture's ids are known only once the run is over: blocks are named by id first, outputs after
    run = T._run_workload(tmp_path, workload, gpu, host, tuple(settings), long_policy, host_policy)
    prepared = prepare_trace(read_mooncake(run.capture_path))
    known = {h for p in prepared for h in p.request.hash_ids}
    remap = lambda x: x if x in known or not isinstance(x, int) else 'output'   # noqa: E731
    h_demote = [(s, remap(b)) for s, b in h_demote]
    h_host = [(s, op, tuple(map(remap, b)) if isinstance(b, tuple) else remap(b), refused)
              for s, op, b, refused in h_host]

    # the model, with the same hooks
    ids = {d: h for p in prepared for d, h in zip(p.digests, p.request.hash_ids)}
    model_name = lambda d: ids.get(d, 'output')   # noqa: E731
    m_demote, m_host = [], []
    demote = SteppedTwoTierCache._demote

    def model_demote(self, block):
        m_demote.append((self._step, model_name(block.digest)))
        return demote(self, block)
    monkeypatch.setattr(SteppedTwoTierCache, '_demote', model_demote)
    cache = SteppedTwoTierCache(gpu - 1, host, host_policy, T.BS, Lifetimes(1.0, 1e15),
                                host_write_s=T.HOST_WRITE_ITERATIONS, record=True,
                                engine=EngineSteps(*settings, long_aging_s=T.NO_AGING_S, long_policy=long_policy))
    for op in HOST_OPS:
        _wrap(cache.host, op, lambda a, out, op=op: m_host.append(
            (cache._step, op, tuple(map(model_name, a[0])) if isinstance(a[0], (list, tuple)) else model_name(a[0]),
             out is None)))
    evicted = cache.host.on_evict

    def on_host_evict(block):
        m_host.append((cache._step, 'evicted', model_name(block.digest), False))
        if evicted is not None:
            evicted(block)
    cache.host.on_evict = on_host_evict
    for name, kind in (('_reclaim_parked', lambda a: a[0].cont), ('_reclaim_load', lambda a: a[0][3])):
        _wrap(cache, name, lambda a, out, kind=kind: cache.schedule.append(
            (cache._step, 'reclaim', cache._position[id(kind(a))])))
    for p in prepared:
        cache.serve_at(p)
    st = cache.finish()

    # per request: the blocks its first prefill reused (matched or restored), as run_with_capture measures them
    first = {}
    for e in h_sched:
        if e[1] == 'prefill':
            first.setdefault(e[2], e[3] // T.BS)
    h_results = [(r, first.get(r)) for r in range(len(prepared))]
    print(f'\nrow {workload} {gpu}/{host} {settings} {long_policy} {host_policy}: harness GPU / host hit rate '
          f'{run.gpu_hit_rate:.3f} / {run.host_hit_rate:.3f}, step model {st.gpu_hit_rate:.3f} / '
          f'{st.host_hit_rate:.3f}; preemptions {run.preemptions} / {st.preemptions}')
    m_sched = [e for e in cache.schedule if e[1] in ('prefill', 'load', 'chunk', 'preempt', 'reclaim')]
    # LMDeploy's forward rows do not tell a chunk from a prefill: both are "prefill" on the harness's side
    m_sched = [(e[0], 'prefill' if e[1] == 'chunk' else e[1], e[2]) for e in m_sched]
    # within a step the two sides log in different orders (a load is decided while scheduling, a prefill row
    # is seen at the forward): compared in (step, kind, request) order
    h_steps = sorted((e[0], e[1], e[2]) for e in h_sched)
    m_sched = sorted(m_sched)
    _first_difference('schedule', h_steps, m_sched)
    _first_difference('reused blocks per request (first prefill)',
                      [(0, r, n) for r, n in h_results],
                      [(0, r, None if res is None else res[0] + res[1]) for r, res in enumerate(cache.results)])
    _first_difference('GPU demotions', h_demote, m_demote)
    _first_difference('host-tier operations', h_host, m_host)
    out = os.environ.get('HOSTCACHE_PLANNER_DIFF_OUT') or str(tmp_path)
    os.makedirs(out, exist_ok=True)
    for side, streams in (('harness', (h_steps, h_demote, h_host)), ('model', (m_sched, m_demote, m_host))):
        with open(os.path.join(out, f'{side}.jsonl'), 'w') as f:
            for name, stream in zip(('schedule', 'demotions', 'host'), streams):
                for e in stream:
                    f.write(json.dumps([name, *e], default=str) + '\n')
    print(f'event streams: {out}/harness.jsonl, {out}/model.jsonl')
    assert run.requests == st.requests
