"""Bad input to the CLIs (audit r7, r8, r9): one line starting ``error: `` that names the option, file or
field, exit code 2, no traceback; an option that would not act with the others given is refused, not
silently ignored.

Every refusal here stops before any replay or measurement (the benches' measuring functions are stubbed
where a regression would otherwise run them)."""
from __future__ import annotations

import json

import pytest

from lmdeploy_hostcache import cli, hostmem
from lmdeploy_hostcache.config import ConfigError, HostCacheConfig
from lmdeploy_hostcache.hostmem import GIB, HostMemoryFacts, resolve_host_cache_bytes

MOONCAKE_LINE = '{"timestamp":1,"input_length":130,"output_length":10,"hash_ids":[1,2],"block_size":64}\n'


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refused(capsys, *argv: str) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    rc, _, err = _main(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def mooncake(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text(MOONCAKE_LINE)
    return p


def _weka(path, sid: str) -> None:
    path.write_text(json.dumps({"id": sid, "block_size": 64, "requests": [
        {"t": 0, "in": 130, "out": 10, "hash_ids": [1, 2]},
        {"t": 5, "in": 200, "out": 10, "hash_ids": [1, 2, 3]}]}))


@pytest.fixture
def weka_folder(tmp_path):
    d = tmp_path / "weka"
    d.mkdir()
    _weka(d / "a.json", "a")
    _weka(d / "b.json", "b")
    return d


# A (r7): exit 2 and an ``error:`` prefix ---------------------------------------------------------------


@pytest.fixture
def no_eviction_replay(monkeypatch):
    from lmdeploy_hostcache import eviction_eval

    monkeypatch.setattr(eviction_eval, "replay", lambda *a, **k: pytest.fail("the bench replayed"))


@pytest.mark.parametrize("argv, text", [
    (["--policies", "nope"], "error: --policies: unknown nope; choose from arc, belady, lru, s3fifo"),
    (["--limit", "0"], "error: --limit must be > 0, got 0"),
])
def test_bench_eviction_bad_values_are_usage_errors(capsys, no_eviction_replay, argv, text):
    assert text in _refused(capsys, "bench", "eviction", "--no-progress", *argv)


@pytest.fixture
def no_transfer_rows(monkeypatch):
    from lmdeploy_hostcache.bench import transfer

    for rows in ("_cpu_rows", "_cpu_quant_rows", "_cuda_rows"):
        monkeypatch.setattr(transfer, rows, lambda *a, **k: pytest.fail("the bench ran"))


@pytest.mark.parametrize("argv, text", [
    (["--blocks", "0"], "--blocks must be in [1, 1048576], got 0"),
    (["--repeats", "0"], "--repeats must be in [1, 1000000], got 0"),
    (["--sizes-kib", "x"], "--sizes-kib must be comma-separated integers"),
    (["--sizes-kib", "0"], "--sizes-kib must hold sizes in [1, 1048576] KiB"),
    (["--layers", "3"], "every --sizes-kib block size must be divisible by --layers 3"),
])
def test_bench_transfer_bad_values_are_usage_errors(capsys, no_transfer_rows, argv, text):
    assert text in _refused(capsys, "bench", "transfer", "--no-store", *argv)


def test_bench_transfer_cuda_only_without_cuda_is_a_usage_error(capsys, no_transfer_rows):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "error: --cuda-only: no CUDA device in this run" in _refused(capsys, "bench", "transfer", "--cuda-only")


@pytest.fixture
def no_harness_runs(monkeypatch):
    from lmdeploy_hostcache.testing import capture_bench, step_bench

    monkeypatch.setattr(capture_bench, "measure_capture", lambda *a, **k: pytest.fail("the bench ran"))
    monkeypatch.setattr(step_bench, "measure", lambda *a, **k: pytest.fail("the bench ran"))


@pytest.mark.parametrize("bench, argv, text", [
    ("capture", ["--runs", "0"], "error: bench capture: --runs must be >= 1, got 0"),
    ("capture", ["--requests", "0"], "error: bench capture: --requests must be >= 1, got 0"),
    ("step", ["--warmup", "-1"], "error: bench step: --warmup must be >= 0, got -1"),
    ("step", ["--runs", "0"], "error: bench step: --runs must be >= 1, got 0"),
])
def test_harness_bench_bad_values_have_the_error_prefix(capsys, no_harness_runs, bench, argv, text):
    assert text in _refused(capsys, "bench", bench, *argv)


# B (r8): options that would not act are refused -------------------------------------------------------


def test_plan_refuses_stagger_on_mooncake_input(capsys, mooncake):
    err = _refused(capsys, "plan", str(mooncake), "--stagger", "5", "--quiet")
    assert "--stagger" in err and str(mooncake) in err and "Mooncake-layout" in err


def test_plan_refuses_stagger_on_one_weka_session(capsys, weka_folder):
    one = weka_folder / "a.json"
    err = _refused(capsys, "plan", str(one), "--stagger", "5", "--quiet")
    assert "--stagger" in err and "one session" in err


def test_plan_stagger_acts_on_merged_weka_sessions(capsys, weka_folder):
    from lmdeploy_hostcache.planner.cli import load_trace

    def starts(*extra):
        args = cli.build_parser().parse_args(["plan", str(weka_folder), *extra])
        return sorted(r.timestamp for r in load_trace(args).requests)

    assert starts("--stagger", "1000") == [0, 5, 1000, 1005] and starts() == [0, 5, 60, 65]
    rc, _, err = _main(capsys, "plan", str(weka_folder), "--stagger", "60", "--quiet", "--no-concurrency")
    assert rc == 0, err


def test_plan_refuses_seed_without_a_generated_workload(capsys, mooncake):
    err = _refused(capsys, "plan", str(mooncake), "--seed", "7", "--quiet")
    assert "--seed" in err and "--generate" in err


@pytest.mark.parametrize("extra, opt", [(["--format", "weka"], "--format"), (["--stagger", "5"], "--stagger"),
                                        (["--format", "weka", "--stagger", "5"], "--format")])
def test_plan_refuses_trace_options_with_a_generated_workload(capsys, extra, opt):
    err = _refused(capsys, "plan", "--chat", "--limit", "5", *extra, "--quiet")
    assert f"error: {opt} applies to trace files; --generate chat" in err


def test_plan_seed_still_acts_on_a_generated_workload(capsys):
    def trace_name(seed):
        rc, out, err = _main(capsys, "plan", "--chat", "--limit", "5", "--seed", seed, "--json", "--quiet",
                             "--no-concurrency")
        assert rc == 0, err
        return json.dumps(json.loads(out).get("trace"))

    assert "seed=7" in trace_name("7") and "seed=0" in trace_name("0")


@pytest.mark.parametrize("argv, text", [
    (["--set", "generated"], "error: --set applies without --trace"),
    (["--per-family", "5"], "error: --per-family applies to --set generated, which --trace replaces"),
    (["--generated-seed", "3"], "error: --generated-seed applies to --set generated"),
    (["--stagger", "5"], "error: --stagger spaces the starts of merged WEKA session files"),
])
def test_bench_eviction_refuses_options_a_trace_ignores(capsys, no_eviction_replay, mooncake, argv, text):
    assert text in _refused(capsys, "bench", "eviction", "--trace", str(mooncake), "--no-progress", *argv)


def test_bench_eviction_refuses_generated_options_without_the_generated_set(capsys, no_eviction_replay):
    err = _refused(capsys, "bench", "eviction", "--set", "heldout", "--per-family", "2", "--no-progress")
    assert "error: --per-family applies to --set generated" in err
    err = _refused(capsys, "bench", "eviction", "--generated-seed", "1", "--no-progress")
    assert "error: --generated-seed applies to --set generated" in err


def test_bench_eviction_stagger_is_kept_for_a_weka_folder(capsys, weka_folder, mooncake):
    rc, out, err = _main(capsys, "bench", "eviction", "--trace", str(weka_folder), "--trace", str(mooncake),
                         "--stagger", "5", "--fractions", "0.5", "--policies", "lru", "--json", "--no-progress")
    assert rc == 0, err
    assert {r["requests"] for r in json.loads(out)["results"] if r["trace"] == "weka"} == {4}


def test_capture_requests_bound_matches_the_bundled_workload():
    from lmdeploy_hostcache.testing.capture_bench import MOONCAKE_REQUESTS, workload

    assert sum(map(len, workload("mooncake", 10 ** 9))) == MOONCAKE_REQUESTS


@pytest.mark.parametrize("bench", ["capture", "step"])
def test_harness_bench_requests_beyond_the_workload_or_with_weka_are_refused(capsys, no_harness_runs, bench):
    err = _refused(capsys, "bench", bench, "--requests", "100000")
    assert f"error: bench {bench}: --requests must be <= 1536" in err and "got 100000" in err
    err = _refused(capsys, "bench", bench, "--workload", "weka", "--requests", "5")
    assert f"error: bench {bench}: --requests applies to --workload mooncake" in err


# C (r9): messages name the file and the field the user set ---------------------------------------------


def test_cluster_without_routing_says_it_is_missing(capsys, tmp_path):
    p = tmp_path / "noroute.yaml"
    p.write_text("nodes:\n  - {name: a, gpu_kv_gb: 20, host_gb: 1}\n")
    err = _refused(capsys, "plan", "--cluster", str(p), "--quiet")
    assert f"error: {p}: routing is missing; it is required: one of session, random, prefix, cache_aware" in err
    assert "None" not in err


def test_cluster_with_an_unknown_model_names_the_file_and_field(capsys, tmp_path):
    p = tmp_path / "nomodel.yaml"
    p.write_text("routing: session\nmodel: NoSuchModel\nnodes:\n  - {name: a, gpu_kv_gb: 20, host_gb: 1}\n")
    err = _refused(capsys, "plan", "--cluster", str(p), "--quiet")
    assert f"error: {p}: model 'NoSuchModel' is neither a preset" in err


def _facts(total_gb: float) -> HostMemoryFacts:
    return HostMemoryFacts(total_bytes=int(total_gb * GIB), available_bytes=int(total_gb * GIB))


@pytest.mark.parametrize("l3, field", [
    ({"local_buffer_gb": 100}, "l3.local_buffer_gb"),     # the default 4 GiB segment is no culprit
    ({"global_segment_gb": 100}, "l3.global_segment_gb"),
])
def test_an_oversized_l3_store_blames_the_field_that_makes_it(l3, field):
    cfg = HostCacheConfig.from_dict({"host_cache_gb": "auto", "l3": {"master_address": "127.0.0.1:50051", **l3}})
    with pytest.raises(ConfigError) as ei:
        resolve_host_cache_bytes(cfg, _facts(8))
    assert ei.value.field == field and f"lower {field}" in str(ei.value)


def test_doctor_names_the_oversized_local_buffer(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(hostmem, "read_host_memory", lambda *a, **k: _facts(8))
    p = tmp_path / "l3buf.yaml"
    p.write_text('l3: {master_address: "127.0.0.1:50051", local_buffer_gb: 100}\n')
    rc, out, err = _main(capsys, "doctor", "--config", str(p))
    assert rc == 2 and "INVALID (l3.local_buffer_gb" in out
    assert "invalid host-cache config: l3.local_buffer_gb: got 100.0" in err and "Traceback" not in err


def test_bench_transfer_no_store_says_why_the_store_rows_are_skipped(capsys):
    rc, out, err = _main(capsys, "bench", "transfer", "--no-store", "--blocks", "2", "--sizes-kib", "64",
                         "--layers", "4", "--repeats", "1", "--no-quant")
    assert rc == 0, err
    assert "Mooncake Store rows skipped: --no-store given" in out and "store rows: store rows" not in out
