"""Start-up refusals of what the engine would only log (audit bad_input items 10 and 11).

10: the package's environment variables the engine process reads at start-up with the tier on (the cache-state
feed's ``LMDEPLOY_HOSTCACHE_FEED_ADDR``, its exposure and ``LMDEPLOY_HOSTCACHE_CLUSTER_SECRET``; the capture's
``LMDEPLOY_HOSTCACHE_CAPTURE_KEY``) are parsed by ``lmdeploy serve api_server`` with the functions the engine
uses, and a bad value is one ``error:`` line naming the variable, exit 2. 11: a ``capture`` path the capture
could not write (a missing or unwritable folder, a folder or FIFO at the path) is refused by the serve command
(naming the flag and path, or the file and field) and reported by ``doctor --config`` (exit 2).

No server starts: the serve command is ``cli_patch.wrap_api_server`` around a stand-in (or LMDeploy's own
parser and ``api_server`` body with the API server replaced by a recorder), and the machine's RAM is synthetic.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import test_startup_audit as audit

from lmdeploy_hostcache import cli, config, hostmem
from lmdeploy_hostcache.hostmem import GIB, HostMemoryFacts
from lmdeploy_hostcache.integration.cli_patch import wrap_api_server
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME

FEED = "LMDEPLOY_HOSTCACHE_FEED_ADDR"
SECRET = "LMDEPLOY_HOSTCACHE_CLUSTER_SECRET"
KEYS = "LMDEPLOY_HOSTCACHE_FEED_API_KEYS"
OPEN = "LMDEPLOY_HOSTCACHE_FEED_UNAUTHENTICATED"
CAPTURE_KEY = "LMDEPLOY_HOSTCACHE_CAPTURE_KEY"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No package variable from the calling shell; an 8 GiB machine (what the size checks read)."""
    for name in (FEED, SECRET, KEYS, OPEN, CAPTURE_KEY, "LMDEPLOY_HOSTCACHE_CALIBRATION"):
        monkeypatch.delenv(name, raising=False)
    facts = HostMemoryFacts(total_bytes=8 * GIB, available_bytes=6 * GIB)
    monkeypatch.setattr(hostmem, "read_host_memory", lambda *a, **k: facts)


def _refused(capsys, **kw) -> str:
    """The serve command on ``kw`` (a 1 GiB tier unless given): one ``error:`` line, exit 2, never served."""
    return audit._refused(capsys, **{"host_cache_gb": 1.0, **kw})


def _served(**kw) -> argparse.Namespace:
    return audit._served(**{"host_cache_gb": 1.0, **kw})


_raw = audit._raw


# 10: the environment the engine reads at start-up ---------------------------------------------------------


@pytest.mark.parametrize("addr", ["notanaddr", "127.0.0.1:99999", "[::1]", "::1:80", "host:"])
def test_a_bad_feed_address_is_refused_naming_the_variable(monkeypatch, capsys, addr):
    monkeypatch.setenv(FEED, addr)
    err = _refused(capsys)
    assert f"{FEED} must be HOST:PORT" in err and repr(addr) in err and "cache-state feed would not start" in err


def test_the_audit_s_address_and_short_secret_are_refused(monkeypatch, capsys):
    """The audit's repro: the server started and logged "cache-state feed not started" once."""
    monkeypatch.setenv(FEED, "notanaddr")
    monkeypatch.setenv(SECRET, "short")
    assert f"error: {FEED} must be HOST:PORT" in _refused(capsys)
    monkeypatch.setenv(FEED, "127.0.0.1:23999")   # a good address: the secret is next, as in the engine
    err = _refused(capsys)
    assert f"error: {SECRET} must be at least 16 characters" in err and "got 5" in err and "short" not in err


def test_an_unauthenticated_feed_on_a_public_address_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(FEED, "0.0.0.0:23999")
    err = _refused(capsys)
    assert KEYS in err and OPEN in err
    monkeypatch.setenv(KEYS, "k1")       # either way out is accepted, as the engine accepts it
    _served()
    monkeypatch.delenv(KEYS)
    monkeypatch.setenv(OPEN, "1")
    _served()


def test_good_feed_settings_are_served_and_nothing_binds_the_port(monkeypatch):
    import socket

    with socket.socket() as s:   # a port held here: the serve command does not bind it (the engine does)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for addr in (f"127.0.0.1:{port}", str(port), f"[::1]:{port}", f"localhost:{port}"):
            monkeypatch.setenv(FEED, addr)
            monkeypatch.setenv(SECRET, "s" * 16)
            _served()


def test_feed_variables_are_not_read_when_the_engine_would_not_read_them(monkeypatch, tmp_path):
    monkeypatch.setenv(SECRET, "short")      # without a feed address the engine never reads the secret
    _served()
    monkeypatch.setenv(FEED, "notanaddr")    # the tier off: no connector, no feed; nothing refused
    _served(host_cache_gb=0.0)
    _served(host_cache_gb=None, kv_transfer_config=None)   # no flag at all: stock LMDeploy


def test_a_raw_transfer_config_is_checked_for_the_environment_too(monkeypatch, capsys):
    monkeypatch.setenv(FEED, "notanaddr")
    err = _refused(capsys, host_cache_gb=None, kv_transfer_config=_raw({"host_cache_gb": 1}))
    assert f"{FEED} must be HOST:PORT" in err


