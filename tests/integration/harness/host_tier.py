"""Plugging the host tier (both ``HostTierConnector`` roles) into the CPU engine.

The connector is built through the factory signature of LMDeploy's ``build_kv_connector``
(``build_host_tier_connector``), the scheduler hook is installed right after
``Scheduler.__init__`` (what the activation patch does), and the worker role registers the
connector rows of the CPU cache (what ``BaseModelAgent.build_cache_engine`` does).

Lossy host formats (``int8``/``int4`` over fp16/bf16 caches): a block restored from host holds
``scatter(gather(oracle))`` of the transfer package's torch reference; :func:`lossy_variants`
produces that (and its repeated application, for blocks demoted again after a restore) so the
checker accepts exactly those bytes and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmdeploy.messages import KVTransferConfig

from .checker import KVChecker, VariantFn
from .cpu_engine import CpuEngine
from .kv_layout import CpuKVCache, HarnessCacheSpec, HarnessModel

CONNECTOR_NAME = 'HostTierConnector'


@dataclass(frozen=True)
class HostTierSpec:
    """Host-tier settings of one harness run (small on purpose)."""

    host_slots: int = 12
    host_kv_format: str = 'same'
    min_restore_tokens: int = 16
    eviction_policy: str = 'lru'
    copy_delay_polls: int = 0   # CpuCopyEngine: results show up only after this many extra polls
    checksum: bool = False      # HostCacheConfig.checksum: hash slots after demotion, check before load

    def kv_transfer_config(self, slots) -> KVTransferConfig:
        """``slots``: the ``HostSlotPlan`` the executor hook would compute for this cache."""
        from lmdeploy_hostcache.config import HostCacheConfig

        hostcache = HostCacheConfig(host_cache_gb=1.0, host_memory_reserve_gb=0.0, host_kv_format=self.host_kv_format,
                                    eviction_policy=self.eviction_policy, min_restore_tokens=self.min_restore_tokens,
                                    pin_memory=False, checksum=self.checksum)
        extra = {'hostcache_config': hostcache.to_dict(),
                 'host_cache_blocks': int(self.host_slots),
                 'host_slot_bytes': int(slots.slot_bytes[0]),
                 'model_identity': 'lmdeploy-hostcache/cpu-harness'}
        if slots.tensor_specs is not None:
            extra['host_tensor_specs'] = [dict(x) for x in slots.tensor_specs]
        return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role='kv_both', kv_connector_extra_config=extra)


def build_host_tier_engine(model: HarnessModel = HarnessModel(), spec: HarnessCacheSpec = HarnessCacheSpec(),
                           host: HostTierSpec = HostTierSpec(), *, via_lmdeploy_factory: bool = False,
                           **engine_kw) -> CpuEngine:
    """A :class:`CpuEngine` with both host-tier connector roles wired as LMDeploy wires them.

    ``via_lmdeploy_factory``: build the roles through LMDeploy's own
    ``kv_connector.factory.build_kv_connector`` and rely on the activated ``Scheduler.__init__``
    to install the eviction hook (only meaningful when the activation patches are live).
    """
    from lmdeploy_hostcache.integration.connector import build_host_tier_connector, install_scheduler_hook

    builder, after_built = build_host_tier_connector, install_scheduler_hook
    if via_lmdeploy_factory:
        from lmdeploy.pytorch.kv_connector import factory

        builder, after_built = factory.build_kv_connector, None

    from lmdeploy_hostcache.integration.engine_config import plan_host_slots

    # Size host slots exactly as the executor hook does (one TP rank's block, in the host format).
    probe = CpuKVCache(model.model_config(), spec.cache_config(), world_size=int(engine_kw.get('tp', 1)))
    slots = plan_host_slots([probe.plan.logical_block_nbytes], host.host_kv_format, probe.plan)
    del probe

    def configure_worker(connector) -> None:
        if host.copy_delay_polls:
            connector.worker_side.engine_kwargs['delay_polls'] = int(host.copy_delay_polls)

    return CpuEngine(model, spec, kv_transfer_config=host.kv_transfer_config(slots),
                     connector_builder=builder, after_scheduler_built=after_built,
                     configure_worker_connector=configure_worker, **engine_kw)


def scheduler_side(engine: CpuEngine):
    """The connector's scheduler component (``HostTierScheduler``)."""
    return engine.scheduler_connector.scheduler_side


def worker_side(engine: CpuEngine, rank: int = 0):
    """The connector's worker component (``HostTierWorker``) of one TP rank."""
    return engine.worker_connectors[rank].worker_side


def copy_engine(engine: CpuEngine, rank: int = 0):
    """One TP rank's transfer copy engine (for ``fail_next`` fault injection)."""
    return worker_side(engine, rank).engine


