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
many seconds.  The step model (``plan --engine-steps``) is compared the same way, with the harness
engine's admission settings.  Remaining differences and the tuning/held-out split: docs/planner.md
"Validated against the engine".
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
import types

import numpy as np
import pytest
import torch

from lmdeploy_hostcache.testing.harness import (HarnessCacheSpec, HarnessModel, WorkloadDriver, chat_conversations,
                                                mooncake_conversations, weka_conversations)
from lmdeploy_hostcache.testing.harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side

pytest.importorskip('lmdeploy_hostcache.integration.connector')

from lmdeploy.pytorch.messages import MessageStatus  # noqa: E402

from lmdeploy_hostcache.cli import main  # noqa: E402
from lmdeploy_hostcache.planner.concurrency import Lifetimes, replay_concurrent  # noqa: E402
from lmdeploy_hostcache.planner.replay import prepare_trace, replay  # noqa: E402
from lmdeploy_hostcache.planner.traces import Request, Trace, read_mooncake  # noqa: E402

BS = 16
WEKA_FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json']
TOLERANCE = 0.02


@dataclasses.dataclass
class HarnessRun:
    capture_path: str
    requests: int
    gpu_hit_rate: float
    host_hit_rate: float
    original: Trace               # the requests as the driver sent them (token prefixes -> block ids)
    preemptions: int = 0          # RUNNING sequences LMDeploy sent back to waiting (no room to decode)
    metrics: dict = dataclasses.field(default_factory=dict)   # the connector's counters
    capture: object = None        # the engine's TraceCapture (its counters)


# the harness engine's admission settings in these runs: (max_batches, prefill_interval, max_prefill_token_num)
HARNESS_ENGINE = (4, 4, 512)
NO_AGING_S = 1e9     # the long-prompt lane's aging, off in the harness and in the step model (run_with_capture)


