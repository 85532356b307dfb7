"""`lmdeploy serve proxy` refuses bad cache-aware input with one ``lmdeploy serve proxy: error: ...`` line and
exit code 2, before it serves, never with a traceback (audit r2, r4 and the ``--cache-aware-feed-url`` refusal):

- a ``--cache-aware-model`` that does not exist, is a folder without ``config.json``, or whose tokenizer cannot
  be loaded;
- ``--cache-aware-*`` options given (a value other than the default) without ``--routing-strategy cache_aware``
  (the stock strategy would silently ignore them); stock invocations, defaults spelled out included, are
  untouched;
- a malformed ``--cache-aware-feed-url``.

The CLI tests start the real ``lmdeploy serve proxy`` on 127.0.0.1 with a bounded timeout; a start that is not
refused would serve until that timeout (the test then fails)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_hostcache.integration import proxy_routing

LMDEPLOY = str(Path(sys.executable).with_name("lmdeploy"))
PREFIX = "lmdeploy serve proxy: error: "


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_proxy(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("LMDEPLOY_HOSTCACHE_CLUSTER_SECRET", None)
    return subprocess.run([LMDEPLOY, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(_port()),
                           *argv], capture_output=True, text=True, timeout=90, env=env, stdin=subprocess.DEVNULL)


def _refused_line(p: subprocess.CompletedProcess) -> str:
    """The one error line of a refused start: exit 2, no traceback, nothing served."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "Uvicorn running" not in p.stderr + p.stdout, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith(PREFIX)]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmdeploy serve proxy")
    p.add_argument("--routing-strategy", default=proxy_routing.STOCK_DEFAULT,
                   choices=["random", "min_expected_latency", "min_observed_latency"])
    p.add_argument("--serving-strategy", default="Hybrid")
    proxy_routing.add_proxy_arguments(p)
    return p


@pytest.fixture
def wrapped(monkeypatch):
    """wrap_proxy around a recording stock command; ``install`` builds the RoutingService only (the live proxy
    module is not patched)."""
    ran, installed = [], []

    def fake_install(options):
        installed.append(options)
        return proxy_routing.RoutingService(options)

    monkeypatch.setattr(proxy_routing, "install", fake_install)
    monkeypatch.delenv("LMDEPLOY_HOSTCACHE_CLUSTER_SECRET", raising=False)
    return proxy_routing.wrap_proxy(lambda args: ran.append(vars(args).copy())), ran, installed


