"""Trace capture through LMDeploy's real Scheduler, read back by `plan`; the planner vs the harness.

Issue 12: (item 1) a capture written by the engine-in-the-loop harness is read back by ``plan`` and
gives the same request count and hit rates as replaying the original trace; (item 3) the planner's
predicted GPU and host hit rates are within 0.02 of what the harness measures on the same trace.

How the comparison is made honest: the planner replays the *capture* of the harness run (same
requests, arrival order and output lengths), with the harness's usable GPU blocks
(``num_gpu_blocks`` minus LMDeploy's reserved block), its host slots, the same host policy, and
``min_restore_tokens`` = one block (both restore any host hit of a block or more); time is counted in
engine iterations (the capture clock is the driver's iteration, the decode rate one token per
iteration, prefill instant).  LMDeploy stamps block access times with ``int(time.perf_counter())``,
so a run that lasts a second has all-equal LRU times and evicts in node-address order; the test gives
its block manager a counter clock, so its LRU order is exact, as it is on a server whose requests span
many seconds.  Remaining differences (docs/planner.md "Concurrency"): the engine's batch and prefill
limits and its one-step wait for host loads are not modelled.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
import types

import numpy as np
import pytest
import torch

from lmdeploy_hostcache.testing.harness import HarnessCacheSpec, HarnessModel, WorkloadDriver, mooncake_conversations, weka_conversations
from lmdeploy_hostcache.testing.harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side

pytest.importorskip('lmdeploy_hostcache.integration.connector')

from lmdeploy_hostcache.cli import main  # noqa: E402
from lmdeploy_hostcache.planner.concurrency import Lifetimes, replay_concurrent  # noqa: E402
from lmdeploy_hostcache.planner.replay import prepare_trace, replay  # noqa: E402
from lmdeploy_hostcache.planner.traces import Request, Trace, read_mooncake  # noqa: E402

BS = 16
WEKA_FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json']
TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class CapturingSpec(HostTierSpec):
    """The harness's host-tier settings plus the ``capture`` setting (the config path a server takes)."""

    capture: str = ''

    def kv_transfer_config(self, slots):
        cfg = super().kv_transfer_config(slots)
        cfg.kv_connector_extra_config['hostcache_config']['capture'] = self.capture
        return cfg


@pytest.fixture
def exact_lru_clock(monkeypatch):
    """LMDeploy's block manager stamps access times with int(perf_counter()); give it a counter."""
    from lmdeploy.pytorch.paging.block_manager import base_block_manager

    ticks = itertools.count(1)
    monkeypatch.setattr(base_block_manager, 'time', types.SimpleNamespace(perf_counter=lambda: next(ticks)))


@dataclasses.dataclass
class HarnessRun:
    capture_path: str
    requests: int
    gpu_hit_rate: float
    host_hit_rate: float
    original: Trace               # the requests as the driver sent them (token prefixes -> block ids)
    capture_seconds: float
    step_seconds: float
    capture_first_seconds: float = 0.0
    preemptions: int = 0          # running sequences LMDeploy sent back to waiting (no room to decode)
    metrics: dict = dataclasses.field(default_factory=dict)   # the connector's counters


