"""``lmdeploy serve api_server --host-cache-gb/--host-cache-config`` through LMDeploy's own parser
and its stock ``api_server`` body (the API server itself is replaced by a recorder)."""
from __future__ import annotations

import json
import sys
import types

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_hostcache.config import ConfigError  # noqa: E402
from lmdeploy_hostcache.integration.cli_patch import apply_host_cache_args  # noqa: E402
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME  # noqa: E402


def _run(lmdeploy_parser, recorded, *argv):
    # --max-batch-size: LMDeploy would otherwise ask CUDA for the device name
    args = lmdeploy_parser.parse_args(["serve", "api_server", *argv, "--max-batch-size", "8"])
    args.run(args)
    assert len(recorded) == 1
    return recorded[0][1]["backend_config"]


def test_flags_reach_the_engine_config(lmdeploy_parser, recorded, tmp_path):
    # a size this machine holds: one above its total RAM is refused at the command line (test_startup_audit.py)
    cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--host-cache-gb", "2")
    tc = cfg.kv_transfer_config
    assert (tc.kv_connector, tc.kv_role) == (CONNECTOR_NAME, "kv_both")
    assert tc.kv_connector_extra_config["hostcache_config"]["host_cache_gb"] == 2.0
    assert cfg.enable_prefix_caching is True


def test_config_file_and_underscore_spelling(lmdeploy_parser, recorded, tmp_path):
    yaml_file = tmp_path / "hostcache.yaml"
    yaml_file.write_text("host_cache_gb: 8\nhost_kv_format: int8\nmin_restore_tokens: 512\n")
    cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--host_cache_config", str(yaml_file), "--host_cache_gb", "auto")
    hc = cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_cache_gb"], hc["host_kv_format"], hc["min_restore_tokens"]) == ("auto", "int8", 512)


def test_without_the_flags_nothing_changes(lmdeploy_parser, recorded, tmp_path):
    cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch")
    assert cfg.kv_transfer_config is None


def _refused(args, capsys, match):
    """One argparse-style line on stderr and exit 2, before the engine starts (issue 9 item 7)."""
    import re

    with pytest.raises(SystemExit) as info:
        args.run(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmdeploy serve api_server: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert "Traceback" not in err
    return err


def test_a_different_kv_transfer_config_is_refused(lmdeploy_parser, recorded, tmp_path, capsys):
    mooncake = json.dumps({"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both"})
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                              "--kv-transfer-config", mooncake, "--host-cache-gb", "4"])
    _refused(args, capsys, "--kv-transfer-config.*MooncakeStoreConnector")
    assert recorded == []
    assert args.kv_transfer_config == json.loads(mooncake)  # untouched


def test_our_own_kv_transfer_config_merges(lmdeploy_parser, recorded, tmp_path):
    ours = json.dumps({"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
                       "kv_connector_extra_config": {"min_restore_tokens": 32}})
    cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--kv-transfer-config", ours, "--host-cache-gb", "2")
    hc = cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_cache_gb"], hc["min_restore_tokens"]) == (2.0, 32)


def test_a_model_lmdeploy_would_run_on_turbomind_is_refused(lmdeploy_parser, recorded, tmp_path, capsys,
                                                            monkeypatch):
    """Stock ``api_server`` resolves every ``--backend`` but pytorch (turbomind, its default, included) with
    ``autoget_backend``: the flags are refused when that gives TurboMind, and work when it falls back to PyTorch
    (TurboMind not built, or the model not supported by it), as a raw ``--kv-transfer-config`` does."""
    import lmdeploy.archs

    for argv in (["--backend", "turbomind"], []):
        monkeypatch.setattr(lmdeploy.archs, "autoget_backend", lambda path, trust_remote_code=False: "turbomind")
        args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), *argv, "--host-cache-gb", "4"])
        _refused(args, capsys, "--backend pytorch .*LMDeploy would run turbomind for this model")
        assert recorded == []
        monkeypatch.setattr(lmdeploy.archs, "autoget_backend", lambda path, trust_remote_code=False: "pytorch")
        cfg = _run(lmdeploy_parser, recorded, str(tmp_path), *argv, "--enable-prefix-caching", "--host-cache-gb", "2")
        assert cfg.kv_transfer_config.kv_connector == CONNECTOR_NAME
        recorded.clear()


