"""Activation: the post-import hook and the one place that rebinds LMDeploy functions.

How it runs:
- ``lmdeploy_hostcache_autoload.pth`` (installed into site-packages by ``pip install``)
  calls ``autoload.install()`` in every interpreter that starts: the engine process,
  spawned mp engines and Ray actors alike. It only puts ``autoload.PostImportFinder`` on
  ``sys.meta_path``; neither LMDeploy nor this module is imported then.
  ``LMDEPLOY_HOSTCACHE_DISABLE=1`` skips it.
- When one of the ``PATCHERS`` modules is imported, the finder lets it execute normally
  and then calls ``_apply`` here, which patches it. The first time, ``guard.verify()``
  checks LMDeploy's version and the source pins of every target (from the files, before
  any patch). On any mismatch it logs one warning naming the function and LMDeploy runs
  as stock, except for the refusal stubs (``REFUSAL_PATCHERS``): the serve flags and the
  ``PytorchEngineConfig`` keywords stay accepted, and asking for the tier through them
  raises ``compat.HostTierUnavailable`` (the version needed, how to run without the tier).
- ``activate()`` does the same by hand (e.g. under ``python -S``): it installs the finder
  and patches the target modules that are already imported.
- A module LMDeploy imports lazily is patched by the patcher of the target that uses it
  (``COMPANION_MODULES``): the scheduler patcher also fixes
  ``RecomputeEvictionHelper._reclaim_candidate`` (the remote-ready reclaim deadlock).
- The model agent's patcher (``_patch_model_agent``) makes ``BaseModelAgent.sleep`` wait for a
  forward step still executing before the KV connector is shut down (the sleep crash).

Invariants:
- All or nothing: every rebinding is recorded (``Patch``); if applying any patch raises,
  every recorded patch is reverted and the state becomes ``failed``. An import of an
  LMDeploy module never fails because of this hook.
- Each patch is applied at most once per (object, attribute).
- Nothing here runs at interpreter start (see ``autoload``).
"""
from __future__ import annotations

import sys
import threading

from . import autoload
from .autoload import ENV_DISABLE, is_disabled

__all__ = [
    "COMPANION_MODULES",
    "ENV_DISABLE",
    "PATCHERS",
    "activate",
    "deactivate",
    "is_disabled",
    "status",
]

_LOGGER_NAME = "lmdeploy_hostcache"
# Start of the INFO line the executor logs once the host tier is sized: the sign that it is active
# (README, "Is the tier on?").
ACTIVE_LOG_PREFIX = "lmdeploy-hostcache: host tier active:"


