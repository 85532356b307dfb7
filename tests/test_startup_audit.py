"""Start-up audit (/tmp/audit_start): every refusal the serve flags, a raw ``--kv-transfer-config`` naming
the host tier, ``doctor`` and the config loader owe is one clear message naming the file, flag or field,
exit 2, and no traceback; before any engine starts, and never a hang.

No server is started: the serve command is ``cli_patch.wrap_api_server`` around a stand-in that fails the
test if it is reached (or LMDeploy's own parser and ``api_server`` body with the API server replaced by a
recorder), and the machine's RAM is a synthetic ``HostMemoryFacts`` where a figure matters, so that these
tests pass on any CI machine."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import types

import pytest

from lmdeploy_hostcache import cli, hostmem
from lmdeploy_hostcache.config import ConfigError, HostCacheConfig
from lmdeploy_hostcache.hostmem import GIB, HostMemoryFacts, resolve_host_cache_bytes
from lmdeploy_hostcache.integration.cli_patch import apply_host_cache_args, wrap_api_server
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME, supported_problems
from lmdeploy_hostcache.integration.engine_config import normalise_extra_config, size_host_cache

L3 = {"master_address": "127.0.0.1:50051", "global_segment_gb": 4, "local_buffer_gb": 0.75}


def machine(total_gb: float, avail_gb: float | None = None) -> HostMemoryFacts:
    avail_gb = total_gb if avail_gb is None else avail_gb
    return HostMemoryFacts(total_bytes=int(total_gb * GIB), available_bytes=int(avail_gb * GIB))


@pytest.fixture
def small_machine(monkeypatch):
    """This process runs on an 8 GiB machine with 6 GiB available (what the flags, the engine and doctor read)."""
    facts = machine(8, 6)
    monkeypatch.setattr(hostmem, "read_host_memory", lambda *a, **k: facts)
    return facts


def _args(**kw) -> argparse.Namespace:
    base = dict(host_cache_gb=None, host_cache_config=None, host_cache_capture=None, backend="pytorch",
                enable_prefix_caching=True, kv_transfer_config=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _raw(extra) -> dict:
    return {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both", "kv_connector_extra_config": extra}


def _refused(capsys, **kw) -> str:
    """The serve command on ``kw``: one ``error:`` line on stderr, exit 2, the server never reached."""
    server = wrap_api_server(lambda args: pytest.fail("the server started"))
    args = _args(**kw)
    before = json.dumps(args.kv_transfer_config, default=str)
    with pytest.raises(SystemExit) as ei:
        server(args)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmdeploy serve api_server: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert json.dumps(args.kv_transfer_config, default=str) == before   # args untouched
    return err


def _served(**kw) -> argparse.Namespace:
    seen = []
    server = wrap_api_server(seen.append)
    args = _args(**kw)
    server(args)
    assert seen == [args]
    return args


def _yaml(tmp_path, text: str, name: str = "hc.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# 1: --host-cache-gb above total RAM is refused by the flag check, not inside the engine ------------------


def test_a_size_above_total_ram_is_refused_by_the_flags(small_machine, capsys):
    err = _refused(capsys, host_cache_gb=16.0)
    assert "--host-cache-gb" in err and "host_cache_gb: got 16.0" in err and "total RAM" in err


def test_a_size_above_total_ram_in_the_file_names_the_file(small_machine, tmp_path, capsys):
    p = _yaml(tmp_path, "host_cache_gb: 9\n")
    err = _refused(capsys, host_cache_config=str(p))
    assert str(p) in err and "host_cache_gb: got 9.0" in err and "total RAM" in err


def test_the_largest_allowed_size_is_refused_on_this_real_machine(capsys):
    """No monkeypatch: 1 PiB (the config's bound) is above every machine's RAM."""
    err = _refused(capsys, host_cache_gb=1048576.0)
    assert "host_cache_gb" in err and "total RAM" in err


def test_a_size_that_fits_is_served(small_machine):
    args = _served(host_cache_gb=1.0)
    assert args.kv_transfer_config["kv_connector_extra_config"]["hostcache_config"]["host_cache_gb"] == 1.0


def test_a_size_under_one_byte_is_refused_by_the_flags_and_by_doctor(small_machine, tmp_path, capsys):
    """It holds no block of any model: start-up would refuse 0 slots after loading the weights."""
    err = _refused(capsys, host_cache_gb=1e-12)
    assert "host_cache_gb: got 1e-12" in err and "one block" in err
    p = _yaml(tmp_path, "host_cache_gb: 1.0e-12\n")
    assert cli.main(["doctor", "--config", str(p)]) == 2
    out = capsys.readouterr()
    assert f"{p}: INVALID (host_cache_gb" in out.out and "one block" in out.err


# 2: the documented raw --kv-transfer-config path is checked inside the flag check ---------------------


def test_a_raw_config_with_a_bad_value_is_one_line(small_machine, capsys):
    err = _refused(capsys, kv_transfer_config=_raw({"host_cache_gb": "lots"}))
    assert "--kv-transfer-config" in err and "host_cache_gb: got 'lots'" in err


def test_a_raw_config_above_total_ram_is_refused(small_machine, capsys):
    err = _refused(capsys, kv_transfer_config=_raw({"host_cache_gb": 16}))
    assert "--kv-transfer-config" in err and "host_cache_gb: got 16.0" in err and "total RAM" in err


def test_a_raw_config_without_prefix_caching_is_refused(small_machine, capsys):
    err = _refused(capsys, kv_transfer_config=_raw({"host_cache_gb": 1}), enable_prefix_caching=False)
    assert "--kv-transfer-config" in err and "--enable-prefix-caching" in err


def test_a_good_raw_config_passes_untouched(small_machine):
    raw = _raw({"host_cache_gb": 1, "min_restore_tokens": 32})
    args = _served(kv_transfer_config=json.loads(json.dumps(raw)))
    assert args.kv_transfer_config == raw   # LMDeploy builds the engine config from it, as documented
    off = _raw({"host_cache_gb": 0})        # the tier off: never refused, LMDeploy runs stock
    assert _served(kv_transfer_config=off, enable_prefix_caching=False).kv_transfer_config == off
    other = {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"mooncake_config_path": "/x"}}
    assert _served(kv_transfer_config=other).kv_transfer_config == other   # not ours: not our business


def test_the_raw_path_through_lmdeploy_s_own_serve_command(lmdeploy_parser, recorded, tmp_path, capsys):
    """The auditor's r_cli.sh case: LMDeploy's parser and api_server body, the patched PytorchEngineConfig."""
    bad = json.dumps(_raw({"host_cache_gb": "lots"}))
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                                       "--enable-prefix-caching", "--kv-transfer-config", bad,
                                       "--max-batch-size", "8"])
    with pytest.raises(SystemExit) as ei:
        args.run(args)
    assert ei.value.code == 2 and recorded == []
    err = capsys.readouterr().err
    assert err.startswith("lmdeploy serve api_server: error: --kv-transfer-config") and err.count("\n") == 1, err
    good = json.dumps(_raw({"host_cache_gb": 1}))
    args = lmdeploy_parser.parse_args(["serve", "api_server", str(tmp_path), "--backend", "pytorch",
                                       "--enable-prefix-caching", "--kv-transfer-config", good,
                                       "--max-batch-size", "8"])
    args.run(args)
    tc = recorded[0][1]["backend_config"].kv_transfer_config
    assert tc.kv_connector == CONNECTOR_NAME and tc.kv_connector_extra_config["host_cache_gb"] == 1


# 3: a kv_connector_extra_config that is not a mapping ---------------------------------------------------


@pytest.mark.parametrize("extra", [[["a", 1]], [], "host_cache_gb=1", 3])
def test_a_non_mapping_extra_config_is_a_value_error_naming_it(extra):
    with pytest.raises(ValueError, match="kv_connector_extra_config must be a mapping") as ei:
        normalise_extra_config(extra)
    assert not isinstance(ei.value, TypeError)
    assert normalise_extra_config(None)["hostcache_config"] == HostCacheConfig().to_dict()


@pytest.mark.parametrize("flag", [{"host_cache_gb": 1.0}, {}])
def test_a_non_mapping_extra_config_is_one_line_at_the_command_line(small_machine, capsys, flag):
    err = _refused(capsys, kv_transfer_config=_raw([["a", 1]]), **flag)
    assert "kv_connector_extra_config must be a mapping" in err and "--kv-transfer-config" in err


# 4: foreign or misspelt extra-config keys are refused with and without --host-cache-gb -----------------


def test_foreign_keys_are_refused_with_and_without_the_flag(small_machine, capsys):
    """/tmp/audit_start/r_dropkeys.py: the flag used to drop them silently; prepare refused them."""
    extra = {"mooncake_config_path": "/etc/mc.json", "host_cache_gbb": 4}
    with_flag = _refused(capsys, kv_transfer_config=_raw(dict(extra)), host_cache_gb=1.0)
    without = _refused(capsys, kv_transfer_config=_raw(dict(extra)))
    cc = types.SimpleNamespace(kv_transfer_config=types.SimpleNamespace(**_raw(dict(extra))),
                               enable_prefix_caching=True)
    at_prepare = supported_problems(cc)[0]   # the engine's own refusal: the same words
    for err in (with_flag, without):
        assert at_prepare in err
        assert "did you mean 'host_cache_gb' for 'host_cache_gbb'" in err
    with pytest.raises(ValueError, match="mooncake_config_path"):
        apply_host_cache_args(_args(kv_transfer_config=_raw(dict(extra)), host_cache_gb=1.0))


def test_our_own_extra_keys_and_flat_fields_still_merge(small_machine):
    args = _served(kv_transfer_config=_raw({"min_restore_tokens": 32, "model_identity": "m"}), host_cache_gb=1.0)
    extra = args.kv_transfer_config["kv_connector_extra_config"]
    assert extra["model_identity"] == "m" and extra["hostcache_config"]["min_restore_tokens"] == 32


# 5: a digit string too long for int() is the field's error ----------------------------------------------


@pytest.mark.parametrize("digits", [21, 4301, 5000])
def test_a_huge_digit_string_for_min_restore_tokens_is_the_field_error(tmp_path, capsys, digits):
    text = "9" * digits
    with pytest.raises(ConfigError, match="min_restore_tokens: got '9+.*whole number of tokens") as ei:
        HostCacheConfig.from_dict({"min_restore_tokens": text})
    assert ei.value.field == "min_restore_tokens"
    p = _yaml(tmp_path, f"host_cache_gb: 1\nmin_restore_tokens: '{text}'\n")   # /tmp/audit_start/big.yaml
    assert cli.main(["doctor", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "min_restore_tokens" in err and "Traceback" not in err


def test_long_text_of_a_small_number_is_still_read():
    assert HostCacheConfig.from_dict({"min_restore_tokens": "0" * 5000 + "512"}).min_restore_tokens == 512
    assert HostCacheConfig.from_dict({"min_restore_tokens": "9" * 20}).min_restore_tokens == int("9" * 20)


# 6: doctor's auto figure is the engine's when an l3 section is present ---------------------------------


def test_doctor_sizes_auto_with_l3_as_the_engine_does(small_machine, tmp_path, capsys):
    facts = machine(64, 60)
    cfg = HostCacheConfig.from_dict({"host_cache_gb": "auto", "l3": dict(L3, global_segment_gb=16, local_buffer_gb=1)})
    engine_blocks, _, _ = size_host_cache({"hostcache_config": cfg.to_dict()}, [1], facts=facts)  # 1-byte slots
    doctor_bytes, reason = resolve_host_cache_bytes(cfg, facts)
    assert doctor_bytes == engine_blocks == (32 - 17) * GIB and "l3 store" in reason
    # and the command itself, on the small machine: auto 4 GiB (half of 8) less the 1.5 GiB store
    p = _yaml(tmp_path, "host_cache_gb: auto\nhost_memory_reserve_gb: 0\nl3: {master_address: '127.0.0.1:50051', "
                        "global_segment_gb: 1, local_buffer_gb: 0.5}\n")
    assert cli.main(["doctor", "--json", "--config", str(p)]) in (0, 1)   # 1: no Mooncake client here
    out = json.loads(capsys.readouterr().out)
    cfg = HostCacheConfig.from_yaml(p)
    engine_blocks, _, _ = size_host_cache({"hostcache_config": cfg.to_dict()}, [1], facts=small_machine)
    assert out["host_cache"]["bytes"] == engine_blocks == int(2.5 * GIB)


# 7: host tier + l3 segment + client buffers above total RAM is refused; above available, warned ---------


def test_explicit_size_plus_the_l3_store_above_total_is_refused_everywhere(small_machine, tmp_path, capsys):
    cfg = HostCacheConfig.from_dict({"host_cache_gb": 3.5, "l3": L3})   # 3.5 + 4 + 0.75 = 8.25 > 8
    with pytest.raises(ConfigError) as ei:
        resolve_host_cache_bytes(cfg, small_machine)
    msg = str(ei.value)
    assert ei.value.field == "host_cache_gb"
    assert "l3.global_segment_gb" in msg and "l3.local_buffer_gb" in msg and "total RAM" in msg
    with pytest.raises(ConfigError, match="l3.global_segment_gb"):   # the engine's hook
        size_host_cache({"hostcache_config": cfg.to_dict()}, [1 << 20], facts=small_machine)
    p = _yaml(tmp_path, "host_cache_gb: 3.5\nl3: {master_address: '127.0.0.1:50051', global_segment_gb: 4, "
                        "local_buffer_gb: 0.75}\n")
    assert cli.main(["doctor", "--config", str(p)]) == 2
    out = capsys.readouterr()
    assert f"{p}: INVALID (host_cache_gb" in out.out
    assert "l3.global_segment_gb" in out.err and "Traceback" not in out.err
    err = _refused(capsys, host_cache_config=str(p))
    assert str(p) in err and "host_cache_gb" in err and "l3.global_segment_gb" in err


def test_each_tp_rank_s_client_buffer_counts(small_machine, tmp_path, capsys, monkeypatch):
    from lmdeploy_hostcache.l3 import backend

    monkeypatch.setattr(backend, "master_refusal", lambda address: None)   # a master answers there
    p = _yaml(tmp_path, "host_cache_gb: 3\nl3: {master_address: '127.0.0.1:50051', global_segment_gb: 4, "
                        "local_buffer_gb: 0.75}\n")          # 3 + 4 + 0.75 fits 8 GiB; with 2 ranks 8.5 does not
    _served(host_cache_config=str(p))
    err = _refused(capsys, host_cache_config=str(p), tp=2)
    assert "2 clients x l3.local_buffer_gb" in err
    cfg = HostCacheConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="2 clients"):
        size_host_cache({"hostcache_config": cfg.to_dict()}, [1 << 20, 1 << 20], facts=small_machine)


def test_above_available_is_kept_with_a_warning(small_machine):
    cfg = HostCacheConfig.from_dict({"host_cache_gb": 2, "l3": L3})   # 6.75 GiB: fits 8 total, not 6 available
    n, reason = resolve_host_cache_bytes(cfg, small_machine)
    assert n == 2 * GIB and "warning" in reason and "l3 store" in reason and "6.0 GiB of RAM is available" in reason


def test_a_store_alone_above_total_is_refused_naming_the_l3_field(small_machine):
    cfg = HostCacheConfig.from_dict({"host_cache_gb": "auto", "l3": dict(L3, global_segment_gb=9)})
    with pytest.raises(ConfigError) as ei:
        resolve_host_cache_bytes(cfg, small_machine)
    assert ei.value.field == "l3.global_segment_gb" and "total RAM" in str(ei.value)
    off = HostCacheConfig.from_dict({"host_cache_gb": 0, "l3": dict(L3, global_segment_gb=9)})
    assert resolve_host_cache_bytes(off, small_machine)[0] == 0   # tier off: nothing is refused


# 8: a FIFO (or any non-regular file) is refused without blocking -----------------------------------------


def _load_in_thread(fn, path):
    """Run ``fn(path)`` in a daemon thread; (finished, result or exception). A reader blocked on a FIFO is
    released by opening the FIFO for writing, so the test fails instead of hanging."""
    box = {}

    def run():
        try:
            box["result"] = fn(path)
        except BaseException as exc:  # noqa: BLE001
            box["result"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    finished = not t.is_alive()
    if not finished and os.path.exists(path):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(5)
    return finished, box.get("result")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_config_is_refused_naming_it(tmp_path, capsys):
    from lmdeploy_hostcache.planner.cluster import load_cluster
    from lmdeploy_hostcache.yamlio import YamlError, load_yaml_file

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    finished, result = _load_in_thread(load_yaml_file, str(fifo))
    assert finished, "load_yaml_file blocked on a FIFO"
    assert isinstance(result, YamlError) and str(fifo) in str(result) and "FIFO" in str(result)
    finished, result = _load_in_thread(HostCacheConfig.from_yaml, str(fifo))
    assert finished and isinstance(result, ConfigError) and str(fifo) in str(result)
    assert result.field == "<file>" and "not a regular file" in str(result)
    finished, result = _load_in_thread(load_cluster, str(fifo))   # the planner's cluster file goes through yamlio
    assert finished and isinstance(result, ValueError) and str(fifo) in str(result)
    finished, result = _load_in_thread(lambda p: cli.main(["doctor", "--config", p]), str(fifo))
    assert finished and result == 2
    assert f"{fifo}" in capsys.readouterr().err
    finished, result = _load_in_thread(lambda p: _refused(capsys, host_cache_config=p), str(fifo))
    assert finished and "not a regular file" in result


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_device_config_is_refused_and_a_symlinked_file_is_read(tmp_path):
    from lmdeploy_hostcache.yamlio import YamlError, load_yaml_file

    with pytest.raises(YamlError, match="/dev/null: is a character device, not a regular file"):
        load_yaml_file("/dev/null")
    real = _yaml(tmp_path, "host_cache_gb: 1\n", "real.yaml")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load_yaml_file(link) == {"host_cache_gb": 1}


def test_a_calibration_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """``$LMDEPLOY_HOSTCACHE_CALIBRATION`` naming a FIFO: one CalibrationError naming it, at once."""
    import os

    from lmdeploy_hostcache.restore_cost import CalibrationError, load_calibration

    fifo = tmp_path / "calibration.json"
    os.mkfifo(fifo)
    with pytest.raises(CalibrationError, match="calibration.json: not a regular file"):
        load_calibration(str(fifo))


def test_a_master_that_refuses_connections_is_refused_before_the_engine_starts(small_machine, tmp_path, capsys):
    """With l3.on_unreachable 'error' the engine's own check fails in its process, after the weights load, as
    two tracebacks; the serve flags refuse it first, naming l3.master_address. 'warn' still starts."""
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                 # bound, not listening: connections are refused
    try:
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        p = _yaml(tmp_path, f"host_cache_gb: 1\nl3: {{master_address: '{address}', global_segment_gb: 1, "
                            "local_buffer_gb: 0.25}\n")
        err = _refused(capsys, host_cache_config=str(p))
        assert str(p) in err and "l3.master_address" in err and address in err and "'warn'" in err
        w = _yaml(tmp_path, f"host_cache_gb: 1\nl3: {{master_address: '{address}', global_segment_gb: 1, "
                            "local_buffer_gb: 0.25, on_unreachable: warn}\n", "warn.yaml")
        _served(host_cache_config=str(w))
    finally:
        closed.close()


def test_a_capture_flag_with_the_tier_off_is_not_refused_but_said_to_be_off(small_machine, tmp_path, caplog):
    """host_cache_gb 0 is the off switch that launch scripts use: nothing is refused, LMDeploy runs as stock,
    and a capture flag beside it is said to be off too (it was dropped without a word)."""
    import logging

    cap = str(tmp_path / "cap.jsonl")
    p = _yaml(tmp_path, f"host_cache_gb: 0\ncapture: {cap}\n")
    for kw, off in ((dict(host_cache_gb=0.0, host_cache_capture=cap), "--host-cache-gb 0 turns off"),
                    (dict(host_cache_config=str(p)), f"host_cache_gb 0 in {p} turns off"),     # the file's capture
                    (dict(host_cache_config=str(p), host_cache_gb=0.0), "--host-cache-gb 0 turns off")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache"):
            assert _served(**kw).kv_transfer_config is None
        said = [r.getMessage() for r in caplog.records if "is off too" in r.getMessage()]
        assert len(said) == 1 and cap in said[0] and off in said[0], (kw, said)
