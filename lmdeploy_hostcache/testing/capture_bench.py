"""Trace capture's cost inside LMDeploy's engine steps (``lmdeploy-hostcache bench capture``).

A harness tool, like ``soak``: it lives under ``testing/`` because it drives the CPU harness; the CLI
imports it only to list and run the command.

Runs LMDeploy's real scheduler and engine loop in the CPU harness (``testing/harness``: CPU tensors
laid out by LMDeploy's cache plan, a prefix-oracle forward instead of a model) with the host tier
and trace capture on, over a scaled-down multi-turn workload: by default the first conversations
of the bundled Mooncake conversation trace (``--workload mooncake``), or the six WEKA sample
sessions of ``../shared/traces`` (``--workload weka``, what the CI test uses). It does ``--runs``
runs (default 5), each on a fresh engine.

Per run it prints what it measured: the capture's own time (``TraceCapture.seconds``: its hook when
LMDeploy registers a sequence, its hook inside ``end_session`` and its batched flushes, all of
which run inside the engine's steps), per request and as a share of the engine steps' time and of
their scheduler part (the steps less the harness's fake forward, which stands in for the model);
then the median of each over the runs. The capture's arrival clock is the server's (``time.time``).
The figures are CPU timings on this machine; on a GPU server the steps also run the model, so the
share is smaller there.

Invariants: every run serves every request of the workload (a run that does not is an error, not
a figure), and every captured record is counted (``records`` equals the requests).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUNS = 5
WORKLOADS = ("mooncake", "weka")
DEFAULT_REQUESTS = 64
# Every request ``workload("mooncake", n)`` can take: the conversations that reuse a prefix in the
# first 3000 lines of the bundled trace (``harness.mooncake_conversations``); a larger --requests is refused.
MOONCAKE_REQUESTS = 1536


class StepTimers:
    """Wall time of a harness engine's steps and of its fake model forward inside them (the
    engine's ``step`` and its executor's ``_run``, wrapped in place)."""

    def __init__(self, engine) -> None:
        self.step_seconds = 0.0
        self.forward_seconds = 0.0
        step, forward = engine.step, engine.executor._run

        def timed_step():
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                self.step_seconds += time.perf_counter() - t0

        def timed_forward(*args):
            t0 = time.perf_counter()
            try:
                return forward(*args)
            finally:
                self.forward_seconds += time.perf_counter() - t0

        engine.step = timed_step
        engine.executor._run = timed_forward

    @property
    def scheduler_seconds(self) -> float:
        """The steps' time less the fake forward's: LMDeploy's scheduling and engine loop."""
        return self.step_seconds - self.forward_seconds


@dataclass
class CaptureCost:
    """One harness run with capture on."""

    requests: int
    capture_seconds: float
    step_seconds: float
    scheduler_seconds: float
    open_seconds: float       # opening the file at engine start (outside the steps)
    capture: object           # the engine's TraceCapture (its counters)
    path: str

    @property
    def us_per_request(self) -> float:
        return self.capture_seconds / max(self.requests, 1) * 1e6

    @property
    def share_of_steps(self) -> float:
        return self.capture_seconds / self.step_seconds

    @property
    def share_of_scheduler(self) -> float:
        return self.capture_seconds / self.scheduler_seconds

    @property
    def helper_cpu_seconds(self) -> float:
        """The helper process's CPU time (offload; 0 without): the encoding moved off the steps."""
        return float(self.capture.encoder_counters().get("cpu_seconds", 0.0))

    def as_dict(self) -> dict:
        cap = self.capture
        done = cap.encoder_counters()
        return {"requests": self.requests, "capture_seconds": self.capture_seconds,
                "us_per_request": self.us_per_request, "step_seconds": self.step_seconds,
                "scheduler_seconds": self.scheduler_seconds, "share_of_steps": self.share_of_steps,
                "share_of_scheduler": self.share_of_scheduler, "open_seconds": self.open_seconds,
                "offload": cap.offload, "helper_cpu_seconds": self.helper_cpu_seconds,
                "records": done.get("records", cap.records), "flushes": cap.flushes, "writes": done.get("writes", 0),
                "blocks_hashed": done.get("blocks_hashed", 0), "blocks_reused": done.get("blocks_reused", 0),
                "ids_keyed": done.get("ids_keyed", 0)}


def measure_capture(conversations, path: str, *, gpu_blocks: int = 32, host_slots: int = 24,
                    max_active: int = 3, policy: str = "lru", offload: bool = True) -> CaptureCost:
    """One run of ``conversations`` through a fresh harness engine with capture to ``path``
    (``offload``: the ``capture_offload`` setting)."""
    import torch

    from .harness import HarnessCacheSpec, HarnessModel, WorkloadDriver
    from .harness.host_tier import HostTierSpec, build_host_tier_engine, scheduler_side

    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=gpu_blocks, max_prefill_token_num=512),
                                    HostTierSpec(host_slots=host_slots, min_restore_tokens=16,
                                                 eviction_policy=policy, capture=path, capture_offload=offload))
    sched = scheduler_side(engine)
    if sched.capture is None:
        raise RuntimeError("the capture setting did not reach the scheduler role")
    timers = StepTimers(engine)
    report = WorkloadDriver(engine, conversations, max_active=max_active).run()
    sched.capture.close()
    if report.finished != report.requests:
        raise RuntimeError(f"the harness finished {report.finished} of {report.requests} requests")
    return CaptureCost(report.requests, sched.capture.seconds, timers.step_seconds, timers.scheduler_seconds,
                       sched.capture.open_seconds, sched.capture, path)


