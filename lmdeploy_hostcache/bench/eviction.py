"""Eviction policies on real traces: host-tier hit rate vs capacity, next to the Belady bound.

Replays traces through ``HostIndex`` (one tier, see ``eviction_eval``) for every policy and
capacity asked for, and prints the measured hit rates, each policy's share of the
LRU -> Belady gap, its worst difference from LRU and the replay time.  Nothing here needs a GPU
or LMDeploy.

``--trace PATH`` (repeatable, one trace each) replays any trace the planner reads
(``planner.traces.read_traces``: Mooncake layout with ``--block-size``, captured files, WEKA
session files or a folder of them, merged ``--stagger`` seconds apart).  Every replay here stores
prompt blocks only: a trace's ``output_hash_ids`` (the reply blocks captures and the chat generator
name) are not replayed, and a note says so when a ``--trace`` names any (``plan`` replays them).  Without ``--trace`` it
replays two sets, kept apart on purpose (docs/eviction.md):

* **tuning** -- the WEKA coding-agent sessions (``../shared/traces/weka_sample``, merged) and the
  planner's built-in chat generator (default ``ChatWorkload``): policy choices may be made here;
* **held-out** -- the two Mooncake traces (``../shared/traces/mooncake``): reported only, never
  used to choose anything.  (The Azure traces carry no block ids, so no cache can be replayed
  on them.)

``--set generated`` replays a third set, only when asked: ``--per-family N`` workloads of each of
the planner's generator families (chat, shared documents, agent sessions), every parameter drawn
at random from ``--generated-seed`` (``planner.generator.random_workload``).  It is a search for
traffic on which a policy falls below LRU (the 0.01 guard of issue 12), over shapes no policy was
tuned on; a new seed is a new draw.  After the per-trace summary, one line per policy and set
counts the capacities more than 0.01 below LRU and pools the gap share over the whole set.

Capacities default to fractions of each trace's footprint (its distinct full blocks), so traces
of different sizes and block sizes are compared at the same relative cache size; ``--capacities``
gives absolute block counts instead (in the trace's own block size).

``--lookahead`` adds, for every servable policy asked for, a row ``<policy>+lookahead``: the same
policy replayed with the waiting requests' host prefixes held (``eviction_eval`` module
docstring: requests that arrived no later than the one being served).  Its gap share is still
measured from plain LRU to plain Belady, so the lookahead's own gain is the difference between
the two rows of one policy.

``--admit-share S`` adds, likewise, a row ``<policy>+admit``: the same policy when one request may
store at most ``S`` x capacity of its missed blocks (``eviction_eval`` module docstring).  Not
storing is a bypass, which the Belady bound never does, so such a row can pass Belady.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..outfile import save_figure
from ..planner.cli import (DEFAULT_STAGGER_S, _nonneg_float, _nonneg_int, bounded_int_arg, plot_path_arg, positive_int_arg,
                           refuse_output_over_input)
from ..planner.traces import TRACE_FORMATS

DEFAULT_FRACTIONS = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5)
_SHARED_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
_SHARED_MOONCAKE = _SHARED_TRACES / "mooncake"
_SHARED_WEKA = _SHARED_TRACES / "weka_sample"
SETS = ("tuning", "heldout", "generated")
DEFAULT_SETS = ("tuning", "heldout")
GUARD = 0.01  # issue 12: the default must never be more than this below LRU
# A capacity whose LRU -> Belady gap is below this (hit-rate units) is left out of the *mean*
# share: a 0.0005 gap turns a 0.2-point loss into a share of -400.  The pooled share keeps it.
MIN_GAP = 0.005
LOOKAHEAD_SUFFIX = "+lookahead"
ADMIT_SUFFIX = "+admit"


def default_traces() -> list[Path]:
    """The Mooncake traces under ``../shared/traces/mooncake`` when this is a source checkout,
    else the conversation trace bundled with the package (``lmdeploy_hostcache/data``)."""
    found = [p for p in (_SHARED_MOONCAKE / "conversation_trace.jsonl",
                         _SHARED_MOONCAKE / "synthetic_trace.jsonl") if p.exists()]
    if found:
        return found
    from ..planner.cli import bundled_trace_path  # noqa: PLC0415 (light: no torch, no lmdeploy)

    return [bundled_trace_path()]


def _positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity must be an integer number of blocks, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"capacity must be > 0 blocks, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fraction must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"fraction must be in (0, 1], got {v}")
    return v


def generated_sources(seed: int, per_family: int) -> "list[tuple[str, object]]":
    """(label, workload) for ``--set generated``: ``per_family`` draws of each family, in family
    order, every parameter drawn from ``random.Random(seed)``."""
    import random  # noqa: PLC0415

    from ..planner.generator import WORKLOAD_FAMILIES, random_workload  # noqa: PLC0415
    rng = random.Random(seed)
    return [(f"{fam} {i + 1} (seed {seed})", random_workload(fam, rng))
            for fam in WORKLOAD_FAMILIES for i in range(per_family)]


DEFAULT_PER_FAMILY = 4
MAX_PER_FAMILY = 10_000     # --set generated: every workload is kept (and replayed) before the first result
MAX_STAGGER_S = 1e9         # about 30 years: k x stagger stays finite for any number of merged files


def _per_family(text: str) -> int:
    return bounded_int_arg(text, 1, MAX_PER_FAMILY)


def _stagger(text: str) -> float:
    v = _nonneg_float(text)   # refuses nan, inf and negatives
    if v > MAX_STAGGER_S:
        raise argparse.ArgumentTypeError(f"expected seconds in [0, {MAX_STAGGER_S:g}], got {text!r}")
    return v


def _admit_share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--admit-share must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--admit-share must be in (0, 1], got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", action="append", metavar="PATH",
                   help="a trace to replay instead of the sets, in any layout `plan` reads: Mooncake JSONL(.gz), "
                        "captured files, WEKA session JSON, or a folder of one of them (merged into one trace); "
                        "repeatable, one trace each")
    p.add_argument("--format", choices=TRACE_FORMATS, default="auto",
                   help="--trace: the trace format (default: sniffed from each file)")
    p.add_argument("--block-size", type=positive_int_arg, default=None, metavar="N",
                   help="--trace: tokens per block of a Mooncake-layout trace's hash_ids (default: the file's own "
                        "'block_size' field, which captured files state, else 512)")
    p.add_argument("--stagger", type=_stagger, default=None, metavar="S",
                   help=f"--trace: seconds between the starts of merged WEKA session files (default "
                        f"{DEFAULT_STAGGER_S:g}, as plan); refused when no --trace merges several")
    p.add_argument("--set", dest="sets", action="append", choices=SETS,
                   help="without --trace: which set to replay, 'tuning' (WEKA sessions + chat generator), "
                        "'heldout' (Mooncake traces) or 'generated' (random workloads of the generator families); "
                        "repeatable, default tuning and heldout")
    p.add_argument("--per-family", type=_per_family, default=None, metavar="N",
                   help=f"--set generated: workloads drawn per family, at most {MAX_PER_FAMILY} "
                        f"(default {DEFAULT_PER_FAMILY})")
    p.add_argument("--generated-seed", type=_nonneg_int, default=None, metavar="S",
                   help="--set generated: the seed every workload parameter is drawn from (default 0)")
    p.add_argument("--capacities", nargs="+", type=_positive_int, metavar="BLOCKS", default=None,
                   help="host capacities in blocks of the trace's own size (512 tokens for Mooncake)")
    p.add_argument("--fractions", nargs="+", type=_fraction, metavar="F", default=None,
                   help="host capacities as fractions of each trace's footprint (distinct full blocks); "
                        f"the default when --capacities is not given: {' '.join(map(str, DEFAULT_FRACTIONS))}")
    p.add_argument("--policies", nargs="+", metavar="NAME", default=None,
                   help="policies to replay (default: every servable policy, plus belady, the offline bound)")
    p.add_argument("--lookahead", action="store_true",
                   help="also replay every servable policy with queue lookahead (rows '<policy>+lookahead': "
                        "the host prefixes of requests that have arrived but wait are held until served)")
    p.add_argument("--admit-share", type=_admit_share, default=None, metavar="S",
                   help="also replay every servable policy with an admission cap (rows '<policy>+admit'): one "
                        "request stores at most S x capacity of its missed blocks")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N requests")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="PNG", type=plot_path_arg, help="write capacity-vs-hit-rate curves to this PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")


def _check_policies(names: list[str]) -> list[str]:
    """``names`` without repeats; ValueError naming ``--policies`` for a name no policy has."""
    from ..tier.eviction import OFFLINE_ONLY, POLICIES  # noqa: PLC0415
    allowed = set(POLICIES) | set(OFFLINE_ONLY)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"--policies: unknown {', '.join(bad)}; choose from {', '.join(sorted(allowed))}")
    return list(dict.fromkeys(names))


def _unused_option(args: argparse.Namespace) -> "str | None":
    """The message refusing an option that would not act with the others given, or None."""
    if args.trace:
        if args.sets:
            return "--set applies without --trace; --trace replays the given traces instead of the sets"
    else:
        for opt, v, default in (("--format", args.format, "auto"), ("--block-size", args.block_size, None),
                                ("--stagger", args.stagger, None)):
            if v != default:
                return f"{opt} applies to --trace files; the sets read their own traces"
    if args.trace and args.stagger is not None:
        from ..planner.cli import stagger_unused  # noqa: PLC0415 (light)
        try:   # a bad or missing file is left to the reader, which names it
            unused = all(stagger_unused([t], args.format) for t in args.trace)
        except (OSError, ValueError):
            unused = False
        if unused:
            return ("--stagger spaces the starts of merged WEKA session files; no --trace here is a folder of "
                    "several WEKA session files")
    if "generated" not in (args.sets or ()):
        for opt, v in (("--per-family", args.per_family), ("--generated-seed", args.generated_seed)):
            if v is not None:
                return f"{opt} applies to --set generated" + (", which --trace replaces" if args.trace else "")
    return None


def _sources(args: argparse.Namespace) -> "tuple[list[tuple[str, str, Path | None, object]], dict]":
    """(set, label, file or None, loader) per trace to replay, and the generated set's workloads by label
    (empty unless it is replayed)."""
    from ..eviction_eval import chat_chains, load_mooncake, load_weka  # noqa: PLC0415

    if args.trace:
        from ..eviction_eval import chains_from_trace  # noqa: PLC0415
        from ..planner.traces import read_traces, trace_warnings  # noqa: PLC0415

        def given(t: str):
            trace = read_traces([t], args.format, args.block_size,
                                DEFAULT_STAGGER_S if args.stagger is None else args.stagger)
            if not trace.requests:
                why = f" ({trace.read_warnings[0]})" if trace.read_warnings else ""
                raise ValueError(f"trace {t} has no requests{why}")
            chains = chains_from_trace(trace)   # refuses ids that are not chained prefixes
            for warning in trace_warnings(trace):   # what a replay still counts, as 'plan' shows it
                print(f"warning: {t}: {warning}", file=sys.stderr)
            named = sum(1 for r in trace.requests if r.output_hash_ids)
            if named:
                print(f"note: {t}: {named} request(s) name output blocks (output_hash_ids); this single-tier "
                      "replay stores prompt blocks only, so a turn re-sending a reply misses them here "
                      "('plan' replays them)", file=sys.stderr)
            return chains
        return [("given", Path(t).name, Path(t), lambda t=t: given(t)) for t in args.trace], {}
    # Absolute capacities are 512-token Mooncake blocks: alone they mean the held-out set only.
    sets = args.sets or (["heldout"] if args.capacities and not args.fractions else list(DEFAULT_SETS))
    out, workloads = [], {}
    if "tuning" in sets:
        weka = sorted(_SHARED_WEKA.glob("*.json")) if _SHARED_WEKA.is_dir() else []
        if weka:
            out.append(("tuning", f"weka_sample ({len(weka)} sessions)", weka[0],
                        lambda: load_weka([str(w) for w in weka])))
        else:
            print(f"note: {_SHARED_WEKA} is absent: the tuning set is the chat generator only", file=sys.stderr)
        out.append(("tuning", "chat generator", None, chat_chains))
    if "heldout" in sets:
        found = default_traces()
        if found[0].parent != _SHARED_MOONCAKE:
            print(f"note: {_SHARED_MOONCAKE} is absent: replaying the bundled trace {found[0].name}",
                  file=sys.stderr)
        out += [("heldout", t.name, t, lambda t=t: load_mooncake(str(t))) for t in found]
    if "generated" in sets:
        from ..eviction_eval import chains_from_trace  # noqa: PLC0415
        from ..planner.generator import generate  # noqa: PLC0415
        workloads = dict(generated_sources(args.generated_seed, args.per_family))
        out += [("generated", label, None, lambda w=w: chains_from_trace(generate(w)))
                for label, w in workloads.items()]
    return out, workloads


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # noqa: PLC0415

    from ..tier.eviction import OFFLINE_ONLY, POLICIES  # noqa: PLC0415
    from ..eviction_eval import belady_share, footprint, head, replay  # noqa: PLC0415

    unused = _unused_option(args)
    if unused:
        print(f"error: {unused}", file=sys.stderr)
        return 2
    if args.trace:
        from ..planner.traces import list_trace_files  # noqa: PLC0415

        try:
            for t in args.trace:
                list_trace_files([t])
            if args.plot:
                refuse_output_over_input("--plot", args.plot, args.trace)
        except ValueError as exc:   # PlanError included
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.limit is not None and args.limit <= 0:
        print(f"error: --limit must be > 0, got {args.limit}", file=sys.stderr)
        return 2
    if args.capacities and args.fractions:
        print("error: give --capacities or --fractions, not both", file=sys.stderr)
        return 2
    try:
        wanted = _check_policies(args.policies or [*POLICIES, *OFFLINE_ONLY])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.per_family is None:
        args.per_family = DEFAULT_PER_FAMILY
    if args.generated_seed is None:
        args.generated_seed = 0
    servable = [n for n in wanted if n not in OFFLINE_ONLY]
    if getattr(args, "lookahead", False):  # belady is never held: it stays the bound of both rows
        wanted += [n + LOOKAHEAD_SUFFIX for n in servable]
    admit_share = getattr(args, "admit_share", None)
    if admit_share is not None:
        wanted += [n + ADMIT_SUFFIX for n in servable]
    runs = list(dict.fromkeys(["lru", *wanted, "belady"]))  # lru and belady anchor the gap share
    sources, workloads = _sources(args)
    fractions = None if args.capacities else sorted(set(args.fractions or DEFAULT_FRACTIONS))
    n_caps = len(args.capacities and set(args.capacities) or fractions)

    results = []
    bar = tqdm(total=len(sources) * n_caps * len(runs), file=sys.stderr, disable=args.no_progress, unit="replay")
    t_all = time.perf_counter()
    for set_name, label, path, loader in sources:
        t0 = time.perf_counter()
        try:
            chains = loader()
        except ValueError as exc:  # every bad trace: one line naming the file, no traceback
            bar.close()
            msg = str(exc)
            where = f"--trace {path}" if set_name == "given" else str(path or label)
            print(f"error: {msg if str(path) in msg else f'{where}: {msg}'}", file=sys.stderr)
            return 2
        if args.limit is not None:
            chains = head(chains, args.limit)
        load_s = time.perf_counter() - t0
        fp = footprint(chains)
        caps = (sorted(set(args.capacities)) if fractions is None
                else [(max(1, round(f * fp)), f) for f in fractions])
        for cap in caps:
            cap, frac = cap if isinstance(cap, tuple) else (cap, None)
            row = {}
            for name in runs:
                bar.set_description(f"{label[:12]} {cap} {name}")
                base = name.removesuffix(LOOKAHEAD_SUFFIX).removesuffix(ADMIT_SUFFIX)
                row[name] = replay(chains, cap, base, lookahead=name.endswith(LOOKAHEAD_SUFFIX),
                                   admit_share=admit_share if name.endswith(ADMIT_SUFFIX) else None)
                bar.update(1)
            lru, bel = row["lru"].hit_rate, row["belady"].hit_rate
            for name in runs:
                r = row[name]
                d = r.as_dict()
                d.update(policy=name, trace=label, set=set_name, footprint_blocks=fp, fraction=frac,
                         load_seconds=round(load_s, 3),
                         gap_share=belady_share(lru, r.hit_rate, bel),
                         delta_vs_lru=round(r.hit_rate - lru, 6),
                         shown=name in wanted)
                if "held_max" in r.stats:  # lookahead rows: the most blocks held at once, stores refused
                    d.update(held_max_blocks=r.stats["held_max"], stores_refused=r.stats["store_rejected"])
                if name.endswith(ADMIT_SUFFIX):
                    d.update(admit_share=admit_share)
                results.append(d)
    bar.close()
    elapsed = time.perf_counter() - t_all

    plot_error = None
    if args.plot:
        try:
            _plot(results, wanted, args.plot)
        except ImportError:
            plot_error = "the plot needs matplotlib: pip install 'lmdeploy-hostcache[plot]'"
        except (OSError, ValueError) as exc:
            plot_error = f"--plot {args.plot}: cannot write it ({getattr(exc, 'strerror', None) or exc})"
    if plot_error:  # the results are still printed below
        args.plot = None
    rc = 2 if plot_error else 0
    summary = summarize(results, wanted)
    per_set = summarize_sets(results, wanted)
    if args.json:
        out = {"bench": "eviction", "capacity_unit": "blocks of the trace's own block size",
               "hit_rate": "hit blocks / prompt blocks", "seconds": round(elapsed, 2),
               "results": results, "summary": summary, "set_summary": per_set}
        if workloads:
            out["generated_workloads"] = {label: repr(w) for label, w in workloads.items()}
        print(json.dumps(out, indent=1))
    else:
        _print_tables(results, wanted)
        _print_summary(summary)
        _print_set_summary(per_set)
        print(f"\n{len(results)} replays in {elapsed:.1f} s" + (f"; plot: {args.plot}" if args.plot else ""))
    if plot_error:
        print(f"error: {plot_error}; the results above are complete", file=sys.stderr)
    return rc


def _rows_of(results: list[dict], wanted: list[str], key: str):
    """(policy, group, rows) for every policy asked for except the two anchors (lru, belady),
    the rows grouped by ``key`` ("trace" or "set") in the order first seen."""
    for n in wanted:
        if n in ("lru", "belady"):
            continue
        groups: dict[str, list[dict]] = {}
        for r in results:
            if r["policy"] == n:
                groups.setdefault(r[key], []).append(r)
        yield from ((n, g, rs) for g, rs in groups.items())


def summarize(results: list[dict], wanted: list[str]) -> list[dict]:
    """Per policy (not lru/belady) and trace: the mean gap share over the capacities whose gap is
    at least ``MIN_GAP``, the pooled share (sum of wins over sum of gaps, every capacity), and the
    worst difference from LRU."""
    out = []
    for n, trace, rs in _rows_of(results, wanted, "trace"):
        gap = {r["capacity"]: _rate(results, trace, r["capacity"], "belady")
               - _rate(results, trace, r["capacity"], "lru") for r in rs}
        shares = [r["gap_share"] for r in rs if gap[r["capacity"]] >= MIN_GAP]
        gaps = sum(gap.values())
        wins = sum(r["delta_vs_lru"] for r in rs)
        worst = min(rs, key=lambda r: r["delta_vs_lru"])
        out.append({"policy": n, "set": rs[0]["set"], "trace": trace, "points": len(rs),
                    "mean_gap_share": round(sum(shares) / len(shares), 4) if shares else None,
                    "pooled_gap_share": round(wins / gaps, 4) if gaps > 1e-12 else None,
                    "min_delta_vs_lru": worst["delta_vs_lru"], "min_delta_capacity": worst["capacity"]})
    return out


def summarize_sets(results: list[dict], wanted: list[str]) -> list[dict]:
    """Per policy (not lru/belady) and set: how many capacities were replayed, how many fell more
    than ``GUARD`` below LRU, the worst difference (and where), and the gap share pooled over every
    trace and capacity of the set."""
    out = []
    for n, set_name, rs in _rows_of(results, wanted, "set"):
        gaps = sum(_rate(results, r["trace"], r["capacity"], "belady")
                   - _rate(results, r["trace"], r["capacity"], "lru") for r in rs)
        worst = min(rs, key=lambda r: r["delta_vs_lru"])
        out.append({"policy": n, "set": set_name, "traces": len({r["trace"] for r in rs}), "points": len(rs),
                    "points_below_guard": sum(r["delta_vs_lru"] < -GUARD for r in rs),
                    "pooled_gap_share": (round(sum(r["delta_vs_lru"] for r in rs) / gaps, 4)
                                         if gaps > 1e-12 else None),
                    "min_delta_vs_lru": worst["delta_vs_lru"], "min_delta_trace": worst["trace"],
                    "min_delta_capacity": worst["capacity"]})
    return out


def _print_set_summary(per_set: list[dict]) -> None:
    print(f"\nper policy and set (points: capacities replayed; below guard: more than {GUARD} below lru):")
    width = max([8, *(len(r["policy"]) for r in per_set)])
    for r in per_set:
        pooled = "n/a" if r["pooled_gap_share"] is None else f"{r['pooled_gap_share']:+.3f}"
        print(f"  {r['policy']:>{width}} [{r['set']:>9}] {r['traces']} traces, {r['points']} points, "
              f"{r['points_below_guard']} below guard; pooled gap share {pooled}; worst vs lru "
              f"{r['min_delta_vs_lru'] * 100:+.2f} pts ({r['min_delta_trace']} @ {r['min_delta_capacity']})")


def _rate(results: list[dict], trace: str, cap: int, policy: str) -> float:
    for r in results:
        if r["trace"] == trace and r["capacity"] == cap and r["policy"] == policy:
            return r["hit_rate"]
    raise KeyError((trace, cap, policy))


def _by_trace(results: list[dict]) -> dict[str, dict[int, dict[str, dict]]]:
    out: dict[str, dict[int, dict[str, dict]]] = {}
    for r in results:
        out.setdefault(r["trace"], {}).setdefault(r["capacity"], {})[r["policy"]] = r
    return out


def _print_tables(results: list[dict], wanted: list[str]) -> None:
    for trace, caps in _by_trace(results).items():
        first = next(iter(caps.values()))
        any_r = next(iter(first.values()))
        print(f"\n[{any_r['set']}] {trace}: {any_r['requests']} requests, {any_r['prompt_blocks']} prompt blocks, "
              f"footprint {any_r['footprint_blocks']} blocks "
              f"(hit rate = hit blocks / prompt blocks; gap share = (policy - lru) / (belady - lru))")
        cols = [n for n in wanted if n != "belady"]
        head = f"{'capacity':>9} {'of fp':>6} " + " ".join(f"{n:>16}" for n in cols) + f" {'belady':>8} {'replay s':>9}"
        print(head)
        for cap, row in caps.items():
            cells = []
            for n in cols:
                r = row[n]
                share = r["gap_share"]
                cells.append(f"{r['hit_rate']:.4f}" + (f" ({share:+.2f})" if n != "lru" and share is not None
                                                       else " " * 8))
            secs = max(r["seconds"] for r in row.values())
            frac = row["lru"]["fraction"]
            print(f"{cap:>9} {'' if frac is None else f'{frac:.2f}':>6} " + " ".join(f"{c:>16}" for c in cells) + f" {row['belady']['hit_rate']:>8.4f} {secs:>9.2f}")


def _print_summary(summary: list[dict]) -> None:
    print(f"\nper policy and trace (mean gap share over the capacities whose gap is >= {MIN_GAP}; pooled: "
          "sum of wins / sum of gaps over every capacity; min vs lru: the worst hit-rate difference, in points):")
    width = max([8, *(len(r["policy"]) for r in summary)])
    for r in summary:
        mean = "n/a" if r["mean_gap_share"] is None else f"{r['mean_gap_share']:+.3f}"
        pooled = "n/a" if r["pooled_gap_share"] is None else f"{r['pooled_gap_share']:+.3f}"
        print(f"  {r['policy']:>{width}} [{r['set']:>9}] {r['trace']:<28} mean gap share {mean:>6}; pooled {pooled:>6}; "
              f"min vs lru {r['min_delta_vs_lru'] * 100:+.2f} pts (@ {r['min_delta_capacity']})")


def _plot(results: list[dict], wanted: list[str], path: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by = _by_trace(results)
    cols = min(len(by), 4)          # a generated set has dozens of traces: rows of at most four
    rows = -(-len(by) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(by):]:
        ax.set_visible(False)
    for ax, (trace, caps) in zip(axes.flat, by.items()):
        xs = list(caps)
        for n in [*dict.fromkeys(["lru", *wanted, "belady"])]:
            ys = [caps[c][n]["hit_rate"] for c in xs]
            style = dict(linestyle="--", color="black") if n == "belady" else dict(marker="o", markersize=3.5)
            ax.plot(xs, ys, label=n + (" (offline bound)" if n == "belady" else ""), **style)
        ax.set_xscale("log")
        ax.set_xlabel("host capacity (blocks)")
        ax.set_ylabel("hit rate (hit blocks / prompt blocks)")
        ax.set_title(trace)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
