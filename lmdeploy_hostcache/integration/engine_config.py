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
     "host_slot_bytes": int,     # idem: bytes of one host slot on one TP rank, in host_kv_format
     "host_tensor_specs": [...], # idem, lossy host_kv_format only: the packed page fields of
                                 #   LMDeploy's cache plan (encode_tensor_specs), for the workers
     "model_identity": str,      # set at start-up from the model path
     "model_content_name": str,  # idem, when the model folder is named exactly by content (a Hugging
                                 #   Face cache snapshot): it then names the digest namespace's model
                                 #   whatever the path (integration/namespace.py)
     "kv_dtype": str}            # set by the executor hook: the model dtype and LMDeploy's KV cache
                                 #   dtype (kv_dtype_name), part of every digest namespace and store key

Host slot planning (executor hook, before any KV cache exists): ``plan_host_slots`` turns the
per-rank GPU block bytes LMDeploy measured into per-rank host slot bytes for the configured
``host_kv_format``, using the cache plan's tensor specs (``cache_plan_for_executor``) and the
transfer package's ``KVRowLayout`` on ``meta`` rows, so the slot size is the one the worker's
``HostPool`` will allocate. The same specs travel to the workers in ``host_tensor_specs``.

Tier off: ``host_cache_gb: 0`` (flag, YAML, keyword or extra config) means the tier is off and
LMDeploy runs as stock: ``drop_if_off`` returns ``None`` for such a ``kv_transfer_config``
(it is removed, never refused) and ``log_tier_off`` says so once in the log.

Invariants: every function validates before it builds anything (``ConfigError`` names
the field, ``ValueError`` names the conflicting connector, or ``kv_connector_extra_config`` when
it is not a mapping or carries a key that is neither a ``HostCacheConfig`` field nor one of
``EXTRA_CONFIG_KEYS``: such keys are refused, never dropped); inputs are never mutated.
``size_host_cache`` sizes through ``hostmem.resolve_host_cache_bytes``, the rule ``doctor`` and the
serve flags use too.
Only ``host_tier_transfer_config``/``with_host_cache``/``cache_plan_for_executor`` import
LMDeploy; ``plan_host_slots`` imports torch and the transfer layout.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import HostCacheConfig, load_config
from .compat import CONNECTOR_NAME, EXTRA_CONFIG_KEYS

__all__ = [
    "CONNECTOR_NAME",
    "HostSlotPlan",
    "KV_ROLE",
    "TIER_OFF_MESSAGE",
    "cache_plan_for_executor",
    "drop_if_off",
    "foreign_extra_keys",
    "foreign_extra_keys_message",
    "log_tier_off",
    "connector_rows_of_plan",
    "decode_tensor_specs",
    "encode_tensor_specs",
    "plan_host_slots",
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


TIER_OFF_MESSAGE = ("lmdeploy-hostcache: host_cache_gb is 0: the host-memory tier is off and LMDeploy runs as "
                    "stock (no KV connector)")


def log_tier_off(where: str = "") -> None:
    """One INFO line (through LMDeploy's logger when it is importable) saying the tier is off."""
    text = TIER_OFF_MESSAGE + (f" [{where}]" if where else "")
    try:
        from lmdeploy.utils import get_logger

        get_logger("lmdeploy").info(text)
    except Exception:  # logging must never break start-up
        import logging

        logging.getLogger("lmdeploy_hostcache").info(text)


def drop_if_off(transfer_config: Any, where: str = "") -> Any:
    """``transfer_config`` unchanged, or ``None`` when it names our connector with ``host_cache_gb: 0``.

    Validates our settings on the way (``ConfigError`` naming the field); another connector's
    config is returned as it is.
    """
    if not is_host_tier(transfer_config):
        return transfer_config
    extra = normalise_extra_config(_get(transfer_config, "kv_connector_extra_config"))
    cfg = HostCacheConfig.from_dict(extra["hostcache_config"], source="kv_connector_extra_config.hostcache_config")
    if cfg.enabled:
        return transfer_config
    log_tier_off(where)
    return None


def foreign_extra_keys(extra: Mapping[str, Any]) -> list[str]:
    """Keys of ``extra`` that are neither ``EXTRA_CONFIG_KEYS`` nor a ``HostCacheConfig`` field (``-`` for ``_``)."""
    allowed = set(EXTRA_CONFIG_KEYS) | set(HostCacheConfig.field_names())
    return sorted(str(k) for k in extra if str(k).replace("-", "_") not in allowed)


def foreign_extra_keys_message(unknown: Sequence[str]) -> str:
    """The refusal of ``unknown`` extra-config keys: ``compat.supported_problems``'s text, plus a
    did-you-mean for a misspelt setting."""
    import difflib

    allowed = list(EXTRA_CONFIG_KEYS) + list(HostCacheConfig.field_names())
    text = (f"kv_connector_extra_config has keys {sorted(unknown)} that belong to no setting of "
            f"{CONNECTOR_NAME} (allowed: {list(EXTRA_CONFIG_KEYS)} or a HostCacheConfig field); settings of "
            "another connector cannot be combined with the host tier")
    hints = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key.replace("-", "_"), allowed, n=1, cutoff=0.8)
        if close:
            hints.append(f"{close[0]!r} for {key!r}")
    if hints:
        text += f" (did you mean {', '.join(hints)}?)"
    return text


