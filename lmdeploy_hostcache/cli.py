"""The ``lmdeploy-hostcache`` command.

A thin dispatcher: every sub-command lives in its own module, which exposes
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).  Sub-command
modules keep heavy imports (torch, triton, lmdeploy) inside ``run`` so that
``--help`` and ``--version`` stay fast.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from . import __version__

# name -> (module, one-line help)
COMMANDS = {
    "doctor": ("lmdeploy_hostcache.doctor", "print the environment facts the host tier depends on"),
    "plan": ("lmdeploy_hostcache.planner.cli", "replay request traces: what a GPU+host prefix cache buys"),
    "soak": ("lmdeploy_hostcache.testing.soak",
             "randomized host-tier scenarios on the CPU harness, every byte checked, for a wall-time budget"),
}
BENCH_COMMANDS = {
    "index": ("lmdeploy_hostcache.bench.index", "digest + host-index cost per block vs LMDeploy's BlockTrie"),
    "transfer": ("lmdeploy_hostcache.bench.transfer", "gather/scatter and copy-engine bandwidth"),
    "eviction": ("lmdeploy_hostcache.bench.eviction",
                 "eviction policies: host hit rate vs capacity on traces, next to Belady"),
    "route": ("lmdeploy_hostcache.bench.route",
              "cache-aware routing: decision time per request and proxy memory per cached block"),
    "capture": ("lmdeploy_hostcache.testing.capture_bench",
                "trace capture's time inside LMDeploy's engine steps, on the CPU harness"),
    "step": ("lmdeploy_hostcache.testing.step_bench",
             "the host tier's cost in LMDeploy's scheduler per engine step (tier off vs on), on the CPU harness"),
}


def _add(sub, name: str, module: str, help_text: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # a sub-command this build does not ship
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        return
    p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdeploy-hostcache",
        description="Host-memory prefix KV-cache tier for LMDeploy's PyTorch engine.",
    )
    parser.add_argument("--version", action="version", version=f"lmdeploy-hostcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="micro-benchmarks (print measured figures; --json for one object)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    for name, (module, help_text) in BENCH_COMMANDS.items():
        _add(bench_sub, name, module, help_text)
    bench.set_defaults(_run=lambda args: _usage_error(bench, "a benchmark"))
    return parser


def _usage_error(parser: argparse.ArgumentParser, what: str) -> int:
    """No sub-command given: a usage error, so usage and reason go to stderr (as argparse's own errors), exit 2."""
    names = [n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: give {what}: {', '.join(names)} (--help describes them)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        return _usage_error(parser, "a command")
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        # a workload or table size the options asked for (sessions, blocks, scale) needs more memory than
        # this machine gives: one line, not a traceback (a size that grows slowly may meet the OOM killer first)
        print(f"error: lmdeploy-hostcache {getattr(args, 'command', '') or ''}: out of memory: the sizes given need "
              "more memory than this machine has; give smaller ones", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as a shell tool does
        _drop_stdout()
        return 141
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        # a full disk or a failing device under the output (``--json > /dev/full``, a plot on a full disk)
        print(f"error: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}", file=sys.stderr)
        _drop_stdout()
        return 1


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit cannot fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
