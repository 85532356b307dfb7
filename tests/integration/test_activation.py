"""Activation in this process: all-or-nothing patching, routing, the engine-config field."""
from __future__ import annotations

import importlib
import inspect

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_hostcache.config import ConfigError  # noqa: E402
from lmdeploy_hostcache.integration import activate as act  # noqa: E402
from lmdeploy_hostcache.integration import guard  # noqa: E402
from lmdeploy_hostcache.integration.compat import CONNECTOR_NAME  # noqa: E402


def _owner_attr(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    parts = qualname.split(".")
    if isinstance(getattr(obj, parts[0]), type) and len(parts) == 1:  # class target: its __init__
        return getattr(obj, parts[0]), "__init__"
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return obj, parts[-1]


def _is_wrapped(target: str) -> bool:
    owner, attr = _owner_attr(target)
    raw = owner.__dict__[attr]
    raw = getattr(raw, "__func__", raw)
    return bool(getattr(raw, "__hostcache_wrapped__", False))


@pytest.fixture
def fresh():
    """Every target module imported, activation reverted; restored afterwards."""
    for name in act.PATCHERS:
        importlib.import_module(name)
    act.deactivate()
    assert not any(_is_wrapped(t) for t in guard.PATCHED_TARGETS)
    yield act
    act.deactivate()
    act.activate()


def test_activation_patches_every_target(fresh):
    st = fresh.activate()
    assert st["status"] == "active", st
    assert st["patched_modules"] == sorted(fresh.PATCHERS)
    assert all(_is_wrapped(t) for t in guard.PATCHED_TARGETS)


def test_deactivate_restores_the_stock_objects(fresh):
    stock = {t: _owner_attr(t)[0].__dict__[_owner_attr(t)[1]] for t in guard.PATCHED_TARGETS}
    fresh.activate()
    fresh.deactivate()
    for t, obj in stock.items():
        owner, attr = _owner_attr(t)
        assert owner.__dict__[attr] is obj, t
    import lmdeploy.pytorch.engine.engine as engine
    import lmdeploy.pytorch.engine.model_agent.agent as agent
    import lmdeploy.pytorch.kv_connector as kv_connector
    from lmdeploy.pytorch.kv_connector import factory

    for mod in (kv_connector, engine, agent):  # bound by ``from ... import``, not by us
        assert mod.build_kv_connector is factory.build_kv_connector, mod.__name__


# On a refused LMDeploy only the refusal stubs are installed: the flags and keywords stay
# accepted and refuse with one message (issue 9 item 8); everything else stays stock.
REFUSAL_TARGETS = {"lmdeploy.messages:PytorchEngineConfig", "lmdeploy.cli.serve:SubCliServe.add_parser_api_server",
                   "lmdeploy.cli.serve:SubCliServe.api_server"}


def test_other_version_patches_only_the_refusal_stubs(fresh, caplog):
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache"):
        st = fresh.activate(version="0.19.0")
    assert st["status"] == "refused"
    assert "0.19.0" in st["reason"] and "LMDeploy runs as stock" in st["reason"]
    assert st["patched_modules"] == sorted(fresh.REFUSAL_PATCHERS)
    assert {t for t in guard.PATCHED_TARGETS if _is_wrapped(t)} == REFUSAL_TARGETS
    assert sum("LMDeploy runs as stock" in r.getMessage() for r in caplog.records) == 1
    # a target module imported later is left to the normal import system
    from lmdeploy_hostcache.integration import autoload

    assert autoload.finder.find_spec("lmdeploy.metrics.stats") is None


def test_changed_source_patches_only_the_refusal_stubs_and_names_the_function(fresh, tmp_path):
    pins = dict(guard.PINS)
    pins["lmdeploy.pytorch.engine.executor.base:ExecutorBase._update_num_gpu_blocks"] = "0" * 64
    st = fresh.activate(pins=pins)
    assert st["status"] == "refused"
    assert "ExecutorBase._update_num_gpu_blocks" in st["reason"]
    assert {t for t in guard.PATCHED_TARGETS if _is_wrapped(t)} == REFUSAL_TARGETS


def test_a_failing_patch_reverts_all_patches(fresh, monkeypatch):
    def boom(mod):
        raise RuntimeError("simulated patch failure")

    # the loggers module is patched last: everything before it must be reverted
    monkeypatch.setitem(fresh.PATCHERS, "lmdeploy.metrics.loggers", boom)
    st = fresh.activate()
    assert st["status"] == "failed"
    assert "simulated patch failure" in st["reason"]
    assert st["patches"] == []
    assert not any(_is_wrapped(t) for t in guard.PATCHED_TARGETS)


def test_disable_env_turns_activation_off(fresh, monkeypatch):
    monkeypatch.setenv(fresh.ENV_DISABLE, "1")
    st = fresh.activate()
    assert st["status"] == "disabled"
    assert not any(_is_wrapped(t) for t in guard.PATCHED_TARGETS)


def test_post_import_hook_patches_a_module_when_it_is_imported(fresh):
    import sys

    fresh.activate()
    name = "lmdeploy.metrics.stats"
    saved = sys.modules.pop(name)
    try:
        fresh._state.patched_modules.discard(name)
        mod = importlib.import_module(name)
        assert mod is not saved
        assert getattr(mod.SchedulerStats.__dict__["update_from_schedule_metrics"], "__hostcache_wrapped__", False)
        assert type(mod.__loader__).__name__ != "_PatchingLoader"  # the module looks stock
    finally:
        sys.modules[name] = saved


# -- factory routing ------------------------------------------------------------------------

def _cache_config(connector=CONNECTOR_NAME, **extra):
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy.pytorch.config import CacheConfig

    tc = KVTransferConfig(kv_connector=connector, kv_role="kv_both", kv_connector_extra_config=extra) \
        if connector else None
    return CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=32,
                       enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc)