def run_with_capture(tmp_path, conversations, *, gpu_blocks: int, host_slots: int, policy: str = 'lru',
                     max_active: int = 3, engine_settings: tuple = HARNESS_ENGINE,
                     offload: bool = True, long_policy: str = 'size', min_restore_tokens: int = BS,
                     copy_delay_polls: int = 0) -> HarnessRun:
    """One harness run with capture on; the capture's arrival clock counts engine iterations (what the
    planner comparisons need; the cost test, ``bench capture``'s ``measure_capture``, keeps the server's).
    ``engine_settings``: the engine's (max_batches, prefill_interval, max_prefill_token_num); ``offload``:
    the ``capture_offload`` setting (encode in the capture's helper process); ``long_policy``: the order of
    waiting long prompts (LMDeploy's ``LMDEPLOY_PT_TTFT_POLICY``: ``size`` or ``fifo``); ``copy_delay_polls``:
    every host copy (loads and demotions) lands that many connector polls later than the next one."""
    max_batches, prefill_interval, max_prefill = engine_settings
    path = str(tmp_path / f'capture-{len(conversations)}-{gpu_blocks}-{host_slots}.jsonl')
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=gpu_blocks, max_prefill_token_num=max_prefill,
                                                     max_batches=max_batches, prefill_interval=prefill_interval),
                                    HostTierSpec(host_slots=host_slots, min_restore_tokens=min_restore_tokens,
                                                 eviction_policy=policy, capture=path, capture_offload=offload,
                                                 copy_delay_polls=copy_delay_polls))
    sched = scheduler_side(engine)
    # LMDeploy ages a waiting long prompt by wall time (2 s per chunk); the harness's iterations last milliseconds
    # and the step model counts the trace's clock (iterations here): both run the long-prompt lane without it
    engine.scheduler._prefill_scheduler._long_prefill_aging_seconds_per_chunk = NO_AGING_S
    engine.scheduler._prefill_scheduler._long_prefill_policy = long_policy
    assert sched.capture is not None, 'the capture setting did not reach the scheduler role'
    assert sched.capture.offload == offload
    driver = WorkloadDriver(engine, conversations, max_active=max_active)
    order = itertools.count()
    # the capture clock counts engine iterations, iteration k being scheduled at time k + 1; the driver
    # launches a request before iteration k's scheduling, so it arrives at k + 0.5 (the tiny increment keeps
    # same-iteration arrivals in launch order)
    sched.capture.clock = lambda: driver.iteration + 0.5 + next(order) * 1e-6
    arrivals: dict[int, float] = {}
    add_request = engine.add_request

    def noting_add_request(prompt, max_new_tokens):
        handle = add_request(prompt, max_new_tokens)
        arrivals[handle.session_id] = float(driver.iteration)
        return handle

    engine.add_request = noting_add_request
    preempted = [0]
    preempt_seqs = engine.scheduler.preempt_seqs

    def counting_preempt(seqs):
        # LMDeploy also passes sequences that finished in the step (STOPPED) through preempt_seqs when
        # it drops them from the running list; only a RUNNING sequence sent back to waiting is a preemption
        seqs = list(seqs)
        preempted[0] += sum(s.status == MessageStatus.RUNNING for s in seqs)
        return preempt_seqs(seqs)

    engine.scheduler.preempt_seqs = counting_preempt
    # What each request reused, measured where it happens rather than from LMDeploy's cached_tokens (which
    # loses a request's hits when its load is rolled back and re-made, and for prompts prefilled in chunks):
    # the history of its first prefill row (the prompt tokens the forward did not compute), and its host loads
    # before that row (the GPU-matched tokens when the load started, the loaded tokens), which count as restored
    # if that history covers them (a load whose blocks were reclaimed before the prefill is recomputed or
    # re-matched).
    reused: dict[int, int] = {}
    loads: dict[int, list[tuple[int, int]]] = {}
    for agent in engine.executor.agents:
        def noting_prefill_rows(forward_inputs, running, _rows=agent._prefill_rows):
            hist = forward_inputs['inputs'].history_lengths.tolist()
            for row, seq in enumerate(running):
                reused.setdefault(seq.session_id, int(hist[row]))
            return _rows(forward_inputs, running)

        agent._prefill_rows = noting_prefill_rows
    after_alloc = sched.update_state_after_alloc

    def noting_alloc(request, block_ids, num_external_tokens, *args, **kwargs):
        if num_external_tokens and request.session_id not in reused:
            # (a load after its first prefill, once LMDeploy preempted it and it prefills again, is not its hit)
            loads.setdefault(request.session_id, []).append((int(request.num_history_ids), int(num_external_tokens)))
        return after_alloc(request, block_ids, num_external_tokens, *args, **kwargs)

    sched.update_state_after_alloc = noting_alloc
    report = driver.run()
    sched.capture.close()
    assert report.finished == report.requests
    prompt_blocks = sum(-(-len(h.prompt) // BS) for h in report.handles)
    cached = restored = 0
    for h in report.handles:
        end = reused[h.session_id] // BS
        # blocks of its reused prefix that one of its loads (a load may be reclaimed and made again) restored
        own = set()
        for matched, loaded in loads.get(h.session_id, ()):
            own.update(range(matched // BS, (matched + loaded) // BS))
        cached += end
        restored += sum(1 for i in own if i < end)
    # the original trace: block id = index of the token prefix ending at that block; its output blocks (the full
    # blocks past the prompt's whose KV the request computed) are named the same way, from prompt + output
    ids: dict[bytes, int] = {}
    reqs = []
    for k, h in enumerate(report.handles):
        prompt = np.asarray(h.prompt, dtype=np.int64)
        hash_ids = tuple(ids.setdefault(prompt[:min(len(prompt), (i + 1) * BS)].tobytes(), len(ids))
                         for i in range(-(-len(prompt) // BS)))
        whole = np.concatenate([prompt, np.asarray(h.output_tokens, dtype=np.int64)])
        kept = (len(whole) - 1) // BS if len(h.output_tokens) else len(prompt) // BS
        out_ids = tuple(ids.setdefault(whole[:(i + 1) * BS].tobytes(), len(ids)) for i in range(len(prompt) // BS, kept))
        reqs.append(Request(arrivals[h.session_id] + k * 1e-6, len(prompt), len(h.output_tokens), hash_ids, k,
                            output_hash_ids=out_ids))
    original = Trace('harness original', BS, sorted(reqs, key=lambda r: r.timestamp))
    return HarnessRun(path, report.requests, (cached - restored) / prompt_blocks, restored / prompt_blocks,
                      original, preempted[0],
                      dict(sched.metrics.snapshot()), sched.capture)


# A host copy made while LMDeploy schedules step t is completed by update_connector_output after step
# t+1 has scheduled: loadable from step t+2. Same-step arrivals differ by 1e-6 iteration in the capture,
# so 1.5 iterations separates "the next step" (not loadable) from "two steps later" (loadable).
HOST_WRITE_ITERATIONS = 1.5


# the harness engine's admission settings (HarnessCacheSpec: max_batches 4, prefill_interval 4; and
# run_with_capture's max_prefill_token_num 512), given to the planner's step model (--engine-steps)
def engine_steps_args(settings=HARNESS_ENGINE, long_policy='size') -> tuple:
    return ('--engine-steps', '--max-batches', str(settings[0]), '--prefill-interval', str(settings[1]),
            '--max-prefill-tokens', str(settings[2]), '--long-prefill-aging-s', str(NO_AGING_S),
            '--long-prefill-policy', long_policy)


ENGINE_STEPS = engine_steps_args()


def _plan_json(capsys, path, gpu, host, *extra, host_policy='lru', min_restore_tokens=BS, host_write_s=None):
    host_write_s = HOST_WRITE_ITERATIONS if host_write_s is None else host_write_s
    assert main(['plan', path, '--json', '--quiet', '--gpu-blocks', str(gpu), '--host-blocks', str(host),
                 '--policy', host_policy, '--decode-tokens-per-s', '1', '--prefill-tokens-per-s', '1e15',
                 '--host-write-s', str(host_write_s), '--min-restore-tokens', str(min_restore_tokens),
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _weka():
    return weka_conversations(files=WEKA_FILES, max_turns=6)


# Held out from the step model's tuning (docs/planner.md): the other three WEKA sample files, and 40
# Mooncake requests (the first 24 are the tuning workload's).
WEKA_HELD_OUT_FILES = ['trace_0228.json', 'trace_0277.json', 'trace_0291.json']


# workload -> (its conversations, the conversations the driver keeps active at once). The step model's
# tuning and held-out sets (docs/planner.md "Validated against the engine") are made of these.
WORKLOADS = {
    'weka': (_weka, 3),
    'weka-10-turns': (lambda: weka_conversations(files=WEKA_FILES, max_turns=10), 3),
    'weka-held-out': (lambda: weka_conversations(files=WEKA_HELD_OUT_FILES, max_turns=6), 3),
    'mooncake': (lambda: mooncake_conversations(max_requests=24), 3),
    'mooncake-40': (lambda: mooncake_conversations(max_requests=40), 3),
    'synthetic-40': (lambda: mooncake_conversations(max_requests=40, trace='synthetic'), 3),
    # round 4: four conversations at once
    'weka-all-8-a4': (lambda: weka_conversations(max_turns=8), 4),
    'mooncake-60-a4': (lambda: mooncake_conversations(max_requests=60), 4),
    'synthetic-60-a4': (lambda: mooncake_conversations(max_requests=60, trace='synthetic'), 4),
    # round 4: five (or two) at once, longer outputs, 16- and 40-slot host tiers
    'weka-6-out8-a5': (lambda: weka_conversations(max_turns=6, max_new_tokens=8), 5),
    'mooncake-80-out6-a5': (lambda: mooncake_conversations(max_requests=80, max_new_tokens=6), 5),
    'synthetic-80-a2': (lambda: mooncake_conversations(max_requests=80, trace='synthetic'), 2),
    # round 4's final held-out set: six at once (more than max_batches), ten output tokens, 8- to 48-slot hosts
    'weka-ho-10-out10-a6': (lambda: weka_conversations(files=WEKA_HELD_OUT_FILES, max_turns=10, max_new_tokens=10), 6),
    'mooncake-120-out3-t3-a3': (lambda: mooncake_conversations(max_requests=120, max_new_tokens=3, think_steps=3), 3),
    'synthetic-100-out5-a6': (lambda: mooncake_conversations(max_requests=100, trace='synthetic', max_new_tokens=5), 6),
    # a second final held-out set: two, five and four at once, bursty arrivals, 12- to 64-slot hosts
    'weka-all-6-a2': (lambda: weka_conversations(max_turns=6), 2),
    'mooncake-100-t0-a5': (lambda: mooncake_conversations(max_requests=100, think_steps=0), 5),
    'synthetic-60-out8-a4': (lambda: mooncake_conversations(max_requests=60, trace='synthetic', max_new_tokens=8), 4),
    # round 5's held-out set: other token fills (seed), longer prompts (up to 20 blocks), other think times
    'weka-all-8-mb20-s1-a5': (lambda: weka_conversations(max_turns=8, max_blocks=20, seed=1, think_steps=1), 5),
    'mooncake-90-mb14-out5-s1-a4': (lambda: mooncake_conversations(max_requests=90, max_blocks=14, max_new_tokens=5,
                                                                    seed=1), 4),
    'synthetic-120-t2-out7-s2-a3': (lambda: mooncake_conversations(max_requests=120, trace='synthetic', think_steps=2,
                                                                    max_new_tokens=7, seed=2), 3),
    # stress rows outside what the step model was built for: 20-30 output tokens, and prompts of up to 40
    # blocks (640 tokens), longer than max_prefill_tokens (512): LMDeploy prefills those in chunks
    'weka-6-out30-a6': (lambda: weka_conversations(max_turns=6, max_new_tokens=30), 6),
    'mooncake-60-out20-a5': (lambda: mooncake_conversations(max_requests=60, max_new_tokens=20), 5),
    'weka-6-mb40': (lambda: weka_conversations(max_turns=6, max_blocks=40), 3),
    # round 5's second held-out set: other engine settings (GRID_ENGINE_SETTINGS)
    'weka-all-6-a5': (lambda: weka_conversations(max_turns=6), 5),
    'mooncake-80-a6': (lambda: mooncake_conversations(max_requests=80), 6),
    'synthetic-80-a4': (lambda: mooncake_conversations(max_requests=80, trace='synthetic'), 4),
    # round 6 (chunked prefill): prompts of up to 30-40 blocks (480-640 tokens), run with max_prefill_token_num
    # 192 or 256 (GRID_LONG): LMDeploy prefills most of them in chunks through its long-prompt lane
    'weka-6-mb40-a5': (lambda: weka_conversations(max_turns=6, max_blocks=40), 5),
    'mooncake-60-mb40-a4': (lambda: mooncake_conversations(max_requests=60, max_blocks=40), 4),
    'synthetic-60-mb40-a4': (lambda: mooncake_conversations(max_requests=60, max_blocks=40, trace='synthetic'), 4),
    'mooncake-60-mb30-out8-a5': (lambda: mooncake_conversations(max_requests=60, max_blocks=30, max_new_tokens=8), 5),
    # round 6's held-out set (HELD_OUT_GRID_LONG): other seeds, longer prompts, other engine settings
    'weka-all-6-mb48-s1-a4': (lambda: weka_conversations(max_turns=6, max_blocks=48, seed=1), 4),
    'mooncake-80-mb36-s1-t2-out6-a5': (lambda: mooncake_conversations(max_requests=80, max_blocks=36, seed=1,
                                                                       think_steps=2, max_new_tokens=6), 5),
    'synthetic-80-mb44-s2-a3': (lambda: mooncake_conversations(max_requests=80, max_blocks=44, seed=2,
                                                                trace='synthetic'), 3),
    # round 7's held-out set (HELD_OUT_GRID_11): long prompts again, other seeds and sizes, each row under
    # both of LMDeploy's long-prompt orders
    'weka-all-6-mb44-s2-a4': (lambda: weka_conversations(max_turns=6, max_blocks=44, seed=2), 4),
    'mooncake-70-mb40-s3-t1-out5-a5': (lambda: mooncake_conversations(max_requests=70, max_blocks=40, seed=3,
                                                                       think_steps=1, max_new_tokens=5), 5),
    'synthetic-70-mb40-s3-a4': (lambda: mooncake_conversations(max_requests=70, max_blocks=40, seed=3,
                                                                trace='synthetic'), 4),
    # round 12's preemption workloads (PREEMPTION_WORKLOADS: tuning 12, held-out 24): long prompts and 16-32 output
    # tokens on squeezed GPU tiers
    'weka-6-mb40-out32-s4-a5': (lambda: weka_conversations(max_turns=6, max_blocks=40, max_new_tokens=32, seed=4), 5),
    'weka-6-mb44-out16-s6-a6': (lambda: weka_conversations(max_turns=6, max_blocks=44, max_new_tokens=16, seed=6), 6),
    'weka-all-6-mb40-out24-s7-a4': (lambda: weka_conversations(max_turns=6, max_blocks=40, max_new_tokens=24,
                                                               seed=7), 4),
    # round 12's busy workloads (held-out 26): eight conversations at once, 32-48 output tokens
    'mooncake-80-mb30-out32-s8-a8': (lambda: mooncake_conversations(max_requests=80, max_blocks=30, seed=8,
                                                                     max_new_tokens=32), 8),
    'synthetic-80-mb30-out32-s8-a8': (lambda: mooncake_conversations(max_requests=80, max_blocks=30, seed=8,
                                                                      max_new_tokens=32, trace='synthetic'), 8),
    'weka-all-6-mb30-out48-s9-a8': (lambda: weka_conversations(max_turns=6, max_blocks=30, max_new_tokens=48,
                                                               seed=9), 8),
    # chats whose later turns re-send the previous prompt, the reply the engine generated and a new message, as an
    # OpenAI chat client does: the next turn hits the reply's blocks LMDeploy's trie kept (the capture's
    # output_hash_ids). Six conversations of five turns, 48 output tokens, two shared two-block system prompts
    'chat-resend-6x5-out48-s81-a3': (lambda: chat_conversations(conversations=6, turns=5, max_new_tokens=48, seed=81), 3),
    'chat-resend-6x5-out48-s84-a3': (lambda: chat_conversations(conversations=6, turns=5, max_new_tokens=48, seed=84), 3),
}


def _conversations(workload):
    return WORKLOADS[workload][0]()


def _run_workload(tmp_path, workload, gpu, host, engine_settings=HARNESS_ENGINE, long_policy='size',
                  host_policy='lru', min_restore_tokens=BS, copy_delay_polls=0):
    convs, active = WORKLOADS[workload]
    return run_with_capture(tmp_path, convs(), gpu_blocks=gpu, host_slots=host, max_active=active,
                            engine_settings=engine_settings, long_policy=long_policy, policy=host_policy,
                            min_restore_tokens=min_restore_tokens, copy_delay_polls=copy_delay_polls)


def test_capture_is_off_by_default():
    engine = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=16), HostTierSpec())
    assert scheduler_side(engine).capture is None


@pytest.mark.parametrize('workload,gpu,host', [('weka', 24, 24), ('chat-resend-6x5-out48-s84-a3', 40, 64)])
def test_capture_read_back_by_plan_equals_the_original_trace(tmp_path, capsys, exact_lru_clock, workload, gpu, host):
    """Done-when of item 1: request count and hit rates of the capture = those of the original trace (its
    output blocks named by their token prefixes too: a chat whose turns re-send the reply hits them)."""
    run = _run_workload(tmp_path, workload, gpu, host)
    text = open(run.capture_path).read()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == run.requests == len(run.original)
    # no token ids: no record holds any of the prompts' tokens as a field or a list
    assert set(records[0]) == {'timestamp', 'input_length', 'output_length', 'hash_ids', 'output_hash_ids',
                               'block_size', 'capture'}
    assert all(r['block_size'] == BS and len(r['hash_ids']) == r['input_length'] // BS for r in records)
    assert all(len(r['output_hash_ids']) == (r['input_length'] + r['output_length'] - 1) // BS - r['input_length'] // BS
               for r in records)
    assert any(r['output_hash_ids'] for r in records) == workload.startswith('chat')
    captured = read_mooncake(run.capture_path)
    assert sorted((r.input_length, r.output_length) for r in captured.requests) == \
        sorted((r.input_length, r.output_length) for r in run.original.requests)
    o = _plan_json(capsys, run.capture_path, gpu - 1, host)
    assert o['block_size'] == BS and o['requests'] == run.requests
    pr = prepare_trace(run.original)
    seq = replay(pr, gpu - 1, host, 'lru', BS)
    conc = replay_concurrent(pr, gpu - 1, host, 'lru', BS, Lifetimes(1.0, 1e15), host_write_s=HOST_WRITE_ITERATIONS)
    for key in ('requests', 'prompt_blocks', 'gpu_hit_blocks', 'host_hit_blocks'):
        assert o[key] == getattr(seq, key), key
        assert o['with_concurrency'][key] == getattr(conc, key), key


def test_a_turn_that_resends_the_reply_hits_the_output_blocks_the_turn_before_left(tmp_path, capsys, exact_lru_clock):
    """A turn marked ``resend`` is sent as the previous prompt, the tokens the engine generated and the new
    message (an OpenAI chat client). LMDeploy's trie kept the reply's full blocks, so the next turn hits them;
    the capture names them (``output_hash_ids``, the ids the next prompt's blocks get) and every replay credits
    them as the harness measured. Without the field (an older capture) they miss."""
    convs = chat_conversations(conversations=1, turns=2, user_tokens=(8, 9), max_new_tokens=48, seed=90)
    run = run_with_capture(tmp_path, convs, gpu_blocks=32, host_slots=16, max_active=1)
    first, second = [json.loads(line) for line in open(run.capture_path)]
    # turn 1: 32 system + 8 user tokens and 48 generated: the KV of 87 tokens, 5 full blocks, 3 past the prompt's 2
    assert (first['input_length'], first['output_length'], len(first['output_hash_ids'])) == (40, 48, 3)
    assert second['input_length'] == 40 + 48 + 8
    assert second['hash_ids'][:5] == first['hash_ids'] + first['output_hash_ids']
    assert run.gpu_hit_rate == 5 / 9      # turn 2 matched 5 of its 6 blocks (the last is recomputed), of 3 + 6
    for extra in ((), ENGINE_STEPS):
        o = _plan_json(capsys, run.capture_path, 31, 16, *extra)
        assert o['with_concurrency']['gpu_hit_rate'] == 5 / 9 and o['gpu_hit_rate'] == 5 / 9
    old = tmp_path / 'without-output-ids.jsonl'
    old.write_text(''.join(json.dumps({k: v for k, v in r.items() if k != 'output_hash_ids'}) + '\n'
                           for r in (first, second)))
    for extra in ((), ENGINE_STEPS):
        o = _plan_json(capsys, str(old), 31, 16, *extra)
        assert o['with_concurrency']['gpu_hit_rate'] == 2 / 9 and o['gpu_hit_rate'] == 2 / 9


# (workload, usable GPU blocks + 1 reserved, host slots): where the planner with concurrency agrees with
# the harness within TOLERANCE. Measured by this test's own runs (printed with -s); see docs/planner.md
# "Concurrency" for the squeezed sizes where it does not yet. Mooncake 40/24 agrees since the replay
# keeps a host copy unrestorable for HOST_WRITE_ITERATIONS (before: host 0.062 vs 0.018).
VALIDATION = [('weka', 32, 24), ('weka', 48, 48), ('mooncake', 40, 24), ('mooncake', 48, 24),
              # turns that re-send the reply (0.18 low on the GPU before the capture named output blocks)
              ('chat-resend-6x5-out48-s81-a3', 96, 48)]


@pytest.mark.parametrize('workload,gpu,host', VALIDATION)
def test_planner_predicts_the_harness_hit_rates(tmp_path, capsys, exact_lru_clock, workload, gpu, host):
    run = _run_workload(tmp_path, workload, gpu, host)
    o = _plan_json(capsys, run.capture_path, gpu - 1, host)
    w = o['with_concurrency']
    print(f'\n{workload} gpu={gpu} host={host}: harness GPU {run.gpu_hit_rate:.3f} host {run.host_hit_rate:.3f}; '
          f'planner with concurrency GPU {w["gpu_hit_rate"]:.3f} host {w["host_hit_rate"]:.3f}; one request at a '
          f'time GPU {o["gpu_hit_rate"]:.3f} host {o["host_hit_rate"]:.3f}')
    assert w['requests'] == run.requests
    assert abs(w['gpu_hit_rate'] - run.gpu_hit_rate) <= TOLERANCE
    assert abs(w['host_hit_rate'] - run.host_hit_rate) <= TOLERANCE


# The step model (--engine-steps with the harness's admission settings) within TOLERANCE, on squeezed rows
# of every set: tuning rows it was fitted on (round 5's worst miss of round 4 among them) and rows of the
# held-out sets, each after its one run (regression guards, not evidence that it agrees everywhere).
# docs/planner.md "Validated against the engine" has the whole table.
VALIDATION_STEPS = [('weka', 24, 24), ('weka', 28, 24), ('weka', 32, 24), ('mooncake', 32, 24),
                    ('mooncake', 44, 24), ('weka-10-turns', 28, 24), ('weka-held-out', 28, 24),
                    ('weka-held-out', 36, 24), ('mooncake-40', 28, 24), ('synthetic-40', 32, 24),
                    ('weka-all-8-a4', 40, 24), ('mooncake-60-a4', 36, 24), ('synthetic-60-a4', 32, 24),
                    ('mooncake-80-out6-a5', 40, 16), ('weka-6-out8-a5', 32, 40), ('mooncake-120-out3-t3-a3', 48, 32),
                    ('mooncake-100-t0-a5', 36, 12), ('weka-ho-10-out10-a6', 64, 32),
                    ('weka-all-8-mb20-s1-a5', 72, 40), ('synthetic-120-t2-out7-s2-a3', 36, 16),
                    ('weka-all-6-a5', 40, 16, (8, 2, 384)), ('mooncake-80-a6', 40, 16, (3, 8, 1024)),
                    # long prompts, prefilled in chunks (round 6): two tuning rows and one held-out row
                    ('mooncake-60-mb40-a4', 80, 32, (4, 4, 256)), ('weka-6-mb40-a5', 128, 32, (4, 4, 256)),
                    ('synthetic-80-mb44-s2-a3', 104, 32, (4, 4, 288)),
                    # LMDEPLOY_PT_TTFT_POLICY=fifo (round 7): two rows whose harness hit rates fifo changes and the
                    # row whose diff found the reclaim of completed loads by an admission (tuning 7; 0.067 off
                    # without it), and a held-out 11 row
                    ('mooncake-60-mb30-out8-a5', 56, 24, (4, 4, 192), 'fifo'),
                    ('synthetic-80-mb44-s2-a3', 104, 32, (4, 4, 288), 'fifo'),
                    ('weka-6-mb40-a5', 96, 32, (4, 4, 256), 'fifo'), ('synthetic-70-mb40-s3-a4', 96, 32, (4, 4, 224), 'fifo'),
                    # round 8: two tuning-8 rows with a preemption (0.057 and 0.106 off before it), and a held-out 12 one
                    ('weka-6-mb40', 64, 24, (4, 4, 256), 'size'), ('weka-all-6-mb44-s2-a4', 56, 48, (4, 4, 256), 'size'),
                    ('weka-all-6-mb48-s1-a4', 56, 32, (4, 4, 288), 'size'),
                    # round 9, the host tier's default policy (arc): two tuning-9 rows (0.083 and 0.032 off before
                    # item 35) and a held-out 15 row (0.064 off before item 34)
                    ('synthetic-60-mb40-a4', 56, 32, (4, 4, 256), 'size', 'arc'),
                    ('mooncake-70-mb40-s3-t1-out5-a5', 88, 16, (4, 4, 192), 'size', 'arc'),
                    ('weka-all-6-mb44-s2-a4', 64, 32, (4, 4, 256), 'fifo', 'arc'),
                    # round 10: held-out 14's one miss (0.046 off before item 36: two loads of the same host blocks)
                    ('weka-all-6-mb44-s2-a4', 48, 24, (4, 4, 256), 'fifo'),
                    # turns that re-send the reply: a roomy GPU tier, and a squeezed one whose demoted reply blocks
                    # are restored from the host tier (0.21 and 0.08 off before output_hash_ids)
                    ('chat-resend-6x5-out48-s81-a3', 96, 48, HARNESS_ENGINE, 'size', 'arc'),
                    ('chat-resend-6x5-out48-s84-a3', 40, 64, HARNESS_ENGINE, 'size', 'arc')]
# (round 12's rows are in EXACT_STEPS below: asserted to the third decimal)


def _row(row) -> tuple:
    """A step-model row: (workload, GPU blocks, host slots[, engine settings[, long-prompt policy[, host
    eviction policy]]]) -> (workload, GPU blocks, host slots, engine settings, long-prompt policy, host
    eviction policy: ``lru`` unless given)."""
    workload, gpu, host, *rest = row
    return (workload, gpu, host, tuple(rest[0]) if rest else HARNESS_ENGINE,
            rest[1] if len(rest) > 1 else 'size', rest[2] if len(rest) > 2 else 'lru')


def _harness_and_step_model(tmp_path, capsys, row, copy_delay_polls: int = 0) -> tuple:
    """A grid row's harness run and ``plan --engine-steps --json`` on its capture: (run, plan's JSON).
    ``copy_delay_polls`` = k: the harness's host copies land k polls late, and the step model is told that
    every load takes k more steps (``--load-delay-steps``) and every host write k more (``--host-write-s``)."""
    workload, gpu, host, settings, long_policy, host_policy = _row(row)
    run = _run_workload(tmp_path, workload, gpu, host, settings, long_policy, host_policy,
                        copy_delay_polls=copy_delay_polls)
    delay = ('--load-delay-steps', str(copy_delay_polls)) if copy_delay_polls else ()
    o = _plan_json(capsys, run.capture_path, gpu - 1, host, *engine_steps_args(settings, long_policy), *delay,
                   host_policy=host_policy, host_write_s=HOST_WRITE_ITERATIONS + copy_delay_polls)
    return run, o


@pytest.mark.parametrize('row', VALIDATION_STEPS, ids=lambda row: '-'.join(map(str, row)))
def test_step_model_predicts_the_harness_hit_rates(tmp_path, capsys, exact_lru_clock, row):
    workload, gpu, host, settings, long_policy, host_policy = _row(row)
    run, o = _harness_and_step_model(tmp_path, capsys, row)
    w = o['with_concurrency']
    assert o['host_policy'] == host_policy
    print(f'\n{workload} gpu={gpu} host={host} engine={settings} host policy {host_policy}: harness GPU '
          f'{run.gpu_hit_rate:.3f} host {run.host_hit_rate:.3f}; step model GPU {w["gpu_hit_rate"]:.3f} host '
          f'{w["host_hit_rate"]:.3f}')
    assert w['requests'] == run.requests
    assert tuple(w['engine_steps'][k] for k in ('max_batches', 'prefill_interval', 'max_prefill_tokens')) == settings
    assert w['engine_steps']['long_policy'] == long_policy
    assert w['prefill_steps'] > 0 and w['decode_steps'] > 0
    assert abs(w['gpu_hit_rate'] - run.gpu_hit_rate) <= TOLERANCE
    assert abs(w['host_hit_rate'] - run.host_hit_rate) <= TOLERANCE


# Rows the step model reproduces to the third decimal since round 12, each brought there by one of its items (the
# grid in docs/planner.md has every row): a preempted request keeps its blocks (item 40: held-out 15's row, 0.078
# before), an idle engine's host copies land a step sooner (41: held-out 18's row, 0.016), a growth settles the
# host copies that landed (42: tuning 12's row, 0.062) and a rejected attempt's rollback refreshes its match again
# (43: a tuning-9 and a tuning-12 row, 0.0045 and 0.0042). Within 0.02 would not notice the last two.
EXACT_STEPS = [('weka-6-mb40', 56, 24, (4, 4, 288), 'fifo', 'arc'), ('weka-6-mb40-a5', 56, 32, (4, 4, 224), 'size', 'arc'),
               ('weka-6-mb44-out16-s6-a6', 80, 16, (4, 4, 288), 'fifo'),
               ('synthetic-60-mb40-a4', 96, 32, (4, 4, 192), 'fifo', 'arc'),
               ('weka-6-mb44-out16-s6-a6', 80, 32, (4, 4, 192), 'size', 'arc'),
               # stop 35: a prefill_interval at or above the block size (LMDeploy preallocates the prompt plus
               # prefill_interval tokens; every other row runs 4 or 8 with 16-token blocks): the 36 runs of
               # test_print_prefill_interval_grid all agree to the third decimal; two are kept here
               ('weka', 28, 24, (4, 64, 512)), ('weka-all-6-mb30-out48-s9-a8', 64, 32, (4, 32, 512))]


@pytest.mark.parametrize('row', EXACT_STEPS, ids=lambda row: '-'.join(map(str, row)))
def test_step_model_reproduces_these_harness_runs_exactly(tmp_path, capsys, exact_lru_clock, row):
    run, o = _harness_and_step_model(tmp_path, capsys, row)
    w = o['with_concurrency']
    assert w['requests'] == run.requests
    assert (round(w['gpu_hit_rate'], 3), round(w['host_hit_rate'], 3)) == \
        (round(run.gpu_hit_rate, 3), round(run.host_hit_rate, 3))


# Host copies that take more than a step (stop 41): the harness's copies land k connector polls late
# (``copy_delay_polls``), and the step model is told so (``--load-delay-steps`` k, ``--host-write-s`` k more).
# Not told, the model was off by up to 0.203 on VALIDATION_STEPS at k = 1 to 3 (27, 31 and 33 of its 38 rows
# beyond 0.02; on the rows below, up to 0.131). Told, 105 of those 114 runs agree to the third decimal, worst
# 0.037 (docs/planner.md "Host loads that take more than a step" has the held-out runs). Regression guards; the
# harness delays every copy by the same k, so these check delayed loads, not the model's copy time by size:
DELAYED_COPY_STEPS = [('weka', 28, 24), ('mooncake', 32, 24), ('mooncake-60-mb40-a4', 80, 32, (4, 4, 256)),
                      ('weka-6-mb40', 64, 24, (4, 4, 256), 'size'),     # a preemption row (round 8) without the delay
                      ('synthetic-60-mb40-a4', 56, 32, (4, 4, 256), 'size', 'arc'),
                      ('chat-resend-6x5-out48-s84-a3', 40, 64, HARNESS_ENGINE, 'size', 'arc')]


@pytest.mark.parametrize('k', [1, 3])
@pytest.mark.parametrize('row', DELAYED_COPY_STEPS, ids=lambda row: '-'.join(map(str, row)))
def test_step_model_follows_host_copies_that_land_polls_late(tmp_path, capsys, exact_lru_clock, row, k):
    run, o = _harness_and_step_model(tmp_path, capsys, row, copy_delay_polls=k)
    w = o['with_concurrency']
    assert w['engine_steps']['load_delay_steps'] == k and run.host_hit_rate > 0
    assert w['requests'] == run.requests
    assert (round(w['gpu_hit_rate'], 3), round(w['host_hit_rate'], 3)) == \
        (round(run.gpu_hit_rate, 3), round(run.host_hit_rate, 3))


def test_capture_costs_little_next_to_the_engine_steps(tmp_path, exact_lru_clock):
    """Capture runs inside LMDeploy's end_session, in the engine step; ``bench capture``'s measurement
    (``measure_capture``) prints its share of the steps' time and of their scheduler part (the steps less
    the harness's fake model forward), over all six WEKA sample files. The timing bound is loose (CPU
    timing on a shared machine: the figures are printed); the work counts are exact: each full prompt
    block is chain-hashed at most once per request, each distinct block keyed once, one os.write per
    batch of records."""
    from lmdeploy_hostcache.testing.capture_bench import measure_capture
    from lmdeploy_hostcache.integration.trace_capture import FLUSH_RECORDS

    cost = measure_capture(weka_conversations(max_turns=6), str(tmp_path / 'capture.jsonl'))
    cap, n = cost.capture, cost.requests
    print(f'\ncapture: {cost.capture_seconds * 1e3:.2f} ms for {n} requests ({cost.us_per_request:.0f} us per '
          f'request) = {cost.share_of_steps:.2%} of {cost.step_seconds * 1e3:.0f} ms of engine steps, '
          f'{cost.share_of_scheduler:.2%} of their {cost.scheduler_seconds * 1e3:.0f} ms outside the fake forward; '
          f'file opened at engine start in {cost.open_seconds * 1e6:.0f} us (outside the steps); {cap.flushes} '
          f'flushes, {cap.writer.writes} writes; measured on this machine')
    records = [json.loads(line) for line in open(cost.path)]
    ids = [i for r in records for i in r['hash_ids'] + r['output_hash_ids']]   # prompt and kept output blocks
    assert cap.records == len(records) == n
    # each full prompt block's (and kept output block's) digest is chain-hashed at most once per request; a
    # prompt that continues an earlier one (the next turn of a conversation) takes that one's digests instead
    done = cap.encoder_counters()     # the helper process's counters (capture_offload, the default)
    assert cap.offload and done['records'] == n and done['batches'] == cap.flushes
    assert done['blocks_hashed'] + done['blocks_reused'] == len(ids) and 0 < done['blocks_reused'] < len(ids)
    assert done['ids_keyed'] == len(set(ids)) < len(ids)    # each distinct block keyed once (shared prefixes)
    assert done['writes'] == cap.flushes <= n // FLUSH_RECORDS + 1 + cap.flushes_by_age
    assert cap.key.derived == 0      # nothing keyed on the scheduler's thread
    # loose bound against pathological regressions only: CPU timing on a shared machine (figures printed)
    assert cost.share_of_steps < 0.2


def test_bench_capture_prints_what_each_run_measured(capsys):
    """``lmdeploy-hostcache bench capture`` on the bundled trace: per-run figures and their median, every
    request served and captured; a bad count is one line and exit 2."""
    assert main(['bench', 'capture', '--runs', '2', '--requests', '24', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['workload'] == 'mooncake' and len(out['runs']) == 2
    for r in out['runs']:
        assert r['requests'] == r['records'] == 24 and r['writes'] == r['flushes'] >= 1 and r['offload']
        assert 0 < r['capture_seconds'] < r['scheduler_seconds'] < r['step_seconds'] and r['helper_cpu_seconds'] > 0
        assert r['share_of_steps'] == pytest.approx(r['capture_seconds'] / r['step_seconds'])
    assert out['median']['share_of_steps'] == pytest.approx(
        sorted(r['share_of_steps'] for r in out['runs'])[0] / 2 + sorted(r['share_of_steps'] for r in out['runs'])[1] / 2)
    assert main(['bench', 'capture', '--runs', '0']) == 2
    err = capsys.readouterr().err
    assert '--runs must be >= 1' in err and 'Traceback' not in err


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
                                    HostTierSpec(host_slots=16, min_restore_tokens=BS, capture=path))
    with caplog.at_level(logging.WARNING, logger='lmdeploy_hostcache.capture'):
        report = WorkloadDriver(engine, _weka()[:3], max_active=2).run()
    assert report.finished == report.requests > 3
    cap = scheduler_side(engine).capture
    assert cap.writer.failed and cap.writer.written == 0   # after the failure the hook does no work at all
    assert sum('trace capture stopped' in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not hasattr(__import__('os'), 'mkfifo'), reason='no os.mkfifo on this platform')
def test_a_fifo_capture_path_never_holds_up_the_engine_start(tmp_path, caplog):
    """`capture:` naming a FIFO with no reader: opening it for writing would wait for a reader for ever. The engine
    starts at once with capture off (one log line, no helper started) and serves."""
    import logging
    import os
    import threading

    path = tmp_path / 'cap.jsonl'
    os.mkfifo(path)
    built = {}
    with caplog.at_level(logging.WARNING, logger='lmdeploy_hostcache.capture'):
        t = threading.Thread(target=lambda: built.setdefault('engine', build_host_tier_engine(
            HarnessModel(), HarnessCacheSpec(num_gpu_blocks=32, max_prefill_token_num=512),
            HostTierSpec(host_slots=16, min_restore_tokens=BS, capture=str(path)))), daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), 'the engine start waits on the FIFO'
        engine = built['engine']
        report = WorkloadDriver(engine, _weka()[:3], max_active=2).run()
    assert report.finished == report.requests > 3
    cap = scheduler_side(engine).capture
    assert 'FIFO' in cap.failed and cap.helper is None and cap.writer.written == 0
    assert sum('trace capture stopped' in r.getMessage() for r in caplog.records) == 1


GRID = [('weka', 24, 24), ('weka', 28, 24), ('weka', 32, 24), ('weka', 36, 24), ('weka', 48, 48),
        ('mooncake', 24, 24), ('mooncake', 32, 24), ('mooncake', 36, 24), ('mooncake', 40, 24),
        ('mooncake', 44, 24), ('mooncake', 48, 24)]
# tuning rows added in the third round (the engine's failed admissions and load pins were found on them)
GRID_ROUND_3 = [('weka-10-turns', g, 24) for g in (24, 28, 32, 36, 40, 44)]
# held out in round 3; tuning rows from round 4 on (each was run once as held out first)
HELD_OUT_GRID = ([('weka-held-out', g, 24) for g in (24, 28, 32, 36, 40)]
                 + [('mooncake-40', g, 24) for g in (28, 32, 36, 40, 44, 48)])
HELD_OUT_GRID_2 = [('synthetic-40', g, 24) for g in (24, 28, 32, 36, 40, 44, 48)]
GRID_FOUR_ACTIVE = [(w, g, 24) for w in ('weka-all-8-a4', 'mooncake-60-a4', 'synthetic-60-a4')
                    for g in (28, 32, 36, 40, 48)]
GRID_HOST_SIZES = [(w, g, h) for w in ('weka-6-out8-a5', 'mooncake-80-out6-a5', 'synthetic-80-a2')
                   for h in (16, 40) for g in ((32, 40, 48) if h == 16 else (32, 40, 56))]
# round 4's held-out set (run once with round 4's final model); round 5 used it for diffs: a tuning set since
HELD_OUT_GRID_5 = [(w, g, h) for w in ('weka-ho-10-out10-a6', 'mooncake-120-out3-t3-a3', 'synthetic-100-out5-a6')
                   for g, h in ((40, 8), (48, 32), (64, 32), (80, 48))]
HELD_OUT_GRID_6 = [(w, g, h) for w in ('weka-all-6-a2', 'mooncake-100-t0-a5', 'synthetic-60-out8-a4')
                   for g, h in ((36, 12), (44, 24), (56, 24), (96, 64))]
# round 5's held-out set: generated after the model's fifth-round changes, run once
HELD_OUT_GRID_7 = [(w, g, h) for w in ('weka-all-8-mb20-s1-a5', 'mooncake-90-mb14-out5-s1-a4',
                                       'synthetic-120-t2-out7-s2-a3')
                   for g, h in ((36, 16), (52, 20), (72, 40), (100, 24))]
# round 5's second held-out set: the engine's max_batches, prefill_interval and max_prefill_token_num changed
# (8/2/384, 3/8/1024, 6/4/256); generated after round 5's changes and run once
GRID_ENGINE_SETTINGS = [(w, g, h, e) for e in ((8, 2, 384), (3, 8, 1024), (6, 4, 256))
                        for w in ('weka-all-6-a5', 'mooncake-80-a6', 'synthetic-80-a4') for g, h in ((40, 16), (64, 32))]
# round 6's tuning rows for chunked prefill (the per-request diffs were made on these)
GRID_LONG = ([('weka-6-mb40', g, h) for g, h in ((64, 24), (96, 48), (128, 32))]
             + [('weka-6-mb40-a5', g, h, (4, 4, 256)) for g, h in ((64, 24), (96, 32), (128, 32), (160, 48))]
             + [('mooncake-60-mb40-a4', g, h, (4, 4, 256)) for g, h in ((48, 16), (80, 32), (112, 32), (144, 48))]
             + [('synthetic-60-mb40-a4', g, h, (6, 4, 256)) for g, h in ((48, 16), (80, 32), (112, 24))]
             + [('mooncake-60-mb30-out8-a5', g, h, (4, 4, 192)) for g, h in ((56, 24), (80, 32), (112, 32))])
# round 6's held-out set: generated after the model was frozen, run once
HELD_OUT_GRID_LONG = ([('weka-all-6-mb48-s1-a4', g, h, (3, 8, 320)) for g, h in ((80, 24), (112, 32), (160, 48))]
                      + [('mooncake-80-mb36-s1-t2-out6-a5', g, h, (8, 2, 224)) for g, h in ((64, 24), (96, 32), (128, 48))]
                      + [('synthetic-80-mb44-s2-a3', g, h, (4, 4, 288)) for g, h in ((72, 24), (104, 32), (144, 48))])
# round 7 (LMDEPLOY_PT_TTFT_POLICY=fifo: long prompts in arrival order): the long-prompt rows of tuning 6 and
# held-out 9 with fifo in the harness and in the step model. Run once as held out, then diffed (the reclaim of
# completed loads by an admission came from its worst row): a tuning set since
GRID_FIFO = [(*row[:3], row[3] if len(row) > 3 else HARNESS_ENGINE, 'fifo') for row in GRID_LONG + HELD_OUT_GRID_LONG]
# round 7's held-out set: generated after the reclaim change, run once, each row under both long-prompt orders
HELD_OUT_GRID_11 = [(w, g, h, e, policy) for policy in ('size', 'fifo') for w, e, sizes in (
    ('weka-all-6-mb44-s2-a4', (4, 2, 256), ((64, 24), (96, 32), (144, 48))),
    ('mooncake-70-mb40-s3-t1-out5-a5', (6, 4, 320), ((56, 24), (88, 32), (128, 48))),
    ('synthetic-70-mb40-s3-a4', (4, 4, 224), ((64, 24), (96, 32), (136, 48)))) for g, h in sizes]
# Round 8's random samples: the long-prompt workloads at random GPU tiers (48-128 blocks, 1.0 to 3.2 times the
# longest prompt: preemption included), host tiers, max_prefill_token_num and long-prompt orders. Seed 1 is the
# tuning sample whose per-request diffs found items 26 to 31; seed 2 was drawn after them and run once, then its
# one miss was diffed (item 32); seed 3 was drawn after item 32 and run once, before item 33 (found on tuning 8
# rows that item 32 moved); seed 4 was drawn after item 33 and run once, then its one miss was diffed (item 36).
SAMPLE_WORKLOADS = ['weka-6-mb40', 'weka-6-mb40-a5', 'mooncake-60-mb40-a4', 'synthetic-60-mb40-a4',
                    'mooncake-60-mb30-out8-a5', 'weka-all-6-mb48-s1-a4', 'mooncake-80-mb36-s1-t2-out6-a5',
                    'synthetic-80-mb44-s2-a3', 'weka-all-6-mb44-s2-a4', 'mooncake-70-mb40-s3-t1-out5-a5',
                    'synthetic-70-mb40-s3-a4']


def sample_rows(seed: int, n: int = 60, gpus: range = range(48, 129, 8), workloads: list = SAMPLE_WORKLOADS) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        workload, max_prefill = rng.choice(workloads), rng.choice([192, 224, 256, 288])
        gpu, host, policy = rng.choice(gpus), rng.choice([16, 24, 32, 48]), rng.choice(['size', 'fifo'])
        rows.append((workload, gpu, host, (4, 4, max_prefill), policy))
    return rows


GRID_SAMPLE_TUNING, GRID_SAMPLE_HELD_OUT, GRID_SAMPLE_HELD_OUT_13 = sample_rows(1), sample_rows(2), sample_rows(3)
GRID_SAMPLE_HELD_OUT_14 = sample_rows(4)
# Round 9: the host tier's default policy, arc, in the harness and in the model (the rows above run lru, under which
# the order of accesses within a step and of removals does not change a decision). Seed 5 was drawn first and run
# once under arc after item 34 (56 of 60 within 0.02), then seed 1 under arc (55 of 60): its per-request diffs found
# item 35, which makes it tuning 9. Seeds 5 (run again) and 6 (drawn after item 35) are held out.
GRID_ARC_TUNING = [(*row, 'arc') for row in sample_rows(1)]
GRID_ARC_HELD_OUT_15 = [(*row, 'arc') for row in sample_rows(5)]
GRID_ARC_HELD_OUT_16 = [(*row, 'arc') for row in sample_rows(6)]
# Round 10: held-out 14's one miss was diffed (item 36, which makes seed 4 a tuning sample); seeds 7 (lru) and 8
# (arc) were drawn after items 36 and 37 and run once (held out).
GRID_SAMPLE_HELD_OUT_17 = sample_rows(7)
GRID_ARC_HELD_OUT_18 = [(*row, 'arc') for row in sample_rows(8)]
# Round 12: preempted requests keep their blocks (item 40, from held-out 11's diffed row). Drawn after it and run
# once: seeds 9 (lru) and 10 (arc), and seed 11 at the smallest GPU tiers (48 to 72 blocks, where preemptions
# happen), arc
GRID_SAMPLE_HELD_OUT_19 = sample_rows(9)
GRID_ARC_HELD_OUT_20 = [(*row, 'arc') for row in sample_rows(10)]
GRID_SQUEEZED_HELD_OUT_21 = [(*row, 'arc') for row in sample_rows(11, gpus=range(48, 73, 8))]
# Preemptions are rare in those samples (2 runs of 180). Sample 22: three workloads with long prompts and 16-32
# output tokens, chosen because LMDeploy preempts in many of their runs (the harness's preemption counts only;
# no model ran on them before the sample was drawn), seed 12, GPU tiers of 48 to 80 blocks, under lru or arc;
# drawn after item 41 and run once (59 of 60), then its one miss was diffed (item 42): a tuning set now.
# Held-out 23 (seed 13, the long-prompt workloads) and 24 (seed 14, the preemption workloads) were drawn after
# item 42 and run once
PREEMPTION_WORKLOADS = ['weka-6-mb40-out32-s4-a5', 'weka-6-mb44-out16-s6-a6', 'weka-all-6-mb40-out24-s7-a4']


def _policies(rows: list) -> list:
    return [(*row, policy) for row, policy in zip(rows, ['lru', 'arc'] * (len(rows) // 2 + 1))]


GRID_PREEMPTION_TUNING_22 = _policies(sample_rows(12, gpus=range(48, 81, 8), workloads=PREEMPTION_WORKLOADS))
GRID_SAMPLE_HELD_OUT_23 = _policies(sample_rows(13))
GRID_PREEMPTION_HELD_OUT_24 = _policies(sample_rows(14, gpus=range(48, 81, 8), workloads=PREEMPTION_WORKLOADS))


def sample_engine_rows(seed: int, n: int = 60, workloads: list = SAMPLE_WORKLOADS + PREEMPTION_WORKLOADS) -> list:
    """Rows whose engine settings vary too (the samples above all run max_batches 4 and prefill_interval 4)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        workload = rng.choice(workloads)
        engine = (rng.choice([2, 3, 4, 6, 8]), rng.choice([1, 2, 4, 8]), rng.choice([192, 256, 320, 384, 512]))
        rows.append((workload, rng.choice(range(48, 129, 8)), rng.choice([16, 24, 32, 48]), engine,
                     rng.choice(['size', 'fifo']), rng.choice(['lru', 'arc'])))
    return rows


# Held-out 25: drawn after item 43 and run once; every engine setting varies. Held-out 26: the same over three busy
# workloads (eight conversations at once, 32-48 output tokens), drawn after 25's run, run once
GRID_ENGINES_HELD_OUT_25 = sample_engine_rows(15)
BUSY_WORKLOADS = ['mooncake-80-mb30-out32-s8-a8', 'synthetic-80-mb30-out32-s8-a8', 'weka-all-6-mb30-out48-s9-a8']
GRID_BUSY_HELD_OUT_26 = sample_engine_rows(16, workloads=BUSY_WORKLOADS)
# stress rows (printed with the grid): 20-30 output tokens; prompts longer than max_prefill_tokens
GRID_STRESS = [('weka-6-out30-a6', 40, 16), ('weka-6-out30-a6', 56, 24), ('mooncake-60-out20-a5', 36, 16),
               ('mooncake-60-out20-a5', 48, 24), ('weka-6-mb40', 64, 24), ('weka-6-mb40', 96, 48)]


@pytest.mark.skipif(not __import__('os').environ.get('HOSTCACHE_PLANNER_GRID'),
                    reason='prints the planner-vs-harness table of docs/planner.md; set HOSTCACHE_PLANNER_GRID=1')
def test_print_planner_vs_harness_grid(tmp_path, exact_lru_clock):
    """The docs/planner.md "Concurrency" table, squeezed sizes included (printed, not asserted)."""
    from lmdeploy_hostcache.planner.engine_steps import EngineSteps, replay_stepped

    print('\n| set | workload | GPU blocks | host slots | harness | planner with concurrency | within 0.02 | '
          'step model | within 0.02 | one request at a time | preemptions |')
    errors = {'concurrency': [], 'steps': []}
    sets = (('tuning 1-3', GRID + GRID_ROUND_3), ('tuning 4a', HELD_OUT_GRID + HELD_OUT_GRID_2),
            ('tuning 4b', GRID_FOUR_ACTIVE), ('tuning 4c', GRID_HOST_SIZES), ('tuning 5', HELD_OUT_GRID_5),
            ('held-out 6', HELD_OUT_GRID_6), ('held-out 7', HELD_OUT_GRID_7), ('held-out 8', GRID_ENGINE_SETTINGS),
            ('stress', GRID_STRESS), ('tuning 6 (long prompts)', GRID_LONG),
            ('held-out 9 (long prompts)', HELD_OUT_GRID_LONG), ('tuning 7 (fifo)', GRID_FIFO),
            ('held-out 11 (long prompts, size and fifo)', HELD_OUT_GRID_11),
            ('tuning 8 (random sample)', GRID_SAMPLE_TUNING), ('held-out 12 (random sample)', GRID_SAMPLE_HELD_OUT),
            ('held-out 13 (random sample)', GRID_SAMPLE_HELD_OUT_13), ('held-out 14 (random sample)', GRID_SAMPLE_HELD_OUT_14),
            ('tuning 9 (arc, random sample)', GRID_ARC_TUNING),
            ('held-out 15 (arc, random sample)', GRID_ARC_HELD_OUT_15),
            ('held-out 16 (arc, random sample)', GRID_ARC_HELD_OUT_16),
            ('held-out 17 (random sample)', GRID_SAMPLE_HELD_OUT_17),
            ('held-out 18 (arc, random sample)', GRID_ARC_HELD_OUT_18),
            ('held-out 19 (random sample)', GRID_SAMPLE_HELD_OUT_19),
            ('held-out 20 (arc, random sample)', GRID_ARC_HELD_OUT_20),
            ('held-out 21 (arc, squeezed random sample)', GRID_SQUEEZED_HELD_OUT_21),
            ('tuning 12 (preemption sample)', GRID_PREEMPTION_TUNING_22),
            ('held-out 23 (lru and arc, random sample)', GRID_SAMPLE_HELD_OUT_23),
            ('held-out 24 (preemption sample)', GRID_PREEMPTION_HELD_OUT_24),
            ('held-out 25 (engine settings sample)', GRID_ENGINES_HELD_OUT_25),
            ('held-out 26 (busy sample)', GRID_BUSY_HELD_OUT_26))
    for label, grid in sets:
        for row in grid:
            workload, gpu, host, engine_settings, long_policy, host_policy = _row(row)
            run = _run_workload(tmp_path, workload, gpu, host, engine_settings, long_policy, host_policy)
            if len(row) > 3:
                workload = (f'{workload} ({"/".join(map(str, engine_settings))}{", fifo" if long_policy == "fifo" else ""}'
                            f'{", arc" if host_policy == "arc" else ""})')
            pr = prepare_trace(read_mooncake(run.capture_path))
            conc = replay_concurrent(pr, gpu - 1, host, host_policy, BS, Lifetimes(1.0, 1e15),
                                     host_write_s=HOST_WRITE_ITERATIONS)
            steps = replay_stepped(pr, gpu - 1, host, host_policy, BS, Lifetimes(1.0, 1e15),
                                   EngineSteps(*engine_settings, long_aging_s=NO_AGING_S, long_policy=long_policy),
                                   host_write_s=HOST_WRITE_ITERATIONS)
            seq = replay(pr, gpu - 1, host, host_policy, BS)
            marks = []
            for name, st in (('concurrency', conc), ('steps', steps)):
                err = max(abs(st.gpu_hit_rate - run.gpu_hit_rate), abs(st.host_hit_rate - run.host_hit_rate))
                errors[name].append((label, err))
                marks.append('yes' if err <= TOLERANCE else 'no')
            print(f'| {label} | {workload} | {gpu} | {host} | {run.gpu_hit_rate:.3f} / {run.host_hit_rate:.3f} | '
                  f'{conc.gpu_hit_rate:.3f} / {conc.host_hit_rate:.3f} | {marks[0]} | '
                  f'{steps.gpu_hit_rate:.3f} / {steps.host_hit_rate:.3f} | {marks[1]} | '
                  f'{seq.gpu_hit_rate:.3f} / {seq.host_hit_rate:.3f} | {run.preemptions} |')
    for name, errs in errors.items():
        for label, _ in sets:
            e = [x for lab, x in errs if lab == label]
            print(f'{name} on {label}: {sum(x <= TOLERANCE for x in e)} of {len(e)} rows within {TOLERANCE}; '
                  f'larger error per row: mean {sum(e) / len(e):.3f}, max {max(e):.3f}')


def test_salted_requests_get_their_own_block_ids(tmp_path):
    """Requests of two cache salts never share blocks in the engine: their captured ids differ too."""
    from lmdeploy_hostcache.capture import CaptureKey
    from lmdeploy_hostcache.tier.digest import Namespace
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model='m', block_size=BS)
    factory = types.SimpleNamespace(for_adapter=lambda name: ns)
    cap = TraceCapture(str(tmp_path / 'c.jsonl'), 1 << 20, BS, factory, key=CaptureKey(b'\x07' * 16))

    def seq(salt):
        s = types.SimpleNamespace(seq_id=1, input_start_pos=0, input_end_pos=40, num_all_ids=42, num_valid_ids=42,
                                  all_ids=np.arange(42), adapter_name=None, arrive_time=time.perf_counter(),
                                  session=types.SimpleNamespace(session_id=1),
                                  sampling_param=types.SimpleNamespace())
        if salt:
            s.cache_salt = salt
        return s

    plain, a, a2, b = (json.loads(cap.record(seq(x)))['hash_ids'] for x in ('', 'tenant-a', 'tenant-a', 'tenant-b'))
    assert len(plain) == 2 and a == a2
    assert len({tuple(plain), tuple(a), tuple(b)}) == 3


def _fake_capture(tmp_path, **kw):
    from lmdeploy_hostcache.capture import CaptureKey
    from lmdeploy_hostcache.tier.digest import Namespace
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model='m', block_size=BS)
    factory = types.SimpleNamespace(for_adapter=lambda name: ns)
    cap = TraceCapture(str(tmp_path / 'c.jsonl'), 1 << 20, BS, factory, key=CaptureKey(b'\x07' * 16), **kw)
    cap.flush_seconds = 3600.0     # batches by count only (a test that needs the age flush sets it)
    return cap, ns


def _fake_seq(seq_id, tokens, *, salt='', start=0, output=2):
    tokens = np.asarray(tokens, dtype=np.int64)
    s = types.SimpleNamespace(seq_id=seq_id, input_start_pos=start, input_end_pos=len(tokens),
                              num_all_ids=len(tokens) + output, num_valid_ids=len(tokens) + output,
                              all_ids=np.concatenate([tokens, np.ones(output, np.int64)]),
                              adapter_name=None, arrive_time=time.perf_counter(),
                              session=types.SimpleNamespace(session_id=seq_id), sampling_param=types.SimpleNamespace())
    if salt:
        s.cache_salt = salt
    return s


def test_batched_capture_writes_the_records_of_the_documented_formula(tmp_path):
    """Queued, batch-encoded records with digests taken from an earlier prompt that this one continues
    are line for line the records built one at a time from ChainHasher digests and the keyed-id formula
    (over the prompt's full blocks and the kept output blocks: here one, the 15-token prompt's)."""
    from lmdeploy_hostcache.capture import capture_record
    from lmdeploy_hostcache.capture.record import kept_tokens
    from lmdeploy_hostcache.tier.digest import ChainHasher, salted_root

    cap, ns = _fake_capture(tmp_path)
    rng = np.random.default_rng(3)
    turn1 = rng.integers(0, 50000, 5 * BS + 3)
    turn2 = np.concatenate([turn1, rng.integers(0, 50000, 4 * BS)])         # continues turn 1
    diverged = turn2.copy()
    diverged[2 * BS + 1] += 1                                                # same first block, then differs
    prompts = [(turn1, '', 0), (turn2, '', 0), (diverged, '', 0), (turn1[:2 * BS], '', 0),   # shorter
               (turn2, 'tenant-a', 0), (turn1[:BS - 1], '', 0), (turn2, '', 5 * BS)]        # salt; no block; session
    expected = []
    for i, (tokens, salt, start) in enumerate(prompts):
        seq = _fake_seq(i, tokens, salt=salt, start=start)
        cap.on_new_request(seq)
        arrival = cap._arrival[i][1]
        cap.on_request_finished(seq)
        h = ChainHasher(ns, parent=salted_root(ns, salt))
        h.extend(seq.all_ids[:kept_tokens(len(tokens), 2, BS)])
        ids = [cap.key.block_id(d) for d in h.digests]
        expected.append(capture_record(arrival_s=arrival, input_length=len(tokens), output_length=2,
                                       block_ids=ids[:len(tokens) // BS], block_size=BS,
                                       fingerprint=cap.key.fingerprint,
                                       session=cap.key.session_id(i) if start else None,
                                       output_block_ids=ids[len(tokens) // BS:]))
    cap.close()
    assert open(tmp_path / 'c.jsonl').read() == ''.join(expected)
    total = sum(len(t) // BS for t, _, _ in prompts) + 1         # + the 15-token prompt's output block
    # reused: turn 2 continues turn 1 (4 blocks after the first, which is always hashed); the last one
    # continues the shorter prompt, the latest remembered with that first block (1); the others hash all
    assert cap.blocks_reused == 4 + 1 and cap.blocks_hashed + cap.blocks_reused == total
    assert cap.flushes == cap.writer.writes == 1


def test_queued_records_reach_the_file_by_count_age_and_close(tmp_path):
    cap, _ = _fake_capture(tmp_path, idle_flush=False)     # the hooks' own flushes only
    cap.flush_records = 3
    path = tmp_path / 'c.jsonl'

    def finish(i):
        seq = _fake_seq(i, np.arange(2 * BS))
        cap.on_new_request(seq)
        cap.on_request_finished(seq)
        return path.read_text().count('\n')

    assert [finish(i) for i in range(4)] == [0, 0, 3, 3]     # every flush_records requests
    cap.flush_seconds = 0.0
    assert finish(4) == 5 and cap.flushes_by_age == 1          # the oldest queued one waited long enough
    cap.flush_seconds = 3600.0
    assert finish(5) == 5
    cap.close()                                                # close writes what is still queued
    assert path.read_text().count('\n') == 6 and cap.records == 6 and cap.writer.dropped == 0


@pytest.mark.parametrize('offload', [False, True], ids=['here', 'helper'])
def test_an_idle_server_writes_its_queued_records_without_a_request_end(tmp_path, monkeypatch, offload):
    """Records queued when the traffic stops reach the file once the oldest is ``flush_seconds`` old,
    with no request ending after them and no close: a process killed later loses none of them."""
    from lmdeploy_hostcache.integration import trace_capture

    monkeypatch.setattr(trace_capture, 'IDLE_FLUSH_SECONDS', 0.05)
    cap, _ = _fake_capture(tmp_path, offload=offload)
    assert cap.offload == offload
    cap.flush_seconds = 0.2
    path = tmp_path / 'c.jsonl'
    for i in range(5):
        seq = _fake_seq(i, np.arange(2 * BS) + i)
        cap.on_new_request(seq)
        cap.on_request_finished(seq)
    assert path.read_text() == '' and len(cap._queue) == 5       # below flush_records, younger than its age
    deadline = time.monotonic() + 30
    while path.read_text().count('\n') < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    with cap._lock:   # the flusher thread writes the file, then counts its flush, under this lock
        assert path.read_text().count('\n') == 5 and cap.flushes_idle == cap.flushes_by_age == cap.flushes == 1
        assert not cap.failed and not cap._queue and not cap._pending
    cap.close()
    assert path.read_text().count('\n') == 5 and not cap._idle_flusher.is_alive()


def test_a_closed_capture_is_freed_and_an_unclosed_one_writes_its_queue_at_exit(tmp_path, monkeypatch):
    """The idle flusher holds the capture weakly and close unregisters its exit hook: a closed capture is
    collected and its thread ends. One nobody closed lives until interpreter exit and writes what it queued
    then (nothing is lost)."""
    import gc
    import subprocess
    import sys
    import weakref

    from lmdeploy_hostcache.integration import trace_capture

    monkeypatch.setattr(trace_capture, 'IDLE_FLUSH_SECONDS', 0.02)
    cap, _ = _fake_capture(tmp_path)
    cap.close()
    thread, ref = cap._idle_flusher, weakref.ref(cap)
    del cap
    gc.collect()
    assert ref() is None
    thread.join(5)
    assert not thread.is_alive()
    script = (
        "import sys, time, types, numpy as np\n"
        "sys.path.insert(0, %r)\n"
        "from lmdeploy_hostcache.capture import CaptureKey\n"
        "from lmdeploy_hostcache.tier.digest import Namespace\n"
        "from lmdeploy_hostcache.integration.trace_capture import TraceCapture\n"
        "ns = Namespace(model='m', block_size=16)\n"
        "cap = TraceCapture(%r, 1 << 20, 16, types.SimpleNamespace(for_adapter=lambda n: ns), key=CaptureKey(b'k' * 16))\n"
        "cap.flush_seconds = 3600.0\n"
        "for i in range(5):\n"
        "    s = types.SimpleNamespace(seq_id=i, input_start_pos=0, input_end_pos=32, num_all_ids=34, num_valid_ids=34,\n"
        "        all_ids=np.arange(34, dtype=np.int64) + i, adapter_name=None, arrive_time=time.perf_counter(),\n"
        "        session=types.SimpleNamespace(session_id=i), sampling_param=types.SimpleNamespace())\n"
        "    cap.on_new_request(s); cap.on_request_finished(s)\n"
        "del cap\n") % (str(__import__('pathlib').Path(trace_capture.__file__).parents[2]), str(tmp_path / 'exit.jsonl'))
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          env=dict(__import__('os').environ, LMDEPLOY_HOSTCACHE_DISABLE='1'))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'exit.jsonl').read_text().count('\n') == 5

def test_output_length_counts_accepted_tokens_not_speculative_drafts(tmp_path):
    """Under speculative decoding a sequence aborted mid-decode still holds unverified draft ids
    after its accepted ones: LMDeploy's ``num_all_ids`` counts them, ``num_valid_ids`` does not."""
    cap, _ = _fake_capture(tmp_path)
    path = tmp_path / 'c.jsonl'
    seq = _fake_seq(1, np.arange(2 * BS), output=5)
    seq.num_all_ids += 3                         # three drafts still queued for verification
    seq.all_ids = np.concatenate([seq.all_ids, np.ones(3, np.int64)])
    cap.on_new_request(seq)
    cap.on_request_finished(seq)
    cap.close()
    assert json.loads(path.read_text())['output_length'] == 5
    assert json.loads(cap.record(seq))['output_length'] == 5


@dataclasses.dataclass(frozen=True)
class ProducerHostTierSpec(HostTierSpec):
    """The host tier as a KV producer only: it never looks up, so no request has a digest chain."""

    def kv_transfer_config(self, slots):
        return dataclasses.replace(super().kv_transfer_config(slots), kv_role='kv_producer')


def test_capture_takes_the_host_tier_chains_and_writes_the_same_lines(tmp_path, monkeypatch, exact_lru_clock):
    """The host tier's digest chains only save hashing, and the helper process only moves the work: on
    the scheduler's thread with the chains (the connector passes each request's chain to the hook) and
    without them (None passed), and in the helper process (capture_offload, which gets no chains), the
    capture holds the same lines, key and clock being equal."""
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    monkeypatch.setenv('LMDEPLOY_HOSTCACHE_CAPTURE_KEY', '00112233445566778899aabbccddeeff')
    for name in 'abc':
        (tmp_path / name).mkdir()
    offloaded = run_with_capture(tmp_path / 'c', _weka(), gpu_blocks=32, host_slots=24)
    with_chains = run_with_capture(tmp_path / 'a', _weka(), gpu_blocks=32, host_slots=24, offload=False)
    finished = TraceCapture.on_request_finished
    monkeypatch.setattr(TraceCapture, 'on_request_finished', lambda self, seq, chain=None: finished(self, seq))
    without = run_with_capture(tmp_path / 'b', _weka(), gpu_blocks=32, host_slots=24, offload=False)
    text = open(with_chains.capture_path).read()
    assert text == open(without.capture_path).read() == open(offloaded.capture_path).read()
    assert text.count('\n') == with_chains.requests > 0
    assert with_chains.capture.blocks_from_chain > 0 == without.capture.blocks_from_chain
    assert with_chains.capture.blocks_hashed < without.capture.blocks_hashed
    done = offloaded.capture.encoder_counters()
    assert done['records'] == offloaded.requests and done['blocks_from_chain'] == 0 and done['failed'] == ''
    assert done['blocks_hashed'] == without.capture.blocks_hashed   # the same work, on another core


def test_capture_of_a_host_tier_that_never_looks_up(tmp_path, monkeypatch, exact_lru_clock):
    """A KV-producer host tier passes no chains; its capture holds the same ids, request for request, as a
    consumer's capture of the same workload under the same key (arrivals may differ)."""
    monkeypatch.setenv('LMDEPLOY_HOSTCACHE_CAPTURE_KEY', '00112233445566778899aabbccddeeff')
    consumer = run_with_capture(tmp_path, _weka(), gpu_blocks=32, host_slots=24)
    path = str(tmp_path / 'producer.jsonl')
    engine = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=32, max_prefill_token_num=512),
                                    ProducerHostTierSpec(host_slots=24, min_restore_tokens=BS, capture=path))
    sched = scheduler_side(engine)
    assert not sched.is_consumer
    report = WorkloadDriver(engine, _weka(), max_active=3).run()
    sched.capture.close()
    records = [json.loads(line) for line in open(path)]
    assert len(records) == report.requests and sched.capture.blocks_from_chain == 0

    def requests(rs):
        return sorted((r['input_length'], r['output_length'], r['hash_ids']) for r in rs)

    assert requests(records) == requests(json.loads(line) for line in open(consumer.capture_path))




# min_restore_tokens above one block (the harness's connector recomputes a shorter host hit, and so does the
# model): rows where the threshold moves the harness's hit rates most, with the threshold in tokens. Two
# tuning rows and one held-out-25 row; before the threshold was modelled the step model was 0.074, 0.056 and
# 0.126 off on them. Over all 60 held-out-25 rows, each with a threshold of 2 to 6 blocks drawn at random
# (seed 2026), the model reproduces the harness to the third decimal on every row (test_print_min_restore_grid,
# docs/planner.md).
MIN_RESTORE_STEPS = [(('mooncake-60-a4', 36, 24), 4 * BS), (('weka-all-8-a4', 40, 24), 4 * BS),
                     (('weka-6-mb40-out32-s4-a5', 72, 24, (8, 4, 320), 'fifo', 'arc'), 6 * BS)]


@pytest.mark.parametrize('row,tokens', MIN_RESTORE_STEPS, ids=lambda v: '-'.join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_step_model_recomputes_short_host_hits_as_the_connector_does(tmp_path, capsys, exact_lru_clock, row, tokens):
    workload, gpu, host, settings, long_policy, host_policy = _row(row)
    run = _run_workload(tmp_path, workload, gpu, host, settings, long_policy, host_policy, min_restore_tokens=tokens)
    args = engine_steps_args(settings, long_policy)
    o = _plan_json(capsys, run.capture_path, gpu - 1, host, *args, host_policy=host_policy, min_restore_tokens=tokens)
    w = o['with_concurrency']
    assert o['min_restore_tokens'] == tokens and w['requests'] == run.requests
    assert w['short_host_hit_blocks'] > 0        # the threshold acted in this run
    assert (round(w['gpu_hit_rate'], 3), round(w['host_hit_rate'], 3)) == \
        (round(run.gpu_hit_rate, 3), round(run.host_hit_rate, 3))
    # and it matters here: with a one-block threshold the model is more than TOLERANCE off
    one = _plan_json(capsys, run.capture_path, gpu - 1, host, *args, host_policy=host_policy)['with_concurrency']
    assert max(abs(one['gpu_hit_rate'] - run.gpu_hit_rate), abs(one['host_hit_rate'] - run.host_hit_rate)) > TOLERANCE


@pytest.mark.skipif(not __import__('os').environ.get('HOSTCACHE_PLANNER_GRID'),
                    reason='prints the min_restore_tokens comparison of docs/planner.md; set HOSTCACHE_PLANNER_GRID=1')
def test_print_min_restore_grid(tmp_path, capsys, exact_lru_clock):
    """Held-out 25's rows, each with a threshold of 2 to 6 blocks drawn at random (seed 2026): the step model
    with that threshold and with a one-block one against the harness (printed, not asserted)."""
    rng = random.Random(2026)
    within = exact = one_within = 0
    worst_one = 0.0
    for row in GRID_ENGINES_HELD_OUT_25:
        workload, gpu, host, settings, long_policy, host_policy = _row(row)
        tokens = rng.choice([2, 3, 4, 6]) * BS
        run = _run_workload(tmp_path, workload, gpu, host, settings, long_policy, host_policy, min_restore_tokens=tokens)
        args = engine_steps_args(settings, long_policy)
        errs = []
        for t in (tokens, BS):
            w = _plan_json(capsys, run.capture_path, gpu - 1, host, *args, host_policy=host_policy,
                           min_restore_tokens=t)['with_concurrency']
            errs.append(max(abs(w['gpu_hit_rate'] - run.gpu_hit_rate), abs(w['host_hit_rate'] - run.host_hit_rate)))
        within += errs[0] <= TOLERANCE
        exact += errs[0] < 0.0005
        one_within += errs[1] <= TOLERANCE
        worst_one = max(worst_one, errs[1])
        with capsys.disabled():
            print(f'{row} min_restore_tokens={tokens}: harness {run.gpu_hit_rate:.3f} / {run.host_hit_rate:.3f}; '
                  f'error {errs[0]:.3f}, {errs[1]:.3f} with a one-block threshold')
    with capsys.disabled():
        print(f'{len(GRID_ENGINES_HELD_OUT_25)} rows: {within} within {TOLERANCE}, {exact} to the third decimal; '
              f'with a one-block threshold {one_within} within {TOLERANCE}, worst {worst_one:.3f}')


def _run_turn(engine, handle, limit: int = 2000) -> None:
    for _ in range(limit):
        engine.step()
        if handle.finished:
            return
    raise AssertionError('the turn did not finish')


@pytest.mark.parametrize('offload', [False, True])
def test_every_turn_of_an_engine_session_kept_open_is_captured(tmp_path, offload):
    """An interactive session is one LMDeploy sequence that each turn extends: every turn is one record
    (the turns before the last one used to be lost: the record was made only when the session ended)."""
    path = tmp_path / 'cap.jsonl'
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16), HarnessCacheSpec(num_gpu_blocks=64),
                                    HostTierSpec(host_slots=16, min_restore_tokens=BS, capture=str(path),
                                                 capture_offload=offload))
    rng = np.random.default_rng(3)
    turns = [rng.integers(10, 200, n) for n in (40, 24, 35)]
    h = engine.add_request(turns[0], 4, interactive=True)
    _run_turn(engine, h)
    outputs = [len(h.output_tokens)]
    for t in turns[1:2]:
        engine.continue_session(h, t, 3)
        _run_turn(engine, h)
        outputs.append(len(h.output_tokens))
    # the last turn ends with its session before it was ever looked up (a client that hung up)
    engine.continue_session(h, turns[2], 5)
    engine.end_session(h.session_id)
    plain = engine.add_request(rng.integers(10, 200, 20), 2)      # an api_server-style request beside it
    _run_turn(engine, plain)
    cap = scheduler_side(engine).capture
    cap.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and cap.records == 4
    mine = sorted((r for r in records if r['input_length'] != 20), key=lambda r: r['input_length'])
    prompt = [40, 40 + outputs[0] + 24, 40 + outputs[0] + 24 + outputs[1] + 35]
    assert [r['input_length'] for r in mine] == prompt
    assert [r['output_length'] for r in mine] == [*outputs, 0]
    # every turn carries the session, its first one too (plan --cluster keeps a session's turns together)
    assert mine[0]['session'] == mine[1]['session'] == mine[2]['session']
    assert 'session' not in next(r for r in records if r['input_length'] == 20)
    # each turn's blocks extend the turn before it: the same keyed ids, then new ones
    for a, b in zip(mine, mine[1:]):
        assert b['hash_ids'][:len(a['hash_ids'])] == a['hash_ids'] and len(b['hash_ids']) > len(a['hash_ids'])
    assert len(read_mooncake(str(path))) == 4


INTERVAL_WORKLOADS = [('weka', 28, 24), ('mooncake', 44, 24), ('weka-all-8-a4', 40, 24), ('mooncake-60-a4', 36, 24),
                      ('synthetic-60-a4', 32, 24), ('weka-6-mb40-a5', 96, 32), ('weka-6-mb40-out32-s4-a5', 56, 24),
                      ('weka-6-mb44-out16-s6-a6', 64, 16), ('weka-all-6-mb40-out24-s7-a4', 56, 32),
                      ('mooncake-80-mb30-out32-s8-a8', 48, 24), ('synthetic-80-mb30-out32-s8-a8', 56, 24),
                      ('weka-all-6-mb30-out48-s9-a8', 64, 32)]


@pytest.mark.skipif(not __import__('os').environ.get('HOSTCACHE_PLANNER_GRID'),
                    reason='prints the step model against the harness with large prefill intervals; set HOSTCACHE_PLANNER_GRID=1')
def test_print_prefill_interval_grid(tmp_path, capsys, exact_lru_clock):
    """prefill_interval 16, 32 and 64 with 16-token blocks (printed, not asserted)."""
    exact = 0
    for workload, gpu, host in INTERVAL_WORKLOADS:
        for interval in (16, 32, 64):
            settings = (4, interval, 512)
            run = _run_workload(tmp_path, workload, gpu, host, settings)
            w = _plan_json(capsys, run.capture_path, gpu - 1, host, *engine_steps_args(settings, 'size'))['with_concurrency']
            err = max(abs(w['gpu_hit_rate'] - run.gpu_hit_rate), abs(w['host_hit_rate'] - run.host_hit_rate))
            exact += (round(w['gpu_hit_rate'], 3), round(w['host_hit_rate'], 3)) == \
                (round(run.gpu_hit_rate, 3), round(run.host_hit_rate, 3))   # EXACT_STEPS' criterion
            with capsys.disabled():
                print(f'{workload} {gpu}/{host} prefill_interval {interval}: harness {run.gpu_hit_rate:.3f} / '
                      f'{run.host_hit_rate:.3f}, step model error {err:.3f}, preemptions {run.preemptions}')
    with capsys.disabled():
        print(f'{3 * len(INTERVAL_WORKLOADS)} runs: {exact} to the third decimal')
    assert exact == 3 * len(INTERVAL_WORKLOADS)   # what docs/planner.md states