class Patch:
    """One rebinding: ``owner.name`` was ``original`` (raw ``__dict__`` entry), is now ``replacement``."""

    __slots__ = ("owner", "name", "original", "replacement", "target")

    def __init__(self, owner, name, original, replacement, target):
        self.owner, self.name, self.original, self.replacement, self.target = owner, name, original, replacement, target

    def revert(self) -> None:
        if self.owner.__dict__.get(self.name) is self.replacement:
            setattr(self.owner, self.name, self.original)

    def __repr__(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        return f"Patch({owner}.{self.name} for {self.target})"


class _State:
    """Process-wide activation state (guarded by ``_lock``)."""

    def __init__(self) -> None:
        self.status = "inactive"    # inactive | hooked | active | refused | failed | disabled
        self.reason = ""
        self.patches: list[Patch] = []
        self.patched_modules: set[str] = set()
        self.guard_result = None
        self.root = None            # lmdeploy package dir to verify (tests point it at a copy)
        self.guard_kwargs: dict = {}


_state = _State()
# the process-wide re-entrant lock, made at import: made on first use, two threads whose first calls raced
# (two LMDeploy modules imported at once, each running the post-import hook) could each make their own
_LOCK = threading.RLock()


def _lock():
    """The process-wide re-entrant lock."""
    return _LOCK


def _logger():
    import logging

    return logging.getLogger(_LOGGER_NAME)


# ----------------------------------------------------------------------------------------
# patch helpers


def _rebind(owner, name: str, replacement, target: str, *, wrap_kind: str | None = None) -> None:
    """Set ``owner.name = replacement`` and record it; a no-op when already ours."""
    current = owner.__dict__.get(name)
    if current is None:
        raise AttributeError(f"{target}: {getattr(owner, '__name__', owner)} has no attribute {name!r}")
    raw = current.__func__ if isinstance(current, (staticmethod, classmethod)) else current
    if getattr(raw, "__hostcache_wrapped__", False):
        return
    if wrap_kind == "staticmethod":
        replacement = staticmethod(replacement)
    setattr(owner, name, replacement)
    _state.patches.append(Patch(owner, name, current, replacement, target))


def _rebind_aliases(original, wrapper, module_names: tuple[str, ...], attr: str, target: str) -> None:
    """Modules that did ``from ... import attr`` before the patch still hold ``original``."""
    for mod_name in module_names:
        mod = sys.modules.get(mod_name)
        current = mod.__dict__.get(attr) if mod is not None else None
        # stock, or a wrapper of ours left from an earlier activation (bound by a plain import)
        if current is original or (current is not None and _is_wrapper_of(current, original)):
            setattr(mod, attr, wrapper)
            _state.patches.append(Patch(mod, attr, original, wrapper, target))


def _is_wrapper_of(obj, original) -> bool:
    return bool(getattr(obj, "__hostcache_wrapped__", False)) and getattr(obj, "__wrapped__", None) is original


def _sweep_aliases() -> None:
    """Modules that imported a factory wrapper by name (``from .factory import ...``) get stock back."""
    for mod_name in _FACTORY_ALIAS_MODULES:
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        for attr in ("build_kv_connector", "prepare_kv_connector_config"):
            current = mod.__dict__.get(attr)
            if current is not None and getattr(current, "__hostcache_wrapped__", False):
                setattr(mod, attr, current.__wrapped__)


def _mark(fn):
    fn.__hostcache_wrapped__ = True
    return fn


# ----------------------------------------------------------------------------------------
# per-module patchers: each receives the freshly executed (or already imported) module


def _patch_generation_config(mod) -> None:
    """``GenerationConfig.__post_init__`` post-hook: the API request's cache salt (request_salt.py)."""
    import functools

    from .request_salt import stamp_generation_config

    cls = mod.GenerationConfig
    original = cls.__dict__["__post_init__"]

    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        stamp_generation_config(self)

    _rebind(cls, "__post_init__", _mark(__post_init__), "lmdeploy.messages:GenerationConfig.__post_init__")


def _patch_pytorch_messages(mod) -> None:
    """``SamplingParam.from_gen_config`` post-hook: the request's cache salt reaches the sequence."""
    import functools

    from .request_salt import copy_to_sampling_param

    cls = mod.SamplingParam
    original = cls.__dict__["from_gen_config"].__func__

    @functools.wraps(original)
    def from_gen_config(klass, gen_config):
        param = original(klass, gen_config)
        copy_to_sampling_param(param, gen_config)
        return param

    _mark(from_gen_config)
    _rebind(cls, "from_gen_config", classmethod(from_gen_config),
            "lmdeploy.pytorch.messages:SamplingParam.from_gen_config")


_SALT_DEPENDENCY_ALIASES = (
    "lmdeploy.serve.openai.chat_completions.serving",
    "lmdeploy.serve.openai.endpoints.completions",
)


def _patch_server_utils(mod) -> None:
    """``validate_json_request`` -> ``request_salt.wrap_validate_json_request`` (the request's salt)."""
    from .request_salt import wrap_validate_json_request

    original = mod.__dict__["validate_json_request"]
    if getattr(original, "__hostcache_wrapped__", False):
        return
    wrapper = wrap_validate_json_request(original)
    setattr(mod, "validate_json_request", wrapper)
    _state.patches.append(Patch(mod, "validate_json_request", original, wrapper,
                                "lmdeploy.serve.utils.server_utils:validate_json_request"))
    _rebind_aliases(original, wrapper, _SALT_DEPENDENCY_ALIASES, "validate_json_request",
                    "lmdeploy.serve.utils.server_utils:validate_json_request")


def _patch_messages(mod) -> None:
    import functools

    _patch_generation_config(mod)
    cls = mod.PytorchEngineConfig
    original = cls.__dict__["__init__"]
    if getattr(original, "__hostcache_wrapped__", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, host_cache_gb=None, host_cache_config=None, **kwargs):
        settings = None
        if host_cache_gb is not None or host_cache_config is not None:
            from ..config import load_config

            settings = load_config(host_cache_config, host_cache_gb=host_cache_gb)  # validate first
        original(self, *args, **kwargs)
        from .engine_config import drop_if_off, host_tier_transfer_config, is_host_tier, log_tier_off

        if settings is not None and not settings.enabled:  # host_cache_gb 0: tier off, LMDeploy as stock
            if is_host_tier(self.kv_transfer_config):
                self.kv_transfer_config = None
            log_tier_off("PytorchEngineConfig")
        elif settings is not None:
            self.kv_transfer_config = host_tier_transfer_config(config=settings, existing=self.kv_transfer_config)
        else:  # a hand-written kv_transfer_config naming our connector with host_cache_gb 0
            self.kv_transfer_config = drop_if_off(self.kv_transfer_config, "PytorchEngineConfig")

    _rebind(cls, "__init__", _mark(__init__), "lmdeploy.messages:PytorchEngineConfig")


_FACTORY_ALIAS_MODULES = (
    "lmdeploy.pytorch.kv_connector",
    "lmdeploy.pytorch.engine.engine",
    "lmdeploy.pytorch.engine.model_agent.agent",
)


def _patch_factory(mod) -> None:
    import functools

    from .compat import CONNECTOR_NAME

    orig_build = mod.__dict__["build_kv_connector"]
    orig_prepare = mod.__dict__["prepare_kv_connector_config"]
    if not getattr(orig_build, "__hostcache_wrapped__", False):

        @functools.wraps(orig_build)
        def build_kv_connector(role, cache_config, **kwargs):
            tc = cache_config.kv_transfer_config
            if tc is not None and tc.is_kv_transfer_instance and tc.kv_connector == CONNECTOR_NAME:
                from .connector import build_host_tier_connector

                return build_host_tier_connector(role, cache_config, **kwargs)
            return orig_build(role, cache_config, **kwargs)

        target = "lmdeploy.pytorch.kv_connector.factory:build_kv_connector"
        _rebind(mod, "build_kv_connector", _mark(build_kv_connector), target)
        _rebind_aliases(orig_build, build_kv_connector, _FACTORY_ALIAS_MODULES, "build_kv_connector", target)

    if not getattr(orig_prepare, "__hostcache_wrapped__", False):

        @functools.wraps(orig_prepare)
        def prepare_kv_connector_config(cache_config, *, model_path=None, dist_config=None,
                                        distributed_executor_backend=None):
            tc = cache_config.kv_transfer_config
            if tc is not None and tc.kv_connector == CONNECTOR_NAME:
                from .engine_config import drop_if_off

                if drop_if_off(tc, "prepare_kv_connector_config") is None:  # host_cache_gb 0: stock engine
                    cache_config.kv_transfer_config = tc = None
            if tc is None or tc.kv_connector != CONNECTOR_NAME:
                return orig_prepare(cache_config, model_path=model_path, dist_config=dist_config,
                                    distributed_executor_backend=distributed_executor_backend)
            from .compat import check_supported
            from ..l3.weights import exact_content_name
            from .engine_config import model_identity_from_path, normalise_extra_config

            check_supported(cache_config, model_path=model_path, dist_config=dist_config,
                            distributed_executor_backend=distributed_executor_backend)
            extra = normalise_extra_config(tc.kv_connector_extra_config)  # validates; new dict
            if not extra.get("model_identity"):
                identity = model_identity_from_path(model_path)
                if identity:
                    extra["model_identity"] = identity
                    extra.pop("model_content_name", None)   # an earlier run's, in a reused config
                    try:   # the identity is the resolved folder, or a hub id (no folder: None)
                        content = exact_content_name(identity)
                    except ValueError:   # its files cannot be read: the path names the model
                        content = None
                    if content:
                        extra["model_content_name"] = content
            tc.kv_connector_extra_config.clear()
            tc.kv_connector_extra_config.update(extra)

        target = "lmdeploy.pytorch.kv_connector.factory:prepare_kv_connector_config"
        _rebind(mod, "prepare_kv_connector_config", _mark(prepare_kv_connector_config), target)
        _rebind_aliases(orig_prepare, prepare_kv_connector_config, _FACTORY_ALIAS_MODULES[:2],
                        "prepare_kv_connector_config", target)


def _is_ours(connector) -> bool:
    return connector is not None and type(connector).__module__.startswith("lmdeploy_hostcache.")


EVICTION_HELPER_MODULE = "lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper"
# Modules patched by another module's patcher (they are not post-import targets themselves):
# module -> the PATCHERS key whose patcher imports and patches it.
COMPANION_MODULES = {EVICTION_HELPER_MODULE: "lmdeploy.pytorch.paging.scheduler"}


def _reclaim_remote_ready(helper, seq) -> bool:
    """Reclaim a remote-ready request whose loaded blocks are already in the prefix trie.

    LMDeploy 0.18.0's ``_reclaim_candidate`` never reclaims a request whose external load
    finished but that was not scheduled yet (``is_remote_ready``), so a chunked long prefill
    admitted later can wait forever on its blocks while it waits on the prefill. With the
    prefix cache on, ``KVLoadCoordinator._publish`` already inserted the loaded blocks into
    the trie, so reclaiming only drops the request's references (the trie keeps the blocks,
    evictable and demotable like any cached block) and releases its load record and soft
    reservation; the request is an ordinary waiting request again and re-matches the trie
    (or the host tier) when it is next admitted. Same steps as the stock body after its
    ``is_remote_ready`` check (pinned by the guard).
    """
    if seq.num_blocks == 0 and (not helper._is_ssm or seq.logical_state < 0):
        return False
    seq.prefix_cache.suppress_match_stats = True
    helper.load_coordinator.release_tracking(seq)
    seq.state.release_paging_resources()
    return True


def _patch_eviction_helper(mod) -> None:
    """Fix the remote-ready reclaim deadlock for engines whose connector is ours (see above)."""
    import functools

    cls = mod.RecomputeEvictionHelper
    original = cls.__dict__["_reclaim_candidate"]

    @functools.wraps(original)
    def _reclaim_candidate(self, seq):
        coordinator = self.load_coordinator
        if (self.block_trie.enabled and _is_ours(getattr(coordinator, "connector", None))
                and coordinator.is_remote_ready(seq)):
            return _reclaim_remote_ready(self, seq)
        return original(self, seq)

    _rebind(cls, "_reclaim_candidate", _mark(_reclaim_candidate),
            EVICTION_HELPER_MODULE + ":RecomputeEvictionHelper._reclaim_candidate")


def _patch_scheduler(mod) -> None:
    """``Scheduler.__init__`` post-hook, and the eviction-helper fix.

    ``scheduler.py`` imports the helper module lazily (inside ``build_eviction_helper``), so it
    is imported here: every engine builds its helper through ``Scheduler.__init__``, and both
    rebindings stay one all-or-nothing step.
    """
    import functools
    import importlib

    _patch_eviction_helper(importlib.import_module(EVICTION_HELPER_MODULE))
    cls = mod.Scheduler
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from .salted_trie import install_salted_trie

        install_salted_trie(getattr(self, "block_trie", None))  # per-request cache salts (issue 16)
        if _is_ours(getattr(self, "kv_connector", None)):
            if getattr(self, "is_ssm", False):
                from .compat import UnsupportedConfiguration

                raise UnsupportedConfiguration(["the model keeps recurrent (SSM/hybrid) state: LMDeploy "
                                                "disables external KV loads for such models"])
            from .connector import install_scheduler_hook

            install_scheduler_hook(self)

    _rebind(cls, "__init__", _mark(__init__), "lmdeploy.pytorch.paging.scheduler:Scheduler.__init__")
    _patch_preempt_seqs(cls)


def _patch_preempt_seqs(cls) -> None:
    """``Scheduler.preempt_seqs`` leaves a sequence whose external load is in flight alone.

    A turn of a session kept open ends; its sequence stays in LMDeploy's ``InputsMaker.running_seqs``
    until the next prefill or decode forward. When the session's next turn gets a host hit, its load
    starts and no prefill forward runs, so the next decode attempt finds that stale entry invalid and
    preempts it while it is ``WAITING_FOR_REMOTE_KVS``, whose state has no ``evict``:
    ``NotImplementedError`` out of the engine loop. Stock LMDeploy never starts such a load. The load
    coordinator owns that sequence until its terminal result, so it is skipped here (only with our
    connector; every other sequence is preempted as before)."""
    import functools

    from lmdeploy.pytorch.messages import MessageStatus

    original = cls.__dict__["preempt_seqs"]

    @functools.wraps(original)
    def preempt_seqs(self, seqs):
        if _is_ours(getattr(self, "kv_connector", None)):
            seqs = [seq for seq in seqs if seq.status != MessageStatus.WAITING_FOR_REMOTE_KVS]
        return original(self, seqs)

    _rebind(cls, "preempt_seqs", _mark(preempt_seqs), "lmdeploy.pytorch.paging.scheduler:Scheduler.preempt_seqs")


AGENT_MODULE = "lmdeploy.pytorch.engine.model_agent.agent"


class _StepTracker:
    """The forward steps of one ``BaseModelAgent`` in flight (its background loop runs them one at a
    time, in the agent's event loop), and a way to wait until none is.

    The wait has no deadline: the connector cannot be shut down under a step that still runs (that
    is the crash the wait prevents), so a forward that never ends keeps sleep waiting.  It is not
    silent: every ``SLOW_STEP_WARN_S`` seconds of waiting logs one warning naming the wait."""

    SLOW_STEP_WARN_S = 30.0

    __slots__ = ("running", "_idle")

    def __init__(self) -> None:
        self.running = 0
        self._idle = None

    def enter(self) -> None:
        self.running += 1

    def exit(self) -> None:
        self.running -= 1
        if self.running <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        import asyncio

        waited = 0.0
        while self.running > 0:
            if self._idle is None or self._idle.is_set():   # one event every waiter shares (two sleeps at once)
                self._idle = asyncio.Event()   # created in the waiting (the agent's) loop
            try:
                await asyncio.wait_for(self._idle.wait(), self.SLOW_STEP_WARN_S)
            except asyncio.TimeoutError:
                waited += self.SLOW_STEP_WARN_S
                _logger().warning("lmdeploy-hostcache: sleep has waited %.0f s for the forward step still "
                                  "executing; the KV connector is shut down when it ends (a forward that "
                                  "never ends keeps sleep waiting)", waited)


def _step_tracker(agent) -> _StepTracker:
    tracker = agent.__dict__.get("_hostcache_steps")
    if tracker is None:
        tracker = agent._hostcache_steps = _StepTracker()
    return tracker


def _wait_before_sleep(agent) -> bool:
    """Whether ``BaseModelAgent.sleep`` must first wait for a forward step of ours still executing."""
    tracker = agent.__dict__.get("_hostcache_steps")
    if tracker is None or tracker.running <= 0 or getattr(agent, "memdecode_agent", None) is not None:
        return False
    dp = getattr(getattr(agent, "dist_config", None), "dp", 1)
    # DP > 1: stock sleep waits for to_sleep, which the step sets once its connector work is done and
    # then stays parked in (on to_wakeup) until wakeup: waiting for it to end would never return.
    return not (isinstance(dp, int) and dp > 1)


def _agent_has_host_tier(agent) -> bool:
    from .engine_config import is_host_tier

    return is_host_tier(getattr(getattr(agent, "cache_config", None), "kv_transfer_config", None))


def _patch_model_agent(mod) -> None:
    """``BaseModelAgent.sleep`` waits for a forward step still executing before the connector closes.

    ``Engine.sleep`` drains its loop (``EngineLoop.drain_for_sleep``): it stops scheduling and drops
    the batch it had sent ahead, but that batch may already be executing in the agent's background
    loop (``_async_loop_background`` -> ``_async_step``, parked at an ``await`` of its forward or
    postprocess). ``BaseModelAgent.sleep`` (no ``await`` with DP 1) then shuts the connector down
    (``kv_connector = None``) under it, and when the step resumes its ``start_kv_connector_save``
    asserts: the engine loop dies, ``wakeup`` finds a released agent, every later request is refused
    (LMDeploy 0.18.0; the host tier ships connector metadata with every step while copies are in
    flight, so that step is a connector step). So, for agents whose connector is ours: each
    ``_async_step`` is counted while it runs, and ``sleep`` first sets ``is_sleeping`` (as stock
    does first), drops the queued inputs (as ``shutdown_kv_connector`` would next: they never run)
    and waits until no step is running; then the stock body runs, whose ``shutdown_kv_connector``
    drains the output that step pushed. No step running: stock at once. DP > 1: stock (see
    ``_wait_before_sleep``). ``wakeup`` of an agent that was released (its engine loop failed, or it
    was closed) raises one clear error instead of an ``AttributeError`` on ``patched_model``.
    """
    import functools

    cls = mod.BaseModelAgent
    orig_step = cls.__dict__["_async_step"]
    orig_sleep = cls.__dict__["sleep"]
    orig_wakeup = cls.__dict__["wakeup"]

    @functools.wraps(orig_step)
    async def _async_step(self, *args, **kwargs):
        if not _is_ours(self.kv_connector):
            return await orig_step(self, *args, **kwargs)
        tracker = _step_tracker(self)
        tracker.enter()
        try:
            return await orig_step(self, *args, **kwargs)
        finally:
            tracker.exit()

    @functools.wraps(orig_sleep)
    async def sleep(self, level: int = 1):
        if _wait_before_sleep(self):
            self.state.is_sleeping = True
            self._drain_queues()
            _logger().info("lmdeploy-hostcache: sleep waits for the forward step still executing before "
                           "the KV connector is shut down")
            await self._hostcache_steps.wait_idle()
        return await orig_sleep(self, level)

    @functools.wraps(orig_wakeup)
    def wakeup(self, tags=None):
        if getattr(self, "patched_model", True) is None and _agent_has_host_tier(self):
            raise RuntimeError("lmdeploy-hostcache: this engine's model agent was released (its engine loop "
                               "stopped: see the first error in the log, e.g. 'Engine main loop failed'); it "
                               "cannot wake up: restart the server")
        return orig_wakeup(self, tags)

    target = AGENT_MODULE + ":BaseModelAgent."
    _rebind(cls, "_async_step", _mark(_async_step), target + "_async_step")
    _rebind(cls, "sleep", _mark(sleep), target + "sleep")
    _rebind(cls, "wakeup", _mark(wakeup), target + "wakeup")


def _patch_executor_base(mod) -> None:
    import functools

    from .engine_config import is_host_tier

    cls = mod.ExecutorBase
    orig_init = cls.__dict__["__init__"]
    orig_update = cls.__dict__["_update_num_gpu_blocks"]

    import inspect

    init_signature = inspect.signature(orig_init)

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        # the LoRA adapters (name -> path) the engine loads: the store keys name their weights too
        # (l3_tier.record_weights); ExecutorBase takes them but keeps them nowhere
        try:
            self._hostcache_adapters = init_signature.bind(self, *args, **kwargs).arguments.get("adapters")
        except TypeError:
            self._hostcache_adapters = None
        if is_host_tier(getattr(self.cache_config, "kv_transfer_config", None)):
            from .compat import check_model_supported

            check_model_supported(self.cache_config, model_config=self.model_config,
                                  misc_config=getattr(self, "misc_config", None))

    @functools.wraps(orig_update)
    def _update_num_gpu_blocks(self, free_mems, cache_block_sizes, spec_cache_config, *args, **kwargs):
        result = orig_update(self, free_mems, cache_block_sizes, spec_cache_config, *args, **kwargs)
        tc = getattr(self.cache_config, "kv_transfer_config", None)
        if is_host_tier(tc):
            from ..config import HostCacheConfig
            from .compat import UnsupportedConfiguration, check_model_supported
            from .engine_config import cache_plan_for_executor, kv_dtype_name, plan_host_slots, size_host_cache

            check_model_supported(self.cache_config, model_config=self.model_config,
                                  misc_config=getattr(self, "misc_config", None))
            extra = tc.kv_connector_extra_config
            host_cfg = HostCacheConfig.from_dict(dict(extra.get("hostcache_config") or {}),
                                                 source="kv_connector_extra_config.hostcache_config")
            fmt = host_cfg.host_kv_format
            per_rank = [int(s.target) + int(getattr(s, "spec", 0)) for s in cache_block_sizes]
            try:
                plan, source = cache_plan_for_executor(self) if fmt != "same" else (None, "")
                slots = plan_host_slots(per_rank, fmt, plan, plan_source=source)
            except Exception as exc:  # refuse before any KV cache or host memory exists
                raise UnsupportedConfiguration([f"cannot plan host slots for host_kv_format={fmt!r}: {exc}"]) \
                    from exc
            dp = getattr(getattr(self, "dist_config", None), "dp", 1)
            dp = dp if isinstance(dp, int) and not isinstance(dp, bool) and dp > 1 else 1
            blocks, slot_bytes, reason = size_host_cache(extra, list(slots.slot_bytes), data_parallel=dp)
            # each DP engine's workers contribute 1/dp of the store's segment (l3_tier.WorkerL3)
            if dp > 1:   # each DP engine also captures to its own file (trace_capture.data_parallel_path)
                extra["data_parallel"] = dp
                extra["dp_rank"] = int(getattr(self.dist_config, "dp_rank", 0))
            else:
                extra.pop("data_parallel", None)
                extra.pop("dp_rank", None)
            if blocks <= 0:
                raise UnsupportedConfiguration([f"the host tier would get 0 slots: {reason} Give it more "
                                                "memory (host_cache_gb) or run without --host-cache-gb"])
            extra["host_cache_blocks"] = blocks
            extra["host_slot_bytes"] = slot_bytes
            # blocks of two dtypes have the same size: the dtype keys every namespace and store key
            extra["kv_dtype"] = kv_dtype_name(self.model_config, self.cache_config.quant_policy)
            if host_cfg.l3 is not None:   # the store's keys name the weights (l3_tier.record_weights)
                from .l3_tier import record_weights

                try:
                    record_weights(extra, host_cfg.l3, getattr(getattr(self, "misc_config", None), "hf_overrides", None),
                                   adapters=getattr(self, "_hostcache_adapters", None),
                                   draft_model=getattr(getattr(self, "specdecode_config", None), "model", None),
                                   quant_config=getattr(self.model_config, "quant_config", None))
                except ValueError as exc:
                    raise UnsupportedConfiguration([str(exc)]) from None
            if slots.tensor_specs is not None:
                extra["host_tensor_specs"] = [dict(spec) for spec in slots.tensor_specs]
            else:
                extra.pop("host_tensor_specs", None)
            reason = f"{reason} {slots.describe()}."
            # WARNING: ``lmdeploy serve api_server``'s default --log-level shows it (an INFO line would not: an
            # active tier would then look off)
            try:
                from lmdeploy.utils import get_logger

                get_logger("lmdeploy").warning(f"{ACTIVE_LOG_PREFIX} {reason}")
            except Exception:  # logging must never break start-up
                _logger().warning("%s %s", ACTIVE_LOG_PREFIX, reason)
        return result

    base = "lmdeploy.pytorch.engine.executor.base:ExecutorBase."
    _rebind(cls, "__init__", _mark(__init__), base + "__init__")
    _rebind(cls, "_update_num_gpu_blocks", _mark(_update_num_gpu_blocks), base + "_update_num_gpu_blocks")


def _patch_cli_serve(mod) -> None:
    from . import cli_patch

    cls = mod.SubCliServe
    orig_add = cls.__dict__["add_parser_api_server"].__func__
    orig_run = cls.__dict__["api_server"].__func__
    _rebind(cls, "add_parser_api_server", cli_patch.wrap_add_parser_api_server(orig_add, cls),
            "lmdeploy.cli.serve:SubCliServe.add_parser_api_server", wrap_kind="staticmethod")
    _rebind(cls, "api_server", cli_patch.wrap_api_server(orig_run),
            "lmdeploy.cli.serve:SubCliServe.api_server", wrap_kind="staticmethod")
    from . import proxy_routing  # `lmdeploy serve proxy --routing-strategy cache_aware`

    _rebind(cls, "add_parser_proxy",
            proxy_routing.wrap_add_parser_proxy(cls.__dict__["add_parser_proxy"].__func__, cls),
            "lmdeploy.cli.serve:SubCliServe.add_parser_proxy", wrap_kind="staticmethod")
    _rebind(cls, "proxy", proxy_routing.wrap_proxy(cls.__dict__["proxy"].__func__),
            "lmdeploy.cli.serve:SubCliServe.proxy", wrap_kind="staticmethod")


def _patch_engine(mod) -> None:
    from . import metrics_export

    cls = mod.Engine
    _rebind(cls, "get_schedule_metrics",
            metrics_export.wrap_engine_get_schedule_metrics(cls.__dict__["get_schedule_metrics"]),
            "lmdeploy.pytorch.engine.engine:Engine.get_schedule_metrics")
    for name in WEIGHT_UPDATES:
        _rebind(cls, name, _wrap_weight_update(cls.__dict__[name], name), f"lmdeploy.pytorch.engine.engine:Engine.{name}")


# Engine methods that change the weights in place: the shared store stops for that engine first
WEIGHT_UPDATES = ("update_params", "update_weights_from_ipc", "update_weights_from_distributed")


def _weights_updated(engine, how: str) -> None:
    connector = getattr(getattr(engine, "scheduler", None), "kv_connector", None)
    notify = getattr(connector, "on_weights_updated", None)
    if notify is not None:
        notify(how)


def _wrap_weight_update(original, name: str):
    import functools
    import inspect

    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def update(self, *args, **kwargs):
            _weights_updated(self, name)
            return await original(self, *args, **kwargs)
    else:
        @functools.wraps(original)
        def update(self, *args, **kwargs):
            _weights_updated(self, name)
            return original(self, *args, **kwargs)
    return _mark(update)


def _patch_stats(mod) -> None:
    from . import metrics_export

    cls = mod.SchedulerStats
    _rebind(cls, "update_from_schedule_metrics",
            metrics_export.wrap_update_from_schedule_metrics(cls.__dict__["update_from_schedule_metrics"]),
            "lmdeploy.metrics.stats:SchedulerStats.update_from_schedule_metrics")


def _patch_loggers(mod) -> None:
    from . import metrics_export

    log_cls, prom_cls = mod.LoggingStatLogger, mod.PrometheusStatLogger
    _rebind(log_cls, "log", metrics_export.wrap_logging_log(log_cls.__dict__["log"]),
            "lmdeploy.metrics.loggers:LoggingStatLogger.log")
    _rebind(prom_cls, "__init__", metrics_export.wrap_prometheus_init(prom_cls.__dict__["__init__"]),
            "lmdeploy.metrics.loggers:PrometheusStatLogger.__init__")
    _rebind(prom_cls, "record_schedule",
            metrics_export.wrap_prometheus_record_schedule(prom_cls.__dict__["record_schedule"]),
            "lmdeploy.metrics.loggers:PrometheusStatLogger.record_schedule")


# ----------------------------------------------------------------------------------------
# refusal stubs: on an LMDeploy the guard refuses, the flags and keywords stay accepted and any
# request for the tier gets one message (compat.unavailable_message) instead of
# "unrecognized arguments" or a TypeError. host_cache_gb 0 (tier off) still runs as stock.


def _unavailable():
    from .compat import HostTierUnavailable, unavailable_message

    result = _state.guard_result
    return HostTierUnavailable(unavailable_message(getattr(result, "version", None),
                                                   list(getattr(result, "problems", []) or [])))


def _refusal_messages(mod) -> None:
    import functools

    cls = mod.PytorchEngineConfig
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, *args, host_cache_gb=None, host_cache_config=None, **kwargs):
        if host_cache_gb is not None or host_cache_config is not None:
            from ..config import load_config

            if load_config(host_cache_config, host_cache_gb=host_cache_gb).enabled:
                raise _unavailable()
        original(self, *args, **kwargs)

    _rebind(cls, "__init__", _mark(__init__), "lmdeploy.messages:PytorchEngineConfig (refusal)")


