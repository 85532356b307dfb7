"""Digest namespaces derived from LMDeploy's cache config.

A host block may be reused only by a request that would have computed the very same KV bytes.
Everything that changes those bytes for identical tokens enters the ``digest.Namespace``:

* the model (``_namespace_model``), named so that nodes keeping one model under different paths
  (another home's hub cache, another mount) agree.  From ``kv_connector_extra_config['model_identity']``
  (set by the activation layer from the model path; required, never guessed): with the shared store
  tier (``l3``), the name the executor hook gave the weights by content (the checkpoint's fingerprint,
  or ``l3.weights_id`` with the model's configuration fingerprinted: ``l3_tier.weights_name``), so
  nodes with the same weights share the store and other weights never do; without it, the
  fingerprint of the model folder's configuration files (no KV leaves the process: the name only has
  to agree across nodes for the cache-state feed and captures merged for ``plan --cluster``); a hub id
  not on this machine stays the name;
* the LoRA adapter (``SchedulerSequence.adapter_name``; one namespace per adapter, mirroring
  the per-adapter roots of LMDeploy's BlockTrie); with the store tier on, the adapter's name is
  joined by its weights' fingerprint (``adapter_weights_fingerprints``, ``l3_tier.record_weights``):
  two nodes may give one name to other adapter weights, and the fingerprint keys that adapter's
  namespace only, so nodes loading different adapter sets still share the base model's blocks;
* the KV format: LMDeploy's ``quant_policy``, the KV dtype (``kv_dtype`` in the extra config, set
  by the executor hook from LMDeploy's model config: fp16 and bf16 blocks have the same size and
  pass every token and checksum check, so without it a bf16 node could restore fp16 bytes
  from the shared store), the kernel page size, and the host format (``host_kv_format``:
  ``same`` keeps the GPU bytes, ``int8``/``int4`` re-quantize);
* the scheduler block size;
* ``tenant_salt`` from ``HostCacheConfig`` (engines/tenants with different salts never share).

Invariant: equal inputs give equal ``Namespace`` objects in every process (pure function).
"""
from __future__ import annotations

from typing import Any

from ..config import HostCacheConfig
from ..tier.digest import Namespace

__all__ = ["NamespaceFactory", "kv_format_name", "model_identity_from_extra"]

_QUANT_NAMES = {0: "native", 4: "int4", 8: "int8", 16: "fp8e4m3", 17: "fp8e5m2", 42: "turboquant"}


def model_identity_from_extra(extra_config: dict[str, Any]) -> str:
    """``extra_config['model_identity']``; raises ValueError naming the key when absent/empty."""
    ident = extra_config.get("model_identity")
    if not isinstance(ident, str) or not ident.strip():
        raise ValueError("kv_connector_extra_config['model_identity'] must be a non-empty string "
                         f"(the model path or name the host-tier namespace is keyed by); got {ident!r}")
    return ident


def kv_format_name(quant_policy: int, kernel_block_size: int, host_kv_format: str, kv_dtype: str | None = None) -> str:
    """Name of the bytes a host slot holds, e.g. ``native:bfloat16/kb64`` or ``native:float16/kb64>int4``
    (``kv_dtype`` None: no dtype in the name, for callers that fix it themselves, such as the CPU harness)."""
    q = int(quant_policy)
    dtype = f":{kv_dtype}" if kv_dtype else ""
    base = f"{_QUANT_NAMES.get(q, f'q{q}')}{dtype}/kb{int(kernel_block_size)}"
    return base if host_kv_format == "same" else f"{base}>{host_kv_format}"


def _namespace_model(extra: dict[str, Any], hostcache: HostCacheConfig) -> str:
    """The namespace's model field, the same on every node that serves the same model whatever its path:
    with the store tier, ``weights:<name>`` when the weights are named by content; without it,
    ``config:<fingerprint of the model folder's config.json>``; else the model identity (a hub id, or a
    path with no configuration file)."""
    identity = model_identity_from_extra(extra)
    if hostcache.l3 is not None:
        from .l3_tier import weights_name   # noqa: PLC0415 -- l3_tier imports this module

        name = weights_name(hostcache.l3, extra)
        # named by content: the checkpoint's fingerprint, or weights_id with the model's configuration
        # fingerprinted (a hub id not on this machine keeps the path: it is all that tells two models apart)
        by_content = name.startswith("fp:") or (name.startswith("id:") and "/cf:" in name)
        return "weights:" + name if by_content else identity
    # no KV leaves this process without the store tier: the name only has to match across nodes (the
    # cache-state feed, captures merged for plan --cluster), so the configuration is enough
    from ..l3.weights import config_fingerprint   # noqa: PLC0415

    try:
        config = config_fingerprint(identity)
    except ValueError:   # unreadable: the engine cannot load that model either; keep the path
        config = None
    return "config:" + config if config else identity


def _adapter_weights(extra: dict[str, Any]) -> dict[str, str]:
    """``extra['adapter_weights_fingerprints']`` (absent: none); ValueError naming the key when malformed."""
    value = extra.get("adapter_weights_fingerprints") or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in value.items()):
        raise ValueError("kv_connector_extra_config['adapter_weights_fingerprints'] must map adapter names to "
                         f"non-empty strings, got {value!r}")
    return value


class NamespaceFactory:
    """One ``Namespace`` per adapter, all sharing model, KV format, block size and salt."""

    def __init__(self, model: str, block_size: int, kv_format: str, tenant_salt: str = "",
                 adapter_weights: dict[str, str] | None = None) -> None:
        self.model = model
        self.block_size = int(block_size)
        self.kv_format = kv_format
        self.tenant_salt = tenant_salt
        self.adapter_weights = dict(adapter_weights or {})   # adapter name -> its weights' fingerprint
        self._by_adapter: dict[str | None, Namespace] = {}
        self.for_adapter(None)  # validates the shared fields now

    @classmethod
    def from_cache_config(cls, cache_config, hostcache: HostCacheConfig) -> NamespaceFactory:
        """Build from an LMDeploy ``CacheConfig`` carrying our ``kv_transfer_config``."""
        extra = cache_config.kv_transfer_config.kv_connector_extra_config
        kv_dtype = extra.get("kv_dtype")
        if kv_dtype is not None and (not isinstance(kv_dtype, str) or not kv_dtype.strip()):
            raise ValueError(f"kv_connector_extra_config['kv_dtype'] must be a non-empty string, got {kv_dtype!r}")
        return cls(
            model=_namespace_model(extra, hostcache),
            block_size=cache_config.block_size,
            kv_format=kv_format_name(cache_config.quant_policy, cache_config.kernel_block_size,
                                     hostcache.host_kv_format, kv_dtype),
            tenant_salt=hostcache.tenant_salt,
            adapter_weights=_adapter_weights(extra) if hostcache.l3 is not None else None,
        )

    def for_adapter(self, adapter_name: str | None) -> Namespace:
        """The namespace of requests (and trie nodes) of ``adapter_name`` (None: base model)."""
        adapter = adapter_name or None
        ns = self._by_adapter.get(adapter)
        if ns is None:
            weights = self.adapter_weights.get(adapter) if adapter is not None else None
            ns = Namespace(model=self.model, block_size=self.block_size, kv_format=self.kv_format,
                           adapter=adapter if weights is None else f"{adapter}@{weights}",
                           tenant_salt=self.tenant_salt)
            self._by_adapter[adapter] = ns
        return ns
