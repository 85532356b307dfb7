"""``HostTierConnector``: the host-DRAM tier as an LMDeploy 0.18.0 KV connector (both roles).

LMDeploy builds one instance per role through ``build_kv_connector`` (patched by the activation
layer to call ``build_host_tier_connector`` for ``kv_connector == "HostTierConnector"``):

* ``KVConnectorRole.SCHEDULER`` (engine process): owns the ``HostIndex`` (host slots), the
  ``HostTierMetrics`` counters and every decision. Its ``on_evict`` is wired into the trie by
  ``install_scheduler_hook`` (run after ``Scheduler.__init__``).
* ``KVConnectorRole.WORKER`` (one per TP rank): ``worker.HostTierWorker`` moves the bytes.

Data only flows the way LMDeploy carries it: scheduler -> worker in ``build_connector_meta``
(``worker.HostTierMetadata``), worker -> scheduler in ``get_finished`` ->
``update_connector_output``.

Scheduler-side flows
--------------------
Demotion (write-back on eviction). ``BlockTrie`` evicts leaf L (only the trie holds it):
``on_evict(L, gpu_block)`` computes L's chained digest (memoised on the trie ``Node`` as
``_hostcache_digest``; nodes on a multimodal path are never cached), then
``HostIndex.prepare_store`` gives a slot -> the pair ``(gpu_block, slot)`` joins this step's
demotion batch; already present -> touched; refused -> ``drop_subtree`` (L's host children
became unreachable). LMDeploy frees the GPU page right after; the worker copies it out before
the step's forward (see ``worker``). Completion -> ``complete_store(ok)``.

Restore. After the local GPU match LMDeploy asks ``get_num_new_matched_tokens(seq, n)``: the
request's full-block digests (cached per request; the chain starts at the memoised digest of
the request's trie cursor, so a GPU-matched prefix is not hashed again) from block
``n // block_size`` are looked up (``HostIndex.lookup``, exact token check); the hit is clamped
like LMDeploy's own match (multimodal boundary, recompute overlap, never the last token) and
dropped when it saves fewer than ``min_restore_tokens`` tokens. The lookup is synchronous:
never ``None``. The hit is touched and *held* (``HostIndex.hold_chain``: the blocks that could leave
pinned, at most half the slots counted over all holds) until its load starts or the scheduling pass
ends (``build_connector_meta``), so
the demotions LMDeploy makes while it finds GPU room for this very request cannot evict it.
LMDeploy then allocates destinations and calls ``update_state_after_alloc``:
``prepare_load`` pins the slots (the hold is released); the load ships in the next metadata; the request waits in
``WAITING_FOR_REMOTE_KVS``. ``update_connector_output`` -> ``complete_load(ok)`` and a
``KVLoadResult`` so LMDeploy publishes the blocks into the trie or rolls back and recomputes.
A request turn whose load failed recomputes (no second host attempt in that turn).
A load a worker refused because a source slot failed its checksum (``checksum: true``) also
reports that slot (``corrupt_slot_marker``): when the load ends, its host block is dropped with
its host subtree (``HostIndex.drop_corrupt``; counted in ``corrupt_blocks``, the subtree in
``host_evictions``), so the block this turn recomputes is demoted again into a fresh slot. Any
other load failure (a copy error, a cancellation) keeps the host blocks: it says nothing about
their bytes.

Second chance. When the trie evicts a block again while its first copy to host is still in
flight (the GPU recomputed it meanwhile), ``HostIndex.prepare_spare`` gives it a spare slot and
a second copy is queued: the block is lost only if both copies fail.

Teardown and rebuild (the host index must never outlive the pool it describes):
* Engine sleep (any level): every worker connector is shut down (its pool released) before
  LMDeploy calls ``finish_transfers_after_worker_drain``; that call settles everything in flight
  and drops the whole index (``drop_host_tier``). In-flight demotions are dropped with the pool,
  not counted as failures: LMDeploy discards the outputs that would say whether they completed
  (the worker logs its drain); wakeup builds new workers with empty pools. The same call also
  empties LMDeploy's GPU prefix trie (``clear_gpu_prefix_cache``, no demotion): LMDeploy 0.18.0
  keeps the trie across sleep although the KV cache behind it is released, and the sleep drain
  can discard a forward whose blocks the trie already lists.
* Engine close: ``shutdown`` does the same.
* A pool rebuilt without this side seeing it (e.g. ``wakeup(['kv_cache'])`` on an awake
  engine): the new worker reports ``pool_reset_marker(first_step)`` at its first poll (every pool
  after an engine's first does; one whose teardown this side saw starts at the floor and is
  ignored) and refuses
  every load of a slot its pool never had written; this side then fails the copies shipped before
  ``first_step`` (they went to the old pool), drops the whole index and empties the GPU trie
  (the cache engine was rebuilt with the pool), once per new pool.
* ``update_params`` touches neither the cache engine nor the connectors (LMDeploy 0.18.0): the
  host tier, like LMDeploy's GPU prefix cache, is kept.

Abort. ``stop_session``/``end_session`` call ``cancel_lookup`` first: a load not yet shipped is
failed without touching the worker; one in flight is marked cancelled and its slots are
unpinned (host copies kept) when the worker reports it. ``request_finished`` forgets the
request; ``finish_transfers_after_worker_drain`` unpins everything and fails open loads.

Invariants (checked by ``check_balanced``): when nothing is in flight every host slot is
unpinned and the index invariants hold; every load LMDeploy started gets exactly one terminal
``KVLoadResult`` (unless the request was removed first); no load is planned from an index that
outlived its pool (dropped at sleep/close/unseen rebuild, and the worker refuses unwritten slots).

Usage in-process (tests, CPU harness)::

    conn_s = build_host_tier_connector(KVConnectorRole.SCHEDULER, cache_config)
    sched = Scheduler(scheduler_config, cache_config, seq_meta=meta, kv_connector=conn_s)
    install_scheduler_hook(sched)
    conn_w = build_host_tier_connector(KVConnectorRole.WORKER, cache_config)
    conn_w.worker_side.engine_kwargs["delay_polls"] = 1   # optional: CpuCopyEngine completes late
    conn_w.register_kv_caches(kv_caches)            # LMDeploy's connector_kv_caches rows
    #   lossy host_kv_format: the specs come from extra['host_tensor_specs'] (executor hook),
    #   or register_kv_caches(kv_caches, tensor_specs=plan.tensor_specs)
    # each step: meta = sched.build_connector_meta(running)
    #            conn_w.bind_connector_metadata(meta); conn_w.start_load_kv(); ...forward...
    #            out = conn_w.get_finished(); conn_w.clear_connector_metadata()
    #            sched.update_connector_output(out)
    conn_s.scheduler_side.stats()            # counters + host_slots / host_slots_used / host_blocks
    conn_s.scheduler_side.check_balanced()   # index invariants; no pinned slot when nothing in flight
    conn_w.worker_side.engine.fail_next(1, kind="load")   # fault injection (transfer API)

``kv_connector_extra_config`` read here: ``hostcache_config`` (HostCacheConfig dict),
``model_identity`` (required), ``host_cache_blocks`` (slots per TP rank; else computed from a
numeric ``host_cache_gb`` and ``host_slot_bytes``), ``host_slot_bytes`` (one host slot of one
rank in ``host_kv_format``; also scales the byte counters: blocks x host_slot_bytes x tp_size;
the worker refuses a layout whose slot is larger), ``host_tensor_specs`` (lossy formats: the
cache plan's packed page fields, ``engine_config.encode_tensor_specs``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from lmdeploy.pytorch.kv_connector.base import (
    KVCacheValue,
    KVConnectorBase,
    KVConnectorOutput,
    KVConnectorResult,
    KVConnectorRole,
    KVConnectorStepInput,
    KVLoadResult,
    RequestId,
)

from ..config import HostCacheConfig
from ..tier.digest import ChainHasher, block_digest, encode_tokens, salted_root
from ..tier.host_index import HostIndex
from ..tier.metrics import HostTierMetrics
from ..restore_cost import resolve_min_restore_tokens
from .lifecycle import install_lifecycle_observer
from .namespace import NamespaceFactory
from .request_salt import ROOT_SALT_ATTR, node_root_salt, sequence_salt
from .trace_capture import capture_from_config
from .worker import (
    HostLoad,
    HostTierMetadata,
    HostTierWorker,
    corrupt_slot_marker,
    failed_demotion_marker,
    pool_reset_step,
    resolve_num_slots,
)

if TYPE_CHECKING:
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy.pytorch.messages import SchedulerSequence
    from lmdeploy.pytorch.paging.block_trie.node import Node

__all__ = [
    "CONNECTOR_NAME",
    "HostLoad",
    "HostTierConnector",
    "HostTierMetadata",
    "HostTierScheduler",
    "build_host_tier_connector",
    "hostcache_config_from_extra",
    "install_scheduler_hook",
]

CONNECTOR_NAME = "HostTierConnector"
NODE_DIGEST_ATTR = "_hostcache_digest"
_MISSING = object()

logger = logging.getLogger("lmdeploy_hostcache.connector")


def hostcache_config_from_extra(extra_config: Mapping[str, Any]) -> HostCacheConfig:
    """``HostCacheConfig`` from ``kv_connector_extra_config['hostcache_config']`` (absent: defaults)."""
    raw = extra_config.get("hostcache_config")
    if raw is None:
        return HostCacheConfig()
    if isinstance(raw, HostCacheConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError("kv_connector_extra_config['hostcache_config'] must be a dict of HostCacheConfig "
                         f"fields, got {type(raw).__name__}")
    return HostCacheConfig.from_dict(raw, source="kv_connector_extra_config['hostcache_config']")


def _transfer_config(cache_config):
    tc = cache_config.kv_transfer_config
    if tc is None or not tc.is_kv_transfer_instance:
        raise ValueError(f"{CONNECTOR_NAME} needs cache_config.kv_transfer_config with kv_connector and kv_role")
    if tc.kv_connector != CONNECTOR_NAME:
        raise ValueError(f"{CONNECTOR_NAME} cannot serve kv_connector={tc.kv_connector!r}")
    return tc


# ---------------------------------------------------------------------------------------------
# scheduler role


@dataclass
class _LookupPlan:
    """A positive lookup waiting for LMDeploy to allocate destinations."""

    first_block: int
    digests: tuple[int, ...]
    block_bytes: tuple[bytes, ...]
    host_blocks: int = -1       # the first ones are host hits; the rest come from the l3 store
    parent: int = 0             # digest before digests[0] (the parent of a staged first block)


@dataclass
class _RequestChain:
    """Digests of a request's full blocks from ``start_block`` on (``hasher.digests[i]`` is
    block ``start_block + i``, chained over the whole prefix)."""

    start_block: int
    hasher: ChainHasher
    salt: str = ""              # the request's cache salt (request_salt.py) the chain was rooted at

    @property
    def end_block(self) -> int:
        return self.start_block + self.hasher.num_blocks

    def block_bytes(self, block: int) -> bytes:
        return self.hasher.block_bytes[block - self.start_block]

    def slice(self, first: int, last: int) -> tuple[list[int], list[bytes]]:
        i, j = first - self.start_block, last - self.start_block
        return self.hasher.digests[i:j], self.hasher.block_bytes[i:j]

    def parent_of(self, block: int) -> int:
        """The digest block ``block`` is chained after (the chain's root for its first block)."""
        i = block - self.start_block
        return self.hasher.digests[i - 1] if i > 0 else self.hasher.parent


def _cover(spans: list[tuple[int, int]], a: int, b: int) -> int:
    """Add blocks ``[a, b)`` to ``spans`` (sorted, disjoint, adjacent ones merged); return how many of
    them ``spans`` did not hold yet."""
    if b <= a:
        return 0
    new, lo, hi, keep = b - a, a, b, []
    for s, e in spans:
        if e < a or s > b:
            keep.append((s, e))
        else:   # overlapping or adjacent: merged (spans are disjoint, so overlaps are subtracted once)
            new -= max(0, min(e, b) - max(s, a))
            lo, hi = min(lo, s), max(hi, e)
    keep.append((lo, hi))
    keep.sort()
    spans[:] = keep
    return new


# seconds a store lookup's answer serves the same request turn's next attempts (``_probe_store``)
STORE_ANSWER_REUSE_S = 1.0


@dataclass
class _TurnCount:
    """What the counters already hold for one request turn (LMDeploy asks again at every admission
    attempt, and the GPU match may grow or shrink between attempts): the blocks looked up and found,
    in the host tier and in the store, as spans of block numbers. Each block is counted once per
    turn, so per turn hit blocks <= lookup blocks, and every restored host block was counted a hit."""

    turn: int                                           # input_start_pos of the turn
    lookup: list[tuple[int, int]] = field(default_factory=list)      # host: blocks looked up past the GPU match
    hit: list[tuple[int, int]] = field(default_factory=list)         # host: blocks found host-resident
    l3_lookup: list[tuple[int, int]] = field(default_factory=list)   # store: blocks asked for
    l3_hit: list[tuple[int, int]] = field(default_factory=list)      # store: blocks found
    l3_counted: bool = False                            # the turn's store lookup is counted (``l3.lookups``)
    behind_demotion: bool = False     # counted in ``lookups_behind_demotion``: the match stopped at a block mid-demotion
    l3_answer: tuple | None = None    # the last store answer: (first block asked, blocks asked, found, monotonic s)


@dataclass
class _Load:
    request_id: int
    gpu_blocks: tuple[int, ...]
    num_tokens: int
    turn: int = 0               # input_start_pos of the request turn that started the load
    digests: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    pinned: bool = False
    started_at: float = 0.0
    shipped_step: int = 0       # metadata step that carried it to the workers
    cancelled: bool = False     # stop/end requested: host copies are kept (unless a worker reports them corrupt)
    removed: bool = False       # request_finished seen: no KVLoadResult is owed any more
    staged: tuple = ()          # l3: (digests, token bytes, slots) reserved to stage store blocks in
    stage_refused: bool = False  # l3: no host slots to stage its store blocks in, so nothing was loaded


class HostTierScheduler:
    """Scheduler role: host index, decisions, per-step plans, completions, counters."""

    def __init__(self, cache_config, *, tp_size: int = 1) -> None:
        tc = _transfer_config(cache_config)
        extra = tc.kv_connector_extra_config
        self.cache_config = cache_config
        self.hostcache = hostcache_config_from_extra(extra)
        self.block_size = int(cache_config.block_size)
        self.tp_size = int(tp_size)
        self.is_consumer = bool(tc.is_kv_consumer)
        self.is_producer = bool(tc.is_kv_producer)
        self.namespaces = NamespaceFactory.from_cache_config(cache_config, self.hostcache)
        self.num_slots = resolve_num_slots(extra, self.hostcache, self.tp_size)
        slot_bytes = extra.get("host_slot_bytes")
        # PCIe bytes of one block summed over the TP ranks (0: unknown, bytes are not counted).
        self.block_transfer_bytes = int(slot_bytes) * self.tp_size if isinstance(slot_bytes, int) else 0
        # `auto`: restore-or-recompute threshold from calibrated (or assumed) figures (restore_cost).
        self.min_restore_tokens = resolve_min_restore_tokens(
            self.hostcache.min_restore_tokens, self.block_transfer_bytes / self.block_size)
        self.metrics = HostTierMetrics()
        self.index = HostIndex(self.num_slots, policy=self.hostcache.eviction_policy,
                               verify_tokens=self.hostcache.verify_tokens, on_evict=self._on_host_evict,
                               keep_restored=self.hostcache.keep_restored_blocks)
        self._step = 0
        self._next_batch = 0
        self._pending_demotions: list[tuple[int, int, int]] = []   # (digest, gpu_block, slot)
        self._pending_demote_gpu: set[int] = set()
        # batch -> (metadata step that shipped it, ((digest, slot), ...))
        self._inflight_demotions: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}
        # Metadata steps below this went to worker pools that are gone (sleep, close, a rebuild
        # reported by pool_reset_marker); the index holds nothing from them.
        self._pool_floor = 1
        self.tier_resets = 0        # times the whole index was dropped with its pool
        self._trie = None           # LMDeploy's BlockTrie (install_scheduler_hook)
        self._clearing_trie = False
        self._chains: dict[int, _RequestChain] = {}
        self._plans: dict[int, _LookupPlan] = {}
        # request -> digests of its lookup's host hit, held (pinned) until its load starts or
        # this scheduling pass ends (build_connector_meta): see _hold_hit
        self._holds: dict[int, tuple[tuple[int, ...], int]] = {}   # request -> (pinned digests, hit blocks counted)
        self._held_blocks = 0
        # request -> what its current turn already counted (each block once per turn: _count_lookup)
        self._counted_lookup: dict[int, _TurnCount] = {}
        self._orphans_counted = 0   # index.stats.orphaned already added to metrics.host_evictions
        self._pending_loads: dict[int, _Load] = {}
        self._inflight_loads: dict[int, _Load] = {}
        self._owed_results: list[KVLoadResult] = []
        self._failed_turns: dict[int, int] = {}   # request -> input_start_pos of a turn whose load failed
        # request -> input_start_pos of a turn whose store blocks found no host slots to stage in: its next
        # attempt asks the host tier only, so its host hits still load (the store part is recomputed)
        self._host_only_turns: dict[int, int] = {}
        self._invalid: set[int] = set()
        self.feed = None  # cache_state_feed.NodeCacheFeed when LMDEPLOY_HOSTCACHE_FEED_ADDR is set
        # LMDeploy's data-parallel engines (each with its own scheduler side), as the executor hook recorded them
        self.data_parallel, self.dp_rank = int(extra.get("data_parallel") or 1), extra.get("dp_rank")
        # trace_capture.TraceCapture when the `capture` setting names a file (never raises into LMDeploy)
        self.capture = capture_from_config(self.hostcache, self.block_size, self.namespaces, dp_rank=self.dp_rank)
        self.l3 = None
        if self.hostcache.l3 is not None:  # the shared store tier under the host tier (l3_tier.py)
            from .l3_tier import SchedulerL3

            try:
                self.l3 = SchedulerL3.build(self)
            except BaseException:
                # a start that fails here leaves no capture behind: no helper process, flusher thread or lock
                # on the capture file (an engine built again in this process captures to it)
                if self.capture is not None:
                    self.capture.close()
                raise

    # -- digests ---------------------------------------------------------------------------
    def node_digest(self, node: Node) -> int | None:
        """Chained digest of a trie node's whole prefix, memoised on the nodes of its path.

        None when the path holds a multimodal block (its KV depends on more than token ids)
        or the node is detached without a memo.
        """
        memo = getattr(node, NODE_DIGEST_ATTR, _MISSING)
        if memo is not _MISSING:
            return memo
        path = []
        cur = node
        while True:
            memo = getattr(cur, NODE_DIGEST_ATTR, _MISSING)
            if memo is not _MISSING:
                base = memo
                break
            if cur.parent is None:
                if cur.block_id >= 0:  # detached non-root: its chain is unknown
                    return None
                # a salted request's trie root (salted_trie.py) starts its own chain
                base = salted_root(self.namespaces.for_adapter(cur.adapter_name),
                                   getattr(cur, ROOT_SALT_ATTR, ""))
                setattr(cur, NODE_DIGEST_ATTR, base)
                break
            path.append(cur)
            cur = cur.parent
        for n in reversed(path):
            if base is not None and n.extra_identity == ():
                seed = self.namespaces.for_adapter(n.adapter_name).seed
                base = block_digest(base, encode_tokens(n.token_ids), seed)
            else:
                base = None
            setattr(n, NODE_DIGEST_ATTR, base)
        return base

    def _cursor_start(self, seq: SchedulerSequence, first: int) -> tuple[int, int] | None:
        """``(block, digest)`` to start the request's chain at its trie cursor, or None.

        The cursor is the deepest trie node LMDeploy matched for this request by exact token
        comparison; its digest is memoised on the node, so a shared prefix is hashed once per
        trie path, not once per request. Used only when the cursor is attached, block aligned,
        not past ``first`` and its own block's tokens equal the request's at that position.
        """
        cursor = seq.prefix_cache.trie_cursor
        if cursor is None or cursor.parent is None or not cursor.is_attached():
            return None
        bs = self.block_size
        k = int(cursor.prefix_len) // bs
        if k <= 0 or k * bs != cursor.prefix_len or k > first:
            return None
        if not np.array_equal(cursor.token_ids, seq.all_ids[(k - 1) * bs:k * bs]):
            return None
        if node_root_salt(cursor) != sequence_salt(seq):  # never start a chain on another salt's path
            return None
        digest = self.node_digest(cursor)
        return None if digest is None else (k, digest)

    def _request_chain(self, seq: SchedulerSequence, first: int, last: int) -> _RequestChain:
        """The request's digest chain covering blocks ``[first, last)``, cached per request."""
        req = int(seq.seq_id)
        ns = self.namespaces.for_adapter(seq.adapter_name)
        salt = sequence_salt(seq)
        bs = self.block_size
        all_ids = seq.all_ids
        chain = self._chains.get(req)
        if chain is not None:
            end = min(chain.end_block, last)
            stale = (chain.hasher.namespace is not ns or chain.salt != salt or chain.start_block > first or (
                end > chain.start_block
                and chain.block_bytes(end - 1) != encode_tokens(all_ids[(end - 1) * bs:end * bs])))
            if stale:
                chain = None
        if chain is None:
            start = self._cursor_start(seq, first)
            block, parent = start if start is not None else (0, salted_root(ns, salt))
            chain = _RequestChain(block, ChainHasher(ns, parent=parent), salt)
            self._chains[req] = chain
        if chain.end_block < last:
            chain.hasher.extend(all_ids[chain.end_block * bs:last * bs])
        return chain

    # -- eviction hook ---------------------------------------------------------------------
    def on_evict(self, leaf: Node, gpu_block: int) -> None:
        """Observer of ``HostTierKVBlockLifecycle``: LMDeploy is about to free ``leaf``'s page.

        Never raises into LMDeploy's eviction: an unexpected error costs only this block's host
        copy (logged, counted as a demotion failure) and eviction goes on as stock.
        """
        if self._clearing_trie:
            return                  # the KV behind the trie is gone: nothing to copy
        try:
            self._demote(leaf, int(gpu_block))
        except Exception:
            logger.exception("host tier: demotion of an evicted block failed; it is recomputed if needed")
            self.metrics.add(demotion_failures=1)

    def _demote(self, leaf: Node, gpu_block: int) -> None:
        digest = self.node_digest(leaf)
        if digest is None:
            return
        if gpu_block in self._pending_demote_gpu:
            # The page was freed by an earlier eviction of this step and reallocated: its bytes
            # for this node were never computed. Do not store it; its host children are orphans.
            self.index.drop_subtree(digest)
            self._count_orphans()
            return
        parent_digest = self.node_digest(leaf.parent) if leaf.parent is not None else None
        if parent_digest is None:
            return
        tokens = encode_tokens(leaf.token_ids)
        slot = self.index.prepare_store(digest, parent_digest, tokens)
        if slot is None:
            # Second chance: evicted again while its first copy is in flight (the GPU recomputed
            # it); that copy may still fail and this GPU page is about to be freed: copy it too.
            slot = self.index.prepare_spare(digest, tokens)
        if slot is not None:
            self._pending_demotions.append((digest, gpu_block, int(slot)))
            self._pending_demote_gpu.add(gpu_block)
            self.metrics.add(demotions=1)
        elif self.index.is_resident(digest):
            self.metrics.add(demotions_skipped=1)   # already on host (a kept restore, or a recomputed block)
        else:
            # refused: no free or evictable slot (for a first copy, or for a second one while the first is in flight)
            self.metrics.add(demotions_refused=1)
            if digest not in self.index:
                # Not stored and not resident: this prefix leaves every tier, so do its host children.
                self.index.drop_subtree(digest)
                self._count_orphans()

    def _on_host_evict(self, block) -> None:
        self.metrics.add(host_evictions=1)
        if self.l3 is not None:
            self.l3.chain.on_host_evict(block)   # write-back before the slot is reused

    # -- lookup / load admission -----------------------------------------------------------
    def get_num_new_matched_tokens(self, request: SchedulerSequence,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.capture is not None:   # a new turn of an engine session kept open ends the turn before it
            self.capture.on_lookup(request)
        if not self.is_consumer:
            return 0, False
        req = int(request.seq_id)
        self._plans.pop(req, None)
        self._release_hold(req)
        if self._failed_turns.get(req) == int(request.input_start_pos):
            return 0, False  # this turn's host load failed once: recompute it
        if not request.history_multimodals.empty() or len(request.history_embeddings) > 0:
            return 0, False
        if request.return_routed_experts:
            # the API returns each token's routed experts (RL routing replay); a host copy holds KV only,
            # so a restore would leave the restored tokens without them.  LMDeploy's own trie refuses a
            # match without routed experts for such a request too: recompute.
            return 0, False
        if request.return_ce_loss or request.return_logits:
            # the result scores the prompt (return_ppl's cross-entropy, output_logits='all') over the tokens the
            # forward computes: a restored prefix would drop out of it.  LMDeploy's AsyncEngine refuses such
            # requests with prefix caching on; through the Engine API they reach the scheduler: recompute.
            # (output_logits='generation' sets the same flag and is recomputed too: the flag does not say which)
            return 0, False
        bs = self.block_size
        token_len = request.clamp_prefix_cache_match_step(request.get_prefix_cache_max_candidate_step())
        token_len = token_len // bs * bs
        recompute = max(0, request.prefix_cache.recompute_overlap.recompute_blocks) * bs
        num_computed = int(num_computed_tokens)
        if token_len < bs or num_computed >= token_len - recompute:
            return 0, False
        first, last = num_computed // bs, token_len // bs
        chain = self._request_chain(request, first, last)
        digests, blocks = chain.slice(first, last)
        found = n = self.index.lookup(digests, blocks, parent=chain.parent_of(first))
        # only what the hold budget covers is reported: a reported hit is held until its load starts
        n = min(n, max(0, self.num_slots // 2 - self._held_blocks))
        s = 0
        count = self._count_lookup(req, int(request.input_start_pos), first, last, found)
        if found < len(digests) and not count.behind_demotion and self.index.is_writing(digests[found]):
            count.behind_demotion = True     # the next block's demotion has not landed: not matchable yet
            self.metrics.add(lookups_behind_demotion=1)
        if (self.l3 is not None and n == found and n < len(digests) and n < self.num_slots // 2
                and self._host_only_turns.get(req) != int(request.input_start_pos)):
            # the prefix continues in the shared store? Staged through host slots: at most half
            # of them per request (host hits included), so staging does not flush the host tier
            asked = digests[n:self.num_slots // 2]
            answer = self._probe_store(count, first + n, asked)
            if answer is not None:
                s = answer
                self._count_l3_lookup(count, first + n, first + n + len(asked), s)
        hit_end = (first + n + s) * bs - recompute if n + s else 0
        num_external = hit_end - num_computed
        if num_external <= 0 or num_external < self.min_restore_tokens:
            return 0, False
        n_use = hit_end // bs - first
        self._plans[req] = _LookupPlan(first, tuple(digests[:n_use]), tuple(blocks[:n_use]), min(n, n_use),
                                       chain.parent_of(first))
        self.index.touch(digests[:n_use])
        self._hold_hit(req, tuple(digests[:min(n, n_use)]))
        return num_external, True

    def _count_lookup(self, req: int, turn: int, first: int, last: int, found: int) -> _TurnCount:
        """Count a host lookup of blocks ``[first, last)`` that found ``[first, first + found)``, once per
        request turn: the turn's first attempt counts one lookup; every attempt adds only the blocks
        (looked up, found) that no earlier attempt of the turn counted, whichever way the GPU match moved."""
        count = self._counted_lookup.get(req)
        if count is None or count.turn != turn:
            count = self._counted_lookup[req] = _TurnCount(turn)
            self.metrics.add(lookups=1)
        looked, hit = _cover(count.lookup, first, last), _cover(count.hit, first, first + found)
        if looked or hit:
            self.metrics.add(lookup_blocks=looked, hit_blocks=hit, hit_tokens=hit * self.block_size)
        return count

    def _probe_store(self, count: _TurnCount, first: int, asked: Sequence[int]) -> int | None:
        """The store's answer for the blocks ``asked`` (from block ``first``), reused within the turn for
        ``STORE_ANSWER_REUSE_S`` when the same blocks are asked again: a request LMDeploy cannot admit yet asks
        at every scheduling pass, and each probe is one store call of TP x len(asked) keys on the scheduler
        thread. The store may change meanwhile (it is eventually consistent anyway): a block found but gone by
        the load fails that load, which recomputes; one added is found at the next probe."""
        now = time.monotonic()
        last = count.l3_answer
        if (last is not None and last[:2] == (first, len(asked)) and now - last[3] < STORE_ANSWER_REUSE_S
                and self.l3.chain.stopped is None):
            return last[2]
        answer = self.l3.chain.probe(asked)
        count.l3_answer = (first, len(asked), answer, now) if answer is not None else None
        return answer

    def _count_l3_lookup(self, count: _TurnCount, first: int, end: int, found: int) -> None:
        """Count an answered store lookup of blocks ``[first, end)`` that found ``[first, first + found)``,
        once per request turn, as ``_count_lookup`` does for the host tier."""
        if not count.l3_counted:
            count.l3_counted = True
            self.l3.metrics.add(lookups=1)
        looked, hit = _cover(count.l3_lookup, first, end), _cover(count.l3_hit, first, first + found)
        if looked or hit:
            self.l3.metrics.add(lookup_blocks=looked, hit_blocks=hit)

    def _count_orphans(self) -> None:
        """Add the host blocks orphaned since the last call (``HostIndex.stats.orphaned``: doomed because a
        host ancestor left every tier, each once) to ``host_evictions``."""
        orphaned = self.index.stats.orphaned
        if orphaned != self._orphans_counted:
            self.metrics.add(host_evictions=orphaned - self._orphans_counted)
            self._orphans_counted = orphaned

    def _hold_hit(self, req: int, digests: tuple[int, ...]) -> None:
        """Hold a lookup's host hit until its load starts (``update_state_after_alloc``) or this
        scheduling pass ends (``build_connector_meta``), whichever comes first: ``HostIndex.hold_chain``
        pins the blocks that could leave meanwhile, which keeps the whole hit.

        LMDeploy makes GPU room for the request between the lookup and the allocation; the blocks
        it evicts are demoted, and in a small host tier whose other blocks are all in flight
        those demotions would evict the hit itself, so the load would fail and the turn would
        recompute.  Holds live for one scheduling pass only and cover at most half the slots
        together, so demotions always keep room; ``get_num_new_matched_tokens`` reports a hit
        only up to what that budget still covers, so every reported hit is held.  A request that
        could not be admitted looks up again on its next attempt.
        """
        if digests and self._held_blocks + len(digests) <= self.num_slots // 2:   # always, by the above
            # the whole hit counts against the budget; only the blocks that could leave are pinned
            # (``hold_chain``: the deepest one and kept restores), so a request LMDeploy cannot admit yet
            # does not pin and unpin its whole hit at every pass
            self._holds[req] = (self.index.hold_chain(digests), len(digests))
            self._held_blocks += len(digests)

    def _release_hold(self, req: int) -> None:
        held = self._holds.pop(req, None)
        if held is not None:
            pinned, counted = held
            self._held_blocks -= counted
            self.index.release(pinned)

    def _release_all_holds(self) -> None:
        for req in list(self._holds):
            self._release_hold(req)

    def update_state_after_alloc(self, request: SchedulerSequence, block_ids: Sequence[int],
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        req = int(request.seq_id)
        plan = self._plans.pop(req, None)
        if req in self._pending_loads or req in self._inflight_loads:
            raise RuntimeError(f"{CONNECTOR_NAME}: request {req} already has a host load")
        gpu_blocks = tuple(int(b) for b in block_ids)
        n = len(gpu_blocks)
        load = _Load(req, gpu_blocks, int(num_external_tokens), turn=int(request.input_start_pos))
        if plan is None:   # no host hit behind these destinations: the load fails unpinned, LMDeploy recomputes
            self._release_hold(req)
            logger.warning("request %d got host-load destinations without a host hit; recomputing", req)
            self._pending_loads[req] = load
            return
        first = int(request.num_history_ids) // self.block_size
        if plan.first_block == first and 0 < n <= len(plan.digests) and n * self.block_size == num_external_tokens:
            digests = plan.digests[:n]
            h = n if plan.host_blocks < 0 else min(n, plan.host_blocks)
            try:
                load.slots = tuple(self.index.prepare_load(digests[:h]))
                load.digests = digests[:h]
                load.pinned = True
            except KeyError:  # not held (hold budget spent) and evicted, or dropped: fail, recompute
                logger.debug("host hit of request %d left the host tier before its load started", req)
            finally:
                self._release_hold(req)   # the load's own pins (if any) replace the hold
            if load.pinned and h < n:  # the rest comes from the store, staged in host slots
                staged = digests[h:]
                parents = ((digests[h - 1] if h else plan.parent),) + staged[:-1]
                slots = self.l3.chain.reserve(staged, parents, plan.block_bytes[h:n])
                if slots is None:
                    # no host slot to stage in (all pinned, or another request is staging these blocks): load
                    # nothing now, and let the turn's next attempt load its host hits alone instead of recomputing
                    # them too (the load never ran, so its host blocks are released, not failed)
                    self.index.release(load.digests)
                    load.pinned, load.stage_refused = False, True
                    self._host_only_turns[req] = load.turn
                else:
                    load.staged = (staged, tuple(plan.block_bytes[h:n]), tuple(slots))
                    load.slots = load.slots + tuple(slots)
        else:
            self._release_hold(req)
            logger.warning("request %d: load range (block %d, %d blocks, %d tokens) does not match the host "
                           "hit (block %d, %d blocks); recomputing", req, first, n, num_external_tokens,
                           plan.first_block, len(plan.digests))
        self._pending_loads[req] = load

    # -- per-step plan -----------------------------------------------------------------------
    def build_connector_meta(self, step_input: KVConnectorStepInput) -> HostTierMetadata | None:
        if self.feed is not None:  # the routing feed's GPU-tier refresh (cache_state_feed.py)
            self.feed.on_running(getattr(step_input, "running", None) or ())
            self.feed.on_step()
        self._release_all_holds()   # this scheduling pass is over: loads it started hold their own pins
        demotions = tuple((gpu, slot) for _, gpu, slot in self._pending_demotions)
        batch = None
        step = self._step + 1   # the step of the metadata built here, if any
        if demotions:
            batch = self._next_batch
            self._next_batch += 1
            self._inflight_demotions[batch] = (step, tuple((d, slot) for d, _, slot in self._pending_demotions))
        self._pending_demotions = []
        self._pending_demote_gpu = set()
        loads = []
        now = time.perf_counter()
        for req, load in self._pending_loads.items():
            if not load.pinned or load.cancelled:
                # never reaches a worker; an unpinned load lost its host blocks: recompute the turn
                self._finish_load(load, success=False,
                                  load_failed=not (load.pinned or load.cancelled or load.stage_refused), copied=None)
                continue
            load.started_at = now
            load.shipped_step = step
            self._inflight_loads[req] = load
            loads.append(HostLoad(req, load.slots, load.gpu_blocks))
        self._pending_loads = {}
        write_backs, stages = (), ()
        if self.l3 is not None:
            write_backs = tuple((w.digest, w.tokens, w.slot) for w in self.l3.chain.take_write_backs())
            if write_backs:   # requested; a worker skips a put the store refuses (counted there)
                self.l3.metrics.add(put_blocks=len(write_backs),
                                    bytes_to_l3=len(write_backs) * self.block_transfer_bytes)
            stages = tuple((ld.request_id, self._inflight_loads[ld.request_id].staged[0],
                            self._inflight_loads[ld.request_id].staged[1], self._inflight_loads[ld.request_id].staged[2])
                           for ld in loads if self._inflight_loads[ld.request_id].staged)
        if not (demotions or loads or write_backs or self._inflight_demotions or self._inflight_loads
                or self._owed_results):
            return None
        self._step = step
        return HostTierMetadata(step=step, demotion_batch=batch, demotions=demotions, loads=tuple(loads),
                                l3_write_backs=write_backs, l3_stages=stages)

    # -- completions -------------------------------------------------------------------------
    def update_connector_output(self, connector_output: KVConnectorOutput) -> KVConnectorResult:
        # holds end with their scheduling pass (build_connector_meta), always before this in LMDeploy 0.18; a
        # load completed here could make a held block a kept restore, which hold_chain does not pin
        self._release_all_holds()
        invalid = set(connector_output.invalid_block_ids or ())
        resets = [s for s in map(pool_reset_step, invalid) if s is not None]
        if resets:
            invalid.difference_update(v for v in connector_output.invalid_block_ids if pool_reset_step(v) is not None)
            first_step = max(resets)
            if first_step > self._pool_floor:
                self.drop_host_tier(f"a worker's host pool only holds copies from metadata step {first_step} on "
                                    "(it was rebuilt without the scheduler seeing a teardown)", before_step=first_step)
                self.clear_gpu_prefix_cache()
        # only what an in-flight copy can own: a destination block of a shipped load, or the failure marker of a
        # shipped demotion batch; ids of an unknown, finished or duplicate result would otherwise stay for good
        # and fail a later, healthy load into a reused GPU block
        if invalid:   # the usual report names none: nothing to build (an O(blocks in flight) set)
            owned = {failed_demotion_marker(b) for b in self._inflight_demotions}
            for ld in self._inflight_loads.values():
                owned.update(ld.gpu_blocks)
                owned.update(self._corrupt_markers(ld))
            self._invalid.update(invalid & owned)
        for batch in sorted(connector_output.completed_save_ids or ()):
            entry = self._inflight_demotions.pop(batch, None)
            if entry is None:
                continue
            pairs = entry[1]
            marker = failed_demotion_marker(batch)
            ok = marker not in self._invalid
            self._invalid.discard(marker)
            for d, slot in pairs:
                self.index.complete_store(d, success=ok, slot=slot)
            if ok:   # copied on every rank; a batch that failed on any rank is not counted (no per-rank outcome)
                self.metrics.add(bytes_to_host=len(pairs) * self.block_transfer_bytes)
            else:
                self.metrics.add(demotion_failures=len(pairs))
        for req in sorted(connector_output.finished_receiving or ()):
            load = self._inflight_loads.pop(req, None)
            if load is None:
                continue
            failed = not self._invalid.isdisjoint(load.gpu_blocks)
            self._invalid.difference_update(load.gpu_blocks)
            corrupt = self._take_corrupt(load)
            self._finish_load(load, success=not failed and not load.cancelled, load_failed=failed, copied=not failed)
            if corrupt:   # never restorable again: drop them so the recomputed blocks are demoted afresh
                self.metrics.add(corrupt_blocks=self.index.drop_corrupt(corrupt))
        self._count_orphans()   # subtrees of failed demotions
        results, self._owed_results = tuple(self._owed_results), []
        return KVConnectorResult(load_results=results)

    @staticmethod
    def _corrupt_markers(load: _Load) -> set[int]:
        """The ``corrupt_slot_marker`` of every host-resident source slot of a shipped load (staged
        store slots are not host blocks: a failed load frees them anyway)."""
        return {corrupt_slot_marker(s) for s in load.slots[:len(load.digests)]} if load.pinned else set()

    def _take_corrupt(self, load: _Load) -> list[int]:
        """Digests of ``load``'s host blocks some worker reported corrupt; their markers leave ``_invalid``
        unless another load in flight read the same slot (the block is pinned until every such load ends)."""
        if not load.pinned:
            return []
        n = len(load.digests)
        bad = [d for d, s in zip(load.digests, load.slots[:n]) if corrupt_slot_marker(s) in self._invalid]
        if bad:
            still_read = set()
            for other in self._inflight_loads.values():
                still_read.update(self._corrupt_markers(other))
            self._invalid.difference_update(self._corrupt_markers(load) - still_read)
        return bad

    def _finish_load(self, load: _Load, *, success: bool, load_failed: bool, copied: bool | None) -> None:
        """Unpin, count, and owe LMDeploy the terminal result (unless the request is gone).

        ``load_failed``: the load itself failed (not a cancellation), so this request turn
        recomputes instead of trying the host tier again.
        ``copied``: what the workers reported: True, every rank staged (store blocks) and copied the
        load to the GPU, whether or not it was cancelled meanwhile (bytes moved, store blocks were
        read); False, some rank reported it failed (its store stage, or the copy after it: the
        report does not say which); None, no report (never shipped, or its pool went away). Only
        ``copied`` is counted as bytes moved or store blocks read, and only False as a store error:
        a cancellation is never a store error.
        """
        if load.pinned:
            self.index.complete_load(load.digests, success=success)
            load.pinned = False
            if load.staged:  # restored: the staged blocks end as restored host blocks; else their slots are freed
                if success:
                    self.l3.chain.finish_restored(load.staged[0])
                else:   # copied (every rank staged it; the load was cancelled): the slots hold verified store
                    self.l3.chain.finish(load.staged[0], bool(copied))   # bytes and stay; else they are freed
                k = len(load.staged[0])
                if copied:
                    self.l3.metrics.add(get_blocks=k, bytes_from_l3=k * self.block_transfer_bytes)
                elif copied is False:
                    self.l3.metrics.add(errors=1)
            self._count_orphans()   # staged blocks released leaf first doom what was chained under them
        if copied:   # on every rank; a load that failed on any rank is not counted (no per-rank outcome)
            self.metrics.add(bytes_to_gpu=len(load.gpu_blocks) * self.block_transfer_bytes)
        if success:
            self.metrics.add(restored_tokens=load.num_tokens)
            self.metrics.observe_restore_latency(time.perf_counter() - load.started_at)
        else:
            self.metrics.add(restore_failures=1)
            if load_failed:
                self._failed_turns[load.request_id] = load.turn
        if not load.removed:
            self._owed_results.append(KVLoadResult(request_id=load.request_id, success=success))

    # -- request lifecycle -------------------------------------------------------------------
    def on_new_request(self, request: SchedulerSequence) -> None:
        if self.capture is not None:
            self.capture.on_new_request(request)
        self._forget(request)

    def _forget(self, request: SchedulerSequence) -> None:
        req = int(request.seq_id)
        self._chains.pop(req, None)
        self._plans.pop(req, None)
        self._release_hold(req)
        self._counted_lookup.pop(req, None)
        self._failed_turns.pop(req, None)
        self._host_only_turns.pop(req, None)

    def cancel_lookup(self, request_id: RequestId) -> None:
        """Called by stop/end before LMDeploy defers them: a load of this request is unwanted."""
        req = int(request_id)
        self._plans.pop(req, None)
        self._release_hold(req)
        for table in (self._pending_loads, self._inflight_loads):
            load = table.get(req)
            if load is not None:
                load.cancelled = True

    def request_finished(self, request: SchedulerSequence) -> None:
        req = int(request.seq_id)
        if self.feed is not None:  # publish the finished request's trie path (cache_state_feed.py)
            self.feed.on_request_finished(request)
        if self.capture is not None:  # one trace record per request, reusing the chain's digests (trace_capture.py)
            self.capture.on_request_finished(request, self._chains.get(req))
        self._forget(request)
        load = self._pending_loads.pop(req, None)
        if load is not None:
            load.removed = True
            self._finish_load(load, success=False, load_failed=False, copied=None)
        load = self._inflight_loads.get(req)
        if load is not None:  # the worker may still read its slots: unpin when it reports
            load.removed = True
            load.cancelled = True

    def finish_transfers_after_worker_drain(self) -> None:
        """Engine sleep: LMDeploy 0.18.0 calls this after every worker connector was shut down
        (``BaseModelAgent.sleep`` -> ``shutdown_kv_connector``), so every host pool is gone; the
        outputs that would report the drained copies were discarded. Settle everything in flight
        and drop the index (wakeup builds workers with new, empty pools)."""
        self.drop_host_tier("engine sleep released every worker's host pool")
        self.clear_gpu_prefix_cache()

    def clear_gpu_prefix_cache(self) -> int:
        """Evict every block of LMDeploy's prefix trie that only the trie holds, without demoting
        it (its KV cache was released or rebuilt). Returns how many blocks went."""
        trie = self._trie
        if trie is None or not trie.enabled:
            return 0
        total = 0
        self._clearing_trie = True
        try:
            while (n := trie.evict(1 << 30)) > 0:
                total += n
        finally:
            self._clearing_trie = False
        logger.info("host tier: evicted %d GPU prefix-cache block(s) whose KV cache was released", total)
        return total

    def on_weights_updated(self, how: str) -> None:
        """The engine's weights change in place (``Engine.update_params`` and the checkpoint-engine
        updates, ``how``). The store's keys name the weights the engine started with, so from now
        on this engine neither reads nor writes the store (``SchedulerChain.stop``) until it is
        restarted. The host tier itself is kept, like LMDeploy's own GPU prefix cache."""
        if self.l3 is None or self.l3.chain.stopped is not None:
            return
        self.l3.chain.stop(f"weights updated in place ({how})")
        logger.warning("l3 tier: the engine's weights were updated in place (%s); the shared store's keys name "
                       "the weights it started with, so this engine no longer reads or writes the store until "
                       "it restarts (set l3.weights_id to the new weights' name when restarting)", how)

    def shutdown(self) -> None:
        """Engine close (``Scheduler.shutdown``): the workers release their pools next."""
        if self.feed is not None:   # stop serving the routing feed first: its port is free again
            feed, self.feed = self.feed, None
            feed.close()
        self.drop_host_tier("engine shutdown")
        if self.capture is not None:
            self.capture.close()
        if self.l3 is not None:
            l3, self.l3 = self.l3, None
            l3.close()
        self._chains.clear()
        self._plans.clear()
        self._counted_lookup.clear()
        self._failed_turns.clear()
        self._host_only_turns.clear()

    def drop_host_tier(self, reason: str, before_step: int | None = None) -> int:
        """The worker pools holding this index's blocks are gone: forget every host block.

        Copies shipped in metadata steps before ``before_step`` (default: every step so far)
        went to a released pool and will never be reported: demotions are dropped with their
        blocks (not counted as failures: whether the drain completed them is the worker's to log),
        loads fail (LMDeploy recomputes). Later copies are in flight in a new pool: their blocks
        are doomed and freed when the worker reports them. Demotions not shipped yet never reach
        a worker. Returns how many blocks were dropped.
        """
        floor = self._step + 1 if before_step is None else int(before_step)
        self._count_orphans()
        self._release_all_holds()
        for d, _, slot in self._pending_demotions:   # queued this step, never shipped
            self.index.complete_store(d, success=False, slot=slot)
        self._pending_demotions = []
        self._pending_demote_gpu = set()
        dropped = self.index.drop_all()
        # the subtrees of the unshipped demotions failed above went with the pool: not evictions
        self._orphans_counted = self.index.stats.orphaned
        for batch in [b for b, (step, _) in self._inflight_demotions.items() if step < floor]:
            _, pairs = self._inflight_demotions.pop(batch)
            for d, slot in pairs:
                self.index.complete_store(d, success=True, slot=slot)   # doomed: only unpins and frees
            self._invalid.discard(failed_demotion_marker(batch))
        for req in [r for r, ld in self._inflight_loads.items() if ld.shipped_step < floor]:
            load = self._inflight_loads.pop(req)
            self._invalid.difference_update(load.gpu_blocks)
            self._invalid.difference_update(self._corrupt_markers(load))   # its blocks went with the pool
            self._finish_load(load, success=False, load_failed=not load.cancelled, copied=None)
        self._pool_floor = max(self._pool_floor, floor)
        self.tier_resets += 1
        logger.info("host tier: %s; dropped %d host block(s), the host tier starts empty", reason, dropped)
        return dropped

    # -- introspection ----------------------------------------------------------------------
    def has_inflight(self) -> bool:
        return bool(self._pending_demotions or self._inflight_demotions or self._pending_loads
                    or self._inflight_loads or self._holds)

    def check_balanced(self) -> None:
        """Raise AssertionError unless the index is consistent and, when idle, nothing is pinned."""
        self.index.check_invariants()
        if not self.has_inflight():
            pinned = [s for s in range(self.num_slots) if self.index.allocator.pins(s)]
            assert not pinned, f"host slots still pinned with no copy in flight: {pinned[:8]}"

    def stats(self) -> dict[str, Any]:
        """Counters plus occupancy: what the metrics exporter publishes."""
        self._count_orphans()
        out: dict[str, Any] = dict(self.metrics.snapshot())
        out["host_slots"] = self.num_slots
        out["host_slots_used"] = self.num_slots - self.index.num_free_slots
        out["host_blocks"] = len(self.index)
        out["host_blocks_kept"] = self.index.num_kept   # of those, kept restores (reused first)
        if self.l3 is not None:   # the store tier's counters ride along as l3_* (metrics_export)
            out.update(self.l3.metrics.prefixed_snapshot())
        return out


# ---------------------------------------------------------------------------------------------
# role adapter


class HostTierConnector(KVConnectorBase):
    """LMDeploy ``KVConnectorBase`` delegating to the role's component."""

    def __init__(self, role: KVConnectorRole, cache_config: CacheConfig, *, global_rank: int = 0,
                 tp_rank: int = 0, tp_size: int = 1, kv_head_replica_num: int = 1) -> None:
        super().__init__(role)
        _transfer_config(cache_config)
        self.role = role
        self.global_rank = int(global_rank)
        self.scheduler_side: HostTierScheduler | None = None
        self.worker_side: HostTierWorker | None = None
        if role is KVConnectorRole.SCHEDULER:
            self.scheduler_side = HostTierScheduler(cache_config, tp_size=tp_size)
        else:
            hostcache = hostcache_config_from_extra(cache_config.kv_transfer_config.kv_connector_extra_config)
            self.worker_side = HostTierWorker(cache_config, hostcache, tp_rank=tp_rank, tp_size=tp_size)

    def _sched(self) -> HostTierScheduler:
        if self.scheduler_side is None:
            raise RuntimeError(f"scheduler-side method called on a worker {CONNECTOR_NAME}")
        return self.scheduler_side

    def _worker(self) -> HostTierWorker:
        if self.worker_side is None:
            raise RuntimeError(f"worker-side method called on a scheduler {CONNECTOR_NAME}")
        return self.worker_side

    @property
    def metrics(self) -> HostTierMetrics:
        return self._sched().metrics

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        return self._sched().update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, step_input: KVConnectorStepInput):
        return self._sched().build_connector_meta(step_input)

    def on_new_request(self, request) -> None:
        return self._sched().on_new_request(request)

    def cancel_lookup(self, request_id: RequestId) -> None:
        return self._sched().cancel_lookup(request_id)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> KVConnectorResult:
        return self._sched().update_connector_output(connector_output)

    def finish_transfers_after_worker_drain(self) -> None:
        return self._sched().finish_transfers_after_worker_drain()

    def request_finished(self, request) -> None:
        return self._sched().request_finished(request)

    # worker side
    def register_kv_caches(self, kv_caches: Mapping[str, KVCacheValue], tensor_specs=None) -> None:
        """LMDeploy passes the rows only; lossy host formats take their tensor specs from the
        extra config's ``host_tensor_specs`` unless given here (see ``HostTierWorker``)."""
        return self._worker().register_kv_caches(kv_caches, tensor_specs=tensor_specs)

    def start_load_kv(self) -> None:
        return self._worker().start_load_kv(self._get_connector_metadata())

    def start_save_kv(self) -> None:
        """No-op: demotions are copied in ``start_load_kv``, before the forward can reuse a page."""
        return None

    def get_finished(self) -> KVConnectorOutput:
        return self._worker().get_finished()

    def shutdown(self) -> None:
        if self.scheduler_side is not None:
            return self.scheduler_side.shutdown()
        return self._worker().shutdown()


def build_host_tier_connector(role: KVConnectorRole, cache_config: CacheConfig, *, global_rank: int = 0,
                              tp_rank: int = 0, tp_size: int = 1,
                              kv_head_replica_num: int = 1) -> HostTierConnector:
    """Same signature as LMDeploy's ``factory.build_kv_connector``, for our connector name."""
    return HostTierConnector(role, cache_config, global_rank=global_rank, tp_rank=tp_rank, tp_size=tp_size,
                             kv_head_replica_num=kv_head_replica_num)


def install_scheduler_hook(scheduler) -> None:
    """Wire the trie's eviction hook to the scheduler-side connector (no-op for other connectors)."""
    conn = getattr(scheduler, "kv_connector", None)
    if not isinstance(conn, HostTierConnector) or conn.scheduler_side is None:
        return
    side = conn.scheduler_side
    trie = scheduler.block_trie
    if int(trie.block_size) != side.block_size:
        raise ValueError(f"trie block_size {trie.block_size} != connector block_size {side.block_size}")
    if not trie.enabled:
        logger.warning("%s: prefix caching is off, so nothing is ever demoted to host", CONNECTOR_NAME)
    install_lifecycle_observer(trie._kv_lifecycle, side.on_evict)
    from .cache_state_feed import attach_from_env

    attach_from_env(side, scheduler)
    side._trie = trie
