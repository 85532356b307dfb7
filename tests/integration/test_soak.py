"""``lmdeploy-hostcache soak``: the short CI soak, the scenario generator, failure reporting, bad input.

The CI soak runs the real command for about 100 s: every scenario byte-checks every step on every
rank and leak-checks at its end; the run must pass, verify restored blocks, and cover the main
configuration axes. A corrupted KV block (test-only ``--inject-corruption``) must come back as a
failed scenario with its seed and exit code 1, reported by the real checkers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip('lmdeploy_hostcache.integration.connector')

from lmdeploy_hostcache.tier.eviction import POLICIES  # noqa: E402
from lmdeploy_hostcache.testing.soak import (BLOCK_SIZE, CHUNKED_PREFILL_TOKENS, NO_CHUNKING, ScenarioConfig, build_workload,  # noqa: E402
                                             max_prompt_blocks, random_scenario, run_scenario)

CLI = Path(sys.executable).with_name('lmdeploy-hostcache')
SOAK_SECONDS = 100


def soak_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    command = [str(CLI)] if CLI.exists() else [sys.executable, '-m', 'lmdeploy_hostcache.cli']
    return subprocess.run(command + ['soak', *args], capture_output=True, text=True, timeout=timeout)


def test_short_soak_passes_verifies_restores_and_covers_the_matrix(tmp_path):
    out = tmp_path / 'soak.json'
    proc = soak_cli('--seconds', str(SOAK_SECONDS), '--seed', '1000', '--json', str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    totals = summary['totals']
    assert summary['ok'] and totals['failed'] == 0 and not summary['failures'], summary['failures']
    assert totals['wrong_blocks'] == 0 and totals['leaks'] == 0, totals
    assert totals['restored_verified'] > 0 and totals['restored_blocks'] > 0, totals
    assert totals['checked_blocks'] > 0 and totals['host_slots_checked'] > 0, totals
    assert totals['lossy_blocks'] > 0, 'no restored block went through a lossy host format'
    assert totals['aborted_while_loading'] > 0 and totals['restore_failures'] > 0, totals
    assert totals['sleep_rejected'] >= 0 and totals['scenarios'] >= 20, totals
    assert summary['wall_s'] < SOAK_SECONDS + 30, 'the soak must stop by itself near its budget'
    assert summary['rates']['restored_verified_per_cpu_minute'] > 0
    cov = summary['coverage']
    assert set(cov['quant_policy']) == {'0', '4', '8'}
    assert set(cov['host_kv_format']) == {'same', 'int8', 'int4'}
    assert set(cov['dtype']) == {'float16', 'bfloat16'}
    assert set(cov['tp']) == {'1', '2'}
    assert set(cov['eviction_policy']) == set(POLICIES)
    for axis in ('checksum', 'chunked_prefill', 'fail_loads', 'fail_stores', 'aborts', 'sleep'):
        assert set(cov[axis]) == {'True', 'False'}, (axis, cov[axis])
    assert set(cov['copy_delay_polls']) == {'0', '1', '2', '3'}
    assert 'verified on every rank' in proc.stdout


def test_random_scenario_draws_only_supported_combinations_deterministically():
    seen = set()
    for seed in range(3000):
        cfg = random_scenario(seed)
        assert cfg == random_scenario(seed), 'not a function of the seed'
        assert ScenarioConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg   # JSON round trip
        assert cfg.quant_policy in (0, 4, 8) and cfg.dtype in ('float16', 'bfloat16')
        assert cfg.host_kv_format in (('same', 'int8', 'int4') if cfg.quant_policy == 0 else ('same',)), cfg
        assert cfg.tp in (1, 2) and 0 <= cfg.fault_rank < cfg.tp
        assert cfg.eviction_policy in POLICIES
        assert 0 <= cfg.copy_delay_polls <= 3 and cfg.fail_load_every >= 0 and cfg.fail_store_every >= 0
        assert cfg.max_prefill_token_num in (*CHUNKED_PREFILL_TOKENS, NO_CHUNKING)
        longest = max_prompt_blocks(cfg.systems, cfg.system_blocks, cfg.turns)
        assert cfg.gpu_blocks >= longest + 3, 'the longest request must fit the GPU alone'
        assert cfg.host_slots >= cfg.gpu_blocks
        seen.add((cfg.quant_policy, cfg.host_kv_format, cfg.tp, cfg.eviction_policy, cfg.checksum,
                  cfg.chunked_prefill, cfg.sleep_at is not None))
    assert len(seen) > 100, 'the generator should spread over the combinations'
    assert random_scenario(1) != random_scenario(2)


def test_workload_turns_extend_the_previous_prompt_and_fit_the_bound():
    import numpy as np

    cfg = random_scenario(7)
    convs = build_workload(cfg.seed, systems=cfg.systems, system_blocks=cfg.system_blocks,
                           conversations=cfg.conversations, turns=cfg.turns, max_new_tokens=cfg.max_new_tokens)
    again = build_workload(cfg.seed, systems=cfg.systems, system_blocks=cfg.system_blocks,
                           conversations=cfg.conversations, turns=cfg.turns, max_new_tokens=cfg.max_new_tokens)
    bound = max_prompt_blocks(cfg.systems, cfg.system_blocks, cfg.turns)
    for conv, conv2 in zip(convs, again):
        assert len(conv) == cfg.turns
        for k, (turn, turn2) in enumerate(zip(conv, conv2)):
            assert np.array_equal(turn.prompt, turn2.prompt)
            assert len(turn.prompt) <= bound * BLOCK_SIZE
            if k:
                prev = conv[k - 1].prompt
                assert len(turn.prompt) > len(prev) and np.array_equal(turn.prompt[:len(prev)], prev)
    if cfg.conversations > cfg.systems:   # conversations c and c + systems share a system prefix
        shared = cfg.system_blocks * BLOCK_SIZE
        assert np.array_equal(convs[0][0].prompt[:shared], convs[cfg.systems][0].prompt[:shared])


def test_a_corrupted_block_fails_the_scenario_with_its_seed():
    proc = soak_cli('--seconds', '60', '--seed', '3', '--inject-corruption', '5')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith('FAILED'))
    assert line.startswith('FAILED scenario seed=3: KVMismatch: '), line
    assert 'wrong bytes' in line and line.endswith('reproduce: lmdeploy-hostcache soak --scenario 3 --inject-corruption 5')
    assert 'Traceback' not in proc.stdout + proc.stderr
    # the reproduce line reproduces it; the same scenario without the fault passes
    again = soak_cli('--scenario', '3', '--inject-corruption', '5')
    assert again.returncode == 1 and 'FAILED scenario seed=3: KVMismatch' in again.stderr, again.stderr
    clean = soak_cli('--scenario', '3')
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)['ok'] is True


@pytest.mark.parametrize('args,message', [
    (['--seconds', '-5'], '--seconds must be > 0'),
    (['--seconds', 'abc'], '--seconds must be a number'),
    (['--minutes', '0'], '--minutes must be > 0'),
    (['--seconds', '5', '--minutes', '1'], 'not both'),
    (['--workers', '0'], '--workers must be >= 1'),
    (['--seed', '1.5'], '--seed must be an integer'),
    (['--scenario', '-1'], '--scenario must be >= 0'),
    (['--scenario', '2', '--seconds', '5'], '--scenario runs one scenario'),
    (['--seconds'], 'expected one argument'),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    proc = soak_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith('error: lmdeploy-hostcache soak: '), proc.stderr
    assert proc.stdout == ''


@pytest.fixture(scope='module')
def sound_scenario():
    """A scenario that passes every check unplanted (run once for the planted-leak cases)."""
    cfg = random_scenario(3)
    assert run_scenario(cfg)['ok']
    return cfg


def _leak_map_entry(engine):
    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    scheduler_side(engine)._chains[10 ** 6] = object()


def _leak_policy_candidate(engine):
    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    policy = scheduler_side(engine).index.policy
    heaps = [policy._heap] if hasattr(policy, '_heap') else [h for h in policy._heaps if h is not None]
    heaps[0].live += 1


def _leak_checksum(engine):
    from lmdeploy_hostcache.testing.harness.host_tier import worker_side
    worker = worker_side(engine, engine.tp - 1)
    worker._checksums[worker.num_slots + 3] = 0


def _leak_invalid_marker(engine):
    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    scheduler_side(engine)._invalid.add(10 ** 6)


def _leak_held_blocks(engine):
    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    scheduler_side(engine)._held_blocks += 2


def _leak_capture_arrival(engine):
    # the soak's scenarios capture nothing: a capture whose arrivals outlived their requests stands in
    import types

    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    scheduler_side(engine).capture = types.SimpleNamespace(_arrival={7: (0, 0.0, 16)}, close=lambda: None)


def _leak_store_staging(engine):
    import types

    from lmdeploy_hostcache.testing.harness.host_tier import scheduler_side
    scheduler_side(engine).l3 = types.SimpleNamespace(chain=types.SimpleNamespace(_staging={123}), close=lambda: None)


@pytest.mark.parametrize('leak,message', [(_leak_map_entry, '_chains'), (_leak_policy_candidate, 'eviction candidates'),
                                          (_leak_checksum, 'checksum cache'), (_leak_invalid_marker, '_invalid'),
                                          (_leak_held_blocks, 'held blocks'), (_leak_capture_arrival, 'arrivals'),
                                          (_leak_store_staging, 'stages')])
def test_leak_checks_report_broken_bookkeeping(monkeypatch, sound_scenario, leak, message):
    """The end-of-scenario bookkeeping checks are live: each planted leak fails the scenario in
    its 'leaks' phase (and the unplanted scenario passes: ``sound_scenario``)."""
    from lmdeploy_hostcache.testing import soak

    cfg = sound_scenario
    original = soak.check_bookkeeping

    def leaky(engine):
        leak(engine)
        return original(engine)

    monkeypatch.setattr(soak, 'check_bookkeeping', leaky)
    summary = soak.run_scenario(cfg)
    assert not summary['ok'] and summary['phase'] == 'leaks' and summary['leaks'] == 1, summary
    assert message in summary['error'], summary['error']


def test_sleep_and_wakeup_into_patterned_memory_pass_the_slot_checks():
    """Wakeup fills the new GPU cache's raw pools with a pattern, padding included (new memory is
    undefined); quant_policy 4/8 pages have padding between typed rows, which 'same' copies into
    host slots. The slot checks compare typed bytes only, so these scenarios (each with a sleep)
    pass; comparing padding too made them fail."""
    import dataclasses

    for seed, quant_policy, level in ((5, 4, 1), (6, 8, 2), (7, 4, 2)):
        cfg = dataclasses.replace(random_scenario(seed), quant_policy=quant_policy, host_kv_format='same',
                                  sleep_at=16, sleep_level=level)
        summary = run_scenario(cfg)
        assert summary['ok'], summary['error']


def test_the_leak_check_bounds_each_ghost_list_on_its_own():
    """ARC keeps two ghost lists, each bounded by ``ghost_ratio`` x (resident + 1): full lists are
    within bounds (the check once summed both against one list's bound and failed sound runs), and a
    list past its bound is still reported."""
    from lmdeploy_hostcache.testing.soak import ghost_overflow
    from lmdeploy_hostcache.tier.host_index import HostIndex

    idx = HostIndex(6, policy="arc")
    d = 1
    for _ in range(40):
        for _ in range(6):   # fresh leaves (T1), half of them used twice (T2)
            if idx.prepare_store(d, 0, d.to_bytes(8, "little")) is not None:
                idx.complete_store(d, True)
                if d % 2:
                    idx.touch([d])
            d += 1
    ghosts = idx.policy._ghost
    assert len(ghosts[1]) + len(ghosts[2]) > int(idx.policy.ghost_ratio * (idx.num_slots + 1)) + 2
    assert ghost_overflow(idx.policy, idx.num_slots) is None
    for k in range(10_000, 10_100):
        ghosts[1][k] = True
    assert "ghost list holds" in ghost_overflow(idx.policy, idx.num_slots)
