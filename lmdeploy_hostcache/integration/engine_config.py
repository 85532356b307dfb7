"""The host tier as LMDeploy configuration: ``kv_transfer_config`` built, merged and sized.

Python API (all three give the same engine):

- ``PytorchEngineConfig(..., enable_prefix_caching=True, host_cache_gb=64,
  host_cache_config="hostcache.yaml")`` once the extension is active (the keywords are
  accepted by a wrapper of the dataclass ``__init__``; ``activate.py``);
- ``with_host_cache(engine_config, host_cache_gb=64, config=None)``: a copy of any
  ``PytorchEngineConfig`` with the connector configured (works without the wrapper);
- ``host_tier_transfer_config(...)``: just the ``KVTransferConfig``.

``kv_connector_extra_config`` layout (flat, JSON-able)::

    {"hostcache_config": HostCacheConfig.to_dict(),
     "host_cache_blocks": int,   # set by the executor hook (size_host_cache)
     "host_slot_bytes": int,     # idem: bytes of one host slot on one TP rank
     "model_identity": str}      # set at start-up from the model path

Invariants: every function validates before it builds anything (``ConfigError`` names
the field, ``ValueError`` names the conflicting connector); inputs are never mutated.
Only ``host_tier_transfer_config``/``with_host_cache`` import LMDeploy.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from ..config import HostCacheConfig, load_config
from .compat import CONNECTOR_NAME, EXTRA_CONFIG_KEYS

__all__ = [
    "CONNECTOR_NAME",
    "KV_ROLE",
    "host_tier_transfer_dict",
    "host_tier_transfer_config",
    "is_host_tier",
    "merge_transfer_config",
    "model_identity_from_path",
    "normalise_extra_config",
    "size_host_cache",
    "with_host_cache",
]

KV_ROLE = "kv_both"
ConfigSource = str | os.PathLike | Mapping[str, Any] | HostCacheConfig | None


def _get(tc: Any, key: str) -> Any:
    if tc is None:
        return None
    if isinstance(tc, Mapping):
        return tc.get(key)
    return getattr(tc, key, None)


def is_host_tier(transfer_config: Any) -> bool:
    """True when ``transfer_config`` (KVTransferConfig, dict or None) names our connector."""
    return _get(transfer_config, "kv_connector") == CONNECTOR_NAME


def normalise_extra_config(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new extra-config dict in the documented layout.

    Flat ``HostCacheConfig`` fields (``{"host_cache_gb": 64}``, what a hand-written
    ``--kv-transfer-config`` naturally carries) move into ``hostcache_config``; the result
    is validated (``ConfigError``) and written back in ``to_dict`` form.
    """
    extra = dict(extra or {})
    fields = set(HostCacheConfig.field_names())
    flat = {k: extra.pop(k) for k in list(extra) if str(k).replace("-", "_") in fields}
    nested = extra.pop("hostcache_config", None)
    if nested is not None and not isinstance(nested, Mapping):
        raise ValueError(f"kv_connector_extra_config.hostcache_config must be a mapping, not {type(nested).__name__}")
    if nested and flat:
        both = sorted(set(k.replace("-", "_") for k in flat) & set(k.replace("-", "_") for k in nested))
        if both:
            raise ValueError(f"kv_connector_extra_config sets {both} both flat and inside hostcache_config")
    merged = dict(nested or {})
    merged.update(flat)
    cfg = HostCacheConfig.from_dict(merged, source="kv_connector_extra_config.hostcache_config")
    out = {k: v for k, v in extra.items()}
    out["hostcache_config"] = cfg.to_dict()
    return out


def merge_transfer_config(existing: Any, host_cache_gb: float | str | None = None,
                          config: ConfigSource = None) -> dict[str, Any]:
    """``kv_transfer_config`` (as a dict) that enables the host tier, merged with ``existing``.

    ``existing`` may be None, a dict or a KVTransferConfig. It is refused (ValueError
    naming it) when it configures another connector or a role other than kv_both: LMDeploy
    runs one connector at a time. Settings: ``config`` (YAML path, mapping or
    HostCacheConfig) or else the ``hostcache_config`` already in ``existing``, then
    ``host_cache_gb`` on top.
    """
    name = _get(existing, "kv_connector")
    if name is not None and name != CONNECTOR_NAME:
        raise ValueError(f"kv_transfer_config already configures the KV connector {name!r}; the host tier "
                         f"({CONNECTOR_NAME}) is a KV connector itself and LMDeploy runs one at a time. "
                         "Remove one of them.")
    role = _get(existing, "kv_role")
    if role is not None and role != KV_ROLE:
        raise ValueError(f"kv_transfer_config.kv_role is {role!r}; the host tier needs {KV_ROLE!r}")
    prior = normalise_extra_config(_get(existing, "kv_connector_extra_config")) if name else {}
    if config is not None and name is not None and _get(existing, "kv_connector_extra_config"):
        given = _get(existing, "kv_connector_extra_config")
        if "hostcache_config" in given or set(given) & set(HostCacheConfig.field_names()):
            raise ValueError("host-tier settings are given twice: in kv_transfer_config's "
                             "kv_connector_extra_config and as a config file/mapping; keep one")
    base = config if config is not None else prior.get("hostcache_config")
    cfg = load_config(base, host_cache_gb=host_cache_gb)
    extra = {k: v for k, v in prior.items() if k in EXTRA_CONFIG_KEYS}
    extra["hostcache_config"] = cfg.to_dict()
    return {"kv_connector": CONNECTOR_NAME, "kv_role": KV_ROLE, "kv_connector_extra_config": extra}