def rank_checkers(engine: CpuEngine, host_kv_format: str = 'same') -> list[KVChecker]:
    """One :class:`KVChecker` per TP rank (lossy formats: with the transfer reference variants)."""
    return [KVChecker(kv, oracle, engine.scheduler, variants=lossy_variants(kv, host_kv_format))
            for kv, oracle in zip(engine.kvs, engine.oracles)]


def check_host_tier_balanced(engine: CpuEngine) -> dict[str, int]:
    """End of run: index invariants, nothing pinned or in flight, slot accounting closed."""
    side = scheduler_side(engine)
    if side.has_inflight():
        raise AssertionError('host-tier copies still in flight after the run')
    for rank in range(engine.tp):
        if worker_side(engine, rank).num_inflight:
            raise AssertionError(f'rank {rank} worker still tracks {worker_side(engine, rank).num_inflight} copy ops')
    side.check_balanced()
    index = side.index
    resident = len(index)
    if index.num_free_slots != index.num_slots - resident:
        raise AssertionError(f'host slots leaked: free {index.num_free_slots} != slots {index.num_slots} - '
                             f'resident {resident}')
    return {'host_slots': index.num_slots, 'host_resident': resident, 'host_free': index.num_free_slots}


def lossy_variants(cache: CpuKVCache, host_kv_format: str, depth: int = 6) -> VariantFn | None:
    """Expected bytes of a block restored through ``host_kv_format`` (None for ``same``).

    Uses the transfer package's torch reference (``reference.gather`` then ``reference.scatter``
    through the real ``HostFormat`` of these rows) on a one-block scratch cache, ``depth`` times.
    """
    if host_kv_format == 'same':
        return None
    from lmdeploy_hostcache.transfer import reference
    from lmdeploy_hostcache.transfer.layout import KVRowLayout

    scratch = cache.scratch_block()
    rows = dict(scratch.connector_kv_caches)
    layout = KVRowLayout.from_connector_caches(rows, cache.pages_per_block, tensor_specs=cache.tensor_specs)
    fmt = layout.host_format(host_kv_format)
    flat = layout.check_caches(rows)
    ids = torch.zeros(1, dtype=torch.long)

    def variants(expected: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        bs = cache.block_size
        pages = torch.arange(cache.pages_per_block).repeat_interleave(cache.kernel_block_size)
        offs = torch.arange(bs) % cache.kernel_block_size
        for name, data in expected.items():
            scratch.views[name][:, pages, offs] = data
        for _ in range(depth):
            slot = torch.zeros(1, fmt.slot_bytes, dtype=torch.uint8)
            reference.gather(flat, layout, fmt, ids, slot)
            reference.scatter(slot, layout, fmt, ids, flat)
            out.append({name: scratch.block_tokens(name, 0).clone() for name in expected})
        return out

    return variants



class HostSlotChecker:
    """Host-side byte check: every RESIDENT host block holds the slot image of its oracle bytes.

    The harness learns the whole token prefix of every full block any sequence has had (chained
    with the connector's own namespace digest), so for a resident host block it can rebuild the
    expected slot: the oracle block written into a one-block scratch cache and gathered with the
    transfer reference in the pool's host format (lossy formats: also after 1..depth restore
    round trips, for blocks demoted again after a lossy restore). This catches a slot holding the
    wrong bytes even if that block is never restored. Same ``check(label)`` / ``stats`` interface
    as :class:`KVChecker`; the byte comparison runs every ``every`` calls (and registration on all).
    """

    def __init__(self, engine: CpuEngine, depth: int = 6, every: int = 5, raise_on_error: bool = True):
        from lmdeploy_hostcache.digest import ChainHasher
        from lmdeploy_hostcache.host_index import BlockState
        from lmdeploy_hostcache.transfer import reference
        from lmdeploy_hostcache.transfer.layout import KVRowLayout

        self._chain_cls = ChainHasher
        self._resident = BlockState.RESIDENT
        self._reference = reference
        self.engine = engine
        self.side = scheduler_side(engine)
        self.namespace = self.side.namespaces.for_adapter(None)
        self.block_size = engine.cache_config.block_size
        self.depth = depth
        self.every = max(1, int(every))
        self.raise_on_error = raise_on_error
        self.stats = _SlotStats()
        self.prefixes: dict[int, torch.Tensor] = {}        # digest -> whole token prefix
        self._registered: dict[int, int] = {}              # seq_id -> full blocks registered
        self._ranks = []
        for rank, (kv, oracle) in enumerate(zip(engine.kvs, engine.oracles)):
            pool = worker_side(engine, rank).pool
            scratch = kv.scratch_block()
            rows = dict(scratch.connector_kv_caches)
            layout = KVRowLayout.from_connector_caches(rows, kv.pages_per_block, tensor_specs=kv.tensor_specs)
            fmt = layout.host_format(pool.format.name)
            if fmt.slot_bytes != pool.slot_bytes:
                raise AssertionError(f'rank {rank}: scratch slot format {fmt.slot_bytes} B != pool {pool.slot_bytes} B')
            self._ranks.append((kv, oracle, scratch, layout, fmt, layout.check_caches(rows), {}))
        self._watch_demotions()

    def _watch_demotions(self) -> None:
        """Register the prefix of every trie leaf the host tier is told about, at the moment it is
        evicted (its whole path is still attached): every block reaches the host tier this way,
        including blocks a request filled on its final step, which no later check sees as part of
        a live sequence. Wraps the observer the scheduler hook installed (LMDeploy code untouched)."""
        lifecycle = self.engine.scheduler.block_trie._kv_lifecycle
        observer = getattr(lifecycle, '_host_tier_observer', None)
        if observer is None:
            return

        def registering_observer(leaf, gpu_block):
            path, node = [], leaf
            while node is not None and node.parent is not None and node.block_id >= 0:
                path.append(node.token_ids)
                node = node.parent
            if node is not None and node.parent is None and path:   # reached the adapter root
                self._register_tokens(np.concatenate([np.asarray(t, dtype=np.int64) for t in reversed(path)]))
            return observer(leaf, gpu_block)

        lifecycle._host_tier_observer = registering_observer

    def _register_tokens(self, tokens) -> None:
        full = len(tokens) // self.block_size
        if full == 0:
            return
        chain = self._chain_cls(self.namespace)
        chain.extend(tokens[:full * self.block_size])
        for i, digest in enumerate(chain.digests):
            if digest not in self.prefixes:
                self.prefixes[digest] = torch.as_tensor(np.asarray(tokens[:(i + 1) * self.block_size]).copy())

    def _register(self) -> None:
        bs = self.block_size
        for seq in self.engine.scheduler.seq_manager.get_all_sequences():
            tokens = seq.all_ids
            full = len(tokens) // bs
            if self._registered.get(int(seq.seq_id), -1) >= full:
                continue
            chain = self._chain_cls(self.namespace)
            chain.extend(tokens[:full * bs])
            for i, digest in enumerate(chain.digests):
                if digest not in self.prefixes:
                    self.prefixes[digest] = torch.as_tensor(tokens[:(i + 1) * bs].copy())
            self._registered[int(seq.seq_id)] = full

    def _candidates(self, rank_state, digest: int) -> list[torch.Tensor]:
        kv, oracle, scratch, layout, fmt, flat, memo = rank_state
        hit = memo.get(digest)
        if hit is not None:
            return hit
        tokens = self.prefixes[digest].numpy()
        expected = oracle.expected_block(tokens, len(tokens) // self.block_size - 1)
        pages = torch.arange(kv.pages_per_block).repeat_interleave(kv.kernel_block_size)
        offs = torch.arange(self.block_size) % kv.kernel_block_size
        for name, data in expected.items():
            scratch.views[name][:, pages, offs] = data
        ids = torch.zeros(1, dtype=torch.long)
        out = []
        for _ in range(1 + (self.depth if fmt.lossy else 0)):
            slot = torch.zeros(1, fmt.slot_bytes, dtype=torch.uint8)
            self._reference.gather(flat, layout, fmt, ids, slot)
            out.append(slot[0].clone())
            self._reference.scatter(slot, layout, fmt, ids, flat)
        memo[digest] = out
        return out

    def _pool(self, rank: int):
        """This rank's current host pool (a wakeup builds a new one), or None."""
        conn = self.engine.worker_connectors[rank]
        return None if conn is None else conn.worker_side.pool

    def check(self, label: str = '') -> None:
        self.stats.checks += 1
        self._register()
        if self.stats.checks % self.every:
            return
        self.verify(label)

    def verify(self, label: str = '') -> None:
        index = self.side.index
        for digest in list(self.prefixes):
            block = index.get(digest)
            if block is None or block.state is not self._resident:
                continue
            self.stats.slots_checked += 1
            for rank, rank_state in enumerate(self._ranks):
                pool = self._pool(rank)
                if pool is None:    # engine asleep or closed: no pool to check against
                    continue
                actual = pool.slot_view(block.slot)
                if any(torch.equal(actual, c) for c in self._candidates(rank_state, digest)):
                    continue
                self.stats.wrong_blocks += 1
                msg = (f'{label} rank {rank}: host slot {block.slot} of resident block {digest:#x} '
                       f'({len(self.prefixes[digest])}-token prefix) does not hold its oracle bytes')
                if self.stats.first_error is None:
                    self.stats.first_error = msg
                if self.raise_on_error:
                    from .checker import KVMismatch
                    raise KVMismatch(msg)
        unknown = sum(1 for d, b in index._blocks.items()
                      if not b.doomed and b.state is self._resident and d not in self.prefixes)
        self.stats.unknown_resident = max(self.stats.unknown_resident, unknown)


@dataclass
class _SlotStats:
    checks: int = 0
    slots_checked: int = 0
    wrong_blocks: int = 0
    unknown_resident: int = 0     # resident blocks whose prefix the harness never saw (should be 0)
    first_error: str | None = None
