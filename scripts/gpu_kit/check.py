"""Prove the staged GPU kit is complete and small enough, on this CPU machine (no GPU, no network).

usage: python check.py [--kit .gpu_kit] [--limit-mib 60] [--no-install] [--no-probe] [--no-engine-run] [--json]

Checks, each reported by name; exit 0 only when all pass (1 otherwise, 2 on bad arguments):

1. ``size``: the staged wheels total at most ``--limit-mib`` MiB.
2. ``one_per_dist``: one wheel per distribution (pip refuses two).
3. ``tags``: every wheel installs on CPython 3.12, Linux x86_64 (``py3-none-any``, ``cp312-cp312``,
   ``cp312-abi3``, manylinux <= glibc 2.39).
4. ``stripped``: LMDeploy's wheel holds no TurboMind binary (``stage.STRIP_PATTERNS``).
5. ``pip_install``: ``pip install --no-index --no-deps --target TMP --python-version 3.12 ...`` of the
   whole set succeeds (what ``run.sh`` does on the GPU machine, minus the interpreter).
6. ``imports``: ``import_probe.py --activate`` imports the kit's engine path in this machine's
   ``.venv`` with the post-import hook installed (so the patches' imports count, and activation must
   succeed) and records who imports whom; walking those edges from the kit's roots (stopping at stdlib and at the
   device image's packages, ``device_packages.txt``), every module reached must be provided by a
   staged wheel. A module missing from both fails the check, named with who imports it.
7. ``lmdeploy_modules``: every ``lmdeploy.*`` module the probe loaded is a ``.py`` file in the
   stripped wheel (stripping removed no Python module the engine path needs).
8. ``engine_run`` (unless ``--no-engine-run``): the probe also ran one tier-on multi-turn replay
   through LMDeploy's real engine on CPU (``import_probe.py --engine-run``): it must finish, restore
   from the host tier and have the extension active; its imports (also those inside functions)
   are part of the walk in 6 and 7.

The pure functions (``wheel_tags_ok``, ``wheel_top_levels``, ``resolve_imports``, ...) are what
``tests/gpu_kit`` exercises on small fake sets.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stage import STRIP_PATTERNS, dist_name  # noqa: E402

LIMIT_MIB = 60
DEVICE_GLIBC = (2, 39)   # Ubuntu 24.04 (Python 3.12.3 there); pip's manylinux tag must not exceed it
PY_TAGS = {"py3", "py312", "cp312", "py2.py3"}
ABI_TAGS = {"none", "cp312", "abi3"}
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
                 "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
ROOT = "<kit>"
KIT_MODULES = frozenset(p.stem for p in HERE.glob("*.py"))
# stdlib modules of this machine's Python 3.11 that Python 3.12 (the GPU image's) no longer has
REMOVED_IN_312 = frozenset({"distutils", "asynchat", "asyncore", "imp", "smtpd"})


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_device_packages(path: Path = HERE / "device_packages.txt") -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(normalise(line))
    return out


# -- wheel set -----------------------------------------------------------------------------------

def wheel_tags(filename: str) -> tuple[str, str, str]:
    """(python, abi, platform) tags of a wheel file name."""
    stem = Path(filename).name[:-len(".whl")]
    parts = stem.split("-")
    if len(parts) < 5:
        raise ValueError(f"{filename}: not a wheel file name (name-version[-build]-py-abi-platform.whl)")
    return parts[-3], parts[-2], parts[-1]


def _platform_ok(plat: str) -> bool:
    if plat == "any":
        return True
    for p in plat.split("."):
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
        if m and (int(m.group(1)), int(m.group(2))) <= DEVICE_GLIBC:
            return True
        if p in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
            return True
    return False


def wheel_tags_ok(filename: str) -> bool:
    """True when the wheel installs on CPython 3.12 / Linux x86_64 / glibc <= DEVICE_GLIBC."""
    py, abi, plat = wheel_tags(filename)
    return (any(t in PY_TAGS for t in py.split(".")) and any(t in ABI_TAGS for t in abi.split("."))
            and _platform_ok(plat))


def wheel_top_levels(names) -> set[str]:
    """Importable top-level names of a wheel's member paths (packages, modules, extensions)."""
    tops = set()
    for name in names:
        first, sep, _ = name.partition("/")
        if first.endswith((".dist-info", ".data")):
            continue
        if sep:
            tops.add(first)
        elif first.endswith(".py"):
            tops.add(first[:-3])
        elif first.endswith(".so"):
            tops.add(first.split(".")[0])
    return tops


