"""Hostile or mistaken input to the settings, the planner, the benches and the proxy flags (an audit of
stop 33): one named error and a non-zero exit, never a traceback, a hang or memory that follows a typo."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lmdeploy_hostcache.cli"]


def _config_error(tmp_path, text: str) -> str:
    p = tmp_path / "hostcache.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    return str(ei.value)


@pytest.mark.parametrize("text, match", [
    ("host_cache_gb: 1e300\n", "host_cache_gb: got 1e+300 (float); allowed: a number of GiB in [0, 1048576]"),
    ("host_memory_reserve_gb: 2000000\n", "host_memory_reserve_gb: got 2000000"),
    ("capture_max_mb: 1e308\n", "capture_max_mb: got 1e+308"),
    ('min_restore_tokens: "²"\n', "min_restore_tokens: got '²'"),
    ("host_cache_gb: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
    ("host_cache_gb: " + "9" * 5000 + "\n", "a value cannot be read"),
])
def test_settings_refuse_absurd_values_naming_the_field(tmp_path, text, match):
    assert match in _config_error(tmp_path, text)


def test_an_alias_bomb_gives_a_short_error_not_gigabytes(tmp_path):
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    msg = _config_error(tmp_path, "\n".join(lines) + "\ntenant_salt: *a7\n")
    assert "tenant_salt: got [[[" in msg and len(msg) < 5000


def _plan(capsys, *argv):
    rc = main(["plan", "--limit", "20", "--quiet", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("argv, match", [
    (["--host-gb", "1e300"], "host_gb must be a number of GiB in [0, 1e+12]"),
    (["--gpu-kv-gb", "1e300"], "gpu_kv_gb must be a number of GiB in [0, 1e+12]"),
    (["--cluster", str(REPO / "examples" / "cluster.yaml"), "--l3-gb", "1e300"], "--l3-gb must be a number of GiB"),
    (["--model", "/proc/self/mem"], "model config /proc/self/mem cannot be read"),
])
def test_plan_refuses_absurd_sizes_and_unreadable_model_configs(capsys, argv, match):
    rc, err = _plan(capsys, *argv)
    assert rc == 2 and match in err, err


def test_model_config_folder_and_bad_bytes(capsys, tmp_path):
    (tmp_path / "m1" / "config.json").mkdir(parents=True)
    rc, err = _plan(capsys, "--model", str(tmp_path / "m1"))
    assert rc == 2 and "cannot be read" in err
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "config.json").write_bytes(b'{"x": "\xff"}')
    rc, err = _plan(capsys, "--model", str(tmp_path / "m2"))
    assert rc == 2 and "is not UTF-8 text" in err


@pytest.mark.parametrize("extra, match", [
    ("host_policy: {a: 1}\n", "host_policy must be one of"),
    ("routing: [session]\n", "routing must be one of"),
])
def test_cluster_values_of_the_wrong_kind_are_named(capsys, tmp_path, extra, match):
    p = tmp_path / "c.yaml"
    text = "nodes:\n  - {name: a, gpu_kv_gb: 10, host_gb: " + "1" + "0" * 400 + "}\n"
    p.write_text("routing: session\n" + text)
    rc, err = _plan(capsys, "--cluster", str(p))
    assert rc == 2 and "nodes[0].host_gb must be a number in [0, 1e+12], got an int of 1329 bits" in err
    p.write_text(("" if extra.startswith("routing") else "routing: session\n") + extra
                 + "nodes:\n  - {name: a, gpu_kv_gb: 10, host_gb: 10}\n")
    rc, err = _plan(capsys, "--cluster", str(p))
    assert rc == 2 and match in err, err


def test_a_calibration_nested_too_deeply_is_one_error(tmp_path):
    from lmdeploy_hostcache.restore_cost import CalibrationError, load_calibration

    p = tmp_path / "cal.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CalibrationError, match="nested too deeply"):
        load_calibration(str(p))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_output_device_is_one_error_line():
    with open("/dev/full", "w") as full:
        p = subprocess.run([*CLI, "plan", "--limit", "20", "--quiet", "--json"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == "error: cannot write the output: No space left on device"


def test_plot_paths_name_the_file_written(capsys, tmp_path):
    with pytest.raises(SystemExit) as ei:      # argparse refuses it: usage and one error line
        main(["plan", "--sweep", "--plot", str(tmp_path)])
    assert ei.value.code == 2 and "is a folder" in capsys.readouterr().err
    rc = main(["plan", "--limit", "20", "--quiet", "--sweep", "--sweep-values", "0,10", "--plot", str(tmp_path / "sw")])
    out = capsys.readouterr().out
    assert rc == 0 and f"plot: {tmp_path / 'sw.png'}" in out and (tmp_path / "sw.png").exists()


@pytest.mark.parametrize("argv, match", [
    (["--cache-aware-host-blocks", "-5"], "must be >= 0"),
    (["--cache-aware-feed-interval", "inf"], "at most 3600"),
    (["--cache-aware-feed-port", "99999"], "at most 65535"),
])
def test_proxy_flags_are_bounded(capsys, argv, match):
    from lmdeploy_hostcache.integration.proxy_routing import add_proxy_arguments

    p = argparse.ArgumentParser(prog="proxy")
    p.add_argument("--routing-strategy", choices=["random"])
    add_proxy_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(argv)
    assert match in capsys.readouterr().err


def test_soak_refuses_an_unwritable_json_path_before_running():
    p = subprocess.run([*CLI, "soak", "--seconds", "1", "--json", "/proc/nonexistent/x.json"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().startswith("error: lmdeploy-hostcache soak: --json /proc/nonexistent/x.json: cannot write")


def test_soak_and_plan_refuse_a_fifo_at_once_instead_of_waiting_for_a_peer(tmp_path):
    """A FIFO with no peer given as soak's --json or plan's --model (or its config.json) used to block
    for ever on the open."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    for argv, needle in ((["soak", "--seconds", "1", "--json", str(fifo)], "it is a FIFO (named pipe), not a regular file"),
                         (["plan", "--model", str(fifo), "--limit", "5"], "is a FIFO (named pipe), not a regular file"),
                         (["plan", "--model", str(model), "--limit", "5"], "is a FIFO (named pipe), not a regular file")):
        p = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, (argv, p.stderr)


def test_sizes_beyond_the_machine_s_memory_are_one_line_not_a_traceback(capsys, monkeypatch):
    """A MemoryError from sizes the options asked for (a generated workload, a table) is one line and exit 2;
    bench index's largest sizes, which asked numpy for about 48 TiB, are refused by their product."""
    from lmdeploy_hostcache.bench import index
    from lmdeploy_hostcache.cli import main

    assert main(["bench", "index", "--blocks", "100000000", "--block-size", "65536"]) == 2
    err = capsys.readouterr().err
    assert "--blocks x --block-size must be at most 268,435,456 tokens" in err and err.count("\n") == 1, err
    assert main(["bench", "index", "--blocks", "1", "--block-size", "65536", "--metadata-blocks", "100000000"]) == 2
    assert "--metadata-blocks x --block-size must be at most" in capsys.readouterr().err
    assert main(["bench", "index", "--blocks", "4", "--block-size", "1", "--repeats", "1"]) == 2   # was a traceback
    assert "--block-size must be in [2, 65536], got 1" in capsys.readouterr().err

    def too_big(args):
        raise MemoryError

    monkeypatch.setattr(index, "measure", too_big)
    assert main(["bench", "index", "--blocks", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lmdeploy-hostcache bench: out of memory") and err.count("\n") == 1, err
