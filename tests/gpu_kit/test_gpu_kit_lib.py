"""The GPU kit's pure helpers: statistics, result file, JUnit parsing, workload sizing, targets."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

import kitlib
from kitlib import ResultFile, WorkloadSpec


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(seed, q):
    rng = random.Random(seed)
    xs = [rng.expovariate(1.0) for _ in range(rng.randrange(1, 200))]
    assert kitlib.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-15)


def test_percentile_edges():
    assert math.isnan(kitlib.percentile([], 50))
    assert kitlib.percentile([3.0], 99) == 3.0
    assert kitlib.percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError, match="0..100"):
        kitlib.percentile([1], 101)


def test_latency_summary():
    s = kitlib.latency_summary([0.4, 0.1, 0.2, 0.3])
    assert s["count"] == 4 and s["max"] == 0.4 and s["mean"] == pytest.approx(0.25)
    assert s["p50"] == pytest.approx(0.25) and s["p99"] == pytest.approx(0.397)
    assert kitlib.latency_summary([]) == {"count": 0, "p50": None, "p99": None, "mean": None, "max": None}


def test_result_file_is_valid_and_rewritten_after_every_step(tmp_path):
    path = tmp_path / "result.json"
    res = ResultFile(path, argv=["--out", "x"])
    first = json.loads(path.read_text())
    assert kitlib.validate_result(first) == []
    assert first["status"] == "running" and first["finished"] is None
    assert all(s["status"] == "pending" for s in first["steps"].values())
    res.step("cuda_tests", "pass", summary={"passed": 3})
    # a run killed now leaves this on disk: the step's result and the rest still pending
    partial = json.loads(path.read_text())
    assert partial["steps"]["cuda_tests"] == {"status": "pass", "summary": {"passed": 3}}
    assert partial["steps"]["e2e"]["status"] == "pending" and partial["status"] == "running"
    res.step("bench_transfer", "timeout", seconds=90.0)
    res.finish()
    done = json.loads(path.read_text())
    assert done["status"] == "fail" and done["finished"] and kitlib.validate_result(done) == []
    assert not list(tmp_path.glob(".result.*"))  # no temp file left behind


def test_result_file_rejects_unknown_steps_and_statuses(tmp_path):
    res = ResultFile(tmp_path / "r.json")
    with pytest.raises(KeyError, match="unknown step"):
        res.step("nope", "pass")
    with pytest.raises(ValueError, match="unknown step status"):
        res.step("e2e", "great")
    res.finish()
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "pass"


def test_validate_result_names_problems():
    probs = kitlib.validate_result({"schema": "x", "status": "odd", "steps": {"e2e": {"status": "pass"}}})
    assert any(p.startswith("schema") for p in probs)
    assert any(p.startswith("status") for p in probs)
    assert any(p.startswith("steps") for p in probs)
    assert any(p.startswith("started") for p in probs)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.transfer.test_transfer_cuda" name="test_a[0]" time="0.1"/>
<testcase classname="tests.transfer.test_transfer_cuda" name="test_a[1]" time="0.1"/>
<testcase classname="tests.transfer.test_transfer_cuda" name="test_b" time="0.1">
  <failure message="assert 3 == 0">long trace</failure></testcase>
<testcase classname="tests.transfer.test_transfer_cuda" name="test_c" time="0.1"><skipped message="no"/></testcase>
<testcase classname="tests.transfer.test_transfer_cuda" name="test_d" time="0.1"><error message="boom"/></testcase>
</testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text(JUNIT)
    s = kitlib.parse_junit(p)
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (5, 2, 1, 1, 1)
    assert s["failures"][0] == {"test": "tests.transfer.test_transfer_cuda::test_b", "message": "assert 3 == 0"}
    assert s["failures"][1]["message"] == "boom"


def test_workload_is_deterministic_and_shaped():
    spec = WorkloadSpec(sessions=5, turns=3, system_tokens=8, first_user_tokens=20, user_tokens=6, new_tokens=2)
    a, b = kitlib.make_workload(spec), kitlib.make_workload(spec)
    assert a == b
    assert len(a["system"]) == 8 and len(a["users"]) == 5
    assert [len(u) for u in a["users"][0]] == [20, 6, 6]
    assert all(sorted(p) == list(range(5)) for p in a["order"]) and len(a["order"]) == 3
    assert all(0 <= t < spec.vocab for u in a["users"] for m in u for t in m)
    assert kitlib.make_workload(WorkloadSpec(sessions=5, turns=3, system_tokens=8, first_user_tokens=20,
                                             user_tokens=6, new_tokens=2, seed=1)) != a


def test_workload_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="sessions"):
        WorkloadSpec(sessions=0)
    with pytest.raises(ValueError, match="new_tokens"):
        WorkloadSpec(new_tokens=True)


def test_gpu_cache_sizing_gives_the_ratio():
    spec = WorkloadSpec(sessions=24)
    bs = 64
    ws = kitlib.working_set_blocks(spec, bs)
    ctx = kitlib.final_context_tokens(spec)
    assert ctx == 256 + 1024 + 3 * 128 + 4 * 16
    assert ws == 4 + 24 * (ctx // bs - 4)
    small = kitlib.gpu_blocks_for(spec, bs, 4.0)
    assert ws / small == pytest.approx(4.0, rel=0.01)
    # never smaller than what the requests in flight need
    tiny = WorkloadSpec(sessions=1, turns=1, system_tokens=0, first_user_tokens=640, user_tokens=1, new_tokens=1)
    assert kitlib.gpu_blocks_for(tiny, bs, 100.0, concurrency=2) == 2 * (math.ceil(642 / bs) + 1) + 2
    # LMDeploy caps a session at (blocks - 2) * block_size tokens: the longest context must fit
    one = kitlib.gpu_blocks_for(tiny, bs, 100.0)
    assert (one - 2) * bs >= kitlib.final_context_tokens(tiny) + 1
    with pytest.raises(ValueError):
        kitlib.gpu_blocks_for(spec, bs, 0)


def _bench(rows):
    return {"cuda": [dict(blocks=32, block_kib=k, engine_h2d_gbps=h, plain_h2d_gbps=p) for k, h, p in rows]}


def test_restore_calibration_picks_the_nearest_block_size():
    bench = _bench([(256, 10.0, 20.0), (4096, 40.0, 45.0), (16384, 44.0, 46.0)])
    cal = kitlib.restore_calibration(bench, 50_000.0, 7.5, 4 * 2**20, "H", "m")
    assert cal["restore_gbps"] == 40.0 and cal["prefill_tokens_per_s"] == 50_000.0
    assert cal["restore_overhead_ms"] == 7.5 and "4096 KiB" in cal["restore_gbps_from"]
    assert kitlib.restore_calibration(None, 1.0, 1.0, 1, None, None) is None
    assert kitlib.restore_calibration(bench, None, 1.0, 1, None, None) is None
    # the kit's calibration is what restore_cost reads
    from lmdeploy_hostcache.restore_cost import RestoreCalibration

    RestoreCalibration(cal["restore_gbps"], cal["prefill_tokens_per_s"], cal["restore_overhead_ms"])


def test_targets_pass_fail_and_not_measured():
    bench = _bench([(4096, 40.0, 45.0)])
    runs = {"small_off_qp0": {"status": "ok", "ttft": {"p50": 0.9}}, "small_on_qp0": {"status": "ok", "ttft": {"p50": 0.2}},
            "fits_off_qp0": {"status": "ok", "output_tokens_per_s": 100.0},
            "fits_on_qp0": {"status": "ok", "output_tokens_per_s": 97.0}}
    eq = {"compared": {"a": {"mismatching_requests": []}}}
    t = kitlib.evaluate_targets(bench, {"runs": runs}, eq)
    assert t["restore_vs_pinned_h2d"] == {"status": "pass", "value": round(40 / 45, 3),
                                          "target": ">= 0.8 for batches >= 16 blocks"}
    assert t["ttft_p50_speedup_4x_working_set"]["status"] == "pass"
    assert t["ttft_p50_speedup_4x_working_set"]["value"] == 4.5
    assert t["throughput_loss_when_fits"]["status"] == "fail" and t["throughput_loss_when_fits"]["value"] == 0.03
    assert t["token_differences"]["status"] == "pass"
    none = kitlib.evaluate_targets(None, None, None)
    assert {v["status"] for v in none.values()} == {"not measured"}
    assert all(v["value"] is None for v in none.values())
    bad_eq = {"compared": {"a": {"mismatching_requests": ["s1t1"]}}}
    assert kitlib.evaluate_targets(None, None, bad_eq)["token_differences"]["status"] == "fail"
    # a run that failed is not measured, never a pass
    runs["small_on_qp0"]["status"] = "error"
    assert kitlib.evaluate_targets(None, {"runs": runs}, None)["ttft_p50_speedup_4x_working_set"]["status"] == \
        "not measured"


def test_budget_step_timeouts():
    now = [0.0]
    b = kitlib.Budget(100, clock=lambda: now[0])
    assert b.step_timeout(150, reserve_s=10) == 90
    now[0] = 95
    assert b.left() == 5 and b.step_timeout(150, reserve_s=10) == 0


def test_marginal_prefill_takes_the_difference_of_median_ttfts():
    # 256 tokens: 50 ms, 2048 tokens: 82 ms (medians; one outlier each) -> 1792 tokens in 32 ms
    m = kitlib.marginal_prefill(256, [0.050, 0.049, 0.300], 2048, [0.082, 0.081, 0.500])
    assert m["prefill_tokens_per_s"] == pytest.approx(1792 / 0.032)
    assert m["ttft_short_ms"] == pytest.approx(50.0) and m["ttft_long_ms"] == pytest.approx(82.0)
    assert m["whole_prompt_tokens_per_s"] == pytest.approx(2048 / 0.082)
    # the whole-prompt rate counts the fixed cost as prefill work: it is lower than the marginal one
    assert m["whole_prompt_tokens_per_s"] < m["prefill_tokens_per_s"]


def test_marginal_prefill_is_none_when_the_longer_prompt_was_not_slower():
    assert kitlib.marginal_prefill(256, [0.051], 1824, [0.050])["prefill_tokens_per_s"] is None
    assert kitlib.marginal_prefill(256, [], 1824, [0.050])["prefill_tokens_per_s"] is None


def test_marginal_prefill_is_none_when_the_longer_prompt_hid_under_the_step():
    # the H200 run 3 figures (7B, eager): 256 tokens 61.9 ms, 2048 tokens 63.8 ms -> not measurable
    m = kitlib.marginal_prefill(256, [0.0619] * 3, 2048, [0.0638] * 3)
    assert m["prefill_tokens_per_s"] is None and m["ttft_long_ms"] == pytest.approx(63.8)
    # its first turns: 15,360 uncached tokens in 0.49 s -> about 35,000 tokens/s
    m = kitlib.marginal_prefill(256, [0.0619] * 3, 15360, [0.49] * 3)
    assert m["prefill_tokens_per_s"] == pytest.approx((15360 - 256) / (0.49 - 0.0619))
    # no calibration file from it: restore_cost would need a positive rate
    assert kitlib.restore_calibration({"cuda": [{"block_kib": 4096, "blocks": 32, "engine_h2d_gbps": 48.0}]}, None,
                                      30.0, 8 << 20, "G", "m") is None