def host_tier_transfer_dict(host_cache_gb: float | str | None = None, config: ConfigSource = None) -> dict[str, Any]:
    """The ``kv_transfer_config`` dict for the host tier alone (what ``--kv-transfer-config`` takes)."""
    return merge_transfer_config(None, host_cache_gb, config)


def host_tier_transfer_config(host_cache_gb: float | str | None = None, config: ConfigSource = None,
                              existing: Any = None):
    """``lmdeploy.messages.KVTransferConfig`` for the host tier (merged with ``existing``)."""
    from lmdeploy.messages import KVTransferConfig

    return KVTransferConfig(**merge_transfer_config(existing, host_cache_gb, config))


def with_host_cache(engine_config: Any, host_cache_gb: float | str | None = None, config: ConfigSource = None):
    """A deep copy of ``engine_config`` (a PytorchEngineConfig) with the host tier configured.

    The copy keeps its class, so LMDeploy's ``isinstance`` checks still hold; the input is
    not modified. Refuses (ValueError) when ``engine_config`` already names another connector.
    """
    from lmdeploy.messages import PytorchEngineConfig

    if not isinstance(engine_config, PytorchEngineConfig):
        raise TypeError(f"with_host_cache: engine_config must be a PytorchEngineConfig (the host tier needs "
                        f"the PyTorch engine), not {type(engine_config).__name__}")
    transfer = host_tier_transfer_config(host_cache_gb, config, existing=engine_config.kv_transfer_config)
    out = copy.deepcopy(engine_config)
    out.kv_transfer_config = transfer
    return out


def model_identity_from_path(model_path: str | None) -> str | None:
    """Stable identity of a model for host-block namespaces: its resolved path or hub id."""
    if not model_path:
        return None
    if os.path.exists(model_path):
        return os.path.realpath(model_path)
    return model_path


def size_host_cache(extra: Mapping[str, Any], rank_block_bytes: list[int],
                    facts: Any = None) -> tuple[int, int, str]:
    """(host_cache_blocks, host_slot_bytes, reason) for the ranks of one engine.

    ``rank_block_bytes[r]`` is the bytes one scheduler block occupies on TP rank ``r``
    (target plus speculative-model caches). ``host_cache_gb`` is the engine's total over
    its ranks, so every rank gets ``host_cache_blocks`` slots and
    ``host_cache_blocks * sum(rank_block_bytes) <= host bytes``.
    """
    from ..hostmem import format_bytes, resolve_host_cache_bytes

    if not rank_block_bytes or any(int(b) <= 0 for b in rank_block_bytes):
        raise ValueError(f"rank_block_bytes must list a positive size per rank, got {list(rank_block_bytes)}")
    cfg = HostCacheConfig.from_dict(dict(extra.get("hostcache_config") or {}),
                                    source="kv_connector_extra_config.hostcache_config")
    total, reason = resolve_host_cache_bytes(cfg, facts)
    per_block_all_ranks = sum(int(b) for b in rank_block_bytes)
    blocks = int(total) // per_block_all_ranks
    slot_bytes = max(int(b) for b in rank_block_bytes)
    ranks = len(rank_block_bytes)
    detail = (f"{blocks} host slots per rank x {ranks} rank{'s' if ranks != 1 else ''} x "
              f"{format_bytes(slot_bytes)} per block = {format_bytes(blocks * per_block_all_ranks)}")
    if total > 0 and blocks == 0:
        detail += (f" (host_cache_gb is smaller than one block on every rank, "
                   f"{format_bytes(per_block_all_ranks)}: the tier is off)")
    return blocks, slot_bytes, f"{reason.rstrip('.')}; {detail}."
