"""The host tier's cost in LMDeploy's scheduler, per engine step (``lmdeploy-hostcache bench step``).

A harness tool, like ``capture_bench``: it drives the CPU harness (LMDeploy's real ``Scheduler``,
inputs maker and engine-loop order on CPU tensors laid out by LMDeploy's cache plan, a prefix-oracle
forward instead of a model), so it lives under ``testing/``; the CLI imports it only to run it.

Why: on a fast GPU with short prompts the first token costs about one engine step of CPU work (the
H200 runs of 2026-12-04, docs/performance.md), so what the tier adds to each step on the
scheduler's thread is a cost every request pays, hit or not. This measures it with the real
scheduler, tier off against tier on, on the same workload:

* ``fits``: a GPU cache that holds the whole workload (the tier has nothing to do but look up and
  account: its idle cost);
* ``small``: a squeezed GPU cache (the tier demotes, looks up and restores).

Per configuration and run: a fresh engine serves the whole workload; the engine's ``step`` and its
executor's ``_run`` (the worker side: the fake forward and, with the tier on, the worker role's
copies, which on a GPU run on a side stream) are timed in place; what is left (``step`` less
``_run``) is the scheduler's side of the step: LMDeploy's scheduling and engine loop plus, with the
tier on, the connector's scheduler role and the activation's hooks. Reported per forward step, for
each configuration, median over ``--runs`` runs taken in rotating order after ``--warmup`` untimed
rounds (this machine is noisy);
the on/off ratio is the median of the per-run ratios. CPU timings of this machine, not GPU ones.

Invariants: every run serves every request (one that does not is an error, not a figure); with the
cache that fits, tier on and tier off run the same number of forward steps (nothing is evicted, so
the tier changes no schedule) and the tier restores nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

from .capture_bench import StepTimers, add_workload_arguments, checked_workload

DEFAULT_RUNS = 5
CONFIGS = ("off_fits", "on_fits", "off_small", "on_small")
FITS_BLOCKS = 2048      # more than the default workloads touch: nothing is evicted
SMALL_BLOCKS = 32
HOST_SLOTS = 256


@dataclass
class StepCost:
    """One harness run of one configuration."""

    config: str
    requests: int
    forwards: int
    step_seconds: float
    scheduler_seconds: float
    restored_tokens: int
    demotions: int

    @property
    def us_per_step(self) -> float:
        return self.scheduler_seconds / max(self.forwards, 1) * 1e6

    def as_dict(self) -> dict:
        return {"config": self.config, "requests": self.requests, "forwards": self.forwards,
                "step_seconds": self.step_seconds, "scheduler_seconds": self.scheduler_seconds,
                "us_per_step": self.us_per_step, "restored_tokens": self.restored_tokens, "demotions": self.demotions}


def measure(config: str, conversations, *, max_active: int = 3) -> StepCost:
    """One fresh harness engine of ``config`` (``CONFIGS``) serving ``conversations``."""
    import torch

    from .harness import CpuEngine, HarnessCacheSpec, HarnessModel, WorkloadDriver
    from .harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side

    tier, cache = config.split("_")
    spec = HarnessCacheSpec(num_gpu_blocks=FITS_BLOCKS if cache == "fits" else SMALL_BLOCKS, max_prefill_token_num=512)
    model = HarnessModel(dtype=torch.float16)
    if tier == "on":
        engine = build_host_tier_engine(model, spec, HostTierSpec(host_slots=HOST_SLOTS, min_restore_tokens=16))
    else:
        engine = CpuEngine(model, spec)
    timers = StepTimers(engine)
    report = WorkloadDriver(engine, conversations, max_active=max_active).run()
    if report.finished != report.requests:
        raise RuntimeError(f"{config}: the harness finished {report.finished} of {report.requests} requests")
    restored = demotions = 0
    if tier == "on":
        st = scheduler_side(engine).stats()
        restored, demotions = int(st.get("restored_tokens", 0)), int(st.get("demotions", 0))
    return StepCost(config, report.requests, len(engine.executor.records), timers.step_seconds,
                    timers.scheduler_seconds, restored, demotions)


def summarize(runs: list[list[StepCost]]) -> dict:
    """Medians per configuration and the on/off ratios (median of the per-run ratios) of ``runs``
    (one list of ``CONFIGS`` costs per run); raises when an invariant of the module fails."""
    by = {c: [next(x for x in run if x.config == c) for run in runs] for c in CONFIGS}
    for k, (off, on) in enumerate(zip(by["off_fits"], by["on_fits"])):
        if off.forwards != on.forwards or on.restored_tokens or on.demotions:
            raise RuntimeError(f"run {k + 1}: with a cache that fits, the tier changed the schedule ({off.forwards} "
                               f"vs {on.forwards} forward steps, {on.demotions} demotions, {on.restored_tokens} "
                               "restored tokens)")
    out = {c: {"us_per_step": statistics.median(x.us_per_step for x in xs),
               "forwards": statistics.median(x.forwards for x in xs),
               "scheduler_ms": statistics.median(x.scheduler_seconds for x in xs) * 1e3,
               "restored_tokens": statistics.median(x.restored_tokens for x in xs)} for c, xs in by.items()}
    for cache in ("fits", "small"):
        pairs = list(zip(by[f"off_{cache}"], by[f"on_{cache}"]))
        out[f"on_over_off_{cache}"] = statistics.median(on.us_per_step / off.us_per_step for off, on in pairs)
        out[f"added_us_per_step_{cache}"] = statistics.median(on.us_per_step - off.us_per_step for off, on in pairs)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"runs of each configuration (default {DEFAULT_RUNS})")
    add_workload_arguments(p)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of every configuration first (imports, first-use costs; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    conversations = checked_workload(args, "bench step", {"runs": 1, "requests": 1, "warmup": 0})
    if conversations is None:
        return 2
    for _ in range(args.warmup):
        for c in CONFIGS:
            measure(c, conversations)
    runs = []
    for i in range(args.runs):
        order = CONFIGS[i % len(CONFIGS):] + CONFIGS[:i % len(CONFIGS)]   # rotating: drift hits each alike
        costs = [measure(c, conversations) for c in order]
        runs.append(costs)
        if not args.json:
            print(f"run {i + 1}: " + ", ".join(f"{c.config} {c.us_per_step:.0f} us/step ({c.forwards} steps"
                                                + (f", {c.restored_tokens} restored" if c.config.startswith("on") else "")
                                                + ")" for c in sorted(costs, key=lambda c: CONFIGS.index(c.config))))
    try:
        med = summarize(runs)
    except RuntimeError as exc:
        print(f"bench step: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"workload": args.workload, "runs": [[c.as_dict() for c in r] for r in runs], "median": med,
                          "note": "CPU harness timings measured on this machine (scheduler side of each step)"},
                         indent=1))
        return 0
    print(f"median of {len(runs)} runs ({args.workload}), scheduler side of a forward step on this CPU:")
    for c in CONFIGS:
        m = med[c]
        print(f"  {c:<10} {m['us_per_step']:8.0f} us/step  {m['forwards']:.0f} steps  restored {m['restored_tokens']:.0f}")
    print(f"tier on / off: fits {med['on_over_off_fits']:.3f} ({med['added_us_per_step_fits']:+.0f} us/step), "
          f"small {med['on_over_off_small']:.3f} ({med['added_us_per_step_small']:+.0f} us/step)")
    return 0
