"""Regressions from the GPU kit audit: stale files, skipped references, recorded threshold and code.

* a file left in the work folder by an earlier call (a warm machine keeps ``/tmp/gpu_kit_work``) is
  never read as this call's, and a step whose child failed never passes;
* a run that skipped a requested run, or compared no outputs while equality was asked for, ends
  ``incomplete`` (exit 3), not ``pass``; a tight budget skips candidates before their reference;
* the tier-on runs record the ``min_restore_tokens`` the connector resolved and the calibration;
* the result records hashes of the code that ran; the probe keeps its stderr;
* ``evaluate_targets`` counts requests present on one side only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import driver
import kitlib

KIT = Path(driver.__file__).resolve().parent
REPO = KIT.parents[1]
SMALL = ["--sessions", "3", "--turns", "2", "--system-tokens", "16", "--first-user-tokens", "40", "--user-tokens",
         "8", "--new-tokens", "3", "--block-size", "8"]
H200_CAL = REPO / "docs" / "data" / "gpu" / "h200_2026-12-04_8b_calibration.json"


def _driver(tmp_path, *argv, env=None, fake=True):
    out = tmp_path / "out"
    cmd = [sys.executable, str(KIT / "driver.py"), "--out", str(out), *(["--fake-engine"] if fake else []), *argv]
    base = {k: v for k, v in os.environ.items() if k != "LMDEPLOY_HOSTCACHE_CALIBRATION"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**base, "GPU_KIT_WORK": str(tmp_path / "work"), **(env or {})})
    return proc, json.loads((out / "result.json").read_text())


def _stale_bench_rows():
    return {"gpu": "NVIDIA H200 (stale, from an earlier call)", "cuda": [dict(
        block_kib=4096, blocks=32, engine_h2d_gbps=50.0, plain_h2d_gbps=51.0, engine_d2h_gbps=49.0,
        plain_d2h_gbps=51.0, kernel_gather_vs_memcpy=0.9, kernel_scatter_vs_memcpy=0.9)]}


# -- finding 2: stale files, failed children -------------------------------------------------------

def test_stale_bench_json_of_an_earlier_call_is_not_this_calls_result(tmp_path):
    """The audit's reproduction: an old bench_transfer.json, then a bench whose child fails (no CUDA
    here: ``--cuda-only`` refuses). The old driver reported ``pass`` with the stale GPU's figures."""
    work = tmp_path / "work"
    (work / "call-old").mkdir(parents=True)
    for folder in (work, work / "call-old"):
        (folder / "bench_transfer.json").write_text(json.dumps(_stale_bench_rows()))
    proc, res = _driver(tmp_path, "--steps", "bench_transfer", fake=False)
    bench = res["steps"]["bench_transfer"]
    assert bench["status"] != "pass" and bench["rc"] not in (0, None), bench
    assert "from an earlier call" not in json.dumps(res)
    assert res["targets"]["restore_vs_pinned_h2d"]["status"] == "not measured"
    assert res["status"] == "fail" and proc.returncode == 1
    assert not (work / "call-old").exists()              # earlier calls' folders are removed
    assert Path(res["work_dir"]).parent == work and Path(res["work_dir"]).name.startswith("call-")


def _step_env(tmp_path, *argv):
    args = driver.parse_args(["--out", str(tmp_path / "out"), "--fake-engine", *SMALL, *argv])
    res = kitlib.ResultFile(tmp_path / "out" / "result.json")
    return args, res, kitlib.Budget(300), driver.Log(tmp_path / "out" / "kit.log")


