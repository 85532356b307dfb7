"""The shared store tier (``l3:``) inside the host-tier connector: glue from LMDeploy's cache
config to ``l3.chain`` (all decisions and byte checks live there).

* ``SchedulerL3.build(scheduler)``: the scheduler's store client (lookups only: it contributes a
  minimal segment) and its ``SchedulerChain`` over the scheduler's ``HostIndex``;
* ``WorkerL3.build(worker)``: one rank's client (it contributes ``global_segment_gb`` / (TP size x
  data-parallel engines), so the node gives the store ``global_segment_gb`` whatever its TP and DP
  sizes) and its ``WorkerChain`` over the rank's ``HostPool``.

Both sides derive the same per-rank ``StoreKeyspace``: the base namespace (its model named as
``integration/namespace.py`` says; adapters differ through the chained digest itself), the TP size
and rank, the planned bytes of one host slot (``host_slot_bytes``) and the weights (``weights_name``:
``l3.weights_id`` with the model configuration's fingerprint, or the checkpoint fingerprint the
executor hook computed, ``weights_fingerprint``; then the draft model, the weights' quantization and
``hf_overrides``). Invariants: with no ``l3:`` section nothing here runs; a store that cannot be
reached at start-up raises (``on_unreachable: error``) or leaves the node without the tier
(``warn``); a worker never writes back a slot its pool has not had written; a worker refuses to start
with a ``ConfigError``, before it opens a store client, when its ``local_buffer_gb`` cannot hold one
block's object (``check_local_buffer``: every put and every restore would fail) or its share of
``global_segment_gb`` is under Mooncake's floor (``check_segment_share``: setup would refuse it); the
scheduler's query-only client, with its small buffer, moves no objects and is not checked.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from ..config import ConfigError, FieldError
from ..l3 import objects
from ..l3.backend import connect
from ..l3.chain import SchedulerChain, WorkerChain
from ..l3.client import buffer_need
from ..l3.config import GIB, MIN_SEGMENT_BYTES
from ..l3.keys import StoreKeyspace
from ..tier.metrics import L3TierMetrics
from .namespace import NamespaceFactory

logger = logging.getLogger("lmdeploy_hostcache.l3")
_QUERY_ONLY_GB = 1 / 64   # the scheduler's client only checks existence: a token segment


def _space_nbytes(extra) -> int:
    planned = extra.get("host_slot_bytes")
    return int(planned) if isinstance(planned, int) and not isinstance(planned, bool) else 0


def _gib_rounded_up(nbytes: int) -> float:
    """``nbytes`` in GiB, rounded up to the 0.001 GiB a start-up error shows."""
    return -(-nbytes * 1000 // GIB) / 1000


def check_local_buffer(cfg, block_size: int, slot_nbytes: int) -> None:
    """``ConfigError`` naming ``l3.local_buffer_gb`` when one block's store object on this rank
    (``block_size`` token ids of 4 bytes, a host slot of ``slot_nbytes``, the object header) cannot
    pass through the client's local buffer (``client.buffer_need``): Mooncake would refuse every put
    and answer every get of it with nothing. Nothing is checked while the slot size is unknown (0)."""
    if slot_nbytes <= 0:
        return
    obj = objects.object_nbytes(4 * max(0, int(block_size)), int(slot_nbytes))
    have = cfg.local_buffer_bytes
    if buffer_need([obj], have) <= have:
        return
    need = buffer_need([obj], 2 * obj)
    min_gb = _gib_rounded_up(need)
    raise ConfigError([FieldError(
        "l3.local_buffer_gb", cfg.local_buffer_gb, f"at least {min_gb:g}",
        f"got {cfg.local_buffer_gb:g} GiB ({have} bytes), too small for one block: its store object on this "
        f"rank is {obj} bytes (a host slot of {slot_nbytes} bytes, {block_size} token ids, the header) and "
        f"Mooncake's client buffer needs {need} bytes for it (its allocator rounds each object up); every put "
        f"and restore would fail. Set l3.local_buffer_gb to at least {min_gb:g}")])


def check_segment_share(cfg, share: int) -> None:
    """``ConfigError`` naming ``l3.global_segment_gb`` when each of the node's ``share`` clients (TP ranks x
    DP engines) would contribute a segment Mooncake's setup refuses (under ``MIN_SEGMENT_BYTES``)."""
    each = int(cfg.global_segment_gb / share * GIB)   # what the client's L3Config.global_segment_bytes will be
    if each >= MIN_SEGMENT_BYTES:
        return
    min_gb = _gib_rounded_up(share * MIN_SEGMENT_BYTES)
    raise ConfigError([FieldError(
        "l3.global_segment_gb", cfg.global_segment_gb, f"at least {min_gb:g}",
        f"each of this node's {share} store clients (TP ranks x data-parallel engines) contributes 1/{share} of "
        f"it, {each} bytes, and Mooncake refuses a segment under "
        f"{MIN_SEGMENT_BYTES // 2**20} MiB. Set l3.global_segment_gb to at least {min_gb:g}")])


