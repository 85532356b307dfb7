"""Issue 12 item 4: `bench eviction` reports a tuning set (WEKA sessions + chat generator) and a
held-out set (Mooncake traces) apart, with the gap share and the worst difference from LRU per
trace; the default policy stays within 0.01 of LRU on slices of both sets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmdeploy_hostcache import cli
from lmdeploy_hostcache.tier.eviction import DEFAULT_POLICY
from lmdeploy_hostcache.eviction_eval import (chains_from_trace, chat_chains, footprint, head, load_weka,
                                              replay)
from lmdeploy_hostcache.planner.generator import ChatWorkload
from lmdeploy_hostcache.planner.traces import read_mooncake

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
WEKA = sorted((SHARED / "weka_sample").glob("*.json"))
CONV = SHARED / "mooncake" / "conversation_trace.jsonl"


def _run(capsys, *argv):
    rc = cli.main(["bench", "eviction", "--no-progress", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def test_footprint_and_head():
    ch = chat_chains(ChatWorkload(sessions=5, seed=3))
    assert footprint(ch) == len({d for ds in ch.digests for d in ds}) > 0
    # At the footprint nothing is evicted: every block is stored once, LRU equals the infinite cache.
    r = replay(ch, footprint(ch), "lru")
    assert r.evictions == 0 and r.stored_blocks == footprint(ch)
    h = head(ch, 3)
    assert len(h) == 3 and h.digests == ch.digests[:3] and h.prompt_blocks == ch.prompt_blocks[:3]


def test_bench_reports_both_sets_with_summary(capsys):
    if not WEKA or not CONV.exists():
        pytest.skip("../shared/traces is not present")
    rc, out, err = _run(capsys, "--limit", "60", "--fractions", "0.05", "0.2", "--policies", "lru", "arc", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    rows = doc["results"]
    sets = {r["trace"]: r["set"] for r in rows}
    assert sets == {f"weka_sample ({len(WEKA)} sessions)": "tuning", "chat generator": "tuning",
                    "conversation_trace.jsonl": "heldout", "synthetic_trace.jsonl": "heldout"}
    for r in rows:
        assert r["requests"] == 60
        assert r["capacity"] == max(1, round(r["fraction"] * r["footprint_blocks"]))
    summ = {(s["policy"], s["trace"]): s for s in doc["summary"]}
    assert set(summ) == {("arc", t) for t in sets}  # lru and belady anchor the share: not summarised
    for (_, trace), s in summ.items():
        arc = [r for r in rows if r["trace"] == trace and r["policy"] == "arc"]
        assert s["min_delta_vs_lru"] == min(r["delta_vs_lru"] for r in arc)
        assert s["set"] == sets[trace] and s["points"] == 2
    # the text form names the set of every table and the summary line per trace
    rc, out, _ = _run(capsys, "--set", "tuning", "--limit", "40", "--fractions", "0.1", "--policies", "arc")
    assert rc == 0
    assert "[tuning] chat generator" in out and "[tuning] weka_sample" in out and "heldout" not in out
    assert "min vs lru" in out and "mean gap share" in out


def test_bench_rejects_capacities_with_fractions(capsys):
    rc, _, err = _run(capsys, "--capacities", "10", "--fractions", "0.1", "--policies", "lru")
    assert rc == 2 and "not both" in err
    with pytest.raises(SystemExit):
        _run(capsys, "--fractions", "1.5")


def _slices():
    out = [("chat", chat_chains(ChatWorkload(sessions=60, seed=11)))]
    if WEKA:
        out.append(("weka", head(load_weka([str(w) for w in WEKA]), 60)))
    if CONV.exists():
        out.append(("conv", chains_from_trace(read_mooncake(CONV).head(1200))))
    return out


def _guard_points(policy: str, slices) -> list[tuple]:
    """(slice, capacity, lru, policy) at 0.03, 0.1 and 0.3 of each slice's footprint where ``policy``'s hit rate
    is more than 0.01 below LRU's (issue 12 item 4's guard)."""
    out = []
    for name, ch in slices:
        fp = footprint(ch)
        for frac in (0.03, 0.1, 0.3):
            cap = max(1, round(frac * fp))
            lru, got = replay(ch, cap, "lru").hit_rate, replay(ch, cap, policy).hit_rate
            if got < lru - 0.01:
                out.append((name, cap, lru, got))
    return out


def test_the_default_is_lru_and_arc_keeps_the_guard_on_slices_of_both_sets():
    """The default is LRU (docs/eviction.md, ninth round): it meets issue 12's guard by definition, so the guard
    is checked on `arc`, the selectable policy the docs describe as within it on both sets; and the checker itself
    is shown to catch a policy that breaks it (s3fifo, several points below LRU on the chat slice). A change of
    the default must make this test check the new default instead."""
    assert DEFAULT_POLICY == "lru"
    slices = _slices()
    assert not _guard_points("arc", slices)
    assert any(name == "chat" for name, *_ in _guard_points("s3fifo", slices[:1]))


def test_arc_breaks_the_guard_on_agent_sessions_that_restart():
    """Issue 12's guard on the traffic where `arc` breaks it (docs/eviction.md, ninth round): agent
    sessions growing by 16 blocks, visited at random, restarting before 30% of requests. At 0.06 of
    the footprint `arc` is more than a point below LRU here (its ghost hits drive p down and it evicts
    the fresh chains of restarted sessions first), which is why it is not the default."""
    from lmdeploy_hostcache.planner.generator import AgentWorkload, generate
    ch = chains_from_trace(generate(AgentWorkload(sessions=40, growth_blocks=16, order="random", restart=0.3,
                                                  requests=1200, seed=1)))
    cap = round(0.06 * footprint(ch))
    assert replay(ch, cap, "arc").hit_rate < replay(ch, cap, "lru").hit_rate - 0.01


def test_summary_math_leaves_tiny_gaps_out_of_the_mean_only():
    from lmdeploy_hostcache.bench.eviction import MIN_GAP, summarize

    def row(cap, pol, rate, lru, bel):
        share = (rate - lru) / (bel - lru)
        return {"trace": "t", "set": "tuning", "capacity": cap, "policy": pol, "hit_rate": rate,
                "gap_share": share, "delta_vs_lru": rate - lru}
    rows = []
    for cap, lru, bel, x in ((10, 0.10, 0.30, 0.15), (20, 0.50, 0.50 + MIN_GAP / 5, 0.498)):
        rows += [row(cap, "lru", lru, lru, bel), row(cap, "belady", bel, lru, bel), row(cap, "x", x, lru, bel)]
    (s,) = summarize(rows, ["lru", "x", "belady"])
    assert s["mean_gap_share"] == pytest.approx(0.25)           # the 0.001 gap is left out of the mean
    assert s["pooled_gap_share"] == pytest.approx((0.05 - 0.002) / (0.2 + MIN_GAP / 5), abs=1e-4)
    assert s["min_delta_vs_lru"] == pytest.approx(-0.002) and s["min_delta_capacity"] == 20


def test_bench_lookahead_rows(capsys):
    # The chat generator's arrival times are all distinct (no request ever waits), so its
    # lookahead rows equal the plain rows; the conversation slice's 3-second ticks hold blocks.
    if not CONV.exists():
        pytest.skip("../shared/traces is not present")
    rc, out, err = _run(capsys, "--limit", "200", "--fractions", "0.05", "--policies", "lru", "arc",
                        "--lookahead", "--json")
    assert rc == 0, err
    rows = json.loads(out)["results"]
    by = {(r["trace"], r["policy"]): r for r in rows}
    assert {p for _, p in by} == {"lru", "arc", "lru+lookahead", "arc+lookahead", "belady"}
    for p in ("lru", "arc"):
        plain, ahead = by[("chat generator", p)], by[("chat generator", p + "+lookahead")]
        assert ahead["hit_blocks"] == plain["hit_blocks"] and ahead["held_max_blocks"] == 0
        assert "held_max_blocks" not in plain
        assert by[("conversation_trace.jsonl", p + "+lookahead")]["held_max_blocks"] > 0
    for (trace, p), r in by.items():
        assert r["hit_rate"] <= by[(trace, "belady")]["hit_rate"] + 1e-12, (trace, p)


def test_bench_admission_rows(capsys):
    rc, out, err = _run(capsys, "--set", "tuning", "--limit", "60", "--fractions", "0.02", "--policies", "lru",
                        "--admit-share", "0.25", "--json")
    assert rc == 0, err
    rows = json.loads(out)["results"]
    admit = [r for r in rows if r["policy"] == "lru+admit"]
    assert admit and all(r["admit_share"] == 0.25 for r in admit)
    assert {r["policy"] for r in rows} == {"lru", "lru+admit", "belady"}
    with pytest.raises(SystemExit):
        _run(capsys, "--admit-share", "1.5")
    assert "--admit-share must be in (0, 1]" in capsys.readouterr().err


def test_bench_generated_set_and_set_summary(capsys):
    """``--set generated``: per-family draws of the generator families, labelled with their seed,
    the same workloads for the same seed, and a per-set line whose guard count and pooled share
    follow from the rows."""
    from lmdeploy_hostcache.bench.eviction import GUARD, generated_sources
    from lmdeploy_hostcache.planner.generator import WORKLOAD_FAMILIES

    rc, out, err = _run(capsys, "--set", "generated", "--per-family", "1", "--generated-seed", "5",
                        "--limit", "80", "--fractions", "0.05", "0.3", "--policies", "lru", "arc", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    labels = [label for label, _ in generated_sources(5, 1)]
    assert labels == [f"{fam} 1 (seed 5)" for fam in WORKLOAD_FAMILIES]
    assert list(doc["generated_workloads"]) == labels
    assert doc["generated_workloads"] == {k: repr(w) for k, w in generated_sources(5, 1)}  # same draw again
    assert doc["generated_workloads"] != {k: repr(w) for k, w in generated_sources(6, 1)}
    rows = doc["results"]
    assert {r["trace"] for r in rows} == set(labels) and {r["set"] for r in rows} == {"generated"}
    (s,) = [s for s in doc["set_summary"] if s["policy"] == "arc"]
    arc = [r for r in rows if r["policy"] == "arc"]
    assert s["set"] == "generated" and s["traces"] == 3 and s["points"] == len(arc) == 6
    assert s["points_below_guard"] == sum(r["delta_vs_lru"] < -GUARD for r in arc)
    assert s["min_delta_vs_lru"] == min(r["delta_vs_lru"] for r in arc)
    rate = {(r["trace"], r["capacity"], r["policy"]): r["hit_rate"] for r in rows}
    gaps = sum(rate[(r["trace"], r["capacity"], "belady")] - rate[(r["trace"], r["capacity"], "lru")] for r in arc)
    assert s["pooled_gap_share"] == pytest.approx(sum(r["delta_vs_lru"] for r in arc) / gaps, abs=1e-4)
    # the default sets stay tuning and held-out: generated traffic only when asked
    rc, out, _ = _run(capsys, "--set", "tuning", "--limit", "30", "--fractions", "0.1", "--policies", "arc")
    assert rc == 0 and "generated" not in out and "below guard" in out


def test_set_summary_counts_points_below_the_guard():
    from lmdeploy_hostcache.bench.eviction import GUARD, summarize_sets

    rows = []
    for trace, cap, lru, bel, x in (("a", 10, 0.20, 0.40, 0.20 - GUARD - 0.001), ("a", 20, 0.30, 0.50, 0.30 - GUARD / 2),
                                    ("b", 10, 0.10, 0.30, 0.20)):
        for pol, rate in (("lru", lru), ("belady", bel), ("x", x)):
            rows.append({"trace": trace, "set": "generated", "capacity": cap, "policy": pol, "hit_rate": rate,
                         "delta_vs_lru": rate - lru})
    (s,) = summarize_sets(rows, ["lru", "x", "belady"])
    assert s["points"] == 3 and s["traces"] == 2
    assert s["points_below_guard"] == 1                    # half the guard below is within it
    assert s["min_delta_vs_lru"] == pytest.approx(-GUARD - 0.001)
    assert (s["min_delta_trace"], s["min_delta_capacity"]) == ("a", 10)
    assert s["pooled_gap_share"] == pytest.approx((-GUARD - 0.001 - GUARD / 2 + 0.10) / 0.6)


def test_bench_rejects_a_bad_per_family(capsys):
    with pytest.raises(SystemExit):
        _run(capsys, "--set", "generated", "--per-family", "0")
    assert "argument --per-family: expected an int in [1, 10000], got '0'" in capsys.readouterr().err