def test_every_binding_of_the_factory_is_the_wrapper(active):
    import lmdeploy.pytorch.engine.engine as engine
    import lmdeploy.pytorch.engine.model_agent.agent as agent
    import lmdeploy.pytorch.kv_connector as kv_connector
    from lmdeploy.pytorch.kv_connector import factory

    assert getattr(factory.build_kv_connector, "__hostcache_wrapped__", False)
    for mod in (kv_connector, engine, agent):
        assert mod.build_kv_connector is factory.build_kv_connector, mod.__name__
    for mod in (kv_connector, engine):
        assert mod.prepare_kv_connector_config is factory.prepare_kv_connector_config, mod.__name__


def test_factory_routes_our_name_and_leaves_others_to_lmdeploy(active, monkeypatch):
    from lmdeploy.pytorch.kv_connector import KVConnectorRole, factory

    import lmdeploy_hostcache.integration.connector as connector

    calls = []
    monkeypatch.setattr(connector, "build_host_tier_connector",
                        lambda role, cc, **kw: calls.append((role, cc, kw)) or "ours")
    cc = _cache_config(host_cache_blocks=4)
    assert factory.build_kv_connector(KVConnectorRole.WORKER, cc, tp_rank=1, tp_size=2) == "ours"
    assert calls == [(KVConnectorRole.WORKER, cc, {"tp_rank": 1, "tp_size": 2})]
    assert factory.build_kv_connector(KVConnectorRole.SCHEDULER, _cache_config(None)) is None
    with pytest.raises(ValueError, match="Unsupported KV connector: 'SomethingElse'"):
        factory.build_kv_connector(KVConnectorRole.SCHEDULER, _cache_config("SomethingElse"))


