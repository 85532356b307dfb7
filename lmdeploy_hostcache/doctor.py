"""Print the environment facts the host tier depends on, and check a config file.

Facts: Python, torch, triton and LMDeploy versions, whether LMDeploy is the supported
release, the LMDeploy activation state in this interpreter (``activate.status()``) and the
version/source guard's verdict (``guard.verify()``, which reads LMDeploy's files without
importing it), CUDA availability, total/available RAM (cgroup-aware), RLIMIT_MEMLOCK and the
host-cache size ``auto`` (or the configured size) gives on this machine, with the reason: the
figure the engine's start-up computes (``hostmem.resolve_host_cache_bytes``, which
``engine_config.size_host_cache`` calls too; with an ``l3:`` section, for a TP-1 engine whose one
store client has one buffer), so a size start-up refuses is refused here.

Exit codes (also in README "Commands"):
  0  everything needed is present (no GPU is fine: CPU machines run the tests);
  1  an environment problem: torch or LMDeploy missing, not LMDeploy 0.18.0, the guard
     refusing the installed LMDeploy's sources, or an activation that failed;
  2  a bad ``--config`` file (unreadable, not YAML, or a field-level error, printed
     naming the field) or a configured size this machine cannot hold (above total RAM, alone
     or with the ``l3`` store's segment and buffer, or under one byte, which holds no block),
     or ``min_restore_tokens: auto`` with a restore calibration file (``$LMDEPLOY_HOSTCACHE_CALIBRATION``)
     the server would refuse at start-up, or a ``capture`` file the capture could not write (its folder
     missing or not writable, a folder or FIFO at the path; a relative path is checked against the current
     folder).
     Whether a size holds at least one block of a model needs the model: start-up checks it.
Missing packages never crash the command: they read "not installed".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from . import SUPPORTED_LMDEPLOY_VERSION, __version__

EXIT_OK = 0
EXIT_ENVIRONMENT = 1
EXIT_BAD_CONFIG = 2
NOT_INSTALLED = "not installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="validate this host-cache YAML file and size the tier with it")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def package_version(dist: str) -> str | None:
    """Installed distribution version (metadata only: nothing is imported), or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> dict[str, Any]:
    """torch version and CUDA availability; never raises."""
    out: dict[str, Any] = {"version": package_version("torch"), "cuda_available": False,
                           "cuda_version": None, "devices": [], "error": None}
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        out["version"] = None
        return out
    except Exception as exc:  # a broken install must not crash doctor
        out["error"] = f"import failed: {type(exc).__name__}: {exc}"
        return out
    out["version"] = getattr(torch, "__version__", out["version"])
    out["cuda_version"] = getattr(torch.version, "cuda", None)
    try:
        if torch.cuda.is_available():
            out["cuda_available"] = True
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:
        out["error"] = f"CUDA query failed: {type(exc).__name__}: {exc}"
    return out


ACTIVATION_MEANING = {
    "inactive": "the .pth post-import hook is not installed in this interpreter",
    "hooked": "post-import hook installed; LMDeploy not imported yet, patches apply on import",
    "active": "LMDeploy is patched in this interpreter",
    "refused": "the guard refused: LMDeploy runs as stock",
    "failed": "a patch failed and every patch was reverted: LMDeploy runs as stock",
    "disabled": "LMDEPLOY_HOSTCACHE_DISABLE is set: LMDeploy runs as stock",
}


