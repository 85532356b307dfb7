"""Verified restores per CPU-minute: the harness before issue 13 vs now, measured in one run.

    .venv/bin/python scripts/bench_harness_speed.py [--before 61c2560] [--seeds 0-11] [--json out.json]

The "before" harness is the one in git at ``--before`` (``tests/integration/harness`` there),
extracted into a temporary folder and imported as its own package, so both versions run in this
process on identical scenarios, interleaved (before, now, no-checks, before, ...) to share the
machine's load. ``no-checks`` is the current harness with no checker attached: the engine, the host
tier and the oracle forward alone, the floor any checking adds to. Each row drives the same engine
configuration and the same requests through all three:

- ``soak``: the soak's scenarios (``testing.soak.random_scenario`` and ``build_workload`` for each
  seed; sleep/wakeup left out, the before-harness's checkers were not built for it), every check on;
- ``matrix``: the shape of the harness's test matrix (three WEKA sample files, six turns, 24 GPU
  blocks, 24 host slots; needs ``../shared/traces``), with the rest of the seed's soak config.

A restored block is counted from the scheduler side's ``restored_tokens`` (the same counter for
both versions; the before-checkers compared every valid block after every step, the current ones
compare every block a load restored right after the load). CPU time is ``time.process_time`` of this
process with torch limited to one thread. Prints what it measured; no figure is assumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_before_harness(commit: str, folder: Path):
    """Extract ``tests/integration/harness`` at ``commit`` into ``folder`` and import it as ``harness_before``."""
    out = folder / 'harness_before'
    out.mkdir()
    listing = subprocess.run(['git', '-C', str(ROOT), 'ls-tree', '--name-only', f'{commit}:tests/integration/harness'],
                             check=True, capture_output=True, text=True).stdout.split()
    for name in listing:
        if name.endswith('.py'):
            text = subprocess.run(['git', '-C', str(ROOT), 'show', f'{commit}:tests/integration/harness/{name}'],
                                  check=True, capture_output=True, text=True).stdout
            # the one edit: where the trace folder is (it was found relative to the old file's place)
            text = text.replace("Path(__file__).resolve().parents[4] / 'shared' / 'traces'",
                                f"Path({str(ROOT.parent / 'shared' / 'traces')!r})")
            (out / name).write_text(text)
    sys.path.insert(0, str(folder))
    pkg = importlib.import_module('harness_before')
    return pkg, importlib.import_module('harness_before.host_tier')


def load_current_harness():
    return (importlib.import_module('lmdeploy_hostcache.testing.harness'),
            importlib.import_module('lmdeploy_hostcache.testing.harness.host_tier'))


def drive(H, HT, cfg, conversations, checks: bool = True) -> tuple[float, int, int]:
    """One scenario through harness ``H``; returns (cpu seconds, restored blocks, iterations).
    ``checks=False``: the same engine, host tier and oracle forward with no checker at all (the
    floor the checks add to)."""
    import torch

    from lmdeploy_hostcache.testing.harness.faults import FaultInjector

    t0 = time.process_time()
    engine = HT.build_host_tier_engine(
        H.HarnessModel(dtype=getattr(torch, cfg.dtype)),
        H.HarnessCacheSpec(num_gpu_blocks=cfg.gpu_blocks, quant_policy=cfg.quant_policy,
                           max_prefill_token_num=cfg.max_prefill_token_num),
        HT.HostTierSpec(host_slots=cfg.host_slots, host_kv_format=cfg.host_kv_format,
                        copy_delay_polls=cfg.copy_delay_polls, checksum=cfg.checksum,
                        eviction_policy=cfg.eviction_policy),
        tp=cfg.tp)
    checkers = HT.rank_checkers(engine, cfg.host_kv_format) if checks else []
    slots = HT.HostSlotChecker(engine) if checks else None

    # the current injector works on either harness's engine (it only reaches the product's copy engine)
    faults = FaultInjector(engine, load_every=cfg.fail_load_every, store_every=cfg.fail_store_every,
                           rank=cfg.fault_rank)
    H.assign_aborts(conversations, rate=cfg.abort_rate, seed=cfg.seed)
    report = H.WorkloadDriver(engine, conversations, checker=checkers + ([slots] if slots else []),
                              max_active=cfg.max_active, on_iteration=faults).run()
    if slots is not None:
        slots.verify('end of run')
    for c in checkers:
        assert c.stats.wrong_blocks == 0, c.stats.first_error
    H.check_gpu_refcounts_balanced(engine.scheduler)
    HT.check_host_tier_balanced(engine)
    restored = int(HT.scheduler_side(engine).metrics.snapshot()['restored_tokens']) // engine.cache_config.block_size
    return time.process_time() - t0, restored, report.iterations


def _seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition('-')
    try:
        seeds = list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a seed or a range A-B of seeds') from None
    if not seeds:
        raise argparse.ArgumentTypeError(f'{text!r} is an empty range')
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--before', default='61c2560', help='git commit of the before-harness (default: %(default)s)')
    parser.add_argument('--seeds', default='0-11', type=_seed_range,
                        help='soak scenario seeds, "A-B" inclusive or one seed (default: %(default)s)')
    parser.add_argument('--json', default=None, help='write the measurements to this file')
    args = parser.parse_args(argv)
    seeds = args.seeds

    import logging

    import torch
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from lmdeploy_hostcache.testing import soak

    with tempfile.TemporaryDirectory() as tmp:
        try:
            before = load_before_harness(args.before, Path(tmp))
        except subprocess.CalledProcessError as exc:
            print(f'bench_harness_speed: --before {args.before}: no tests/integration/harness at that commit in '
                  f'{ROOT} ({((exc.stderr or "").strip().splitlines() or ["git failed"])[-1]})', file=sys.stderr)
            return 2
        versions = {'before': before, 'now': load_current_harness(),
                    'no-checks': load_current_harness()}
        totals = {(shape, v): [0.0, 0, 0] for shape in ('soak', 'matrix') for v in versions}
        rows = []
        for seed in seeds:
            cfg = dataclasses.replace(soak.random_scenario(seed), sleep_at=None)
            for shape in ('soak', 'matrix'):
                for name, (H, HT) in versions.items():
                    if shape == 'soak':
                        convs = soak.build_workload(cfg.seed, systems=cfg.systems, system_blocks=cfg.system_blocks,
                                                    conversations=cfg.conversations, turns=cfg.turns,
                                                    max_new_tokens=cfg.max_new_tokens)
                        run_cfg = cfg
                    else:
                        convs = H.weka_conversations(files=['trace_0019.json', 'trace_0086.json', 'trace_0624.json'],
                                                     max_turns=6)
                        run_cfg = dataclasses.replace(cfg, gpu_blocks=24, host_slots=24, max_active=3,
                                                      max_prefill_token_num=512)
                    cpu, restored, iters = drive(H, HT, run_cfg, convs, checks=name != 'no-checks')
                    t = totals[(shape, name)]
                    t[0] += cpu
                    t[1] += restored
                    t[2] += iters
                    rows.append({'seed': seed, 'shape': shape, 'harness': name, 'cpu_s': round(cpu, 3),
                                 'restored_blocks': restored, 'iterations': iters})
                    print(f'seed {seed:3d} {shape:6s} {name:9s} cpu {cpu:7.2f} s  restored {restored:6d}  '
                          f'{restored / cpu * 60 if cpu else 0:9.0f} /CPU-min', flush=True)

    def rate(key):
        cpu, restored, _ = totals[key]
        return restored / cpu * 60 if cpu else 0.0

    print('\nverified restored blocks per CPU-minute (this run, torch 1 thread; no-checks verifies nothing):')
    for shape in ('matrix', 'soak'):
        print(f'  {shape:6s}: before {rate((shape, "before")):9.0f}   now {rate((shape, "now")):9.0f}   '
              f'x{rate((shape, "now")) / max(rate((shape, "before")), 1e-9):.1f}   '
              f'(no-checks {rate((shape, "no-checks")):9.0f})')
    overall = rate(('soak', 'now')) / max(rate(('matrix', 'before')), 1e-9)
    print(f'  before harness on the matrix shape -> current harness on the soak shape: x{overall:.1f}')
    check_cost = {}
    for shape in ('matrix', 'soak'):
        floor = totals[(shape, 'no-checks')][0]
        before, now = totals[(shape, 'before')][0] - floor, totals[(shape, 'now')][0] - floor
        check_cost[shape] = {'before_s': round(before, 2), 'now_s': round(now, 2)}
        print(f'  CPU seconds the checks add on the {shape} scenarios: before {before:.1f} s, now {now:.1f} s '
              f'(x{before / max(now, 1e-9):.1f}); engine + host tier + oracle forward alone: {floor:.1f} s')
    if args.json:
        Path(args.json).write_text(json.dumps({
            'before_commit': args.before, 'seeds': seeds, 'rows': rows,
            'rates_per_cpu_min': {f'{s}/{v}': round(rate((s, v))) for s, v in totals},
            'soak_now_over_matrix_before': round(overall, 2), 'check_cpu_s': check_cost}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