@pytest.mark.parametrize("argv, match", [
    (["--role", "Prefill"], "role Prefill: only role=Hybrid"),
    (["--tp", "2", "--distributed-executor-backend", "mp"], "'mp' with world_size=2"),
    (["--ep", "2", "--distributed-executor-backend", "mp"], "'mp' with world_size=2"),
    (["--tp", "2", "ENV:mp"], "'mp' with world_size=2"),
    (["--quant-policy", "4", "--host-cache-config", "INT4"], "host_kv_format.*--quant-policy 4 already packs"),
])
def test_what_the_engine_would_refuse_from_the_arguments_is_one_line_here(lmdeploy_parser, recorded, tmp_path,
                                                                          capsys, monkeypatch, argv, match):
    """Refusals the engine process would make from the arguments alone come before it starts, as one line: in
    the engine process they end in tracebacks and RPCServerDeadError, exit 1.  Without the executor flag LMDeploy
    takes $LMDEPLOY_EXECUTOR_BACKEND ("ENV:mp" sets it)."""
    for a in argv:
        if a.startswith("ENV:"):
            monkeypatch.setenv("LMDEPLOY_EXECUTOR_BACKEND", a[4:])
    argv = [a for a in argv if not a.startswith("ENV:")]
    int4 = tmp_path / "int4.yaml"
    int4.write_text("host_cache_gb: 1\nhost_kv_format: int4\n")
    argv = [str(int4) if a == "INT4" else a for a in argv]
    gb = [] if "--host-cache-config" in argv else ["--host-cache-gb", "1"]
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                                       "--enable-prefix-caching", *gb, *argv])
    _refused(args, capsys, match)
    assert recorded == []


def test_a_model_the_engine_would_refuse_is_refused_here(lmdeploy_parser, recorded, tmp_path, capsys):
    """A sliding-window model: the engine refuses it from its config before the weights load, here it is one line;
    the same folder without the window starts."""
    from lmdeploy_hostcache.testing.models import write_tiny_model

    model = write_tiny_model(tmp_path / "qwen2", "qwen2", seed=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, use_sliding_window=True, sliding_window=32,
                                                       max_window_layers=0)))
    capsys.readouterr()                      # the model writer's progress bar
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(model), "--backend", "pytorch",
                                       "--enable-prefix-caching", "--host-cache-gb", "1"])
    _refused(args, capsys, "window attention")
    assert recorded == []
    (model / "config.json").write_text(json.dumps(config))
    assert _run(lmdeploy_parser, recorded, str(model), "--backend", "pytorch", "--enable-prefix-caching",
                "--host-cache-gb", "1").kv_transfer_config.kv_connector == CONNECTOR_NAME


def test_bad_gb_is_an_argparse_error(lmdeploy_parser, capsys):
    with pytest.raises(SystemExit):
        lmdeploy_parser.parse_args(["serve", "api_server", "m", "--host-cache-gb", "-3"])
    assert "host_cache_gb" in capsys.readouterr().err


def test_bad_config_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("host_kv_format: fp3\n")
    args = types.SimpleNamespace(backend="pytorch", host_cache_gb=None, host_cache_config=str(bad),
                                 kv_transfer_config=None)
    with pytest.raises(ConfigError, match="host_kv_format"):
        apply_host_cache_args(args)
    assert args.kv_transfer_config is None


# -- issue 9: the off switch and one-line refusals on the serve path ----------------------------


@pytest.mark.parametrize("how", ["flag", "file"])
def test_host_cache_gb_0_is_the_stock_engine(lmdeploy_parser, recorded, tmp_path, how, caplog):
    """Item 6: 0 is "tier off", not a refusal, even without --enable-prefix-caching or with turbomind."""
    if how == "flag":
        extra = ["--host-cache-gb", "0"]
    else:
        f = tmp_path / "off.yaml"
        f.write_text("host_cache_gb: 0\nhost_kv_format: int8\n")
        extra = ["--host-cache-config", str(f)]
    cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch", *extra)
    assert cfg.kv_transfer_config is None and cfg.enable_prefix_caching is False


def test_missing_prefix_caching_is_refused_at_the_command_line(lmdeploy_parser, recorded, tmp_path, capsys):
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch", "--host-cache-gb", "4"])
    _refused(args, capsys, "--enable-prefix-caching")
    assert recorded == []


@pytest.mark.parametrize("content, match", [
    (b"host_kv_format: fp3\n", "host_kv_format"),
    (b"\x00\x01binary", "binary data"),
    (b"host_cache_gb: \xff\xfe 4\n", "not UTF-8"),
    (b"host_cache_gb: [4\n", "not valid YAML"),
    (b"host_cache_gb: 4\nhost_cache_gb: 8\n", "duplicate key 'host_cache_gb'"),
    (None, "is a folder"),
    ("missing", "no such file"),
])
def test_bad_config_file_is_one_line_and_exit_2(lmdeploy_parser, recorded, tmp_path, capsys, content, match):
    f = tmp_path / "hostcache.yaml"
    if content is None:
        f.mkdir()
    elif content != "missing":
        f.write_bytes(content)
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
                              "--host-cache-config", str(f)])
    err = _refused(args, capsys, match)
    assert str(f) in err
    assert recorded == []


def test_empty_config_file_is_auto_and_says_so_once(lmdeploy_parser, recorded, tmp_path, caplog):
    """Item 10: an empty file silently meant `auto` (up to half of RAM pinned); now one log line says so."""
    f = tmp_path / "empty.yaml"
    f.write_text("")
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache"):
        cfg = _run(lmdeploy_parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
                   "--host-cache-config", str(f))
    assert cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]["host_cache_gb"] == "auto"
    said = [r.getMessage() for r in caplog.records if "is empty" in r.getMessage()]
    assert len(said) == 1 and str(f) in said[0] and "'auto'" in said[0], said
