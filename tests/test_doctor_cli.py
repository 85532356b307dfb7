"""The lmdeploy-hostcache CLI: --version, doctor facts, doctor --config exit codes, missing packages."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lmdeploy_hostcache import SUPPORTED_LMDEPLOY_VERSION, __version__, cli, doctor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hostcache.yaml"


def _cli_command() -> list[str]:
    """The installed console script when present (what README tells users to run)."""
    script = Path(sys.executable).parent / "lmdeploy-hostcache"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmdeploy_hostcache.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli_command(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_version_subprocess():
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"lmdeploy-hostcache {__version__}"


FACT_LABELS = ("python", "torch", "triton", "lmdeploy", "cuda", "ram", "memlock", "host cache")


def test_doctor_prints_the_facts(capsys):
    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    for label in FACT_LABELS:
        assert f"  {label}" in text, label
    assert sys.version.split()[0] in text
    lmd = metadata.version("lmdeploy")
    assert f"lmdeploy     {lmd} (supported)" in text
    assert "total" in text and "available" in text and "RLIMIT_MEMLOCK" in text
    assert "host_cache_gb=auto ->" in text and "(auto)" in text


def test_console_script_doctor_bad_config_exits_2_naming_the_field(tmp_path):
    """The installed command, end to end: facts still printed, exit 2, the field named."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("host_cache_gb: 64\nhost_kv_format: fp8\n")
    out = run_cli("doctor", "--config", str(bad))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "host_kv_format" in out.stderr and "'fp8'" in out.stderr and str(bad) in out.stderr
    assert "INVALID" in out.stdout
    for label in FACT_LABELS[:-1]:
        assert f"  {label}" in out.stdout, label


def test_doctor_good_config_exits_0(capsys):
    assert cli.main(["doctor", "--config", str(EXAMPLE)]) == 0
    assert f"{EXAMPLE}: valid" in capsys.readouterr().out


