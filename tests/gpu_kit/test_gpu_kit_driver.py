"""The kit's driver with the engine faked: arguments, replay, result JSON, partial results, equality."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import driver
import e2e_worker
import fake_engine
import kitlib

KIT = Path(driver.__file__).resolve().parent
SMALL = ["--sessions", "3", "--turns", "2", "--system-tokens", "16", "--first-user-tokens", "40", "--user-tokens",
         "8", "--new-tokens", "3", "--block-size", "8"]


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "cuda_tests,nope"], "--steps: unknown nope"),
    (["--steps", ","], "--steps: unknown (none given)"),
    (["--runs", "small_on_qp9"], "--runs: unknown small_on_qp9"),
    (["--min-restore-tokens", "-1"], "--min-restore-tokens must be an integer >= 0 or auto"),
    (["--min-restore-tokens", "lots"], "--min-restore-tokens must be an integer >= 0 or auto"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--ratio", "-1"], "--ratio must be > 0"),
    (["--concurrency", "0"], "--concurrency and --block-size must be >= 1"),
    (["--sessions", "0"], "workload: sessions must be an integer >= 1"),
    (["--model-size", "70b"], "invalid choice"),
])
def test_bad_arguments_exit_2_naming_the_option(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        driver.parse_args(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        driver.parse_args([])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_plan_runs_sizes_the_caches(tmp_path):
    args = driver.parse_args(["--out", str(tmp_path)])
    runs = {r["name"]: r for r in driver.plan_runs(args)}
    assert list(runs) == [r[0] for r in driver.RUNS]
    ws = kitlib.working_set_blocks(args.spec, 64)
    small = runs["small_on_qp0"]["num_gpu_blocks"]
    assert ws / small == pytest.approx(4.0, rel=0.01)
    assert runs["fits_off_qp0"]["num_gpu_blocks"] >= ws + small
    assert runs["small_on_qp4"]["quant_policy"] == 4 and runs["small_on_qp4"]["tier"]
    assert not runs["small_off_qp0"]["tier"] and runs["small_off_qp0"]["host_cache_gb"] == 0
    assert [n for n, r in runs.items() if r["calibrate"]] == ["fits_off_qp0"]
    only = driver.plan_runs(driver.parse_args(["--out", str(tmp_path), "--runs", "small_on_qp0,fits_off_qp0"]))
    assert [r["name"] for r in only] == ["small_on_qp0", "fits_off_qp0"]  # the order given
    assert all(r["keep_restored_blocks"] for r in runs.values())
    # the opt-in exclusive run: named only, never a default; the tier on with kept restores off
    assert "small_onx_qp0" not in runs
    (x,) = driver.plan_runs(driver.parse_args(["--out", str(tmp_path), "--runs", "small_onx_qp0"]))
    assert x["tier"] and not x["keep_restored_blocks"] and x["num_gpu_blocks"] == small
    assert all(r["min_restore_tokens"] == 0 for r in runs.values())
    (a,) = driver.plan_runs(driver.parse_args(["--out", str(tmp_path), "--runs", "small_on_qp0",
                                               "--min-restore-tokens", "auto"]))
    assert a["min_restore_tokens"] == "auto"
    with pytest.raises(SystemExit):
        driver.parse_args(["--out", str(tmp_path), "--runs", "small_on_qp0,fits_off_qp0,small_on_qp0"])


def test_replay_builds_multi_turn_prompts_and_times_requests():
    spec = kitlib.WorkloadSpec(sessions=2, turns=3, system_tokens=4, first_user_tokens=6, user_tokens=2, new_tokens=3)
    wl = kitlib.make_workload(spec)
    eng = fake_engine.build({"name": "x", "block_size": 4})
    seen = []
    real = fake_engine.FakeInstance.async_stream_infer

    def spy(self, session_id, input_ids, gen_config=None, **kw):
        seen.append(list(input_ids))
        return real(self, session_id, input_ids, gen_config, **kw)

    fake_engine.FakeInstance.async_stream_infer = spy
    try:
        ticks = iter(range(10 ** 6))
        rep = asyncio.new_event_loop().run_until_complete(e2e_worker.replay(
            eng, wl, fake_engine.GenerationConfig(max_new_tokens=3), clock=lambda: float(next(ticks)),
            stats=lambda: eng.stats.num_hit_tokens))
    finally:
        fake_engine.FakeInstance.async_stream_infer = real
    assert len(rep["rows"]) == 6 and set(rep["outputs"]) == {kitlib.request_id(s, t) for s in (0, 1) for t in (0, 1, 2)}
    # turn 2 of session s: system + u0 + out0 + u1 + out1 + u2
    s = wl["order"][2][0]
    out = rep["outputs"]
    want = wl["system"] + wl["users"][s][0] + out[f"s{s}t0"] + wl["users"][s][1] + out[f"s{s}t1"] + wl["users"][s][2]
    assert want in seen
    rows = {r["id"]: r for r in rep["rows"]}
    assert rows[f"s{s}t2"]["prompt_tokens"] == len(want)
    assert all(r["output_tokens"] == 3 and r["ttft"] > 0 and r["latency"] >= r["ttft"] for r in rep["rows"])
    assert rows[f"s{s}t2"]["gpu_cached_tokens"] > 0   # its earlier turn's blocks were reused
    summ = e2e_worker.summarize(rep)
    assert summ["requests"] == 6 and summ["failed_requests"] == [] and summ["output_tokens"] == 18
    assert summ["ttft"]["count"] == 6 and summ["output_tokens_per_s"] == pytest.approx(18 / rep["wall_s"])


def test_summarize_lists_failed_requests():
    rep = {"wall_s": 2.0, "rows": [
        {"id": "s0t0", "prompt_tokens": 10, "output_tokens": 2, "ttft": 0.5, "latency": 1.0, "status": "FINISH",
         "gpu_cached_tokens": 0},
        {"id": "s0t1", "prompt_tokens": 90, "output_tokens": 0, "ttft": None, "latency": 0.0,
         "status": "INPUT_LENGTH_ERROR", "gpu_cached_tokens": 0}]}
    s = e2e_worker.summarize(rep)
    assert s["failed_requests"] == ["s0t1"] and s["ttft"]["count"] == 1
    assert s["prefill_tokens_per_s"] == pytest.approx(10 / 0.5)


def test_run_child_timeout_kills_the_process_group(tmp_path):
    log = driver.Log(tmp_path / "kit.log")
    t0 = time.monotonic()
    outcome, rc, secs = driver.run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1.5, log)
    assert outcome == "timeout" and rc is None and time.monotonic() - t0 < 20
    assert driver.run_child([sys.executable, "-c", "raise SystemExit(3)"], 30, log)[:2] == ("fail", 3)
    assert driver.run_child(["true"], 0.5, log)[0] == "timeout"   # no time left: not even started
    assert "time.sleep(60)" in (tmp_path / "kit.log").read_text()


def test_equality_step_reports_the_request_and_position(tmp_path):
    res = kitlib.ResultFile(tmp_path / "r.json")
    ref = {"s0t0": [1, 2, 3], "s1t0": [4, 5, 6]}
    eq = driver.step_equality({"fits_off_qp0": ref, "small_on_qp0": {"s0t0": [1, 2, 3], "s1t0": [4, 9, 6]}}, res)
    c = eq["compared"]["small_on_qp0_vs_fits_off_qp0"]
    assert c["mismatching_requests"] == ["s1t0"] and c["first_difference"] == {"s1t0": 1}
    assert "s1t0@1" in c["summary"]
    assert "fits_on_qp0_vs_fits_off_qp0" in eq["not_compared"]
    assert json.loads((tmp_path / "r.json").read_text())["steps"]["equality"]["status"] == "fail"
    res2 = kitlib.ResultFile(tmp_path / "r2.json")
    assert driver.step_equality({}, res2)["compared"] == {}
    assert json.loads((tmp_path / "r2.json").read_text())["steps"]["equality"]["status"] == "skipped"


def _run_driver(tmp_path, *extra, env=None):
    out = tmp_path / "out"
    cmd = [sys.executable, str(KIT / "driver.py"), "--out", str(out), "--fake-engine", "--steps", "e2e,equality",
           "--budget-s", "120", *SMALL, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "GPU_KIT_WORK": str(tmp_path / "work"), **(env or {})})
    return proc, out


def test_driver_end_to_end_with_the_fake_engine(tmp_path):
    proc, out = _run_driver(tmp_path, "--runs", "fits_off_qp0,small_on_qp0,small_off_qp0,fits_on_qp0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "result.json").read_text())
    assert kitlib.validate_result(res) == [] and res["status"] == "pass"
    assert res["steps"]["cuda_tests"]["status"] == "skipped" and res["steps"]["bench_transfer"]["status"] == "skipped"
    runs = res["steps"]["e2e"]["runs"]
    assert {n: r["status"] for n, r in runs.items()} == {"fits_off_qp0": "ok", "small_on_qp0": "ok",
                                                         "small_off_qp0": "ok", "fits_on_qp0": "ok"}
    assert runs["small_on_qp0"]["requests"] == 6 and runs["small_on_qp0"]["ttft"]["p50"] > 0
    assert "host_tier" in runs["small_on_qp0"] and "host_tier" not in runs["small_off_qp0"]
    eq = res["steps"]["equality"]
    assert eq["status"] == "pass" and set(eq["compared"]) == {"small_on_qp0_vs_fits_off_qp0",
                                                               "fits_on_qp0_vs_fits_off_qp0"}
    assert res["targets"]["token_differences"]["status"] == "pass"
    assert res["targets"]["restore_vs_pinned_h2d"]["status"] == "not measured"   # no bench in this run
    assert "no figure here is a GPU figure" in res["note"]
    assert not (out / "calibration.json").exists()   # never from a fake engine
    outputs = json.loads((out / "outputs.json").read_text())
    assert set(outputs) == set(runs) and len(outputs["small_on_qp0"]) == 6
    assert sorted(p.name for p in out.iterdir()) == ["kit.log", "outputs.json", "result.json"]


def test_driver_fails_on_a_token_difference(tmp_path):
    proc, out = _run_driver(tmp_path, "--runs", "fits_off_qp0,small_on_qp0",
                            env={"GPU_KIT_FAKE_DIVERGE": "small_on_qp0:4"})
    assert proc.returncode == 1
    res = json.loads((out / "result.json").read_text())
    eq = res["steps"]["equality"]["compared"]["small_on_qp0_vs_fits_off_qp0"]
    assert len(eq["mismatching_requests"]) == 1 and list(eq["first_difference"].values()) == [2]
    assert res["steps"]["equality"]["status"] == "fail" and res["status"] == "fail"
    assert res["targets"]["token_differences"] == {"status": "fail", "value": 1,
                                                   "target": "0 (tier on vs stock with a large GPU cache)"}


def test_driver_skips_runs_that_do_not_fit_the_budget(tmp_path):
    proc, out = _run_driver(tmp_path, "--budget-s", "30", "--runs", "fits_off_qp0,small_on_qp0")
    res = json.loads((out / "result.json").read_text())
    runs = res["steps"]["e2e"]["runs"]
    assert {r["status"] for r in runs.values()} == {"skipped"}
    assert all("left of the budget" in r["reason"] for r in runs.values())
    assert res["steps"]["e2e"]["status"] == "fail" and proc.returncode == 1


def test_worker_error_is_a_result_not_a_crash(tmp_path):
    wl = tmp_path / "wl.json"
    wl.write_text("{}")
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, str(KIT / "e2e_worker.py"), "--model", "x", "--run", '{"name": "a"}',
                           "--workload", str(wl), "--out", str(out), "--fake-engine"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    data = json.loads(out.read_text())
    assert data["status"] == "error" and data["error"].startswith("KeyError") and data["config"] == {"name": "a"}


def test_bench_cuda_only_refuses_without_cuda(capsys):
    from lmdeploy_hostcache.bench import transfer

    args = SimpleNamespace(blocks=2, layers=2, repeats=1, spread=1, sizes_kib="4", threads=1, no_quant=True,
                           cuda_only=True, json=True, seed=0)
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert transfer.run(args) == 2   # a usage error: one line, exit 2 (the kit's driver counts any non-zero)
    assert "error: --cuda-only: no CUDA device" in capsys.readouterr().err


def test_model_writer_matches_write_tiny_model(tmp_path):
    """The kit's fast writer produces the same checkpoint layout as the project's reference writer."""
    from safetensors import safe_open

    import model_writer
    from lmdeploy_hostcache.testing.models import write_tiny_model

    cfg = driver.MODEL_SIZES["tiny"]
    info = model_writer.write_random_llama(tmp_path / "fast", cfg, device="cpu")
    write_tiny_model(tmp_path / "ref", "llama", **cfg)
    fast, ref = safe_open(str(tmp_path / "fast" / "model.safetensors"), "pt"), \
        safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt")
    assert set(fast.keys()) == set(ref.keys())
    for k in ref.keys():
        assert fast.get_slice(k).get_shape() == ref.get_slice(k).get_shape()
        assert fast.get_slice(k).get_dtype() == ref.get_slice(k).get_dtype()
    assert info["params"] == sum(
        __import__("math").prod(ref.get_slice(k).get_shape()) for k in ref.keys())
    a = json.loads((tmp_path / "fast" / "config.json").read_text())
    b = json.loads((tmp_path / "ref" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "bos_token_id", "eos_token_id", "torch_dtype", "tie_word_embeddings"):
        assert a.get(key) == b.get(key), key
    assert (tmp_path / "fast" / "tokenizer.json").read_text() == (tmp_path / "ref" / "tokenizer.json").read_text()
    w = fast.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    assert 0.015 < float(w.std()) < 0.025 and float(fast.get_tensor("model.norm.weight").float().min()) == 1.0


def test_replay_with_several_requests_in_flight():
    spec = kitlib.WorkloadSpec(sessions=5, turns=2, system_tokens=4, first_user_tokens=6, user_tokens=2, new_tokens=2)
    wl = kitlib.make_workload(spec)
    eng = fake_engine.build({"name": "x", "block_size": 4})
    rep = asyncio.new_event_loop().run_until_complete(e2e_worker.replay(
        eng, wl, fake_engine.GenerationConfig(max_new_tokens=2), concurrency=3, stats=lambda: 0))
    assert sorted(r["id"] for r in rep["rows"]) == sorted(kitlib.request_id(s, t) for s in range(5) for t in range(2))
    assert all(r["gpu_cached_tokens"] is None for r in rep["rows"])   # not attributable with requests in flight
    # the same outputs as one at a time: a turn only starts once the previous turn's outputs exist
    one = asyncio.new_event_loop().run_until_complete(e2e_worker.replay(
        fake_engine.build({"name": "x", "block_size": 4}), wl, fake_engine.GenerationConfig(max_new_tokens=2)))
    assert one["outputs"] == rep["outputs"]


def test_sigterm_kills_the_running_step_and_keeps_partial_results(tmp_path):
    """What `timeout` in run.sh does: the driver kills its step's process group and marks the run."""
    import os
    import signal

    out = tmp_path / "out"
    env = {**os.environ, "GPU_KIT_WORK": str(tmp_path / "work"), "GPU_KIT_FAKE_SLEEP_S": "60"}
    proc = subprocess.Popen([sys.executable, str(KIT / "driver.py"), "--out", str(out), "--fake-engine",
                             "--steps", "e2e,equality", "--budget-s", "300", *SMALL], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "kit.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and "e2e_worker.py" in log.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 124
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "timeout" and res["stopped_by_signal"] == signal.SIGTERM
    assert res["steps"]["e2e"]["status"] == "running" and kitlib.validate_result(res) == []
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "work") not in ps   # the worker (its own session) is gone too


