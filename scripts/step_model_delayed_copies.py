"""The step model against the harness when host copies land late (docs/planner.md "Host loads that take more
than a step"): a developer tool, not in the package or CI.

For each grid row and each k, the engine-in-the-loop harness (LMDeploy's real Scheduler) runs with every
host copy landing k connector polls late (``copy_delay_polls``), and ``plan --engine-steps`` replays its
capture told so (``--load-delay-steps k``, ``--host-write-s`` k more), or, with ``--untold``, not told.
Prints one line per run: the harness's and the model's GPU/host hit rates and their differences, then a
summary (runs, worst difference, runs beyond 0.02, runs equal to the third decimal).

    TRITON_INTERPRET=1 .venv/bin/python scripts/step_model_delayed_copies.py --rows tuning --k 1,2,3
    TRITON_INTERPRET=1 .venv/bin/python scripts/step_model_delayed_copies.py --rows held-out --k 1,2,3 [--untold]

Rows: ``tuning`` is ``VALIDATION_STEPS`` of tests/integration/test_trace_capture.py (38 rows, on which the
rule was found); ``held-out`` is ``sample_rows(13, n=20)`` plus ``sample_rows(14, n=10)`` over the preemption
workloads (the first rows of rounds 23 and 24's samples, all under ``lru``; not used to find the rule, run once
after it was fixed).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmdeploy.pytorch.paging.block_manager import base_block_manager  # noqa: E402

from tests.integration import test_trace_capture as T  # noqa: E402


def rows_of(name: str) -> list:
    if name == "tuning":
        return list(T.VALIDATION_STEPS)
    return T.sample_rows(13, n=20) + T.sample_rows(14, n=10, gpus=range(48, 81, 8), workloads=T.PREEMPTION_WORKLOADS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", choices=("tuning", "held-out"), default="tuning")
    ap.add_argument("--k", default="1,2,3", help="copy delays in polls, comma-separated")
    ap.add_argument("--untold", action="store_true", help="the step model is not told of the delay")
    args = ap.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    if args.untold:
        plan_json = T._plan_json

        def untold(capsys, path, gpu, host, *extra, host_write_s=None, **kw):
            extra = list(extra)
            if "--load-delay-steps" in extra:
                i = extra.index("--load-delay-steps")
                del extra[i:i + 2]
            return plan_json(capsys, path, gpu, host, *extra, **kw)
        T._plan_json = untold
    worst, beyond, exact, runs = 0.0, 0, 0, 0
    with tempfile.TemporaryDirectory() as scratch:
        for row, k in itertools.product(rows_of(args.rows), ks):
            ticks = itertools.count(1)      # the tests' exact_lru_clock fixture
            base_block_manager.time = types.SimpleNamespace(perf_counter=lambda: next(ticks))
            out = io.StringIO()

            class Capsys:
                def readouterr(self):
                    text = out.getvalue()
                    out.seek(0)
                    out.truncate(0)
                    return types.SimpleNamespace(out=text)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(out):
                run, o = T._harness_and_step_model(Path(tempfile.mkdtemp(dir=scratch)), Capsys(), row,
                                                   copy_delay_polls=k)
            w = o["with_concurrency"]
            dg, dh = w["gpu_hit_rate"] - run.gpu_hit_rate, w["host_hit_rate"] - run.host_hit_rate
            m = max(abs(dg), abs(dh))
            runs, worst = runs + 1, max(worst, m)
            beyond += m > 0.02
            exact += (round(w["gpu_hit_rate"], 3), round(w["host_hit_rate"], 3)) == \
                (round(run.gpu_hit_rate, 3), round(run.host_hit_rate, 3))
            print(f"k={k} {row}: harness GPU/host {run.gpu_hit_rate:.3f}/{run.host_hit_rate:.3f}, model "
                  f"{w['gpu_hit_rate']:.3f}/{w['host_hit_rate']:.3f} ({dg:+.3f} {dh:+.3f}) "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{args.rows} rows, k {args.k}, model {'not told' if args.untold else 'told'}: {runs} runs, worst "
          f"{worst:.3f}, {beyond} beyond 0.02, {exact} equal to the third decimal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