def _refusal_cli_serve(mod) -> None:
    from . import cli_patch

    cls = mod.SubCliServe
    orig_add = cls.__dict__["add_parser_api_server"].__func__
    orig_run = cls.__dict__["api_server"].__func__
    _rebind(cls, "add_parser_api_server", cli_patch.wrap_add_parser_api_server(orig_add, cls),
            "lmdeploy.cli.serve:SubCliServe.add_parser_api_server (refusal)", wrap_kind="staticmethod")
    _rebind(cls, "api_server", cli_patch.wrap_api_server(orig_run, refusal=_unavailable),
            "lmdeploy.cli.serve:SubCliServe.api_server (refusal)", wrap_kind="staticmethod")


REFUSAL_PATCHERS = {
    "lmdeploy.messages": _refusal_messages,
    "lmdeploy.cli.serve": _refusal_cli_serve,
}


def require_supported_lmdeploy() -> None:
    """Raise ``HostTierUnavailable`` unless the guard accepts the installed LMDeploy (checked once)."""
    with _lock():
        if _state.guard_result is None:
            from . import guard

            try:
                _state.guard_result = guard.verify(_state.root, **_state.guard_kwargs)
            except Exception as exc:
                _state.guard_result = guard.GuardResult(False, None, [f"the version guard failed to run: {exc!r}"])
        if not _state.guard_result.ok:
            raise _unavailable()