def test_a_bad_capture_key_is_refused_when_capture_is_on(monkeypatch, capsys, tmp_path):
    cap = str(tmp_path / "cap.jsonl")
    monkeypatch.setenv(CAPTURE_KEY, "abc12")
    err = _refused(capsys, host_cache_capture=cap)
    assert f"error: {CAPTURE_KEY}: expected 32 hex digits" in err and "abc12" not in err
    _served()                                   # no capture: the key is never read
    monkeypatch.setenv(CAPTURE_KEY, "0f" * 16)
    _served(host_cache_capture=cap)
    assert not os.path.exists(cap)              # checked, not created


# 11: capture paths that cannot work -----------------------------------------------------------------------


def _fifo(tmp_path):
    p = tmp_path / "fifo.jsonl"
    os.mkfifo(p)
    return p


def _unwritable_folder(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:   # root writes anywhere: the check asks os.access, which says what a user would get
        real = os.access
        monkeypatch.setattr(os, "access",
                            lambda p, mode, **kw: os.fspath(p) != str(d) and real(p, mode, **kw))
    return d / "x.jsonl"


@pytest.mark.parametrize("make, words", [
    (lambda tmp, mp: "/nonexistent/d/x.jsonl", "its folder /nonexistent/d does not exist"),
    (lambda tmp, mp: tmp / "no" / "x.jsonl", "does not exist"),
    (lambda tmp, mp: (tmp / "file").write_text("") or tmp / "file" / "x.jsonl", "/file is not a folder"),
    (lambda tmp, mp: (tmp / "file").write_text("") or tmp / "file" / "d" / "x.jsonl", "a part of that path is a file"),
    (lambda tmp, mp: (tmp / "dir.jsonl").mkdir() or tmp / "dir.jsonl", "it is a folder, not a regular file"),
    (lambda tmp, mp: _fifo(tmp), "it is a FIFO (named pipe), not a regular file"),
    (lambda tmp, mp: _unwritable_folder(tmp, mp), "is not writable by this user"),
], ids=["missing-root", "missing-folder", "file-as-folder", "file-above-folder", "folder", "fifo", "unwritable-folder"])
def test_a_capture_path_that_cannot_work_is_refused_by_serve_and_doctor(tmp_path, monkeypatch, capsys, make, words):
    path = str(make(tmp_path, monkeypatch))
    err = _refused(capsys, host_cache_capture=path)
    assert f"error: --host-cache-capture {path}: " in err and words in err
    conf = tmp_path / "hc.yaml"
    conf.write_text(f"host_cache_gb: 1\ncapture: {json.dumps(path)}\n")
    err = _refused(capsys, host_cache_gb=None, host_cache_config=str(conf))
    assert f"error: {conf}: invalid host-cache config: capture: {path}: " in err and words in err
    assert cli.main(["doctor", "--config", str(conf)]) == 2
    out = capsys.readouterr()
    assert f"{conf}: INVALID (capture; error below)" in out.out and words in out.err
    off = tmp_path / "off.yaml"                 # the tier off captures nothing: no refusal
    off.write_text(f"host_cache_gb: 0\ncapture: {json.dumps(path)}\n")
    assert cli.main(["doctor", "--config", str(off)]) in (0, 1)
    assert "INVALID" not in capsys.readouterr().out
    assert words in config.capture_path_problem(path)


def test_capture_paths_that_work_are_accepted_and_not_created(tmp_path, monkeypatch, capsys):
    new = tmp_path / "new.jsonl"
    old = tmp_path / "old.jsonl"
    old.write_text("{}\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(old)
    for path in (new, old, link):
        _served(host_cache_capture=str(path))
    monkeypatch.chdir(tmp_path)                 # a relative path: against the folder the server starts in
    _served(host_cache_capture="rel.jsonl")
    assert not new.exists() and not (tmp_path / "rel.jsonl").exists()
    conf = tmp_path / "hc.yaml"
    conf.write_text(f"host_cache_gb: 1\ncapture: {json.dumps(str(new))}\n")
    assert cli.main(["doctor", "--config", str(conf)]) in (0, 1)
    assert f"{conf}: valid" in capsys.readouterr().out
    assert [config.capture_path_problem(p) for p in (new, old, link, "rel.jsonl")] == [None] * 4


def test_the_flag_is_refused_through_lmdeploy_s_own_serve_command(lmdeploy_parser, recorded, tmp_path, capsys,
                                                                  monkeypatch):
    """LMDeploy's parser and ``api_server`` body (the audit's command line), the API server a recorder."""
    def run(*extra):
        args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                                           "--enable-prefix-caching", "--host-cache-gb", "1", "--max-batch-size",
                                           "8", *extra])
        with pytest.raises(SystemExit) as ei:
            args.run(args)
        assert ei.value.code == 2 and recorded == []
        err = capsys.readouterr().err
        assert err.startswith("lmdeploy serve api_server: error: ") and err.count("\n") == 1, err
        return err

    assert "--host-cache-capture /nonexistent/d/x.jsonl: its folder" in run("--host-cache-capture",
                                                                            "/nonexistent/d/x.jsonl")
    monkeypatch.setenv(FEED, "notanaddr")
    assert f"{FEED} must be HOST:PORT" in run()