def _digest(value) -> str:
    import json

    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(value, sort_keys=True, default=repr).encode())


def record_weights(extra: dict, cfg, hf_overrides, adapters=None, draft_model=None, quant_config=None) -> None:
    """At start-up (executor hook), put in ``extra`` what ``weights_name`` needs on every side: the
    digest of LMDeploy's ``hf_overrides`` (``hf_overrides_digest``) and of the weights' quantization
    when LMDeploy quantizes or loads quantized weights (``quant_config``, e.g. ``model_format='fp8'``
    quantizing at load: ``weight_format_digest``); without ``l3.weights_id``, the fingerprint of the
    checkpoint at ``extra['model_identity']`` (``weights_fingerprint``), one per LoRA adapter (name ->
    path; ``adapter_weights_fingerprints``, which key that adapter's namespace only: its blocks are keyed by
    its name, which two nodes may give to other weights, and the base model's blocks are the same whatever
    adapters a node loads) and one of the speculative draft model (``companion_weights_fingerprint``). The store outlives this
    process and other nodes read it, so its keys name the weights and the settings that change what
    they compute. ``ValueError`` when a weight file cannot be read."""
    for key in ("weights_fingerprint", "hf_overrides_digest", "weight_format_digest",
                "companion_weights_fingerprint", "model_config_fingerprint", "adapter_weights_fingerprints"):
        extra.pop(key, None)   # an earlier run's, in a reused config
    if hf_overrides:
        extra["hf_overrides_digest"] = _digest(hf_overrides)
    if getattr(quant_config, "quant_method", None):
        extra["weight_format_digest"] = _digest(vars(quant_config))
    if cfg.weights_id:
        from ..l3.weights import config_fingerprint

        try:   # one id given to two models (another architecture or size) must not share their KV
            config = config_fingerprint(extra.get("model_identity"))
        except ValueError as exc:
            raise ValueError(f"l3: cannot read the model's configuration for the store keys: {exc}") from None
        if config is not None:
            extra["model_config_fingerprint"] = config
        return
    from ..l3.weights import checkpoint_fingerprint

    def fingerprint_of(path) -> str | None:
        try:
            return checkpoint_fingerprint(path if isinstance(path, str) else None)
        except ValueError as exc:
            raise ValueError(f"l3: cannot fingerprint the weights for the store keys: {exc}; "
                             "set l3.weights_id to name them") from None

    # a path not on this machine is named by the path (a hub id)
    if adapters:   # each adapter keys its own namespace (namespace.NamespaceFactory), not the base model's
        extra["adapter_weights_fingerprints"] = {
            str(name): fingerprint_of(path) or f"path:{path}" for name, path in sorted(adapters.items())}
    model_path = extra.get("model_identity")   # the resolved model path (prepare hook)
    if draft_model and not (isinstance(model_path, str) and os.path.realpath(str(draft_model)) == os.path.realpath(model_path)):
        # an MTP draft in the target's own checkpoint: once is enough; a draft of its own shares the slot
        extra["companion_weights_fingerprint"] = _digest([("draft", fingerprint_of(draft_model) or f"path:{draft_model}")])
    fingerprint = fingerprint_of(model_path)
    if fingerprint is None:
        logger.warning("l3: the model path %r is not on this machine, so the store keys name the weights by that "
                       "path only; set l3.weights_id (e.g. the commit hash) so that nodes with other weights never "
                       "share objects", model_path)
    else:
        extra["weights_fingerprint"] = fingerprint


def weights_name(cfg, extra) -> str:
    """What names the weights in the store keys: ``l3.weights_id`` when set (with the fingerprint of the
    model's configuration files, ``model_config_fingerprint``, when the model is a local folder), else
    the checkpoint fingerprint the executor hook put in the extra config (``weights_fingerprint``), else
    ""; then the draft model's fingerprint, the weights' quantization and the digest of LMDeploy's
    ``hf_overrides``, each when there is one (``record_weights``)."""
    if cfg is not None and cfg.weights_id:
        name = "id:" + cfg.weights_id
    else:
        fp = extra.get("weights_fingerprint")
        name = "fp:" + fp if isinstance(fp, str) and fp else ""
    for key, tag in (("model_config_fingerprint", "cf"), ("companion_weights_fingerprint", "aw"),
                     ("weight_format_digest", "wf"), ("hf_overrides_digest", "hf")):
        value = extra.get(key)
        if isinstance(value, str) and value:
            name += f"/{tag}:{value}"
    return name


def rank_keyspace(namespaces: NamespaceFactory, tp_size: int, tp_rank: int, extra, cfg=None) -> StoreKeyspace:
    return StoreKeyspace(namespaces.for_adapter(None), tp_size=int(tp_size), tp_rank=int(tp_rank),
                         block_nbytes=_space_nbytes(extra), weights=weights_name(cfg, extra))


