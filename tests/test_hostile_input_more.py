"""Hostile input, second audit (/tmp/audit3 F2, F4, F8, F9, F11, F14, F15, F16): one error naming the file,
field or flag and a non-zero exit; never a traceback, a hang, or memory sized by a typo.

Every case that would allocate or run without its fix is stubbed (the soak, the transfer rows) or stops at
argument parsing, so that a regression fails here instead of taking the machine down."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from lmdeploy_hostcache import cli
from lmdeploy_hostcache.config import ConfigError, load_config
from lmdeploy_hostcache.l3.config import parse_l3_section

HUGE = 10 ** 400   # beyond float range: float(HUGE) raises OverflowError


def _yaml(tmp_path, text: str, name: str = "hc.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# F2: huge ints in the l3 section and the calibration file --------------------------------------------


@pytest.mark.parametrize("field", ["global_segment_gb", "local_buffer_gb"])
def test_l3_sizes_beyond_float_range_are_field_errors(field):
    with pytest.raises(ConfigError, match=rf"l3\.{field}: got an int of \d+ bits .*GiB in"):
        parse_l3_section({"master_address": "a:1", field: HUGE})


def test_doctor_names_a_huge_l3_size(tmp_path, capsys):
    p = _yaml(tmp_path, f"l3: {{master_address: 'a:1', global_segment_gb: {HUGE}}}\n")
    assert cli.main(["doctor", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "l3.global_segment_gb" in err and "Traceback" not in err


def _serve(args_path, capsys):
    from lmdeploy_hostcache.integration.cli_patch import wrap_api_server

    server = wrap_api_server(lambda args: pytest.fail("the server started"))
    args = argparse.Namespace(host_cache_gb=None, host_cache_config=str(args_path), host_cache_capture=None,
                              backend="pytorch", enable_prefix_caching=True, kv_transfer_config=None)
    with pytest.raises(SystemExit) as ei:
        server(args)
    assert ei.value.code == 2
    return capsys.readouterr().err


def test_server_start_refuses_a_huge_l3_size(tmp_path, capsys):
    p = _yaml(tmp_path, f"l3: {{master_address: 'a:1', local_buffer_gb: {HUGE}}}\n")
    err = _serve(p, capsys)
    assert "error:" in err and "l3.local_buffer_gb" in err


def test_a_huge_calibration_figure_is_named_at_load_and_at_server_start(tmp_path, monkeypatch, capsys):
    from lmdeploy_hostcache.restore_cost import CalibrationError, load_calibration

    cal = tmp_path / "cal.json"
    cal.write_text(f'{{"restore_gbps": {HUGE}, "prefill_tokens_per_s": 1000, "restore_overhead_ms": 1}}')
    with pytest.raises(CalibrationError, match=r"cal\.json: restore_gbps: got .*allowed: a finite number > 0"):
        load_calibration(str(cal))
    monkeypatch.setenv("LMDEPLOY_HOSTCACHE_CALIBRATION", str(cal))
    err = _serve(_yaml(tmp_path, "host_cache_gb: 1\nmin_restore_tokens: auto\n"), capsys)
    assert "cal.json: restore_gbps" in err


# F4: built-in workload parameters ------------------------------------------------------------------


@pytest.mark.parametrize("family, params, match", [
    ("documents", {"documents": "100000000"}, "documents must be at most 1000000"),
    ("documents", {"document_blocks": "1,1000000000"}, "document_blocks must be at most 100000"),
    ("documents", {"documents": "1000000"}, "documents x document_blocks hi"),
    ("agents", {"growth_blocks": "1000000000"}, "growth_blocks must be at most 100000"),
    ("agents", {"sessions": "10000000"}, "sessions must be at most 1000000"),
    ("chat", {"system_prompt_tokens": "1000000000000"}, "system_prompt_tokens must be at most 1048576"),
    ("chat", {"mean_turns": "1e300"}, "mean_turns must be at most 1000"),     # hung: p_continue == 1.0
    ("chat", {"mean_think_s": "1e300"}, "mean_think_s must be at most"),
    ("chat", {"mean_turns": "1000", "block_size": "1"}, "block ids, over"),
])
def test_workload_params_have_upper_bounds_naming_the_field(family, params, match):
    from lmdeploy_hostcache.planner.generator import workload_from_params

    with pytest.raises(ValueError, match=match) as ei:
        workload_from_params(family, params)
    assert "--workload-param" in str(ei.value)


def test_workload_bounds_refuse_the_hang_but_keep_the_defaults_and_wide_values():
    from lmdeploy_hostcache.planner.generator import generate, workload_from_params

    with pytest.raises(ValueError, match="mean_turns must be at most 1000"):
        workload_from_params("chat", {"mean_turns": "1e300"})
    for family in ("chat", "documents", "agents"):
        workload_from_params(family, {})
    w = workload_from_params("chat", {"sessions": "3000000", "mean_turns": "50", "block_size": "16"})
    assert len(generate(w, limit=3)) == 3
    workload_from_params("documents", {"documents": "50000", "document_blocks": "1,200"})


# F8 and F14: count flags of soak and bench transfer --------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    (["--workers", "100000"], "--workers must be <= 256"),
    (["--minutes", "1e307"], "--minutes must be <= 43200"),
    (["--seconds", "1e12"], "--seconds must be <= 2592000"),
])
def test_soak_refuses_counts_it_would_act_on(monkeypatch, capsys, argv, match):
    from lmdeploy_hostcache.testing import soak

    monkeypatch.setattr(soak, "soak", lambda *a, **k: pytest.fail("the soak ran"))
    assert cli.main(["soak", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--blocks", "100000000", "--sizes-kib", "64"], "--blocks must be in [1, 1048576]"),
    (["--seed", str(10 ** 29)], "--seed must be in [0, 9223372036854775807]"),
    (["--threads", "-3"], "--threads must be in [1, 4096]"),
    (["--spread", "100000"], "--spread must be in [1, 1024]"),
    (["--blocks", str(1 << 20), "--spread", "1024", "--sizes-kib", "1024"], "available on this machine"),
])
def test_bench_transfer_refuses_counts_before_allocating(monkeypatch, capsys, argv, match):
    from lmdeploy_hostcache.bench import transfer

    for rows in ("_cpu_rows", "_cpu_quant_rows", "_cuda_rows"):
        monkeypatch.setattr(transfer, rows, lambda *a, **k: pytest.fail("the bench ran"))
    assert cli.main(["bench", "transfer", "--no-store", *argv]) == 2   # a usage error: exit 2, as argparse's
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err


# F8 and F11: bench eviction flags, refused by argparse naming the flag --------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--set", "generated", "--per-family", "100000000"], "--per-family"),
    (["--trace", "w.json", "--stagger", "nan"], "--stagger"),
    (["--trace", "w.json", "--stagger", "-1"], "--stagger"),
    (["--trace", "w.json", "--stagger", "1e308"], "--stagger"),
])
def test_bench_eviction_flags_are_bounded(capsys, argv, flag):
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(["bench", "eviction", *argv])
    assert ei.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


# F9: model config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("digits", [401, 5000])
def test_model_config_huge_ints_name_the_file_and_field(tmp_path, digits):
    from lmdeploy_hostcache.planner.geometry import geometry_from_hf_config

    p = tmp_path / "config.json"
    p.write_text('{"num_hidden_layers": %s, "num_attention_heads": 8, "hidden_size": 1024}' % ("9" * digits))
    with pytest.raises(ValueError, match=rf"model config {p}: field 'num_hidden_layers' must be a positive int "
                                         rf"<= 1048576 .*got an int of {digits} digits"):
        geometry_from_hf_config(p)


# F14: l3.weights_id read as a number by YAML --------------------------------------------------------------


def test_weights_id_must_be_quoted(tmp_path):
    for raw in ("0x1f", "0123", ".nan"):
        with pytest.raises(ConfigError, match=r"l3\.weights_id: got .*quote it in YAML"):
            load_config(_yaml(tmp_path, f"l3: {{master_address: 'a:1', weights_id: {raw}}}\n"))
    cfg = load_config(_yaml(tmp_path, "l3: {master_address: 'a:1', weights_id: \"0x1f\"}\n"))
    assert cfg.l3.weights_id == "0x1f"


# F15: l3 errors say what is allowed, not a Python exception ---------------------------------------------


@pytest.mark.parametrize("section, field, allowed", [
    ({"master_address": "a:" + "1" * 5000}, "master_address", "'host:port' with a port in 1..65535"),
    ({"master_address": "a:1", "timeout_ms": "²"}, "timeout_ms", "a whole number of milliseconds in 1..600000"),
    ({"master_address": "a:1", "timeout_ms": "9" * 5000}, "timeout_ms", "a whole number of milliseconds"),
])
def test_l3_errors_state_the_allowed_values(section, field, allowed):
    with pytest.raises(ConfigError) as ei:
        parse_l3_section(section)
    msg = str(ei.value)
    assert f"l3.{field}: got" in msg and allowed in msg
    assert "Exceeds the limit" not in msg and "invalid literal" not in msg


# F16: errors reach stderr ------------------------------------------------------------------------------------


def test_doctor_json_also_prints_the_config_error_to_stderr(tmp_path, capsys):
    p = _yaml(tmp_path, "host_cache_gb: -1\n")
    assert cli.main(["doctor", "--json", "--config", str(p)]) == 2
    cap = capsys.readouterr()
    assert json.loads(cap.out)["config"]["field"] == "host_cache_gb"
    assert cap.err.startswith("error: ") and "host_cache_gb" in cap.err and cap.err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["bench"]])
def test_a_missing_sub_command_is_a_usage_error_on_stderr(capsys, argv):
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("usage: ") and "error: give a" in cap.err


# bad-input audit (stop 43) ------------------------------------------------------------------------------


def _rows(tmp_path, name: str, n: int = 40):
    import gzip
    from pathlib import Path

    src = Path(cli.__file__).parent / "data" / "conversation_trace.jsonl.gz"
    p = tmp_path / name
    with gzip.open(src, "rt") as fh:
        p.write_text("".join(next(fh) for _ in range(n)))
    return p


def test_a_trace_behind_a_symlink_loop_is_named_unreadable_not_missing(tmp_path, capsys):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    for argv in (["plan", str(tmp_path / "a.jsonl")], ["bench", "eviction", "--trace", str(tmp_path / "a.jsonl")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "a.jsonl: cannot read it: Too many levels of symbolic links" in err and "Traceback" not in err


def test_a_trace_file_name_that_is_not_utf8_still_replays(tmp_path, capsys):
    name = os.fsdecode(b"bad\xffname.jsonl")
    _rows(tmp_path, name)
    assert cli.main(["plan", str(tmp_path / name), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 40


def test_bench_eviction_refuses_a_trace_with_no_requests_as_plan_does(tmp_path, capsys):
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"timestamp": 0, "input_length": 10')
    assert cli.main(["bench", "eviction", "--no-progress", "--trace", str(cut)]) == 2
    err = capsys.readouterr().err
    assert f"trace {cut} has no requests" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["plan", "--chat", "--seed", "-1"], ["bench", "index", "--seed", "-1"],
                                  ["bench", "route", "--seed", "-1"], ["bench", "eviction", "--generated-seed", "-1"]])
def test_a_negative_seed_is_refused_not_folded_onto_another(argv, capsys):
    """Python's random drops a seed's sign: -1 replayed seed 1's workload without a word."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and f"argument {argv[-2]}: expected an int in [0, " in capsys.readouterr().err