def check_size(sizes: dict[str, int], limit_mib: float) -> dict:
    total = sum(sizes.values())
    return {"ok": total <= limit_mib * 2**20, "total_bytes": total, "total_mib": round(total / 2**20, 2),
            "limit_mib": limit_mib}


def check_one_per_dist(wheels) -> dict:
    seen = defaultdict(list)
    for w in wheels:
        seen[dist_name(w)].append(Path(w).name)
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    return {"ok": not dup, "duplicates": dup}


def check_stripped(names) -> dict:
    bad = [n for n in names if any(fnmatch.fnmatch(n, p) for p in STRIP_PATTERNS)]
    return {"ok": not bad, "binaries_left": bad[:20]}


def resolve_imports(edges, is_stdlib, device_provided, staged_tops, present, root: str = ROOT) -> dict:
    """Walk ``edges`` (importer -> imported top-level names) from ``root``.

    A reached module is ``stdlib`` (``is_stdlib(name)``), ``device`` (``device_provided(name)``: the
    device image has its distribution; not walked further: its own needs are the image's business),
    ``staged`` (in ``staged_tops``; walked further) or ``missing``. Only names in ``present`` (imported
    successfully in the probe) are demanded: a failed optional import (``try: import x``) is not.
    Returns the three sets and, for each missing name, who imported it.
    """
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    seen, order = {root}, [root]
    out = {"stdlib": set(), "device": set(), "staged": set(), "missing": {}}
    while order:
        node = order.pop()
        for dep in sorted(graph.get(node, ())):
            if dep in seen or dep not in present:
                continue
            seen.add(dep)
            if is_stdlib(dep):
                out["stdlib"].add(dep)
            elif dep in staged_tops:
                out["staged"].add(dep)
                order.append(dep)
            elif device_provided(dep):
                out["device"].add(dep)
            else:
                out["missing"][dep] = sorted(a for a, b in edges if b == dep and a in seen)
    return out


# -- steps that touch the machine -----------------------------------------------------------------

def pip_install_check(wheels: list[Path], python: str = sys.executable) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_kit_target_") as tmp:
        cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
               "--no-compile", "--target", tmp, "--python-version", "3.12", "--implementation", "cp",
               "--only-binary=:all:"]
        for p in PIP_PLATFORMS:
            cmd += ["--platform", p]
        proc = subprocess.run(cmd + [str(w) for w in wheels], capture_output=True, text=True)
        installed = sorted(os.listdir(tmp)) if proc.returncode == 0 else []
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return {"ok": proc.returncode == 0, "installed_entries": len(installed), "pip_said": tail}


