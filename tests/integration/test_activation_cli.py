"""``lmdeploy serve api_server --host-cache-gb/--host-cache-config`` through LMDeploy's own parser
and its stock ``api_server`` body (the API server itself is replaced by a recorder)."""
from __future__ import annotations

import json
import sys
import types

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_hostcache.config import ConfigError  # noqa: E402
from lmdeploy_hostcache.integration import activate as act  # noqa: E402
from lmdeploy_hostcache.integration.cli_patch import apply_host_cache_args  # noqa: E402
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME  # noqa: E402


@pytest.fixture(scope="module")
def parser():
    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe

    if "api_server" not in SubCliServe.subparsers.choices:  # argparse refuses to add it twice
        CLI.add_parsers()
        SubCliServe.add_parsers()
    return CLI.parser


@pytest.fixture
def recorded(monkeypatch):
    """Replace lmdeploy.serve.openai.api_server (needs fastapi) by a recorder of serve() calls."""
    calls = []
    fake = types.ModuleType("lmdeploy.serve.openai.api_server")
    fake.serve = lambda model_path, **kwargs: calls.append((model_path, kwargs))
    monkeypatch.setitem(sys.modules, "lmdeploy.serve.openai.api_server", fake)
    return calls


def _run(parser, recorded, *argv):
    # --max-batch-size: LMDeploy would otherwise ask CUDA for the device name
    args = parser.parse_args(["serve", "api_server", *argv, "--max-batch-size", "8"])
    args.run(args)
    assert len(recorded) == 1
    return recorded[0][1]["backend_config"]


def test_flags_reach_the_engine_config(parser, recorded, tmp_path):
    cfg = _run(parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--host-cache-gb", "64")
    tc = cfg.kv_transfer_config
    assert (tc.kv_connector, tc.kv_role) == (CONNECTOR_NAME, "kv_both")
    assert tc.kv_connector_extra_config["hostcache_config"]["host_cache_gb"] == 64.0
    assert cfg.enable_prefix_caching is True


def test_config_file_and_underscore_spelling(parser, recorded, tmp_path):
    yaml_file = tmp_path / "hostcache.yaml"
    yaml_file.write_text("host_cache_gb: 8\nhost_kv_format: int8\nmin_restore_tokens: 512\n")
    cfg = _run(parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--host_cache_config", str(yaml_file), "--host_cache_gb", "auto")
    hc = cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_cache_gb"], hc["host_kv_format"], hc["min_restore_tokens"]) == ("auto", "int8", 512)


def test_without_the_flags_nothing_changes(parser, recorded, tmp_path):
    cfg = _run(parser, recorded, str(tmp_path), "--backend", "pytorch")
    assert cfg.kv_transfer_config is None


def test_a_different_kv_transfer_config_is_refused(parser, recorded, tmp_path):
    mooncake = json.dumps({"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both"})
    args = parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                              "--kv-transfer-config", mooncake, "--host-cache-gb", "4"])
    with pytest.raises(ValueError, match="--kv-transfer-config.*MooncakeStoreConnector"):
        args.run(args)
    assert recorded == []
    assert args.kv_transfer_config == json.loads(mooncake)  # untouched


def test_our_own_kv_transfer_config_merges(parser, recorded, tmp_path):
    ours = json.dumps({"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
                       "kv_connector_extra_config": {"min_restore_tokens": 32}})
    cfg = _run(parser, recorded, str(tmp_path), "--backend", "pytorch", "--enable-prefix-caching",
               "--kv-transfer-config", ours, "--host-cache-gb", "2")
    hc = cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_cache_gb"], hc["min_restore_tokens"]) == (2.0, 32)


def test_turbomind_backend_is_refused(parser, recorded, tmp_path):
    args = parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "turbomind",
                              "--host-cache-gb", "4"])
    with pytest.raises(ValueError, match="--backend pytorch"):
        args.run(args)
    assert recorded == []


def test_bad_gb_is_an_argparse_error(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "api_server", "m", "--host-cache-gb", "-3"])
    assert "host_cache_gb" in capsys.readouterr().err


def test_bad_config_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("host_kv_format: fp3\n")
    args = types.SimpleNamespace(backend="pytorch", host_cache_gb=None, host_cache_config=str(bad),
                                 kv_transfer_config=None)
    with pytest.raises(ConfigError, match="host_kv_format"):
        apply_host_cache_args(args)
    assert args.kv_transfer_config is None