def activation_facts() -> dict[str, Any]:
    """``activate.status()`` and ``guard.verify()`` as JSON-able facts; never raises.

    Reads only: the guard parses LMDeploy's files without importing it, and nothing is
    patched or hooked here.
    """
    out: dict[str, Any] = {"status": None, "meaning": None, "reason": "", "hook_installed": False,
                           "patched_modules": [], "disabled": False, "error": None,
                           "guard": {"ok": None, "version": None, "pins": None, "problems": [], "message": None}}
    try:
        from .integration import activate, guard  # noqa: PLC0415

        st = activate.status()
        disabled = activate.is_disabled()
        status = "disabled" if disabled and st["status"] in ("inactive", "disabled") else st["status"]
        out.update(status=status, meaning=ACTIVATION_MEANING.get(status, ""), reason=st["reason"],
                   hook_installed=bool(st["hook_installed"]), patched_modules=list(st["patched_modules"]),
                   disabled=disabled)
        result = guard.verify()
        out["guard"] = {"ok": bool(result.ok), "version": result.version, "pins": len(guard.PINS),
                        "problems": list(result.problems), "message": result.message()}
    except Exception as exc:  # a broken install must not crash doctor
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def collect(config_path: str | None = None) -> dict[str, Any]:
    """Every fact as one JSON-able dict, with ``problems`` and ``exit_code`` decided."""
    from .config import ConfigError, HostCacheConfig  # noqa: PLC0415
    from .hostmem import (  # noqa: PLC0415
        format_bytes,
        read_host_memory,
        refuse_size_holding_no_block,
        resolve_host_cache_bytes,
    )

    problems: list[str] = []
    notes: list[str] = []
    facts: dict[str, Any] = {
        "lmdeploy_hostcache": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": f"{platform.system()} {platform.machine()}",
    }

    torch = torch_facts()
    facts["torch"] = torch
    if torch["version"] is None:
        problems.append("torch is not installed")
    if torch["error"]:
        problems.append(f"torch: {torch['error']}")
    if not torch["cuda_available"]:
        notes.append("no CUDA device: the host tier needs a GPU to serve; on this machine only the "
                     "tests, planner and CPU benchmarks run")

    facts["triton"] = {"version": package_version("triton"),
                       "interpret": os.environ.get("TRITON_INTERPRET", "")}

    lmd = package_version("lmdeploy")
    facts["lmdeploy"] = {"version": lmd, "supported_version": SUPPORTED_LMDEPLOY_VERSION,
                         "supported": lmd == SUPPORTED_LMDEPLOY_VERSION}
    if lmd is None:
        problems.append(f"lmdeploy is not installed (this release supports lmdeploy=={SUPPORTED_LMDEPLOY_VERSION})")
    elif lmd != SUPPORTED_LMDEPLOY_VERSION:
        problems.append(f"lmdeploy {lmd} is installed; this release supports exactly {SUPPORTED_LMDEPLOY_VERSION}")

    act = activation_facts()
    facts["activation"] = act
    if act["guard"]["ok"] is False:  # "supported" only when the guard accepts it too (never next to REFUSED)
        facts["lmdeploy"]["supported"] = False
        facts["lmdeploy"]["sources_match"] = False
    if lmd == SUPPORTED_LMDEPLOY_VERSION:  # otherwise the version problem above already says it
        if act["error"]:
            problems.append(f"the activation state could not be read: {act['error']}")
        elif act["guard"]["ok"] is False:
            problems.append("the version/source guard refuses the installed LMDeploy, so the host tier "
                            f"would not activate: {'; '.join(act['guard']['problems'])}")
        if act["status"] == "failed":
            problems.append(f"activation failed in this interpreter: {act['reason']}")
    if act["status"] == "inactive":
        notes.append("the auto-activation hook (lmdeploy_hostcache_autoload.pth) did not run in this interpreter "
                     "(python -S, or the package is not pip-installed): call "
                     "lmdeploy_hostcache.integration.activate.activate() before building the engine")
    elif act["status"] == "disabled":
        notes.append("LMDEPLOY_HOSTCACHE_DISABLE is set: the host tier is off and LMDeploy runs as stock")

    try:
        mem = read_host_memory()
    except Exception as exc:  # psutil missing or /proc unreadable
        mem = None
        problems.append(f"host memory could not be read: {type(exc).__name__}: {exc}")
    facts["host_memory"] = mem.to_dict() if mem else None

    exit_code = EXIT_OK
    cfg = None
    config_info: dict[str, Any] = {"path": config_path, "ok": None, "error": None, "field": None,
                                   "fields": [], "values": None}
    try:
        cfg = HostCacheConfig.from_yaml(config_path) if config_path else HostCacheConfig()
        config_info["ok"] = True
        config_info["values"] = cfg.redacted_dict()
    except ConfigError as exc:
        config_info.update(ok=False, error=str(exc), field=exc.field, fields=[e.field for e in exc.errors])
        exit_code = EXIT_BAD_CONFIG
    except ImportError as exc:  # PyYAML missing: the file cannot be checked here
        config_info.update(ok=None, error=f"cannot read YAML: {exc}")
        problems.append(f"PyYAML is not installed ({exc}); --config cannot be checked")
    facts["config"] = config_info
    facts["calibration"] = None
    if cfg is not None and cfg.enabled and cfg.min_restore_tokens == "auto":   # a disabled tier reads none
        # the server reads it at start-up (cli_patch._check_startable) and refuses a bad file: so does this check
        from .restore_cost import CalibrationError, load_calibration  # noqa: PLC0415

        try:
            facts["calibration"] = load_calibration().to_dict()
        except CalibrationError as exc:
            config_info.update(ok=False, error=f"min_restore_tokens: auto needs the restore calibration: {exc}",
                               field="min_restore_tokens", fields=["min_restore_tokens"])
            exit_code = EXIT_BAD_CONFIG

    if cfg is not None and cfg.enabled and cfg.capture and config_info["ok"]:   # a disabled tier captures nothing
        # the server refuses a capture it could not write at start-up (cli_patch._check_capture_path): so does this
        from .config import capture_field_error  # noqa: PLC0415

        error = capture_field_error(cfg.capture)
        if error is not None:
            exc = ConfigError([error], config_path)
            config_info.update(ok=False, error=str(exc), field="capture", fields=["capture"])
            exit_code = EXIT_BAD_CONFIG

    sizing: dict[str, Any] = {"host_cache_gb": cfg.host_cache_gb if cfg else None,
                              "bytes": None, "human": None, "reason": None}
    if cfg is not None and mem is not None:
        try:
            # the engine's own rule (engine_config.size_host_cache): with an l3 section, auto leaves the
            # store's segment and one client buffer room, and an explicit size that cannot fit total RAM
            # beside them is refused; one client: a TP-1 engine (each further rank adds a buffer)
            nbytes, reason = resolve_host_cache_bytes(cfg, mem, l3_clients=1)
            refuse_size_holding_no_block(cfg, nbytes)
            sizing.update(bytes=nbytes, human=format_bytes(nbytes), reason=reason)
        except ConfigError as exc:
            exc = ConfigError(exc.errors, config_path)  # name the file, as a load error does
            sizing["reason"] = str(exc)
            config_info.update(ok=False, error=str(exc), field=exc.field, fields=[e.field for e in exc.errors])
            exit_code = EXIT_BAD_CONFIG
    facts["host_cache"] = sizing
    facts["memory_budget"] = _l3_budget(getattr(cfg, "l3", None), sizing, mem, problems, notes)

    if exit_code == EXIT_OK and problems:
        exit_code = EXIT_ENVIRONMENT
    facts["problems"] = problems
    facts["notes"] = notes
    facts["exit_code"] = exit_code
    return facts