def _refused_in_process(capsys, wrapped_cmd, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        wrapped_cmd(_parser().parse_args(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and err.count("\n") == 1, err
    assert str(info.value) == err[len(PREFIX):].rstrip("\n")
    return err


# ------------------------------------------------------------------------------ the real CLI
def test_a_missing_model_path_is_one_error_line_naming_the_option():
    line = _refused_line(_serve_proxy("--routing-strategy", "cache_aware", "--cache-aware-model", "/nonexistent/model"))
    assert "--cache-aware-model" in line and "/nonexistent/model" in line and "no such file or folder" in line


def test_a_model_folder_without_config_is_one_error_line_naming_the_option(tmp_path):
    line = _refused_line(_serve_proxy("--routing-strategy", "cache_aware", "--cache-aware-model", str(tmp_path)))
    assert "--cache-aware-model" in line and str(tmp_path) in line and "config.json" in line
    assert "Could not find model architecture" not in line


def test_cache_aware_options_without_the_strategy_are_refused_naming_them():
    line = _refused_line(_serve_proxy("--cache-aware-model", "/nonexistent/model", "--cache-aware-feed-port", "23400"))
    assert "--cache-aware-model, --cache-aware-feed-port" in line
    assert "add --routing-strategy cache_aware" in line


def test_a_malformed_feed_url_is_one_error_line_and_exit_2():
    line = _refused_line(_serve_proxy("--routing-strategy", "cache_aware", "--cache-aware-feed-url", "garbage"))
    assert line == PREFIX + "--cache-aware-feed-url: expected NODE_URL=FEED_URL with http(s) URLs (a host, a port up to 65535), got 'garbage'"
    # without the strategy it is an ignored option: refused the same way
    line = _refused_line(_serve_proxy("--cache-aware-feed-url", "garbage"))
    assert "--cache-aware-feed-url" in line and "add --routing-strategy cache_aware" in line


# ------------------------------------------------------------------------------ wrap_proxy in process
@pytest.mark.parametrize("argv", [
    [],
    ["--routing-strategy", "random"],
    ["--routing-strategy", "min_observed_latency", "--serving-strategy", "DistServe"],
    # every option spelled out at its default: nothing would be ignored
    ["--cache-aware-balance", "1.3", "--cache-aware-block-size", "64", "--cache-aware-gpu-blocks", "4096",
     "--cache-aware-host-blocks", "0", "--cache-aware-feed-interval", "1", "--cache-aware-feed-timeout", "10",
     "--cache-aware-error-cooldown", "10"],
])
def test_stock_invocations_run_the_stock_command_untouched(wrapped, argv, capsys):
    cmd, ran, installed = wrapped
    args = _parser().parse_args(argv)
    before = vars(args).copy()
    cmd(args)
    assert ran == [before] and not installed
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option,value", [
    ("--cache-aware-model", "m"), ("--cache-aware-feed-interval", "2"), ("--cache-aware-feed-timeout", "5"),
    ("--cache-aware-feed-port", "23400"), ("--cache-aware-feed-url", "http://127.0.0.1:1=http://127.0.0.1:2"),
    ("--cache-aware-feed-api-key", "k"), ("--cache-aware-error-cooldown", "1"), ("--cache-aware-balance", "2"),
    ("--cache-aware-block-size", "32"), ("--cache-aware-gpu-blocks", "8"), ("--cache-aware-host-blocks", "8"),
])
def test_each_cache_aware_option_given_without_the_strategy_is_refused(wrapped, option, value, capsys):
    cmd, ran, installed = wrapped
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "random", option, value])
    assert err.startswith(f"{PREFIX}{option} applies only to --routing-strategy cache_aware")
    assert "--routing-strategy random" in err and "add --routing-strategy cache_aware" in err
    assert not ran and not installed


def test_the_parser_defaults_are_the_ones_the_refusal_compares_with():
    args = _parser().parse_args([])
    assert {k: getattr(args, "cache_aware_" + k) for k in proxy_routing.OPTION_DEFAULTS} == \
        proxy_routing.OPTION_DEFAULTS
    assert proxy_routing.given_cache_aware_options(args) == []


def test_the_other_cache_aware_refusals_are_error_lines_with_exit_2(wrapped, capsys, monkeypatch):
    cmd, ran, installed = wrapped
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "cache_aware", "--cache-aware-feed-url",
                                            "127.0.0.1:24001"])
    assert "--cache-aware-feed-url: expected NODE_URL=FEED_URL" in err
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "cache_aware", "--serving-strategy", "DistServe"])
    assert "needs --serving-strategy Hybrid" in err
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "cache_aware", "--cache-aware-balance", "0.5"])
    assert "--cache-aware-balance must be >= 1" in err
    monkeypatch.setenv("LMDEPLOY_HOSTCACHE_CLUSTER_SECRET", "short")
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "cache_aware"])
    assert "LMDEPLOY_HOSTCACHE_CLUSTER_SECRET" in err
    assert not ran and not installed


def test_a_model_whose_tokenizer_cannot_load_is_refused_naming_the_option(wrapped, tmp_path, capsys):
    """config.json there, no tokenizer files: the loader's message on one line, after the option and path."""
    cmd, ran, installed = wrapped
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    err = _refused_in_process(capsys, cmd, ["--routing-strategy", "cache_aware", "--cache-aware-model", str(tmp_path)])
    assert err.startswith(f"{PREFIX}--cache-aware-model {str(tmp_path)!r}: cannot load its tokenizer")
    assert len(installed) == 1 and not ran   # refused while building the service, before the stock command


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_load_encoder_refuses_what_is_not_a_model_folder(tmp_path, kind):
    path = {"missing": tmp_path / "nope", "file": tmp_path / "f", "empty": tmp_path}[kind]
    if kind == "file":
        path.write_text("x")
    with pytest.raises(proxy_routing.ModelLoadError, match="--cache-aware-model") as info:
        proxy_routing.load_encoder(str(path))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
