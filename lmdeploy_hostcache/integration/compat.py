"""Start-up refusals: every configuration the host tier cannot serve correctly.

Two checkpoints, both before any KV cache or host memory is allocated:

1. ``check_supported(cache_config, model_path=, dist_config=, distributed_executor_backend=)``
   runs inside LMDeploy's ``prepare_kv_connector_config`` (``Engine.__init__`` calls it
   before building the executor): settings known from the engine config alone.
2. ``check_model_supported(cache_config, model_config=, misc_config=)`` runs at the end of
   ``ExecutorBase.__init__`` (model config parsed; no worker started, no weight loaded)
   and again just before host slots are sized (``_update_num_gpu_blocks``), because
   LMDeploy may still switch prefix caching off in ``update_configs``.

Invariant: each raises ``UnsupportedConfiguration`` (a ``ValueError``) whose message
names every offending setting and what to change; nothing is modified before it raises.
``host_cache_gb: 0`` is not refused: it means "tier off" and never reaches these checks
(``engine_config.drop_if_off`` removes the connector first; LMDeploy then runs as stock).

``HostTierUnavailable`` (also a ``ValueError``) is the one refusal used when the installed
LMDeploy is not the supported release (or its sources differ): the flags and keywords stay
accepted, and any request for the tier gets ``unavailable_message`` (the needed version and
how to run without the tier).
Neither function imports LMDeploy (they read attributes), so they are testable with
plain objects.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CONNECTOR_NAME",
    "HostTierUnavailable",
    "unavailable_message",
    "EXTRA_CONFIG_KEYS",
    "UnsupportedConfiguration",
    "check_model_supported",
    "check_supported",
    "executor_problems",
    "model_problems",
    "role_problems",
    "supported_problems",
]

CONNECTOR_NAME = "HostTierConnector"
# Keys our kv_connector_extra_config may carry (contract in docs/integration.md).
EXTRA_CONFIG_KEYS = ("hostcache_config", "host_cache_blocks", "host_slot_bytes", "host_tensor_specs",
                     "model_identity", "kv_dtype", "weights_fingerprint", "hf_overrides_digest",
                     "data_parallel", "dp_rank", "weight_format_digest", "companion_weights_fingerprint",
                     "model_config_fingerprint", "adapter_weights_fingerprints", "model_content_name")


class UnsupportedConfiguration(ValueError):
    """The host tier cannot serve this configuration correctly; ``reasons`` lists why."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("lmdeploy-hostcache (HostTierConnector) cannot run with this configuration:\n  - "
                         + "\n  - ".join(self.reasons))


class HostTierUnavailable(ValueError):
    """The host tier was asked for, but this LMDeploy is not the one the package supports."""


def unavailable_message(found_version: str | None, problems: list[str] | tuple[str, ...] = ()) -> str:
    """One paragraph: which LMDeploy is needed, what was found, how to run without the tier."""
    from . import guard  # no LMDeploy import: the guard reads files only

    need = guard.SUPPORTED_LMDEPLOY_VERSION
    found = found_version or "none"
    why = f" ({'; '.join(problems)})" if problems else ""
    return (f"lmdeploy-hostcache needs LMDeploy {need}, found {found}{why}: the host-memory tier cannot run "
            f"on this LMDeploy. To run without the tier, remove --host-cache-gb/--host-cache-config (in Python: "
            f"the host_cache_gb=/host_cache_config= keywords) or give host_cache_gb 0; "
            f"LMDEPLOY_HOSTCACHE_DISABLE=1 keeps the package out of every process. To use the tier, install "
            f"lmdeploy=={need} (docs/integration.md, 'Upgrading LMDeploy').")


def _name(value: Any) -> str:
    return getattr(value, "name", None) or str(value)