def workload(name: str, requests: int):
    """The conversations of a workload name (``WORKLOADS``)."""
    from .harness import mooncake_conversations, weka_conversations

    if name == "weka":
        return weka_conversations(max_turns=6)
    from ..planner.cli import bundled_trace_path

    return mooncake_conversations(max_requests=requests, path=bundled_trace_path())


def add_workload_arguments(p: argparse.ArgumentParser, weka_note: str = "") -> None:
    """``--workload`` and ``--requests``, as the harness benches share them (``checked_workload``)."""
    p.add_argument("--workload", choices=WORKLOADS, default="mooncake",
                   help="mooncake: the bundled conversation trace (default); weka: the WEKA sample sessions of "
                        "../shared/traces" + weka_note)
    p.add_argument("--requests", type=int, default=None,
                   help=f"--workload mooncake: requests taken from the bundled trace (default {DEFAULT_REQUESTS}, "
                        f"at most the {MOONCAKE_REQUESTS} its conversations hold; the WEKA workload has its own 69)")


def checked_workload(args: argparse.Namespace, command: str, minimums: dict[str, int]):
    """The conversations of ``args``, after checking each of ``minimums`` (argument -> least value)
    and ``--requests`` (Mooncake only, at most ``MOONCAKE_REQUESTS``); None after one ``error:``
    line on stderr naming the argument or the missing trace (the caller exits 2)."""
    if args.requests is not None and args.workload != "mooncake":
        print(f"error: {command}: --requests applies to --workload mooncake; the {args.workload} workload is "
              "fixed (the first 6 turns of every sample session and sub-agent: 69 requests)", file=sys.stderr)
        return None
    if args.requests is None:
        args.requests = DEFAULT_REQUESTS
    for name, low in minimums.items():
        if getattr(args, name) < low:
            print(f"error: {command}: --{name} must be >= {low}, got {getattr(args, name)}", file=sys.stderr)
            return None
    if args.workload == "mooncake" and args.requests > MOONCAKE_REQUESTS:
        print(f"error: {command}: --requests must be <= {MOONCAKE_REQUESTS} (the requests of the bundled "
              f"trace's reused conversations), got {args.requests}", file=sys.stderr)
        return None
    try:
        return workload(args.workload, args.requests)
    except FileNotFoundError as exc:
        print(f"error: {command}: {exc} (the WEKA sessions live in ../shared/traces beside a checkout; "
              "use --workload mooncake)", file=sys.stderr)
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"harness runs (default {DEFAULT_RUNS})")
    add_workload_arguments(p, " (the CI test's)")
    p.add_argument("--no-offload", action="store_true",
                   help="capture_offload: false (encode on the scheduler's thread, as before the helper process)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    conversations = checked_workload(args, "bench capture", {"runs": 1, "requests": 1})
    if conversations is None:
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="hostcache-capture-bench-") as tmp:
        for i in range(args.runs):
            cost = measure_capture(conversations, str(Path(tmp) / f"run{i}.jsonl"), offload=not args.no_offload)
            runs.append(cost)
            if not args.json:
                print(f"run {i + 1}: {cost.requests} requests, capture {cost.capture_seconds * 1e3:.2f} ms "
                      f"({cost.us_per_request:.1f} us per request) = {cost.share_of_steps:.2%} of "
                      f"{cost.step_seconds * 1e3:.0f} ms of engine steps, {cost.share_of_scheduler:.2%} of their "
                      f"{cost.scheduler_seconds * 1e3:.0f} ms outside the fake forward; {cost.capture.flushes} "
                      "flushes" + (f"; the helper process: {cost.helper_cpu_seconds * 1e3:.0f} ms of CPU"
                                   if cost.capture.offload else " (on the scheduler's thread)"))
    med = {key: statistics.median(getattr(c, key) for c in runs)
           for key in ("us_per_request", "share_of_steps", "share_of_scheduler")}
    if args.json:
        print(json.dumps({"workload": args.workload, "offload": not args.no_offload, "runs": [c.as_dict() for c in runs],
                          "median": med, "note": "CPU harness timings measured on this machine"}, indent=1))
        return 0
    mode = "helper process" if not args.no_offload else "on the scheduler's thread"
    print(f"median of {len(runs)} runs ({args.workload}, encoding {mode}): {med['us_per_request']:.1f} us per request, "
          f"{med['share_of_steps']:.2%} of the engine steps, {med['share_of_scheduler']:.2%} of their scheduler "
          "part; CPU harness timings measured on this machine")
    return 0