def normalise_extra_config(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new extra-config dict in the documented layout.

    Flat ``HostCacheConfig`` fields (``{"host_cache_gb": 64}``, what a hand-written
    ``--kv-transfer-config`` naturally carries) move into ``hostcache_config``; the result
    is validated (``ConfigError``) and written back in ``to_dict`` form. ``None`` is an empty
    mapping; anything else that is not a mapping, and a key that is neither a
    ``HostCacheConfig`` field nor one of ``EXTRA_CONFIG_KEYS`` (another connector's setting, a
    misspelling), is a ``ValueError`` naming ``kv_connector_extra_config``: never dropped.
    """
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"kv_connector_extra_config must be a mapping (a JSON object) of {CONNECTOR_NAME} "
                         f"settings, not {type(extra).__name__}")
    extra = dict(extra)
    fields = set(HostCacheConfig.field_names())
    unknown = foreign_extra_keys(extra)
    if unknown:
        raise ValueError(foreign_extra_keys_message(unknown))
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
    settings = load_config(config, host_cache_gb=host_cache_gb) if config is not None or host_cache_gb is not None \
        else None
    out = copy.deepcopy(engine_config)
    if settings is not None and not settings.enabled:  # host_cache_gb 0: the tier is off, LMDeploy as stock
        if is_host_tier(out.kv_transfer_config):
            out.kv_transfer_config = None
        log_tier_off("with_host_cache")
        return out
    from .activate import require_supported_lmdeploy

    require_supported_lmdeploy()  # HostTierUnavailable on any LMDeploy but the supported one
    out.kv_transfer_config = host_tier_transfer_config(host_cache_gb, config, existing=engine_config.kv_transfer_config)
    return out


def kv_dtype_name(model_config: Any, quant_policy: int) -> str:
    """The dtypes that decide a block's bytes: the model's (activations, and the scales of quantized caches)
    and, when it differs, LMDeploy's KV cache dtype for ``quant_policy`` (``_resolve_kv_cache_dtype``,
    pinned by the version guard), e.g. ``bfloat16`` or ``float16/kv-uint8``."""
    def short(dtype: Any) -> str:
        return str(dtype).removeprefix("torch.")

    model = short(model_config.dtype)
    try:
        from lmdeploy.pytorch.engine.cache_engine.schema import _resolve_kv_cache_dtype

        kv = short(_resolve_kv_cache_dtype(model_config, quant_policy))
    except Exception:  # noqa: BLE001 -- the model dtype alone still separates fp16 from bf16
        kv = model
    return model if kv == model else f"{model}/kv-{kv}"


def model_identity_from_path(model_path: str | None) -> str | None:
    """Stable identity of a model for host-block namespaces: its resolved path or hub id."""
    if not model_path:
        return None
    if os.path.exists(model_path):
        return os.path.realpath(model_path)
    return model_path


def size_host_cache(extra: Mapping[str, Any], rank_block_bytes: list[int],
                    facts: Any = None, data_parallel: int = 1) -> tuple[int, int, str]:
    """(host_cache_blocks, host_slot_bytes, reason) for the ranks of one engine.

    ``rank_block_bytes[r]`` is the bytes one host slot occupies for TP rank ``r``: the
    scheduler block's target plus speculative-model caches in the configured
    ``host_kv_format`` (``plan_host_slots(...).slot_bytes``; for ``same`` the GPU bytes).
    ``host_cache_gb`` is the engine's total over its ranks, so every rank gets
    ``host_cache_blocks`` slots and ``host_cache_blocks * sum(rank_block_bytes) <= host bytes``.
    ``data_parallel`` > 1: LMDeploy runs one engine per DP rank, each with this hook and the same
    settings, so each takes 1/``data_parallel`` of the node's figure (``auto`` or explicit); where
    the DP ranks span several nodes this is conservative.
    """
    from ..hostmem import format_bytes, resolve_host_cache_bytes

    if not rank_block_bytes or any(int(b) <= 0 for b in rank_block_bytes):
        raise ValueError(f"rank_block_bytes must list a positive size per rank, got {list(rank_block_bytes)}")
    cfg = HostCacheConfig.from_dict(dict(extra.get("hostcache_config") or {}),
                                    source="kv_connector_extra_config.hostcache_config")
    dp = max(1, int(data_parallel))
    # the one sizing rule (doctor and the serve flags use it too): with an l3 section, auto leaves the
    # store's segment (once per node) and a client buffer per rank of each DP engine room, and an
    # explicit size that does not fit total RAM beside them is refused (ConfigError)
    total, reason = resolve_host_cache_bytes(cfg, facts, l3_clients=len(rank_block_bytes) * dp)
    if dp > 1 and total > 0:
        total //= dp
        reason = (f"{reason.rstrip('.')}; shared by the {dp} data-parallel engines LMDeploy starts with the same "
                  f"settings: {format_bytes(total)} for this one.")
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


# ---------------------------------------------------------------------------------------------
# host slot planning from LMDeploy's cache plan (executor hook) and the specs handed to workers

TENSOR_SPEC_KEYS = ("name", "shape", "dtype", "alignment")


def _packed_specs(specs: Sequence[Any]) -> list[Any]:
    """The leading run of specs LMDeploy packs into cache pool 0 (rows ``cache_pool.0.row.*``)."""
    from ..transfer.layout import _packed_specs as packed

    return packed(specs)


def encode_tensor_specs(specs: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON form of the packed page fields of a cache plan's ``tensor_specs``.

    Takes LMDeploy ``CacheTensorSpec`` objects (``.name``, ``.desc.shape/.dtype/.alignment``)
    or ``transfer.TensorSpec``; keeps the fields of pool 0 only, the rows a lossy
    ``host_kv_format`` compresses. ``decode_tensor_specs`` inverts it.
    """
    out = []
    for spec in _packed_specs(specs):
        desc = getattr(spec, "desc", spec)
        dtype = getattr(desc, "dtype", None)
        name = str(dtype).removeprefix("torch.")
        out.append({"name": str(spec.name), "shape": [int(d) for d in desc.shape], "dtype": name,
                    "alignment": int(getattr(desc, "alignment", 256))})
    if not out:
        raise ValueError("the cache plan has no packed tensor specs (no cache_pool.0 fields) to describe")
    return out