def supported_problems(cache_config: Any, *, model_path: str | None = None, dist_config: Any = None,
                       distributed_executor_backend: str | None = None) -> list[str]:
    """Reasons (possibly none) why ``cache_config`` cannot run the host tier."""
    problems: list[str] = []
    tc = getattr(cache_config, "kv_transfer_config", None)
    if tc is None or getattr(tc, "kv_connector", None) != CONNECTOR_NAME:
        return [f"kv_transfer_config.kv_connector is {getattr(tc, 'kv_connector', None)!r}, "
                f"not {CONNECTOR_NAME!r} (only one KV connector can be configured)"]
    if getattr(tc, "kv_role", None) != "kv_both":
        problems.append(f"kv_transfer_config.kv_role is {tc.kv_role!r}: the host tier both saves and "
                        "loads, set kv_role='kv_both'")
    extra = getattr(tc, "kv_connector_extra_config", None)
    if not isinstance(extra, Mapping):
        problems.append("kv_transfer_config.kv_connector_extra_config must be a dict")
    else:
        from .engine_config import foreign_extra_keys, foreign_extra_keys_message  # no heavy imports

        unknown = foreign_extra_keys(extra)
        if unknown:
            problems.append(foreign_extra_keys_message(unknown))
    if not getattr(cache_config, "enable_prefix_caching", False):
        problems.append("prefix caching is off: the host tier extends LMDeploy's prefix cache, pass "
                        "--enable-prefix-caching (enable_prefix_caching=True); if you did, LMDeploy switched it "
                        "off for this model (e.g. a vision-language model: see its warning)")
    device = getattr(cache_config, "device_type", "cuda")
    if device != "cuda":
        problems.append(f"device_type {device!r}: the host tier runs on CUDA only (its copies are ordered "
                        "against the forward with CUDA streams and events; no other device is validated)")
    window = getattr(cache_config, "window_size", -1)
    if window is not None and window > 0:
        problems.append(f"window attention (window_size={window}): blocks leave the window, so a restored "
                        "prefix would not match what the model attends to")
    if getattr(cache_config, "num_cpu_blocks", 0) > 0:
        problems.append(f"num_cpu_blocks={cache_config.num_cpu_blocks}: LMDeploy's legacy CPU block swap "
                        "cannot share host memory with the host tier; set num_cpu_blocks=0")
    role = getattr(cache_config, "role", None)
    if role is not None:
        problems += role_problems(_name(role))
    if getattr(cache_config, "states_shapes", None):
        problems.append("the model keeps recurrent (SSM) state: LMDeploy disables external KV loads for "
                        "SSM and hybrid models")
    world = getattr(dist_config, "world_size", 1) if dist_config is not None else 1
    return problems + executor_problems(distributed_executor_backend, world)


def role_problems(role: str) -> list[str]:
    """The refusal of a PD-disaggregation ``role`` (its name) other than Hybrid, if it is one."""
    if role == "Hybrid":
        return []
    return [f"PD disaggregation role {role}: only role=Hybrid is supported (migration writes into GPU blocks "
            "outside the forward ordering the tier relies on)"]


def executor_problems(distributed_executor_backend: str | None, world_size: int) -> list[str]:
    """The refusal of the ``mp`` executor over several ranks, if that is what is asked."""
    if distributed_executor_backend != "mp" or world_size <= 1:
        return []
    return [f"distributed_executor_backend='mp' with world_size={world_size}: the mp executor does not "
            "aggregate connector outputs over TP ranks; use 'ray'"]


def check_supported(cache_config: Any, *, model_path: str | None = None, dist_config: Any = None,
                    distributed_executor_backend: str | None = None) -> None:
    """Raise ``UnsupportedConfiguration`` naming every problem ``supported_problems`` finds."""
    problems = supported_problems(cache_config, model_path=model_path, dist_config=dist_config,
                                  distributed_executor_backend=distributed_executor_backend)
    if problems:
        raise UnsupportedConfiguration(problems)


def model_problems(cache_config: Any, *, model_config: Any = None, misc_config: Any = None) -> list[str]:
    """Reasons depending on the model (SSM/hybrid, sliding window, diffusion decoding) or on MemDecode."""
    problems: list[str] = []
    states = getattr(model_config, "states_shapes", None) or getattr(cache_config, "states_shapes", None)
    if states:
        model_type = getattr(getattr(model_config, "hf_config", None), "model_type", None)
        problems.append(f"the model{f' ({model_type})' if model_type else ''} keeps recurrent (SSM/hybrid) "
                        "state: LMDeploy disables external KV loads for such models")
    window = getattr(cache_config, "window_size", -1)
    sliding = getattr(model_config, "sliding_window", -1)
    for label, value in (("window_size", window), ("sliding_window", sliding)):
        if value is not None and value > 0:
            problems.append(f"window attention ({label}={value}): LMDeploy cannot prefix-cache a sliding "
                            "window, so there is nothing for the host tier to extend")
            break
    if getattr(model_config, "model_paradigm", "ar") == "dllm":
        problems.append("diffusion decoding (model_paradigm 'dllm', e.g. SDAR): it unmasks tokens of a block in "
                        "place, while the host tier's digest chains and restores assume tokens are only appended; "
                        "it has not been validated for it")
    if misc_config is not None and getattr(misc_config, "memdecode_config", None) is not None:
        problems.append("MemDecode (hf_overrides.memory_model_path): its memory-model KV cache is not in "
                        "the connector's cache rows, so a restore would leave it stale")
    if not getattr(cache_config, "enable_prefix_caching", False) and not problems:
        problems.append("LMDeploy switched prefix caching off for this model/engine (see its warning "
                        "above): the host tier has nothing to extend")
    return problems


def check_model_supported(cache_config: Any, *, model_config: Any = None, misc_config: Any = None) -> None:
    """Raise ``UnsupportedConfiguration`` naming every problem ``model_problems`` finds."""
    problems = model_problems(cache_config, model_config=model_config, misc_config=misc_config)
    if problems:
        raise UnsupportedConfiguration(problems)