def test_bench_route_compare_refuses_the_timing_options_it_would_ignore(tmp_path, capsys):
    from pathlib import Path

    cluster = Path(cli.__file__).resolve().parents[1] / "examples" / "cluster.yaml"
    argv = ["bench", "route", "--compare", str(cluster), "--chat-sessions", "4"]
    assert cli.main([*argv, "--block-size", "16", "--nodes", "3"]) == 2
    assert "--block-size, --nodes set the router timing run; --compare replays a trace" in capsys.readouterr().err


@pytest.mark.parametrize("item", ["http://a:1=http://b:99999", "http://=http://b:2", "http://a:1=ftp://b:2"])
def test_a_feed_url_with_no_host_or_an_impossible_port_is_refused(item):
    from lmdeploy_hostcache.integration.proxy_routing import parse_feed_urls

    with pytest.raises(ValueError, match="--cache-aware-feed-url: expected NODE_URL=FEED_URL"):
        parse_feed_urls([item])
    assert parse_feed_urls(["http://a:1=http://b:2/feed"]) == {"http://a:1": "http://b:2/feed"}


def test_a_metadata_server_with_an_impossible_port_is_a_field_error():
    with pytest.raises(ConfigError, match="l3.metadata_server: got 'http://x:99999/metadata'"):
        parse_l3_section({"master_address": "127.0.0.1:50051", "metadata_server": "http://x:99999/metadata"})


def test_doctor_refuses_an_empty_config_path_as_the_server_does(capsys):
    assert cli.main(["doctor", "--config", ""]) == 2
    assert "--config: expected a file path, got an empty one" in capsys.readouterr().err
