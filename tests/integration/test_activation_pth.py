"""The .pth auto-loader: fresh interpreters (spawned children, the console script) are hooked."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lmdeploy_hostcache.integration import activate as act
from lmdeploy_hostcache.integration import autoload

PTH_NAME = "lmdeploy_hostcache_autoload.pth"
SOURCE_PTH = Path(autoload.__file__).with_name(PTH_NAME)
INSTALLED_PTH = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME

needs_pth = pytest.mark.skipif(not INSTALLED_PTH.exists(),
                               reason=f"{PTH_NAME} is not installed in this environment (pip install -e .)")


def _env(disable: bool) -> dict:
    env = dict(os.environ)
    env.pop(autoload.ENV_DISABLE, None)
    if disable:
        env[autoload.ENV_DISABLE] = "1"
    return env


def test_target_modules_match_the_patchers():
    assert autoload.TARGET_MODULES == frozenset(act.PATCHERS)


@needs_pth
def test_installed_pth_is_the_packaged_one():
    assert INSTALLED_PTH.read_text() == SOURCE_PTH.read_text()


@needs_pth
def test_interpreter_start_installs_the_hook_without_importing_lmdeploy():
    code = ("import sys; print(type(sys.meta_path[0]).__name__, "
            "any(m == 'lmdeploy' or m.startswith('lmdeploy.') for m in sys.modules), "
            "'lmdeploy_hostcache.integration.activate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), timeout=60)
    assert out.stdout.split() == ["PostImportFinder", "False", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(True), timeout=60)
    assert out.stdout.split()[0] != "PostImportFinder", out.stderr


def _child_probe(queue) -> None:
    """Runs in a spawned interpreter: what LMDeploy's worker/engine processes would see."""
    from lmdeploy.pytorch.kv_connector import factory

    import lmdeploy.pytorch.kv_connector as package
    from lmdeploy_hostcache.integration.activate import status

    queue.put({
        "wrapped": bool(getattr(factory.build_kv_connector, "__hostcache_wrapped__", False)),
        "package_binding_is_wrapper": package.build_kv_connector is factory.build_kv_connector,
        "status": status()["status"],
    })


def _start_child(ctx, queue, disable: bool):
    old = os.environ.get(autoload.ENV_DISABLE)
    os.environ.pop(autoload.ENV_DISABLE, None)
    if disable:
        os.environ[autoload.ENV_DISABLE] = "1"
    try:  # a spawned child inherits the environment at start
        proc = ctx.Process(target=_child_probe, args=(queue,))
        proc.start()
    finally:
        os.environ.pop(autoload.ENV_DISABLE, None)
        if old is not None:
            os.environ[autoload.ENV_DISABLE] = old
    return proc


@needs_pth
def test_spawned_children_see_the_wrapper_unless_disabled():
    pytest.importorskip("lmdeploy")
    ctx = mp.get_context("spawn")
    q_on, q_off = ctx.Queue(), ctx.Queue()
    procs = [_start_child(ctx, q_on, disable=False), _start_child(ctx, q_off, disable=True)]
    try:
        on, off = q_on.get(timeout=240), q_off.get(timeout=240)
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert on == {"wrapped": True, "package_binding_is_wrapper": True, "status": "active"}
    assert off["wrapped"] is False and off["status"] == "inactive"


@needs_pth
def test_stock_console_script_lists_the_flags():
    pytest.importorskip("lmdeploy")
    exe = Path(sys.executable).with_name("lmdeploy")
    if not exe.exists():
        pytest.skip("no lmdeploy console script next to this interpreter")
    out = subprocess.run([str(exe), "serve", "api_server", "--help"], capture_output=True, text=True,
                         env=_env(False), timeout=180)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    group = text[text.index("PyTorch engine arguments:"):text.index("TurboMind engine arguments:")]
    assert "--host-cache-gb" in group and "--host-cache-config" in group