# module name -> patcher. Order matters only for activate() on already-imported modules.
PATCHERS = {
    "lmdeploy.messages": _patch_messages,
    "lmdeploy.pytorch.kv_connector.factory": _patch_factory,
    "lmdeploy.pytorch.paging.scheduler": _patch_scheduler,
    "lmdeploy.pytorch.engine.executor.base": _patch_executor_base,
    "lmdeploy.pytorch.engine.engine": _patch_engine,
    AGENT_MODULE: _patch_model_agent,
    "lmdeploy.cli.serve": _patch_cli_serve,
    "lmdeploy.metrics.stats": _patch_stats,
    "lmdeploy.metrics.loggers": _patch_loggers,
    "lmdeploy.pytorch.messages": _patch_pytorch_messages,
    "lmdeploy.serve.utils.server_utils": _patch_server_utils,
}


# ----------------------------------------------------------------------------------------
# guard + application


def _refuse(status: str, reason: str) -> None:
    _state.status = status
    _state.reason = reason
    autoload.stopped = True  # the finder steps aside: later imports stay stock ...
    # ... except the refusal stubs' modules when the guard refused this LMDeploy
    autoload.still_patched = frozenset(REFUSAL_PATCHERS) if status == "refused" else frozenset()
    _logger().warning(reason)