def _l3_budget(l3, sizing, mem, problems: list[str], notes: list[str]) -> dict[str, Any] | None:
    """With an ``l3:`` section: host tier + the store segment this node contributes + one client
    buffer (each further TP rank's client adds one), against usable RAM; and whether the Mooncake
    client imports here."""
    if l3 is None:
        return None
    from .hostmem import format_bytes  # noqa: PLC0415
    from .l3.master import mooncake_import_error  # noqa: PLC0415

    host = int(sizing.get("bytes") or 0)
    total = host + l3.global_segment_bytes + l3.local_buffer_bytes
    out = {"host_cache_bytes": host, "l3_segment_bytes": l3.global_segment_bytes,
           "l3_buffer_bytes": l3.local_buffer_bytes, "total_bytes": total, "total": format_bytes(total),
           "usable_available_bytes": mem.usable_available_bytes if mem else None,
           "l3_master_address": l3.master_address, "l3_client": mooncake_import_error() or "importable"}
    if out["l3_client"] != "importable":
        problems.append(f"l3: the Mooncake Store client cannot run here: {out['l3_client']}")
    if mem is not None and total > mem.usable_available_bytes:
        notes.append(f"memory budget: host tier + L3 segment + one L3 client buffer = {format_bytes(total)} is more than the "
                     f"{format_bytes(mem.usable_available_bytes)} available now: lower host_cache_gb or "
                     "l3.global_segment_gb")
    return out