def run_with_capture(tmp_path, conversations, *, gpu_blocks: int, host_slots: int, policy: str = 'lru',
                     max_active: int = 3) -> HarnessRun:
    path = str(tmp_path / f'capture-{len(conversations)}-{gpu_blocks}-{host_slots}.jsonl')
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=gpu_blocks, max_prefill_token_num=512),
                                    CapturingSpec(host_slots=host_slots, min_restore_tokens=BS,
                                                  eviction_policy=policy, capture=path))
    sched = scheduler_side(engine)
    assert sched.capture is not None, 'the capture setting did not reach the scheduler role'
    driver = WorkloadDriver(engine, conversations, max_active=max_active)
    order = itertools.count()
    # arrival = engine iteration; the tiny increment keeps same-iteration arrivals in launch order
    sched.capture.clock = lambda: driver.iteration + next(order) * 1e-6
    arrivals: dict[int, float] = {}
    add_request = engine.add_request

    def noting_add_request(prompt, max_new_tokens):
        handle = add_request(prompt, max_new_tokens)
        arrivals[handle.session_id] = float(driver.iteration)
        return handle

    engine.add_request = noting_add_request
    step, step_seconds = engine.step, [0.0]

    def timed_step():
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            step_seconds[0] += time.perf_counter() - t0

    engine.step = timed_step
    preempted = [0]
    preempt_seqs = engine.scheduler.preempt_seqs

    def counting_preempt(seqs):
        seqs = list(seqs)
        preempted[0] += len(seqs)
        return preempt_seqs(seqs)

    engine.scheduler.preempt_seqs = counting_preempt
    report = driver.run()
    sched.capture.close()
    assert report.finished == report.requests
    prompt_blocks = sum(-(-len(h.prompt) // BS) for h in report.handles)
    restored = sched.metrics.snapshot()['restored_tokens'] // BS
    cached = sum(h.cached_tokens for h in report.handles) // BS    # LMDeploy's: GPU trie + external loads
    # the original trace: block id = index of the token prefix ending at that block
    ids: dict[bytes, int] = {}
    reqs = []
    for k, h in enumerate(report.handles):
        prompt = np.asarray(h.prompt, dtype=np.int64)
        hash_ids = tuple(ids.setdefault(prompt[:min(len(prompt), (i + 1) * BS)].tobytes(), len(ids))
                         for i in range(-(-len(prompt) // BS)))
        reqs.append(Request(arrivals[h.session_id] + k * 1e-6, len(prompt), len(h.output_tokens), hash_ids, k))
    original = Trace('harness original', BS, sorted(reqs, key=lambda r: r.timestamp))
    return HarnessRun(path, report.requests, (cached - restored) / prompt_blocks, restored / prompt_blocks,
                      original, sched.capture.seconds, step_seconds[0], sched.capture.first_seconds, preempted[0],
                      dict(sched.metrics.snapshot()))


def _plan_json(capsys, path, gpu, host, *extra):
    assert main(['plan', path, '--json', '--quiet', '--gpu-blocks', str(gpu), '--host-blocks', str(host),
                 '--policy', 'lru', '--decode-tokens-per-s', '1', '--prefill-tokens-per-s', '1e15', *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _weka():
    return weka_conversations(files=WEKA_FILES, max_turns=6)


def test_capture_is_off_by_default():
    engine = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=16), HostTierSpec())
    assert scheduler_side(engine).capture is None


def test_capture_read_back_by_plan_equals_the_original_trace(tmp_path, capsys, exact_lru_clock):
    """Done-when of item 1: request count and hit rates of the capture = those of the original trace."""
    gpu, host = 24, 24
    run = run_with_capture(tmp_path, _weka(), gpu_blocks=gpu, host_slots=host)
    text = open(run.capture_path).read()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == run.requests == len(run.original)
    # no token ids: no record holds any of the prompts' tokens as a field or a list
    assert set(records[0]) == {'timestamp', 'input_length', 'output_length', 'hash_ids', 'block_size', 'capture'}
    assert all(r['block_size'] == BS and len(r['hash_ids']) == r['input_length'] // BS for r in records)
    captured = read_mooncake(run.capture_path)
    assert sorted((r.input_length, r.output_length) for r in captured.requests) == \
        sorted((r.input_length, r.output_length) for r in run.original.requests)
    o = _plan_json(capsys, run.capture_path, gpu - 1, host)
    assert o['block_size'] == BS and o['requests'] == run.requests
    pr = prepare_trace(run.original)
    seq = replay(pr, gpu - 1, host, 'lru', BS)
    conc = replay_concurrent(pr, gpu - 1, host, 'lru', BS, Lifetimes(1.0, 1e15))
    for key in ('requests', 'prompt_blocks', 'gpu_hit_blocks', 'host_hit_blocks'):
        assert o[key] == getattr(seq, key), key
        assert o['with_concurrency'][key] == getattr(conc, key), key


# (workload, usable GPU blocks + 1 reserved, host slots): where the planner with concurrency agrees with
# the harness within TOLERANCE. Measured by this test's own runs (printed with -s); see docs/planner.md
# "Concurrency" for the squeezed sizes where it does not yet.
VALIDATION = [('weka', 32, 24), ('weka', 48, 48), ('mooncake', 48, 24)]


@pytest.mark.parametrize('workload,gpu,host', VALIDATION)
def test_planner_predicts_the_harness_hit_rates(tmp_path, capsys, exact_lru_clock, workload, gpu, host):
    convs = _weka() if workload == 'weka' else mooncake_conversations(max_requests=24)
    run = run_with_capture(tmp_path, convs, gpu_blocks=gpu, host_slots=host)
    o = _plan_json(capsys, run.capture_path, gpu - 1, host)
    w = o['with_concurrency']
    print(f'\n{workload} gpu={gpu} host={host}: harness GPU {run.gpu_hit_rate:.3f} host {run.host_hit_rate:.3f}; '
          f'planner with concurrency GPU {w["gpu_hit_rate"]:.3f} host {w["host_hit_rate"]:.3f}; one request at a '
          f'time GPU {o["gpu_hit_rate"]:.3f} host {o["host_hit_rate"]:.3f}')
    assert w['requests'] == run.requests
    assert abs(w['gpu_hit_rate'] - run.gpu_hit_rate) <= TOLERANCE
    assert abs(w['host_hit_rate'] - run.host_hit_rate) <= TOLERANCE


def test_capture_costs_little_next_to_the_engine_steps(tmp_path, exact_lru_clock):
    """Capture runs inside LMDeploy's end_session; print its share of the engine steps' time (all six
    WEKA sample files; the first record, which opens the file, is shown apart)."""
    convs = weka_conversations(max_turns=6)
    engine_run = run_with_capture(tmp_path, convs, gpu_blocks=32, host_slots=24)
    cap_total, steps, n = engine_run.capture_seconds, engine_run.step_seconds, engine_run.requests
    first = engine_run.capture_first_seconds
    print(f'\ncapture: {cap_total * 1e3:.2f} ms for {n} requests in {steps * 1e3:.0f} ms of engine steps '
          f'({cap_total / steps:.2%}); without the first record (opens the file, {first * 1e6:.0f} us): '
          f'{(cap_total - first) / max(n - 1, 1) * 1e6:.0f} us per request, {(cap_total - first) / steps:.2%}; '
          'measured on this machine')
    # loose bound against pathological regressions only: CPU timing on a shared machine (figures printed)
    assert cap_total / steps < 0.2


def test_serve_flag_sets_the_capture_setting(tmp_path):
    import argparse

    from lmdeploy_hostcache.integration.cli_patch import add_host_cache_arguments, apply_host_cache_args

    parser = argparse.ArgumentParser()
    add_host_cache_arguments(parser)
    target = str(tmp_path / 'node0.jsonl')
    args = parser.parse_args(['--host-cache-gb', '1', '--host-cache-capture', target])
    args.backend, args.enable_prefix_caching, args.kv_transfer_config = 'pytorch', True, None
    assert apply_host_cache_args(args)
    assert args.kv_transfer_config['kv_connector_extra_config']['hostcache_config']['capture'] == target
    alone = parser.parse_args(['--host-cache-capture', target])
    with pytest.raises(ValueError, match='--host-cache-capture records requests in the host tier'):
        apply_host_cache_args(alone)


def test_an_unwritable_capture_never_stops_serving(tmp_path, caplog):
    import logging

    path = str(tmp_path / 'missing-folder' / 'cap.jsonl')
    engine = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=32, max_prefill_token_num=512),
                                    CapturingSpec(host_slots=16, min_restore_tokens=BS, capture=path))
    with caplog.at_level(logging.WARNING, logger='lmdeploy_hostcache.capture'):
        report = WorkloadDriver(engine, _weka()[:3], max_active=2).run()
    assert report.finished == report.requests > 3
    cap = scheduler_side(engine).capture
    assert cap.writer.failed and cap.writer.written == 0   # after the failure the hook does no work at all
    assert sum('trace capture stopped' in r.getMessage() for r in caplog.records) == 1


GRID = [('weka', 24, 24), ('weka', 28, 24), ('weka', 32, 24), ('weka', 36, 24), ('weka', 48, 48),
        ('mooncake', 24, 24), ('mooncake', 32, 24), ('mooncake', 36, 24), ('mooncake', 40, 24),
        ('mooncake', 44, 24), ('mooncake', 48, 24)]


@pytest.mark.skipif(not __import__('os').environ.get('HOSTCACHE_PLANNER_GRID'),
                    reason='prints the planner-vs-harness table of docs/planner.md; set HOSTCACHE_PLANNER_GRID=1')
def test_print_planner_vs_harness_grid(tmp_path, exact_lru_clock):
    """The docs/planner.md "Concurrency" table, squeezed sizes included (printed, not asserted)."""
    print('\n| workload | GPU blocks | host slots | harness | planner with concurrency | one request at a time '
          '| within 0.02 | preemptions | demotions engine / planner | host blocks found engine / planner |')
    for workload, gpu, host in GRID:
        convs = _weka() if workload == 'weka' else mooncake_conversations(max_requests=24)
        run = run_with_capture(tmp_path, convs, gpu_blocks=gpu, host_slots=host)
        pr = prepare_trace(read_mooncake(run.capture_path))
        conc = replay_concurrent(pr, gpu - 1, host, 'lru', BS, Lifetimes(1.0, 1e15))
        seq = replay(pr, gpu - 1, host, 'lru', BS)
        ok = (abs(conc.gpu_hit_rate - run.gpu_hit_rate) <= TOLERANCE
              and abs(conc.host_hit_rate - run.host_hit_rate) <= TOLERANCE)
        print(f'| {workload} | {gpu} | {host} | {run.gpu_hit_rate:.3f} / {run.host_hit_rate:.3f} | '
              f'{conc.gpu_hit_rate:.3f} / {conc.host_hit_rate:.3f} | {seq.gpu_hit_rate:.3f} / {seq.host_hit_rate:.3f} '
              f'| {"yes" if ok else "no"} | {run.preemptions} | {run.metrics.get("demotions", 0)} / {conc.demotions} '
              f'| {run.metrics.get("hit_blocks", 0)} / {conc.host_hit_blocks} |')


def test_salted_requests_get_their_own_block_ids(tmp_path):
    """Requests of two cache salts never share blocks in the engine: their captured ids differ too."""
    from lmdeploy_hostcache.capture import CaptureKey
    from lmdeploy_hostcache.digest import Namespace
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model='m', block_size=BS)
    factory = types.SimpleNamespace(for_adapter=lambda name: ns)
    cap = TraceCapture(str(tmp_path / 'c.jsonl'), 1 << 20, BS, factory, key=CaptureKey(b'\x07' * 16))

    def seq(salt):
        s = types.SimpleNamespace(seq_id=1, input_start_pos=0, input_end_pos=40, num_all_ids=42,
                                  all_ids=np.arange(42), adapter_name=None, arrive_time=time.perf_counter(),
                                  session=types.SimpleNamespace(session_id=1),
                                  sampling_param=types.SimpleNamespace())
        if salt:
            s.cache_salt = salt
        return s

    plain, a, a2, b = (json.loads(cap.record(seq(x)))['hash_ids'] for x in ('', 'tenant-a', 'tenant-a', 'tenant-b'))
    assert len(plain) == 2 and a == a2
    assert len({tuple(plain), tuple(a), tuple(b)}) == 3