def test_bench_passes_only_when_its_child_exited_0(tmp_path, monkeypatch):
    """A child that wrote its JSON and then failed (or died) is a failed step, its rc recorded, and no
    calibration is built from its rows."""
    args, res, budget, log = _step_env(tmp_path)
    work = tmp_path / "w"
    work.mkdir()

    def child(cmd, timeout_s, log_, env=None):
        Path(cmd[3]).write_text(json.dumps(_stale_bench_rows()))
        return "fail", 134, 1.0

    monkeypatch.setattr(driver, "run_child", child)
    assert driver.step_bench(args, res, budget, log, work) is None
    st = res.data["steps"]["bench_transfer"]
    assert st["status"] == "fail" and st["rc"] == 134 and "exited 134" in st["error"]
    # the same file with exit 0 passes, rc recorded, and the 8 MiB block size is measured
    seen = {}

    def ok_child(cmd, timeout_s, log_, env=None):
        seen["cmd"] = cmd
        Path(cmd[3]).write_text(json.dumps(_stale_bench_rows()))
        return "ok", 0, 1.0

    monkeypatch.setattr(driver, "run_child", ok_child)
    assert driver.step_bench(args, res, budget, log, work)["cuda"]
    assert res.data["steps"]["bench_transfer"]["status"] == "pass" and res.data["steps"]["bench_transfer"]["rc"] == 0
    sizes = seen["cmd"][seen["cmd"].index("--sizes-kib") + 1].split(",")
    assert "8192" in sizes


def test_bench_removes_the_old_file_before_its_child_runs(tmp_path, monkeypatch):
    args, res, budget, log = _step_env(tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    (work / "bench_transfer.json").write_text(json.dumps(_stale_bench_rows()))
    monkeypatch.setattr(driver, "run_child", lambda cmd, t, log_, env=None: ("ok", 0, 1.0))  # writes nothing
    assert driver.step_bench(args, res, budget, log, work) is None
    assert res.data["steps"]["bench_transfer"]["status"] == "error"


def test_cuda_tests_ignore_an_old_junit_file_and_need_exit_0(tmp_path, monkeypatch):
    args, res, budget, log = _step_env(tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    passed = '<testsuite><testcase classname="t" name="a"/></testsuite>'
    (work / "cuda_tests.xml").write_text(passed)
    monkeypatch.setattr(driver, "run_child", lambda cmd, t, log_, env=None: ("fail", -9, 1.0))  # killed, no XML
    driver.step_cuda_tests(args, res, budget, log, work)
    st = res.data["steps"]["cuda_tests"]
    assert st["status"] == "error" and st["rc"] == -9

    def crashed_after_xml(cmd, t, log_, env=None):   # pytest wrote a clean XML, then exited non-zero
        Path(cmd[-1].split("=", 1)[1]).write_text(passed)
        return "fail", 3, 1.0

    monkeypatch.setattr(driver, "run_child", crashed_after_xml)
    driver.step_cuda_tests(args, res, budget, log, work)
    st = res.data["steps"]["cuda_tests"]
    assert st["status"] == "fail" and st["rc"] == 3 and "exited 3" in st["note"]


def test_e2e_never_reads_a_run_file_of_an_earlier_call(tmp_path, monkeypatch):
    """A worker killed before writing (OOM, CUDA abort) must not inherit the last call's outputs."""
    args, res, budget, log = _step_env(tmp_path, "--runs", "fits_off_qp0")
    work = tmp_path / "w"
    work.mkdir()
    (work / "run_fits_off_qp0.json").write_text(json.dumps(
        {"status": "ok", "outputs": {"s0t0": [1, 2, 3]}, "ttft": {"p50": 0.1, "p99": 0.1}}))
    monkeypatch.setattr(driver, "run_child", lambda cmd, t, log_, env=None: ("fail", 137, 2.0))
    outputs = driver.step_e2e(args, res, budget, log, work)
    run = res.data["steps"]["e2e"]["runs"]["fits_off_qp0"]
    assert run["status"] == "error" and run["rc"] == 137 and "no result file" in run["error"]
    assert outputs == {"fits_off_qp0": {}} and res.data["steps"]["e2e"]["status"] == "fail"


def test_e2e_run_that_says_ok_but_exited_non_zero_is_an_error(tmp_path, monkeypatch):
    args, res, budget, log = _step_env(tmp_path, "--runs", "fits_off_qp0")
    work = tmp_path / "w"
    work.mkdir()

    def child(cmd, t, log_, env=None):
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"status": "ok", "outputs": {}}))
        return "fail", 1, 1.0

    monkeypatch.setattr(driver, "run_child", child)
    driver.step_e2e(args, res, budget, log, work)
    run = res.data["steps"]["e2e"]["runs"]["fits_off_qp0"]
    assert run["status"] == "error" and run["rc"] == 1 and "exited 1" in run["error"]