def _apply_refusal(module_name: str, module) -> None:
    """Install the refusal stub of ``module_name`` (best effort: this LMDeploy may differ)."""
    if module_name not in REFUSAL_PATCHERS or module_name in _state.patched_modules:
        return
    try:
        REFUSAL_PATCHERS[module_name](module)
    except Exception as exc:
        _logger().warning("lmdeploy-hostcache: cannot register its flags/keywords on this LMDeploy (%s: %r); "
                          "they will be unrecognized", module_name, exc)
        return
    _state.patched_modules.add(module_name)


def _ensure_guard() -> bool:
    """Run the guard once; True when patching may proceed."""
    if _state.status in ("refused", "failed", "disabled"):
        return False
    if _state.guard_result is None:
        from . import guard

        try:
            _state.guard_result = guard.verify(_state.root, **_state.guard_kwargs)
        except Exception as exc:  # a guard that cannot run refuses
            _state.guard_result = guard.GuardResult(False, None, [f"the version guard failed to run: {exc!r}"])
    result = _state.guard_result
    if not result.ok:
        _refuse("refused", result.message())
        return False
    if _state.status != "active":
        _state.status = "active"
        _state.reason = result.message()
    return True


def _apply(module_name: str, module) -> None:
    """Patch one module (all or nothing for the whole process)."""
    with _lock():
        if module_name in _state.patched_modules:
            return
        if not _ensure_guard():
            if _state.status == "refused":
                _apply_refusal(module_name, module)
            return
        try:
            PATCHERS[module_name](module)
        except Exception as exc:
            _rollback()
            _refuse("failed", f"lmdeploy-hostcache not activated, LMDeploy runs as stock: patching "
                              f"{module_name} failed ({exc!r}); every patch was reverted")
            return
        _state.patched_modules.add(module_name)