def test_doctor_unknown_key_and_unreadable_file(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("host_cache_gb: 1\npin_memroy: false\n")
    assert cli.main(["doctor", "--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "pin_memroy" in err and "did you mean 'pin_memory'" in err
    assert cli.main(["doctor", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_doctor_size_too_big_for_this_machine(tmp_path, capsys):
    huge = tmp_path / "huge.yaml"
    huge.write_text("host_cache_gb: 1000000\n")
    assert cli.main(["doctor", "--config", str(huge)]) == 2
    err = capsys.readouterr().err
    assert "host_cache_gb" in err and "total RAM" in err and str(huge) in err


def test_doctor_json_is_one_object(tmp_path, capsys):
    assert cli.main(["doctor", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["exit_code"] == 0 and facts["problems"] == []
    assert facts["lmdeploy"] == {"version": metadata.version("lmdeploy"),
                                 "supported_version": SUPPORTED_LMDEPLOY_VERSION, "supported": True}
    assert facts["host_memory"]["total_bytes"] > 0
    assert facts["host_cache"]["bytes"] >= 0 and facts["host_cache"]["reason"]
    assert facts["config"]["ok"] is True and facts["config"]["values"]["host_cache_gb"] == "auto"
    bad = tmp_path / "bad.yaml"
    bad.write_text("checksum: 2\n")
    assert cli.main(["doctor", "--json", "--config", str(bad)]) == 2
    facts = json.loads(capsys.readouterr().out)
    assert facts["exit_code"] == 2 and facts["config"]["field"] == "checksum"


def test_doctor_masks_the_salt(tmp_path, capsys):
    salted = tmp_path / "salted.yaml"
    salted.write_text("tenant_salt: very-secret\n")
    assert cli.main(["doctor", "--json", "--config", str(salted)]) == 0
    out = capsys.readouterr().out
    assert "very-secret" not in out and json.loads(out)["config"]["values"]["tenant_salt"] == "***"


def test_missing_packages_read_not_installed(monkeypatch, capsys):
    real = doctor.package_version
    monkeypatch.setattr(doctor, "package_version",
                        lambda dist: None if dist in ("torch", "triton", "lmdeploy") else real(dist))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    for label in ("torch", "triton", "lmdeploy"):
        line = next(line for line in out.splitlines() if line.strip().split()[0] == label)
        assert "not installed" in line, line
    assert "problem: torch is not installed" in out
    assert "problem: lmdeploy is not installed" in out
    assert "unknown (torch not installed)" in out


def test_unsupported_lmdeploy_is_exit_1(monkeypatch, capsys):
    real = doctor.package_version
    monkeypatch.setattr(doctor, "package_version", lambda dist: "0.17.2" if dist == "lmdeploy" else real(dist))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"0.17.2 (NOT SUPPORTED: this release needs exactly {SUPPORTED_LMDEPLOY_VERSION})" in out
    # a bad config outranks an environment problem
    assert cli.main(["doctor", "--config", "/nonexistent/hc.yaml"]) == 2


def test_no_command_and_unknown_command(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_missing_pyyaml_is_an_environment_problem(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert cli.main(["doctor", "--config", str(EXAMPLE)]) == 1
    out = capsys.readouterr().out
    assert "not checked" in out and "problem: PyYAML is not installed" in out


# -- activation status and guard verdict ---------------------------------------------------------


def test_doctor_shows_activation_and_guard(capsys):
    from lmdeploy_hostcache.integration import activate, guard

    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    status = activate.status()["status"]  # "active" when this test process imported LMDeploy, else "hooked"
    line = next(ln for ln in text.splitlines() if ln.startswith("  activation"))
    assert f"activation   {status} (" in line and doctor.ACTIVATION_MEANING[status] in line
    pins = len(guard.PINS)
    assert f"  guard        ok: LMDeploy {SUPPORTED_LMDEPLOY_VERSION}: version and {pins} source pins match" in text
    assert cli.main(["doctor", "--json"]) == 0
    act = json.loads(capsys.readouterr().out)["activation"]
    assert act["status"] == status and act["error"] is None and act["disabled"] is False
    assert act["guard"] == {"ok": True, "version": SUPPORTED_LMDEPLOY_VERSION, "pins": len(guard.PINS),
                            "problems": [], "message": guard.verify().message()}


def test_doctor_guard_refusal_is_an_environment_problem(monkeypatch, capsys):
    from lmdeploy_hostcache.integration import guard

    target = "lmdeploy.pytorch.paging.scheduler:Scheduler.__init__"
    refused = guard.GuardResult(False, SUPPORTED_LMDEPLOY_VERSION, [f"the source of {target} differs"])
    monkeypatch.setattr(guard, "verify", lambda *a, **k: refused)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "  guard        REFUSED: lmdeploy-hostcache not activated, LMDeploy runs as stock" in out
    assert "problem: the version/source guard refuses the installed LMDeploy" in out and target in out
    assert cli.main(["doctor", "--json"]) == 1
    facts = json.loads(capsys.readouterr().out)
    verdict = facts["activation"]["guard"]
    assert verdict["ok"] is False and verdict["problems"] == refused.problems


def test_doctor_disabled_and_unhooked_interpreters(tmp_path):
    """Fresh interpreters: with LMDEPLOY_HOSTCACHE_DISABLE=1, and under ``python -S`` (no .pth ran)."""
    import os
    import site

    env = dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1")
    out = subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "doctor", "--json"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    act = json.loads(out.stdout)["activation"]
    assert act["status"] == "disabled" and act["disabled"] and not act["hook_installed"]
    assert act["guard"]["ok"] is True  # the verdict is reported even when activation is off
    paths = [str(ROOT), *site.getsitepackages()]
    code = f"import sys; sys.path[:0] = {paths!r}; from lmdeploy_hostcache import cli; sys.exit(cli.main(['doctor']))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "LMDEPLOY_HOSTCACHE_DISABLE"})
    assert out.returncode == 0, out.stderr
    assert "  activation   inactive (the .pth post-import hook is not installed" in out.stdout
    assert "note: the auto-activation hook" in out.stdout and "activate()" in out.stdout


# -- issue 9: bad input and first use ------------------------------------------------------------


@pytest.mark.parametrize("content, match", [(b"\x00\x01\x02\x03", "binary data"), (b"host_cache_gb: \xff 4\n", "not UTF-8"),
                                            (b"pin_memory: true\npin_memory: false\n", "duplicate key")])
def test_doctor_binary_or_non_utf8_config_is_a_bad_config(tmp_path, capsys, content, match):
    """Item 7: exit 2 (a bad config file, naming it), not an environment problem (exit 1)."""
    f = tmp_path / "hc.yaml"
    f.write_bytes(content)
    assert cli.main(["doctor", "--config", str(f)]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith(f"error: {f}: ") and match in cap.err and cap.err.count("\n") == 1
    assert "problem:" not in cap.out


def test_doctor_host_cache_gb_0_is_the_tier_off(tmp_path, capsys):
    """Item 6: 0 reads as "off, LMDeploy as stock", exit 0."""
    f = tmp_path / "off.yaml"
    f.write_text("host_cache_gb: 0\n")
    assert cli.main(["doctor", "--config", str(f)]) in (0, 1)  # 1 only for an environment problem
    out = capsys.readouterr().out
    assert "host tier off: host_cache_gb is 0, so LMDeploy runs as stock" in out
    assert f"{f}: valid" in out


def test_doctor_never_says_supported_next_to_refused(monkeypatch, capsys):
    """Item 8: a 0.18.0 whose sources differ is not "supported" while the guard says REFUSED."""
    from lmdeploy_hostcache.integration import guard

    refused = guard.GuardResult(False, SUPPORTED_LMDEPLOY_VERSION, ["the source of x:y differs"])
    monkeypatch.setattr(guard, "verify", lambda *a, **k: refused)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "(supported)" not in out
    assert "version matches but its sources differ" in out
    assert cli.main(["doctor", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["lmdeploy"]["supported"] is False


def test_doctor_checks_the_calibration_auto_reads(tmp_path, capsys, monkeypatch):
    """``min_restore_tokens: auto`` makes the server read ``$LMDEPLOY_HOSTCACHE_CALIBRATION`` at start-up and refuse
    a bad file; doctor used to call such a settings file valid (exit 0). It now refuses it the same way, and names
    the calibration a good one resolves to."""
    cfg = tmp_path / "auto.yaml"
    cfg.write_text("min_restore_tokens: auto\n")
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    monkeypatch.setenv("LMDEPLOY_HOSTCACHE_CALIBRATION", str(bad))
    assert cli.main(["doctor", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "INVALID (min_restore_tokens" in out and "cal.json" in err and "min_restore_tokens" in err
    bad.write_text(json.dumps({"restore_gbps": 12.5, "prefill_tokens_per_s": 9000, "restore_overhead_ms": 3}))
    assert cli.main(["doctor", "--config", str(cfg), "--json"]) in (0, 1)   # 1: an environment problem only
    facts = json.loads(capsys.readouterr().out)
    assert facts["config"]["ok"] and facts["calibration"]["restore_gbps"] == 12.5
    assert facts["calibration"]["source"] == str(bad)
    monkeypatch.delenv("LMDEPLOY_HOSTCACHE_CALIBRATION")
    cli.main(["doctor", "--config", str(cfg)])
    assert "calibration  min_restore_tokens: auto uses assumed" in capsys.readouterr().out


def test_doctor_skips_the_calibration_of_a_disabled_tier(tmp_path, capsys, monkeypatch):
    """``host_cache_gb: 0`` runs LMDeploy as stock, which reads no calibration: doctor must not refuse the file."""
    cfg = tmp_path / "off.yaml"
    cfg.write_text("host_cache_gb: 0\nmin_restore_tokens: auto\n")
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    monkeypatch.setenv("LMDEPLOY_HOSTCACHE_CALIBRATION", str(bad))
    assert cli.main(["doctor", "--config", str(cfg)]) != 2
    assert "INVALID" not in capsys.readouterr().out