# -- finding 3: skipped runs, nothing compared ------------------------------------------------------

def test_a_tight_budget_keeps_the_reference_run_and_the_result_is_incomplete(tmp_path):
    """The audit's reproduction: with the reference last and a tight budget only ``small_off_qp0`` ran
    and the result said ``pass``, exit 0, having compared nothing."""
    proc, res = _driver(tmp_path, "--steps", "e2e,equality", "--budget-s", "75", *SMALL,
                        "--runs", "small_off_qp0,small_on_qp0,fits_off_qp0")
    runs = res["steps"]["e2e"]["runs"]
    assert runs["fits_off_qp0"]["status"] == "ok"                     # the reference ran
    assert runs["small_off_qp0"]["status"] == "skipped" and "reference" in runs["small_off_qp0"]["reason"]
    assert res["status"] == "incomplete" and proc.returncode == driver.EXIT_INCOMPLETE
    assert any("small_on_qp0" in why for why in res["incomplete"])
    assert any("no pair" in why for why in res["incomplete"])
    assert kitlib.validate_result(res) == []
    assert "incomplete:" in proc.stdout


def test_equality_requested_with_no_pair_is_incomplete(tmp_path):
    proc, res = _driver(tmp_path, "--steps", "e2e,equality", "--budget-s", "120", *SMALL, "--runs", "fits_off_qp0")
    assert res["steps"]["e2e"]["status"] == "pass" and res["steps"]["equality"]["status"] == "skipped"
    assert res["status"] == "incomplete" and proc.returncode == driver.EXIT_INCOMPLETE
    assert res["incomplete"] == ["output equality requested but no pair of runs was compared (not compared: "
                                 "small_on_qp0_vs_fits_off_qp0, fits_on_qp0_vs_fits_off_qp0, "
                                 "small_on_qp4_vs_fits_off_qp4, small_onx_qp0_vs_fits_off_qp0)"]


def test_a_calibration_only_run_without_equality_passes(tmp_path):
    proc, res = _driver(tmp_path, "--steps", "e2e", "--budget-s", "120", *SMALL, "--runs", "fits_off_qp0")
    assert res["status"] == "pass" and proc.returncode == 0 and "incomplete" not in res


def test_incomplete_reasons_and_finish():
    e2e = {"runs": {"a": {"status": "ok"}, "b": {"status": "skipped", "reason": "10s left of the budget"}}}
    assert kitlib.incomplete_reasons(["e2e"], e2e, None) == ["requested runs not run: b (10s left of the budget)"]
    assert kitlib.incomplete_reasons(["e2e", "equality"], {"runs": {"a": {"status": "ok"}}}, {"compared": {"x": {}}}) \
        == []
    assert kitlib.incomplete_reasons(["bench_transfer"], None, None) == []


def test_finish_orders_fail_over_incomplete_over_pass(tmp_path):
    res = kitlib.ResultFile(tmp_path / "r.json")
    res.finish(incomplete=["why"])
    assert res.data["status"] == "incomplete" and res.data["incomplete"] == ["why"]
    assert kitlib.validate_result(json.loads((tmp_path / "r.json").read_text())) == []
    res.step("e2e", "fail")
    res.finish(incomplete=["why"])
    assert res.data["status"] == "fail"
    res2 = kitlib.ResultFile(tmp_path / "r2.json")
    res2.finish(incomplete=[])
    assert res2.data["status"] == "pass" and "incomplete" not in res2.data


def test_reference_runs():
    args = driver.parse_args(["--out", "x", "--runs", "small_on_qp0,small_off_qp0,fits_off_qp0,fits_off_qp4"])
    runs = driver.plan_runs(args)
    assert driver.reference_runs(runs, ["e2e", "equality"]) == {"fits_off_qp0"}   # no small_on_qp4: no qp4 pair
    assert driver.reference_runs(runs, ["e2e"]) == {"fits_off_qp0"}               # the calibration run


