"""Eviction policies on real traces: host-tier hit rate vs capacity, next to the Belady bound.

Replays Mooncake JSONL traces through ``HostIndex`` (one tier, see ``eviction_eval``) for every
policy and capacity asked for, and prints the measured hit rates, each policy's share of the
LRU -> Belady gap and the replay time.  Nothing here needs a GPU or LMDeploy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_CAPACITIES = (500, 1000, 2000, 4000, 6000, 10000, 20000, 40000)
_SHARED_MOONCAKE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mooncake"


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", action="append", metavar="PATH",
                   help="Mooncake JSONL(.gz) trace (repeatable; default: the two Mooncake traces of a source "
                        "checkout's ../shared/traces/mooncake, else the trace bundled with the package)")
    p.add_argument("--capacities", nargs="+", type=_positive_int, metavar="BLOCKS",
                   default=list(DEFAULT_CAPACITIES), help="host capacities in 512-token blocks")
    p.add_argument("--policies", nargs="+", metavar="NAME", default=None,
                   help="policies to replay (default: every servable policy, plus belady, the offline bound)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N requests")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="PNG", help="write capacity-vs-hit-rate curves to this PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")


def _check_policies(names: list[str]) -> list[str]:
    from ..eviction import OFFLINE_ONLY, POLICIES  # noqa: PLC0415
    allowed = set(POLICIES) | set(OFFLINE_ONLY)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"--policies: unknown {bad}; choose from {sorted(allowed)}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # noqa: PLC0415

    from ..eviction import OFFLINE_ONLY, POLICIES  # noqa: PLC0415
    from ..eviction_eval import belady_share, load_mooncake, replay  # noqa: PLC0415

    traces = [Path(t) for t in args.trace] if args.trace else default_traces()
    if not traces:
        print("no trace: pass --trace PATH (Mooncake JSONL)", file=sys.stderr)
        return 2
    for t in traces:
        if not t.exists():
            print(f"error: --trace {t}: no such file", file=sys.stderr)
            return 2
    if not args.trace and traces[0].parent != _SHARED_MOONCAKE:
        print(f"note: {_SHARED_MOONCAKE} is absent: replaying the bundled trace {traces[0].name}", file=sys.stderr)
    if args.limit is not None and args.limit <= 0:
        print(f"--limit must be > 0, got {args.limit}", file=sys.stderr)
        return 2
    wanted = _check_policies(args.policies or [*POLICIES, *OFFLINE_ONLY])
    runs = list(dict.fromkeys(["lru", *wanted, "belady"]))  # lru and belady anchor the gap share
    capacities = sorted(set(args.capacities))

    results = []
    total = len(traces) * len(capacities) * len(runs)
    bar = tqdm(total=total, file=sys.stderr, disable=args.no_progress, unit="replay")
    t_all = time.perf_counter()
    for path in traces:
        t0 = time.perf_counter()
        try:
            chains = load_mooncake(str(path))
        except ValueError as exc:  # every bad trace: one line naming the file, no traceback
            bar.close()
            msg = str(exc)
            print(f"error: {msg if str(path) in msg else f'--trace {path}: {msg}'}", file=sys.stderr)
            return 2
        if args.limit is not None:
            chains = type(chains)(chains.name, chains.digests[:args.limit], chains.tokens[:args.limit],
                                  chains.prompt_blocks[:args.limit])
        load_s = time.perf_counter() - t0
        for cap in capacities:
            row = {}
            for name in runs:
                bar.set_description(f"{path.stem[:12]} {cap} {name}")
                row[name] = replay(chains, cap, name)
                bar.update(1)
            lru, bel = row["lru"].hit_rate, row["belady"].hit_rate
            for name in runs:
                r = row[name]
                d = r.as_dict()
                d.update(trace=path.name, load_seconds=round(load_s, 3),
                         gap_share=belady_share(lru, r.hit_rate, bel),
                         delta_vs_lru=round(r.hit_rate - lru, 6),
                         shown=name in wanted)
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
    if args.json:
        print(json.dumps({"bench": "eviction", "capacity_unit": "blocks of 512 tokens",
                          "hit_rate": "hit blocks / prompt blocks", "seconds": round(elapsed, 2),
                          "results": results}, indent=1))
    else:
        _print_tables(results, wanted)
        _print_summary(results, wanted)
        print(f"\n{len(results)} replays in {elapsed:.1f} s" + (f"; plot: {args.plot}" if args.plot else ""))
    if plot_error:
        print(f"error: {plot_error}; the results above are complete", file=sys.stderr)
    return rc


def _by_trace(results: list[dict]) -> dict[str, dict[int, dict[str, dict]]]:
    out: dict[str, dict[int, dict[str, dict]]] = {}
    for r in results:
        out.setdefault(r["trace"], {}).setdefault(r["capacity"], {})[r["policy"]] = r
    return out


def _print_tables(results: list[dict], wanted: list[str]) -> None:
    for trace, caps in _by_trace(results).items():
        first = next(iter(caps.values()))
        any_r = next(iter(first.values()))
        print(f"\n{trace}: {any_r['requests']} requests, {any_r['prompt_blocks']} prompt blocks "
              f"(hit rate = hit blocks / prompt blocks; gap share = (policy - lru) / (belady - lru))")
        cols = [n for n in wanted if n != "belady"]
        head = f"{'capacity':>9} " + " ".join(f"{n:>16}" for n in cols) + f" {'belady':>8} {'replay s':>9}"
        print(head)
        for cap, row in caps.items():
            cells = []
            for n in cols:
                r = row[n]
                share = r["gap_share"]
                cells.append(f"{r['hit_rate']:.4f}" + (f" ({share:+.2f})" if n != "lru" and share is not None
                                                       else " " * 8))
            secs = max(r["seconds"] for r in row.values())
            print(f"{cap:>9} " + " ".join(f"{c:>16}" for c in cells) + f" {row['belady']['hit_rate']:>8.4f} {secs:>9.2f}")


def _print_summary(results: list[dict], wanted: list[str]) -> None:
    print("\nper policy, over every trace and capacity above:")
    for n in wanted:
        if n in ("lru", "belady"):
            continue
        rs = [r for r in results if r["policy"] == n]
        worst = min(rs, key=lambda r: r["delta_vs_lru"])
        best = max(rs, key=lambda r: r["delta_vs_lru"])
        shares = [r["gap_share"] for r in rs if r["gap_share"] is not None]
        mean_share = sum(shares) / len(shares) if shares else float("nan")
        print(f"  {n:>8}: mean gap share {mean_share:+.3f}; worst vs lru {worst['delta_vs_lru'] * 100:+.2f} pts "
              f"({worst['trace']} @ {worst['capacity']}); best {best['delta_vs_lru'] * 100:+.2f} pts "
              f"({best['trace']} @ {best['capacity']})")


def _plot(results: list[dict], wanted: list[str], path: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by = _by_trace(results)
    fig, axes = plt.subplots(1, len(by), figsize=(6.2 * len(by), 4.4), squeeze=False)
    for ax, (trace, caps) in zip(axes[0], by.items()):
        xs = list(caps)
        for n in [*dict.fromkeys(["lru", *wanted, "belady"])]:
            ys = [caps[c][n]["hit_rate"] for c in xs]
            style = dict(linestyle="--", color="black") if n == "belady" else dict(marker="o", markersize=3.5)
            ax.plot(xs, ys, label=n + (" (offline bound)" if n == "belady" else ""), **style)
        ax.set_xscale("log")
        ax.set_xlabel("host capacity (512-token blocks)")
        ax.set_ylabel("hit rate (hit blocks / prompt blocks)")
        ax.set_title(trace)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
