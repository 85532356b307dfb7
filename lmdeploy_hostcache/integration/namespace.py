"""Digest namespaces derived from LMDeploy's cache config.

A host block may be reused only by a request that would have computed the very same KV bytes.
Everything that changes those bytes for identical tokens enters the ``digest.Namespace``:

* the model (``_namespace_model``), from ``kv_connector_extra_config['model_identity']`` (set by the
  activation layer from the model path; required, never guessed): the resolved path, or a hub id.
  Nodes that keep one model under different paths (another home's cache, another mount) agree only
  where the name does not depend on the path: a Hugging Face cache snapshot, whose files are links
  named by their content hashes, is named by those (``model_content_name``: weight files by their
  blobs' names, every other file by its bytes; with the store tier joined by the weights' name), and
  with the store tier an operator's ``l3.weights_id`` (with the configuration fingerprinted, so two
  models given one id stay apart) names it, snapshot or not.  A plain folder keeps its path: the
  sampled fingerprint (``l3/weights.py``) is not exact enough to let two folders' KV meet on it alone
  (it still keys the store: two fine-tunes at one path never share);
* the LoRA adapter (``SchedulerSequence.adapter_name``; one namespace per adapter, mirroring
  the per-adapter roots of LMDeploy's BlockTrie); with the store tier on and no ``l3.weights_id``,
  the adapter's name is joined by its weights' fingerprint (``adapter_weights_fingerprints``,
  ``l3_tier.record_weights``): two nodes may give one name to other adapter weights, and the
  fingerprint keys that adapter's namespace only, so nodes loading different adapter sets still
  share the base model's blocks;
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
    """The namespace's model field (see the module docstring): with the store tier's ``l3.weights_id``
    (and a configuration to fingerprint) the operator's name; else the model's exact content name when
    it has one (``model_content_name``; with the store tier joined by the weights' name); else the model
    identity."""
    identity = model_identity_from_extra(extra)
    exact = extra.get("model_content_name")
    if exact is not None and (not isinstance(exact, str) or not exact):
        raise ValueError(f"kv_connector_extra_config['model_content_name'] must be a non-empty string, got {exact!r}")
    if hostcache.l3 is None:
        return "exact:" + exact if exact else identity
    from .l3_tier import weights_name   # noqa: PLC0415 -- l3_tier imports this module

    name = weights_name(hostcache.l3, extra)
    if hostcache.l3.weights_id and extra.get("model_config_fingerprint"):
        # named by the operator (weights_id, the configuration fingerprinted): a snapshot and a plain copy
        # of the same weights share, as the operator said
        return "weights:" + name
    if exact:
        return f"weights:{name}/exact:{exact}"
    return identity


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
