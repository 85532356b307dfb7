"""Issue 9 items 6 and 8: ``host_cache_gb: 0`` is "tier off, LMDeploy as stock" everywhere, and
on any LMDeploy but the supported one the flags/keywords stay accepted and refuse with one
message naming the needed version and how to run without the tier."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_hostcache.integration import activate as act  # noqa: E402
from lmdeploy_hostcache.integration import autoload, guard  # noqa: E402
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME, HostTierUnavailable, check_supported  # noqa: E402

NEED = guard.SUPPORTED_LMDEPLOY_VERSION


@pytest.fixture
def other_version():
    """Activation as it is on LMDeploy 0.19.0 (the guard refuses); restored afterwards."""
    for name in act.PATCHERS:
        importlib.import_module(name)
    act.deactivate()
    st = act.activate(version="0.19.0")
    assert st["status"] == "refused"
    yield act
    act.deactivate()
    act.activate()


def _ours(gb):
    return {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
            "kv_connector_extra_config": {"host_cache_gb": gb}}


# -- item 6 ---------------------------------------------------------------------------------


def test_engine_config_with_host_cache_gb_0_is_stock(active, tmp_path):
    from lmdeploy.messages import PytorchEngineConfig

    from lmdeploy_hostcache.integration import with_host_cache

    assert PytorchEngineConfig(host_cache_gb=0).kv_transfer_config is None
    off = tmp_path / "off.yaml"
    off.write_text("host_cache_gb: 0\n")
    assert PytorchEngineConfig(host_cache_config=str(off)).kv_transfer_config is None
    assert PytorchEngineConfig(kv_transfer_config=_ours(0)).kv_transfer_config is None
    assert with_host_cache(PytorchEngineConfig(), host_cache_gb=0).kv_transfer_config is None
    on = PytorchEngineConfig(host_cache_gb=2, enable_prefix_caching=True)
    assert on.kv_transfer_config.kv_connector == CONNECTOR_NAME


def test_start_up_with_host_cache_gb_0_runs_stock(active):
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy.pytorch.kv_connector import factory

    cc = CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=32, enable_prefix_caching=False,
                     device_type="cpu", kv_transfer_config=KVTransferConfig(**_ours(0)))
    factory.prepare_kv_connector_config(cc, model_path="m")  # was: UnsupportedConfiguration
    assert cc.kv_transfer_config is None
    assert factory.build_kv_connector(factory.KVConnectorRole.SCHEDULER, cc) is None


def test_compat_never_refuses_zero():
    from types import SimpleNamespace

    tc = SimpleNamespace(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                         kv_connector_extra_config={"hostcache_config": {"host_cache_gb": 0}})
    check_supported(SimpleNamespace(kv_transfer_config=tc, enable_prefix_caching=True, window_size=-1,
                                    num_cpu_blocks=0, role=None, states_shapes=None))


# -- item 8 ---------------------------------------------------------------------------------


def _assert_message(text: str):
    assert f"needs LMDeploy {NEED}, found 0.19.0" in text
    assert "--host-cache-gb" in text and "LMDEPLOY_HOSTCACHE_DISABLE=1" in text and "Upgrading LMDeploy" in text


def test_other_version_keywords_refuse_with_the_message(other_version):
    from lmdeploy.messages import PytorchEngineConfig

    from lmdeploy_hostcache.integration import with_host_cache

    with pytest.raises(HostTierUnavailable) as info:  # was: TypeError (unexpected keyword)
        PytorchEngineConfig(enable_prefix_caching=True, host_cache_gb=64)
    _assert_message(str(info.value))
    assert PytorchEngineConfig(host_cache_gb=0).kv_transfer_config is None  # off works on any version
    assert PytorchEngineConfig().kv_transfer_config is None
    with pytest.raises(HostTierUnavailable) as info:  # was: a config returned
        with_host_cache(PytorchEngineConfig(enable_prefix_caching=True), host_cache_gb=4)
    _assert_message(str(info.value))


_CLI = textwrap.dedent("""
    import sys, types
    from lmdeploy_hostcache.integration import activate as act
    print("STATUS", act.activate(version="0.19.0")["status"])
    fake = types.ModuleType("lmdeploy.serve.openai.api_server")
    fake.serve = lambda model_path, **kw: print("SERVED", kw["backend_config"].kv_transfer_config)
    sys.modules["lmdeploy.serve.openai.api_server"] = fake
    sys.argv = ["lmdeploy", "serve", "api_server", sys.argv[1], "--backend", "pytorch", "--max-batch-size", "8",
                *sys.argv[2:]]
    from lmdeploy.cli.entrypoint import run
    run()
""")


@pytest.mark.skipif(autoload.is_disabled(), reason="LMDEPLOY_HOSTCACHE_DISABLE is set")
def test_other_version_serve_flags_are_registered_and_refused(tmp_path):
    env = dict(os.environ)
    env.pop(autoload.ENV_DISABLE, None)

    def serve(*flags):
        return subprocess.run([sys.executable, "-c", _CLI, str(tmp_path), *flags], capture_output=True, text=True,
                              env=env, timeout=180)

    out = serve("--enable-prefix-caching", "--host-cache-gb", "4")
    assert "STATUS refused" in out.stdout
    assert out.returncode == 2, out.stderr  # was: "unrecognized arguments: --host-cache-gb"
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("lmdeploy serve api_server: error: ") and "Traceback" not in out.stderr
    _assert_message(err[-1])
    assert "SERVED" not in out.stdout
    out = serve("--host-cache-gb", "0")
    assert out.returncode == 0, out.stderr
    assert "SERVED None" in out.stdout