def decode_tensor_specs(raw: Any, *, source: str = "kv_connector_extra_config['host_tensor_specs']"):
    """``transfer.TensorSpec`` tuple from ``encode_tensor_specs`` output; ValueError naming the entry."""
    import torch

    from ..transfer.layout import TensorSpec

    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise ValueError(f"{source} must be a non-empty list of tensor specs, got {raw!r}")
    specs = []
    for i, item in enumerate(raw):
        where = f"{source}[{i}]"
        if not isinstance(item, Mapping) or set(item) != set(TENSOR_SPEC_KEYS):
            raise ValueError(f"{where} must be a mapping with keys {list(TENSOR_SPEC_KEYS)}, got {item!r}")
        dtype = getattr(torch, str(item["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}.dtype {item['dtype']!r} is not a torch dtype")
        shape = item["shape"]
        if (not isinstance(shape, Sequence) or isinstance(shape, str)
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise ValueError(f"{where}.shape must be a list of ints >= 0, got {shape!r}")
        align = item["alignment"]
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ValueError(f"{where}.alignment must be an int >= 1, got {align!r}")
        specs.append(TensorSpec(str(item["name"]), tuple(shape), dtype, align))
    return tuple(specs)


def connector_rows_of_plan(cache_plan: Any, num_blocks: int = 1, device: str = "meta") -> dict[str, Any]:
    """Rows named and ordered as ``CacheEngine.connector_kv_caches`` names them, for ``num_blocks``
    blocks of ``cache_plan`` on ``device`` (``meta``: geometry only, nothing allocated)."""
    allocation = cache_plan.allocate(num_blocks, device)
    rows: dict[str, Any] = {}
    for pool_index, pool in enumerate(allocation.pools):
        if pool.nbytes == 0:
            continue
        if pool.entry_axis != 1:
            raise ValueError(f"cache pool {pool_index} uses entry_axis={pool.entry_axis}; LMDeploy's KV "
                             "connectors need entry_axis=1")
        for row_index, row in enumerate(pool.tensor):
            rows[f"cache_pool.{pool_index}.row.{row_index}"] = row
    return rows


@dataclass(frozen=True)
class HostSlotPlan:
    """Per-rank host slot bytes for one ``host_kv_format``, planned before any KV cache exists.

    ``slot_bytes[r] = gpu_block_bytes[r] - shrink``: a lossy format rewrites only the K/V
    fields of the packed pool's rows (every other field and row is copied raw at its own
    size), so the difference is the same on every rank and does not depend on fields the
    plan was built without. ``tensor_specs`` (lossy formats): ``encode_tensor_specs`` of the plan.
    """

    host_kv_format: str
    gpu_block_bytes: tuple[int, ...]
    slot_bytes: tuple[int, ...]
    shrink: int = 0
    tensor_specs: tuple[dict[str, Any], ...] | None = None
    plan_source: str = ""

    def describe(self) -> str:
        from ..hostmem import format_bytes

        if self.host_kv_format == "same":
            return "host_kv_format=same: a host slot holds the GPU block's bytes"
        gpu, host = max(self.gpu_block_bytes), max(self.slot_bytes)
        return (f"host_kv_format={self.host_kv_format}: {format_bytes(gpu)} per block on GPU -> "
                f"{format_bytes(host)} per host slot ({host / gpu:.3f}x; specs from {self.plan_source})")


def plan_host_slots(rank_block_bytes: Sequence[int], host_kv_format: str, cache_plan: Any = None,
                    *, plan_source: str = "the cache plan") -> HostSlotPlan:
    """Host slot bytes per TP rank for ``host_kv_format``.

    ``rank_block_bytes[r]``: GPU bytes of one scheduler block on rank ``r`` (target + spec).
    ``cache_plan`` (LMDeploy ``BlockCachePlan``) is needed for ``int8``/``int4``. Raises
    ValueError (naming the format and why) when the format cannot apply to the plan's rows,
    e.g. a quant_policy 4/8 cache, before anything is allocated.
    """
    from ..transfer.layout import HOST_KV_FORMATS, KVRowLayout

    gpu = tuple(int(b) for b in rank_block_bytes)
    if not gpu or any(b <= 0 for b in gpu):
        raise ValueError(f"rank_block_bytes must list a positive size per rank, got {list(rank_block_bytes)}")
    if host_kv_format not in HOST_KV_FORMATS:
        raise ValueError(f"host_kv_format must be one of {HOST_KV_FORMATS}, got {host_kv_format!r}")
    if host_kv_format == "same":
        return HostSlotPlan("same", gpu, gpu)
    if cache_plan is None:
        raise ValueError(f"host_kv_format={host_kv_format!r} needs LMDeploy's cache plan to size a host slot")
    rows = connector_rows_of_plan(cache_plan)
    layout = KVRowLayout.from_connector_caches(rows, int(cache_plan.kernel_blocks_per_logical_block),
                                               tensor_specs=cache_plan.tensor_specs)
    err = layout.compression_error(host_kv_format)
    if err:
        raise ValueError(f"host_kv_format={host_kv_format!r} cannot apply to this KV cache: {err}")
    shrink = layout.block_bytes - layout.slot_bytes(host_kv_format)
    slots = tuple(b - shrink for b in gpu)
    if layout.block_bytes > min(gpu) or min(slots) <= 0:
        raise ValueError(f"the cache plan's block ({layout.block_bytes} B) does not fit the per-rank GPU block "
                         f"bytes LMDeploy measured ({list(gpu)}): the plan is not this engine's")
    return HostSlotPlan(host_kv_format, gpu, slots, shrink, tuple(encode_tensor_specs(cache_plan.tensor_specs)),
                        plan_source)


def cache_plan_for_executor(executor: Any) -> tuple[Any, str]:
    """(LMDeploy ``BlockCachePlan``, where it came from) as the executor's workers build it.

    A local model agent (``UniExecutor``) holds the exact plan it built in
    ``_prepare_worker_cache_plans``; otherwise (Ray/mp workers in other processes) the plan
    is rebuilt with ``build_block_cache_plan(model_config, cache_config, attn_tp)``, the call
    the workers make minus operator-requested caches (those are copied raw by every host
    format, so the slot size difference does not depend on them).
    """
    agent = getattr(executor, "model_agent", None)
    plan = getattr(agent, "block_cache_plan", None)
    if plan is not None:
        return plan, "the model agent's cache plan"
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan

    dist = getattr(executor, "dist_config", None)
    tp = int(getattr(dist, "attn_tp", None) or getattr(dist, "world_size", 1) or 1)
    return (build_block_cache_plan(executor.model_config, executor.cache_config, tp),
            f"build_block_cache_plan(attn_tp={tp}) in the engine process")