def _rollback() -> None:
    for patch in reversed(_state.patches):
        try:
            patch.revert()
        except Exception:  # pragma: no cover - best effort, keep reverting the rest
            pass
    _state.patches.clear()
    _state.patched_modules.clear()
    _sweep_aliases()


def activate(*, root=None, **guard_kwargs) -> dict:
    """Activate by hand: install the finder and patch the target modules already imported.

    ``root`` and ``guard_kwargs`` (``version=``, ``pins=``) are passed to ``guard.verify``
    (tests use them to simulate another LMDeploy). Returns ``status()``.
    """
    with _lock():
        if is_disabled():
            _state.status, _state.reason = "disabled", f"{ENV_DISABLE} is set"
            return status()
        if root is not None or guard_kwargs:
            _state.root = root
            _state.guard_kwargs = dict(guard_kwargs)
            _state.guard_result = None
        autoload.install_finder()
        if _state.status == "inactive":
            _state.status = "hooked"
        for name in PATCHERS:
            mod = sys.modules.get(name)
            if mod is not None:
                _apply(name, mod)
        if _state.status not in ("refused", "failed"):
            _ensure_guard()
        return status()


def deactivate() -> dict:
    """Revert every patch and remove the finder (tests; a later ``activate()`` starts afresh)."""
    with _lock():
        _rollback()
        autoload.remove_finder()
        autoload.stopped = False
        autoload.still_patched = frozenset()
        fresh = _State()
        _state.__dict__.update(fresh.__dict__)
        return status()


def status() -> dict:
    """Where activation stands: status, reason, patched modules and rebound attributes."""
    current = _state.status
    if current == "inactive" and autoload.finder in sys.meta_path:
        current = "hooked"  # installed by the .pth; LMDeploy not imported yet
    return {
        "status": current,
        "reason": _state.reason,
        "patched_modules": sorted(_state.patched_modules),
        "patches": [repr(p) for p in _state.patches],
        "hook_installed": autoload.finder in sys.meta_path,
    }
