"""A session kept open whose next turn gets a host hit while its sequence is still a stale entry of
LMDeploy's ``InputsMaker.running_seqs`` (no prefill or decode forward ran since its previous turn ended):
the next decode attempt preempts that entry while its load is in flight (``WAITING_FOR_REMOTE_KVS``,
whose state has no ``evict``). Stock LMDeploy never starts such a load; with the host tier the engine
loop raised ``NotImplementedError`` until ``Scheduler.preempt_seqs`` learnt to leave such a sequence to
its load (``activate._patch_preempt_seqs``). Every GPU block and host slot is byte-checked each step."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('lmdeploy_hostcache.integration.connector')

from lmdeploy_hostcache.testing.harness import HarnessCacheSpec, HarnessModel, check_gpu_refcounts_balanced  # noqa: E402
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine,  # noqa: E402
                                                          check_host_tier_balanced, rank_checkers, scheduler_side)


def test_the_next_turn_of_an_open_session_restores_from_host_while_its_old_entry_is_stale():
    bs = 16
    eng = build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=14, max_prefill_token_num=512,
                                                                  max_batches=4),
                                 HostTierSpec(host_slots=32, min_restore_tokens=1, copy_delay_polls=0))
    checkers = rank_checkers(eng) + [HostSlotChecker(eng)]
    side = scheduler_side(eng)
    steps = [0]

    def run_until(cond, limit=200):
        for _ in range(limit):
            if cond():
                return
            eng.step()
            steps[0] += 1
            for c in checkers:
                c.check(f'iteration {steps[0]}')
        raise AssertionError('the engine made no progress')

    def ended(h):
        return h.finished and eng.scheduler.get_session(h.session_id) is None

    rng = np.random.default_rng(1)
    p1 = rng.integers(10, 30000, 3 * bs + 5)
    t2 = rng.integers(10, 30000, 2 * bs + 3)
    first = eng.add_request(p1, 1)
    run_until(lambda: ended(first))                   # turn 1's output token
    both = eng.add_request(np.concatenate([p1, first.output_tokens, t2]), 1)
    run_until(lambda: ended(both))                    # turn 2's history computed once...
    other = eng.add_request(rng.integers(10, 30000, 10 * bs + 1), 1)
    run_until(lambda: ended(other))                   # ...and demoted to the host tier by other traffic
    assert len(side.index) > 0
    session = eng.add_request(p1, 1, interactive=True)   # the session kept open: turn 1
    run_until(lambda: session.finished)
    seq = eng.sequence_of(session.session_id)
    assert seq.seq_id in [s.seq_id for s in eng.inputs_maker.running_seqs], 'the stale entry this test needs'
    restored = side.metrics.restored_tokens
    eng.continue_session(session, t2, 4)                 # the next turn: a host hit, loaded
    run_until(lambda: session.finished)
    assert side.metrics.restored_tokens > restored
    eng.end_session(session.session_id)
    run_until(lambda: eng.scheduler.get_session(session.session_id) is None)
    for c in checkers:
        assert c.stats.wrong_blocks == 0, c.stats.first_error
    check_gpu_refcounts_balanced(eng.scheduler)
    check_host_tier_balanced(eng)