def _text(facts: dict[str, Any]) -> str:
    from .hostmem import format_bytes  # noqa: PLC0415

    def ver(v: str | None) -> str:
        return v if v else NOT_INSTALLED

    t, lmd, mem = facts["torch"], facts["lmdeploy"], facts["host_memory"]
    lines = [f"lmdeploy-hostcache {facts['lmdeploy_hostcache']}"]
    row = "  {:<13}{}".format
    lines.append(row("python", f"{facts['python']['version']} ({facts['python']['executable']})"))
    lines.append(row("platform", facts["platform"]))
    lines.append(row("torch", ver(t["version"]) + (f"  [{t['error']}]" if t["error"] else "")))
    interp = facts["triton"]["interpret"]
    lines.append(row("triton", ver(facts["triton"]["version"]) + (f"  (TRITON_INTERPRET={interp})" if interp else "")))
    if lmd["version"] is None:
        status = f"NOT SUPPORTED: this release needs {lmd['supported_version']}"
    elif lmd["supported"]:
        status = "supported"
    elif lmd["version"] == lmd["supported_version"]:
        status = "NOT SUPPORTED: the version matches but its sources differ from the release (see guard)"
    else:
        status = f"NOT SUPPORTED: this release needs exactly {lmd['supported_version']}"
    lines.append(row("lmdeploy", f"{ver(lmd['version'])} ({status})"))
    if t["cuda_available"]:
        cuda = f"available: {len(t['devices'])} device(s): {', '.join(t['devices'])}; CUDA {t['cuda_version']}"
    elif t["version"] is None:
        cuda = "unknown (torch not installed)"
    else:
        cuda = "not available" + ("" if t["cuda_version"] else f" (torch {t['version']} is a CPU build)")
    lines.append(row("cuda", cuda))
    act = facts.get("activation") or {}
    if act.get("error"):
        lines.append(row("activation", f"unknown ({act['error']})"))
    else:
        text = f"{act.get('status')} ({act.get('meaning')})"
        if act.get("patched_modules"):
            text += f"; {len(act['patched_modules'])} modules patched"
        lines.append(row("activation", text))
        g = act.get("guard") or {}
        verdict = "ok" if g.get("ok") else "REFUSED"
        lines.append(row("guard", f"{verdict}: {g.get('message')}"))
    if mem:
        ram = f"total {format_bytes(mem['total_bytes'])}, available {format_bytes(mem['available_bytes'])}"
        if mem["cgroup_limit_bytes"] is not None:
            ram += (f"; cgroup limit {format_bytes(mem['cgroup_limit_bytes'])}, "
                    f"used {format_bytes(mem['cgroup_used_bytes'])}")
        lines.append(row("ram", ram))
        lines.append(row("memlock", f"RLIMIT_MEMLOCK soft {format_bytes(mem['memlock_soft_bytes'])}, "
                                    f"hard {format_bytes(mem['memlock_hard_bytes'])}"))
    else:
        lines.append(row("ram", "unknown"))
    cfg = facts["config"]
    if cfg["path"] is None and cfg["ok"]:
        lines.append(row("config", "defaults (no --config given)"))
    elif cfg["path"] is None:
        lines.append(row("config", f"defaults: INVALID for this machine ({', '.join(cfg['fields'])}; error below)"))
    elif cfg["ok"]:
        lines.append(row("config", f"{cfg['path']}: valid"))
    elif cfg["ok"] is None:
        lines.append(row("config", f"{cfg['path']}: not checked ({cfg['error']})"))
    else:
        lines.append(row("config", f"{cfg['path']}: INVALID ({', '.join(cfg['fields'])}; error below)"))
    cal = facts.get("calibration")
    if cal:
        lines.append(row("calibration", f"min_restore_tokens: auto uses {cal['source']}"))
    hc = facts["host_cache"]
    if hc["bytes"] is not None:
        lines.append(row("host cache", f"host_cache_gb={hc['host_cache_gb']} -> {hc['human']} on this machine"))
        lines.append(row("", hc["reason"]))
    mb = facts.get("memory_budget")
    if mb:
        lines.append(row("mem budget", f"host tier {format_bytes(mb['host_cache_bytes'])} + L3 segment "
                                          f"{format_bytes(mb['l3_segment_bytes'])} + L3 buffer "
                                          f"{format_bytes(mb['l3_buffer_bytes'])} = {mb['total']}"
                                          + (f" of {format_bytes(mb['usable_available_bytes'])} available"
                                             if mb["usable_available_bytes"] is not None else "")))
        lines.append(row("l3", f"Mooncake Store, master {mb['l3_master_address']}; client {mb['l3_client']}"))
    for note in facts["notes"]:
        lines.append(f"note: {note}")
    for problem in facts["problems"]:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config_path = getattr(args, "config", None)
    if config_path is not None and not config_path.strip():   # as the server refuses an empty settings path
        print("error: lmdeploy-hostcache doctor: --config: expected a file path, got an empty one", file=sys.stderr)
        return EXIT_BAD_CONFIG
    facts = collect(config_path)
    if getattr(args, "json", False):
        print(json.dumps(facts, indent=2, default=str))
    else:
        print(_text(facts))
    if facts["config"]["error"]:  # also with --json: a script sees the reason without parsing stdout
        print(f"error: {facts['config']['error']}", file=sys.stderr)
    return int(facts["exit_code"])