class SchedulerL3:
    def __init__(self, chain: SchedulerChain, metrics: L3TierMetrics) -> None:
        self.chain = chain
        self.metrics = metrics

    @classmethod
    def build(cls, sched: Any) -> SchedulerL3 | None:
        cfg = sched.hostcache.l3
        if cfg is None:
            return None
        metrics = L3TierMetrics()
        query_cfg = dataclasses.replace(cfg, global_segment_gb=_QUERY_ONLY_GB, local_buffer_gb=_QUERY_ONLY_GB)
        client = connect(query_cfg, metrics=metrics, logger=logger)
        if client is None:
            return None
        extra = sched.cache_config.kv_transfer_config.kv_connector_extra_config
        spaces = [rank_keyspace(sched.namespaces, sched.tp_size, r, extra, cfg) for r in range(sched.tp_size)]
        logger.info("l3 tier: Mooncake Store at %s (%s), %s", cfg.master_address, cfg.protocol, cfg.write_policy)
        return cls(SchedulerChain(sched.index, client, spaces, cfg.write_policy), metrics)

    def close(self) -> None:
        if self.chain.client is not None:
            self.chain.client.close()


class WorkerL3:
    """One rank's store client and chain. Its puts and object checks happen here, in the worker
    process, where LMDeploy's connector output cannot carry counters back to the scheduler: the
    rank logs them itself (``log_progress``): a warning the first time the store refuses a put or
    a read object fails its checks, and a summary at most every ``LOG_EVERY_S`` seconds when the
    counters moved."""

    LOG_EVERY_S = 60.0

    def __init__(self, chain: WorkerChain, metrics: L3TierMetrics | None = None, tp_rank: int = 0) -> None:
        self.chain = chain
        self.metrics = metrics if metrics is not None else L3TierMetrics()
        self.tp_rank = tp_rank
        self._warned: set[str] = set()
        self._logged: dict[str, float] = {}
        self._logged_at = time.monotonic()

    def log_progress(self, now: float | None = None) -> None:
        s = self.metrics.snapshot()
        for key, what in (("put_refused", "refused a put (full?)"), ("corrupt", "returned an object that failed "
                          "its checks"), ("missing", "no longer had a block it listed")):
            if s.get(key, 0) and key not in self._warned:
                self._warned.add(key)
                logger.warning("l3 tier rank %d: the store %s; those blocks are recomputed (counted in this "
                               "rank's l3 summary lines)", self.tp_rank, what)
        now = time.monotonic() if now is None else now
        counters = {k: s.get(k, 0) for k in ("put_blocks", "put_refused", "get_blocks", "errors", "timeouts",
                                              "missing", "corrupt", "corrupt_removed")}
        if counters != self._logged and now - self._logged_at >= self.LOG_EVERY_S:
            self._logged, self._logged_at = counters, now
            logger.info("l3 tier rank %d: %s, write-back errors %d", self.tp_rank,
                        " ".join(f"{k}={v}" for k, v in counters.items()), self.chain.write_back_errors)

    @classmethod
    def build(cls, worker: Any) -> WorkerL3 | None:
        cfg = worker.hostcache.l3
        if cfg is None:
            return None
        metrics = L3TierMetrics()
        # global_segment_gb is what the node gives the store: each TP rank's client of each
        # data-parallel engine contributes its share (local_buffer_gb is each client's own staging
        # buffer, kept whole: its batches need the room)
        share = max(1, int(worker.tp_size)) * int(worker.extra.get("data_parallel", 1))   # set > 1 or absent
        pool = getattr(worker, "pool", None)   # registered before the tier is built (worker.py)
        slot_nbytes = int(pool.slot_bytes) if pool is not None else _space_nbytes(worker.extra)
        check_local_buffer(cfg, int(getattr(getattr(worker, "cache_config", None), "block_size", 0) or 0),
                           slot_nbytes)
        if share > 1:
            check_segment_share(cfg, share)
            cfg = dataclasses.replace(cfg, global_segment_gb=cfg.global_segment_gb / share)
        client = connect(cfg, metrics=metrics, logger=logger)
        if client is None:
            return None
        namespaces = NamespaceFactory.from_cache_config(worker.cache_config, worker.hostcache)
        space = rank_keyspace(namespaces, worker.tp_size, worker.tp_rank, worker.extra, cfg)
        pool = worker.pool

        def read_slot(slot: int):
            return pool.slot_view(slot).numpy()

        def write_slot(slot: int, payload) -> None:
            pool.slot_view(slot).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)

        return cls(WorkerChain(client, space, pool.slot_bytes, read_slot, write_slot), metrics, int(worker.tp_rank))

    def close(self) -> None:
        self.chain.client.close()