def run_probe(python: str, extra_modules=(), engine_run: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_kit_probe_") as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [python, str(HERE / "import_probe.py"), "--out", str(out), "--activate"]
        if engine_run:
            cmd += ["--engine-run", str(Path(tmp) / "engine")]
        for m in extra_modules:
            cmd += ["--module", m]
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.pop("LMDEPLOY_HOSTCACHE_DISABLE", None)  # the tier-on path: the hook and its patches load too
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"import probe failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def probe_present_and_dists(python: str, tops: list[str]) -> dict:
    """For each top-level name: importable in ``python``'s env, and which distributions provide it."""
    code = ("import json,sys,importlib.util,importlib.metadata as m\n"
            "pd=m.packages_distributions()\n"
            "out={}\n"
            "for t in json.loads(sys.argv[1]):\n"
            "    try: ok=importlib.util.find_spec(t) is not None\n"
            "    except Exception: ok=False\n"
            "    out[t]={'present':ok,'dists':pd.get(t,[])}\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([python, "-c", code, json.dumps(tops)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"reading the distributions of imported modules failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def check_kit(kit: Path, limit_mib: float, python: str, install: bool = True, probe: bool = True,
              engine_run: bool = True) -> dict:
    wheel_dir = kit / "wheels"
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{wheel_dir}: no staged wheels (run: bash scripts/gpu_kit/stage.sh)")
    checks: dict[str, dict] = {}
    checks["size"] = check_size({w.name: w.stat().st_size for w in wheels}, limit_mib)
    checks["one_per_dist"] = check_one_per_dist(wheels)
    bad_tags = [w.name for w in wheels if not wheel_tags_ok(w.name)]
    checks["tags"] = {"ok": not bad_tags, "not_installable_on_cp312_x86_64": bad_tags}
    members = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            members[dist_name(w)] = z.namelist()
    if "lmdeploy" not in members:
        checks["stripped"] = {"ok": False, "error": "no lmdeploy wheel staged"}
    else:
        checks["stripped"] = check_stripped(members["lmdeploy"])
    if install:
        checks["pip_install"] = pip_install_check(wheels, python)
    if probe:
        data = run_probe(python, engine_run=engine_run)
        if engine_run:
            er = data.get("engine_run") or {}
            checks["engine_run"] = {"ok": er.get("status") == "ok" and bool(er.get("restored_tokens"))
                                    and er.get("activation") == "active", **er}
        # the kit's own scripts travel with the checkout
        staged_tops = set().union(*(wheel_top_levels(n) for n in members.values())) | KIT_MODULES
        tops = sorted({b for _, b in data["edges"]} | {a for a, _ in data["edges"] if a != ROOT})
        info = probe_present_and_dists(python, tops)
        device = read_device_packages()
        stdlib = set(sys.stdlib_module_names) | {"__mp_main__", "__main__"}
        present = {t for t, v in info.items() if v["present"]}

        def device_provided(t):
            return any(normalise(d) in device for d in info.get(t, {}).get("dists", []))

        res = resolve_imports(data["edges"], lambda t: (t in stdlib or t.startswith("_")) and t not in REMOVED_IN_312,
                              device_provided, staged_tops, present)
        failed = {k: v for k, v in data["failed"].items()}
        checks["imports"] = {"ok": not res["missing"] and not failed, "missing": res["missing"],
                             "failed_imports": failed, "staged_used": sorted(res["staged"]),
                             "device_used": sorted(res["device"]),
                             "staged_unused": sorted(staged_tops - res["staged"] - {"lmdeploy_hostcache"} - KIT_MODULES)}
        lm_files = set(members.get("lmdeploy", ()))
        absent = [m for m in data["loaded_submodules"] if m.startswith("lmdeploy.")
                  and f"{m.replace('.', '/')}.py" not in lm_files
                  and f"{m.replace('.', '/')}/__init__.py" not in lm_files]
        checks["lmdeploy_modules"] = {"ok": not absent, "loaded": sum(
            1 for m in data["loaded_submodules"] if m.startswith("lmdeploy.")), "absent_from_wheel": absent}
    return {"ok": all(c["ok"] for c in checks.values()), "kit": str(kit), "wheels": len(wheels), "checks": checks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="check the staged GPU kit (complete, installable, small)")
    parser.add_argument("--kit", type=Path, default=HERE.parents[1] / ".gpu_kit", help="staged kit folder")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    parser.add_argument("--python", default=str(HERE.parents[1] / ".venv" / "bin" / "python"),
                        help="interpreter with LMDeploy installed, for the import walk (default .venv)")
    parser.add_argument("--no-install", action="store_true", help="skip the pip --target install check")
    parser.add_argument("--no-probe", action="store_true", help="skip the import walk")
    parser.add_argument("--no-engine-run", action="store_true",
                        help="import walk without the CPU engine run (faster; misses imports inside functions)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    if args.limit_mib <= 0:
        print("--limit-mib must be > 0", file=sys.stderr)
        return 2
    if not args.kit.is_dir():
        print(f"--kit {args.kit}: not a folder (run: bash scripts/gpu_kit/stage.sh)", file=sys.stderr)
        return 2
    report = check_kit(args.kit, args.limit_mib, args.python, not args.no_install, not args.no_probe,
                       not args.no_engine_run)
    (args.kit / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, c in report["checks"].items():
            detail = {k: v for k, v in c.items() if k != "ok" and v not in ([], {}, None)}
            print(f"{'PASS' if c['ok'] else 'FAIL'} {name}: {json.dumps(detail)[:600]}")
        print(f"{'PASS' if report['ok'] else 'FAIL'}: {report['wheels']} wheels, "
              f"{report['checks']['size']['total_mib']} MiB (limit {args.limit_mib:g} MiB)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
