"""patches/*.diff: current with the installed LMDeploy 0.18.0, and they apply as a series."""
from __future__ import annotations

import importlib.util
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest

from lmdeploy_hostcache.integration import guard

PATCHES = Path(__file__).resolve().parents[2] / "patches"


def _generator():
    spec = importlib.util.spec_from_file_location("patches_generate", PATCHES / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def series():
    root = guard.lmdeploy_root()
    if root is None or guard.installed_lmdeploy_version(root) != guard.SUPPORTED_LMDEPLOY_VERSION:
        pytest.skip("needs LMDeploy 0.18.0")
    return root, _generator()


def test_committed_diffs_are_current(series):
    root, gen = series
    fresh = gen.build_series(root)
    committed = sorted(p.name for p in PATCHES.glob("*.diff"))
    assert committed == sorted(fresh)
    for name, text in fresh.items():
        assert (PATCHES / name).read_text(encoding="utf-8") == text, f"{name} is stale: run patches/generate.py"


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")
def test_series_applies_to_stock_files_and_compiles(series, tmp_path):
    root, gen = series
    touched = sorted({rel for _, _, files in gen.SERIES for rel, _ in files})
    for rel in touched:
        dst = tmp_path / "lmdeploy" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, dst)
    for name in sorted(p.name for p in PATCHES.glob("*.diff")):
        out = subprocess.run(["patch", "-p1", "--batch", "--forward", "-i", str(PATCHES / name)],
                             cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"
        assert "fuzz" not in out.stdout and "offset" not in out.stdout, out.stdout
    for rel in touched:
        py_compile.compile(str(tmp_path / "lmdeploy" / rel), doraise=True)
        assert (tmp_path / "lmdeploy" / rel).read_text() != (root / rel).read_text(), rel


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")
def test_patched_lmdeploy_runs_the_upstream_form(series, tmp_path):
    """A symlink copy of LMDeploy with the series applied imports and does what each diff says."""
    import os
    import sys

    root, gen = series
    farm = tmp_path / "site"
    shutil.copytree(root, farm / "lmdeploy", symlinks=False, copy_function=os.symlink,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel in sorted({rel for _, _, files in gen.SERIES for rel, _ in files}):
        dst = farm / "lmdeploy" / rel
        dst.unlink()
        shutil.copy(root / rel, dst)
    for name in sorted(p.name for p in PATCHES.glob("*.diff")):
        out = subprocess.run(["patch", "-p1", "--batch", "-s", "-i", str(PATCHES / name)], cwd=farm,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"
    env = dict(os.environ, PYTHONPATH=str(farm), LMDEPLOY_HOSTCACHE_DISABLE="1")
    out = subprocess.run([sys.executable, str(PATCHES / "smoke_upstream.py"), str(farm)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0 and "UPSTREAM-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    assert "[DP0] KV connector: hit_blocks=3" in out.stdout