# -- finding 4: the threshold the connector resolved --------------------------------------------------

def test_tier_runs_record_the_resolved_threshold_and_its_calibration(tmp_path):
    from lmdeploy_hostcache.restore_cost import load_calibration, threshold_tokens

    proc, res = _driver(tmp_path, "--steps", "e2e,equality", "--budget-s", "120", *SMALL,
                        "--runs", "fits_off_qp0,small_on_qp0", "--min-restore-tokens", "auto",
                        env={"LMDEPLOY_HOSTCACHE_CALIBRATION": str(H200_CAL)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    thr = res["steps"]["e2e"]["runs"]["small_on_qp0"]["restore_threshold"]
    want = threshold_tokens(load_calibration(str(H200_CAL)), 65536)
    assert thr["configured"] == "auto" and thr["connector"] == thr["resolved"] == want and thr["agrees"]
    assert thr["calibration_source"] == str(H200_CAL) and thr["calibration_env"] == str(H200_CAL)
    assert "restore_threshold" not in res["steps"]["e2e"]["runs"]["fits_off_qp0"]     # stock: no connector
    ci = res["calibration_input"]
    assert ci["env"] == str(H200_CAL) and ci["exists"] and ci["min_restore_tokens"] == "auto"
    assert ci["content"]["restore_gbps"] == json.loads(H200_CAL.read_text())["restore_gbps"]
    assert f"min_restore_tokens 'auto' -> {want}" in proc.stdout


def test_without_a_calibration_file_auto_says_assumed(tmp_path):
    proc, res = _driver(tmp_path, "--steps", "e2e", "--budget-s", "120", *SMALL, "--runs", "small_on_qp0",
                        "--min-restore-tokens", "auto")
    thr = res["steps"]["e2e"]["runs"]["small_on_qp0"]["restore_threshold"]
    assert thr["calibration_source"].startswith("assumed") and thr["calibration_env"] is None
    assert "not set" in res["calibration_input"]["note"]


# -- finding 6: what code ran --------------------------------------------------------------------------

def test_tree_sha256_follows_content_and_paths(tmp_path):
    (tmp_path / "p" / "sub").mkdir(parents=True)
    (tmp_path / "p" / "a.py").write_text("x = 1\n")
    (tmp_path / "p" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "p" / "sub" / "c.txt").write_text("not hashed")
    one = kitlib.tree_sha256(tmp_path / "p")
    assert one["files"] == 2 and len(one["sha256"]) == 64
    assert kitlib.tree_sha256(tmp_path / "p") == one
    (tmp_path / "p" / "sub" / "c.txt").write_text("still not hashed")
    assert kitlib.tree_sha256(tmp_path / "p")["sha256"] == one["sha256"]
    (tmp_path / "p" / "a.py").write_text("x = 2\n")
    assert kitlib.tree_sha256(tmp_path / "p")["sha256"] != one["sha256"]
    assert kitlib.tree_sha256(tmp_path / "missing")["sha256"] is None


def test_checkout_state_sees_uncommitted_and_untracked_changes(tmp_path):
    import stage

    repo = tmp_path / "r"
    (repo / "lmdeploy_hostcache").mkdir(parents=True)
    (repo / "lmdeploy_hostcache" / "m.py").write_text("a = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    clean = kitlib.checkout_state(repo)
    assert clean["head"] and not clean["describe"].endswith("-dirty") and clean["untracked"] == []
    (repo / "lmdeploy_hostcache" / "m.py").write_text("a = 2\n")
    (repo / "lmdeploy_hostcache" / "new.py").write_text("b = 1\n")
    dirty = stage.write_checkout_json(repo, tmp_path / "kit" / "checkout.json")
    assert dirty["describe"].endswith("-dirty") and dirty["diff_sha256"] != clean["diff_sha256"]
    assert dirty["untracked"] == ["lmdeploy_hostcache/new.py"] and dirty["package"]["files"] == 2
    assert json.loads((tmp_path / "kit" / "checkout.json").read_text()) == dirty
    nogit = kitlib.checkout_state(tmp_path / "kit")
    assert nogit["head"] is None and nogit["package"]["sha256"] is None


def test_environment_hashes_the_imported_package(tmp_path):
    import lmdeploy_hostcache

    env = driver.environment(probe=False)
    pkg = Path(lmdeploy_hostcache.__file__).parent
    assert env["package"] == kitlib.tree_sha256(pkg)
    assert env["kit_scripts"]["files"] >= 5 and env["kit_scripts"]["sha256"]


def test_environment_compares_with_the_staged_checkout(tmp_path, monkeypatch):
    import lmdeploy_hostcache

    pkg = kitlib.tree_sha256(Path(lmdeploy_hostcache.__file__).parent)
    (tmp_path / ".gpu_kit").mkdir()
    staged = {"describe": "abc1234-dirty", "package": pkg}
    (tmp_path / ".gpu_kit" / "checkout.json").write_text(json.dumps(staged))
    monkeypatch.setattr(driver, "REPO", tmp_path)
    env = driver.environment(probe=False)
    assert env["staged_checkout"] == staged and env["package_matches_staged"] is True
    staged["package"] = {"sha256": "0" * 64}
    (tmp_path / ".gpu_kit" / "checkout.json").write_text(json.dumps(staged))
    assert driver.environment(probe=False)["package_matches_staged"] is False


# -- finding 7 ------------------------------------------------------------------------------------------

def test_probe_failure_keeps_its_stderr():
    out = driver._probe("import sys; sys.stderr.write('ModuleNotFoundError: No module named torch'); sys.exit(1)")
    assert "exited 1" in out["probe_error"] and "No module named torch" in out["probe_stderr"]
    assert driver._probe("print('{\"torch\": \"x\"}')") == {"torch": "x"}


def test_targets_count_requests_on_one_side_only():
    """A request only the candidate has makes the equality step fail; the target must not read 0."""
    eq = {"compared": {"a": {"mismatching_requests": [], "missing_requests": [], "extra_requests": ["s9t0"],
                             "identical": False}}}
    t = kitlib.evaluate_targets(None, None, eq)["token_differences"]
    assert t["status"] == "fail" and t["value"] == 1
    eq = {"compared": {"a": {"mismatching_requests": ["s1t0"], "missing_requests": ["s1t0"],
                             "extra_requests": ["s9t0"], "identical": False}}}
    assert kitlib.evaluate_targets(None, None, eq)["token_differences"]["value"] == 2   # missing counted once
    eq = {"compared": {"a": {"mismatching_requests": [], "identical": False}}}
    assert kitlib.evaluate_targets(None, None, eq)["token_differences"]["status"] == "fail"


def test_the_8b_calibration_takes_the_8_mib_row():
    m = driver.MODEL_SIZES["8b"]
    block = m["num_layers"] * 2 * 64 * m["num_key_value_heads"] * (m["hidden_size"] // m["num_attention_heads"]) * 2
    assert block == 8 << 20 and 8192 in driver.BENCH_SIZES_KIB
    rows = {"cuda": [dict(blocks=32, block_kib=k, engine_h2d_gbps=float(k), plain_h2d_gbps=1.0)
                     for k in driver.BENCH_SIZES_KIB]}
    cal = kitlib.restore_calibration(rows, 1.0, 1.0, block, None, None)
    assert cal["restore_gbps"] == 8192.0 and "8192 KiB" in cal["restore_gbps_from"]


@pytest.mark.parametrize("with_nvidia_smi", [False, True])
def test_conftest_decides_triton_interpret_from_torch(tmp_path, with_nvidia_smi):
    """An ``nvidia-smi`` on PATH (or its absence) no longer decides: torch's CUDA does."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if with_nvidia_smi:
        smi = bindir / "nvidia-smi"
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(0o755)
    code = ("import importlib.util, os, torch\n"
            f"spec = importlib.util.spec_from_file_location('c', {str(REPO / 'tests' / 'conftest.py')!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(os.environ.get('TRITON_INTERPRET'), torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    interp, cuda = out.stdout.split()
    assert (interp == "1") == (cuda == "False"), out.stdout + out.stderr