def test_scheduler_built_with_our_connector_gets_the_eviction_hook(active):
    from lmdeploy.pytorch.config import SchedulerConfig
    from lmdeploy.pytorch.kv_connector import KVConnectorRole, factory
    from lmdeploy.pytorch.paging.scheduler import Scheduler

    cc = _cache_config(hostcache_config={"host_cache_gb": 0.001, "min_restore_tokens": 0},
                       host_cache_blocks=8, host_slot_bytes=1024, model_identity="test-model")
    conn = factory.build_kv_connector(KVConnectorRole.SCHEDULER, cc)
    assert type(conn).__name__ == "HostTierConnector"
    sched = Scheduler(SchedulerConfig(max_batches=8, max_session_len=1024), cc, kv_connector=conn)
    assert type(sched.block_trie._kv_lifecycle).__name__ == "HostTierKVBlockLifecycle"
    stock = Scheduler(SchedulerConfig(max_batches=8, max_session_len=1024), _cache_config(None))
    assert type(stock.block_trie._kv_lifecycle).__name__ == "KVBlockLifecycle"


# -- the engine-config field -----------------------------------------------------------------

def test_pytorch_engine_config_accepts_host_cache_gb(active, tmp_path):
    from lmdeploy.messages import PytorchEngineConfig

    cfg = PytorchEngineConfig(enable_prefix_caching=True, host_cache_gb=64)
    tc = cfg.kv_transfer_config
    assert (tc.kv_connector, tc.kv_role) == (CONNECTOR_NAME, "kv_both")
    assert tc.kv_connector_extra_config["hostcache_config"]["host_cache_gb"] == 64.0
    yaml_file = tmp_path / "hostcache.yaml"
    yaml_file.write_text("host_kv_format: int4\nhost_cache_gb: 8\n")
    cfg = PytorchEngineConfig(enable_prefix_caching=True, host_cache_config=str(yaml_file), host_cache_gb=16)
    hc = cfg.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_kv_format"], hc["host_cache_gb"]) == ("int4", 16.0)
    assert PytorchEngineConfig().kv_transfer_config is None  # stock default untouched
    assert "host_cache_gb" not in inspect.signature(PytorchEngineConfig).parameters  # stock signature shown


def test_pytorch_engine_config_bad_host_cache_gb_names_the_field(active):
    from lmdeploy.messages import PytorchEngineConfig

    with pytest.raises(ConfigError, match="host_cache_gb"):
        PytorchEngineConfig(enable_prefix_caching=True, host_cache_gb=-1)


def test_pytorch_engine_config_refuses_another_connector(active):
    from lmdeploy.messages import PytorchEngineConfig

    with pytest.raises(ValueError, match="MooncakeStoreConnector"):
        PytorchEngineConfig(host_cache_gb=4, kv_transfer_config={"kv_connector": "MooncakeStoreConnector",
                                                                 "kv_role": "kv_both"})


def test_with_host_cache_copies_and_keeps_the_class():
    from lmdeploy.messages import PytorchEngineConfig

    from lmdeploy_hostcache.integration import with_host_cache

    base = PytorchEngineConfig(enable_prefix_caching=True, tp=1)
    out = with_host_cache(base, host_cache_gb=2, config={"min_restore_tokens": 128})
    assert isinstance(out, PytorchEngineConfig) and out is not base
    assert base.kv_transfer_config is None
    hc = out.kv_transfer_config.kv_connector_extra_config["hostcache_config"]
    assert (hc["host_cache_gb"], hc["min_restore_tokens"]) == (2.0, 128)
    with pytest.raises(TypeError, match="PytorchEngineConfig"):
        with_host_cache(object(), host_cache_gb=1)


def test_threads_that_first_use_the_activation_lock_at_once_share_it():
    """Two LMDeploy modules imported at once each run the post-import hook, which takes the process-wide
    activation lock: both threads must get the same lock, or activation's all-or-nothing patching is not
    exclusive.  A slow lock factory widens the window a lock made on first use would have."""
    import subprocess
    import sys

    code = (
        "import threading, time\n"
        "real = threading.RLock\n"
        "def slow():\n"
        "    time.sleep(0.05)\n"
        "    return real()\n"
        "threading.RLock = slow\n"
        "import lmdeploy_hostcache.integration.activate as act\n"
        "got, barrier = [], threading.Barrier(2)\n"
        "def first_use():\n"
        "    barrier.wait()\n"
        "    got.append(act._lock())\n"
        "threads = [threading.Thread(target=first_use) for _ in range(2)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(len({id(lock) for lock in got}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