def test_summary_table_of_a_full_result():
    res = {"status": "fail", "env": {"gpu": "G"}, "calibration": {"restore_gbps": 40.0, "prefill_tokens_per_s": 5e4,
                                                                    "restore_overhead_ms": 7.0},
           "steps": {"cuda_tests": {"status": "pass", "summary": {"passed": 9, "failed": 0, "errors": 0, "skipped": 0}},
                     "bench_transfer": {"status": "pass", "result": {"cuda": [dict(
                         block_kib=4096, blocks=32, engine_h2d_gbps=40.0, plain_h2d_gbps=45.0, engine_d2h_gbps=30.0,
                         plain_d2h_gbps=44.0, kernel_gather_vs_memcpy=0.9, kernel_scatter_vs_memcpy=0.85)]}},
                     "e2e": {"status": "fail", "runs": {
                         "small_on_qp0": {"status": "ok", "ttft": {"p50": 0.05, "p99": 0.1}, "output_tokens_per_s": 90.0,
                                          "prefill_tokens_per_s": 30000.0, "host_tier": {"restored_tokens": 640}},
                         "small_off_qp0": {"status": "timeout"}}},
                     "equality": {"status": "pass", "compared": {"a_vs_b": {"summary": "3 requests ... 0 mismatching"}}}}}
    text = driver.summary_table(res)
    assert "gpu: G  status: fail" in text and "passed 9 failed 0" in text
    assert "H2D engine 40.0 / plain 45.0 GB/s" in text
    assert "small_on_qp0   ok" in text and "640" in text and "small_off_qp0  timeout" in text
    assert "equality a_vs_b: 3 requests" in text and "restore 40.0 GB/s" in text
