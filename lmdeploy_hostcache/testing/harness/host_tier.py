"""Plugging the host tier (both ``HostTierConnector`` roles) into the CPU engine.

The connector is built through the factory signature of LMDeploy's ``build_kv_connector``
(``build_host_tier_connector``), the scheduler hook is installed right after
``Scheduler.__init__`` (what the activation patch does), and the worker role registers the
connector rows of the CPU cache (what ``BaseModelAgent.build_cache_engine`` does).

Lossy host formats (``int8``/``int4`` over fp16/bf16 caches): a block restored from host holds
``f(oracle)`` with ``f = scatter(gather(.))`` of the transfer package's torch reference, and a block
demoted again after a restore goes through ``f`` again. :func:`lossy_variants` produces
``f^1..f^n`` lazily (memoised, stopping at a fixed point) and :class:`RoundTrips` counts how many
times each prefix was restored, which bounds ``n`` per block: the checker accepts exactly those
bytes and nothing else, however long the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmdeploy.messages import KVTransferConfig

from lmdeploy_hostcache.eviction import DEFAULT_POLICY

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
    eviction_policy: str = DEFAULT_POLICY   # the product's default; tests parametrize the others
    copy_delay_polls: int = 0   # CpuCopyEngine: results show up only after this many extra polls
    checksum: bool = False      # HostCacheConfig.checksum: hash slots after demotion, check before load
    l3: dict | None = None      # HostCacheConfig.l3: the shared store tier (tests/l3/test_l3_engine.py)

    def kv_transfer_config(self, slots) -> KVTransferConfig:
        """``slots``: the ``HostSlotPlan`` the executor hook would compute for this cache."""
        from lmdeploy_hostcache.config import HostCacheConfig

        hostcache = HostCacheConfig(host_cache_gb=1.0, host_memory_reserve_gb=0.0, host_kv_format=self.host_kv_format,
                                    eviction_policy=self.eviction_policy, min_restore_tokens=self.min_restore_tokens,
                                    pin_memory=False, checksum=self.checksum, l3=self.l3)
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
    """One :class:`KVChecker` per TP rank (lossy formats: with the transfer reference variants,
    bounded by each block's own restore count)."""
    trips = round_trips(engine) if host_kv_format != 'same' else None
    return [KVChecker(kv, oracle, engine.scheduler, variants=lossy_variants(kv, host_kv_format),
                      round_trips=None if trips is None else trips.of_block)
            for kv, oracle in zip(engine.kvs, engine.oracles)]


class RoundTrips:
    """How many times each prefix (chained digest) was restored from the host tier.

    Counts the digests of every load the scheduler side completes successfully (the index's
    ``complete_load(..., success=True)``, wrapped on this engine's index instance); one engine has
    one counter (``round_trips(engine)``). A block's bytes can have gone through the lossy round
    trip at most that many times."""

    def __init__(self, engine: CpuEngine):
        from lmdeploy_hostcache.digest import ChainHasher

        side = scheduler_side(engine)
        self._chain_cls = ChainHasher
        self.namespace = side.namespaces.for_adapter(None)
        self.block_size = engine.cache_config.block_size
        self.counts: dict[int, int] = {}
        index = side.index
        complete_load = index.complete_load

        def counting_complete_load(digests, success):
            if success:
                for d in digests:
                    self.counts[d] = self.counts.get(d, 0) + 1
            return complete_load(digests, success)

        index.complete_load = counting_complete_load

    def of_digest(self, digest: int) -> int:
        return self.counts.get(digest, 0)

    def of_block(self, tokens, block_index: int) -> int:
        """Restores of block ``block_index`` of ``tokens`` (its whole prefix names it)."""
        chain = self._chain_cls(self.namespace)
        chain.extend(tokens[:(block_index + 1) * self.block_size])
        return self.of_digest(chain.digests[block_index])

    @property
    def max(self) -> int:
        return max(self.counts.values(), default=0)


def round_trips(engine: CpuEngine) -> RoundTrips:
    """The engine's :class:`RoundTrips` counter (created on first use)."""
    counter = getattr(engine, '_host_round_trips', None)
    if counter is None:
        counter = engine._host_round_trips = RoundTrips(engine)
    return counter


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


def lossy_variants(cache: CpuKVCache, host_kv_format: str) -> VariantFn | None:
    """Expected bytes of a block restored ``1..n`` times through ``host_kv_format`` (None for ``same``).

    Uses the transfer package's torch reference (``reference.gather`` then ``reference.scatter``
    through the real ``HostFormat`` of these rows) on a one-block scratch cache. Per expected
    block the chain ``f^1, f^2, ...`` is computed lazily and memoised; it stops growing at a fixed
    point (``f^(k+1) == f^k``), after which every deeper round trip gives the same bytes.
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

    bs = cache.block_size
    pages = torch.arange(cache.pages_per_block).repeat_interleave(cache.kernel_block_size)
    offs = torch.arange(bs) % cache.kernel_block_size
    memo: dict[int, tuple[dict, list, list]] = {}   # id(expected) -> (expected, chain, [fixed point reached])

    def round_trip(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, data in block.items():
            scratch.views[name][:, pages, offs] = data
        slot = torch.zeros(1, fmt.slot_bytes, dtype=torch.uint8)
        reference.gather(flat, layout, fmt, ids, slot)
        reference.scatter(slot, layout, fmt, ids, flat)
        return {name: scratch.block_tokens(name, 0).clone() for name in block}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)) for k in a)

    def variants(expected: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
        entry = memo.get(id(expected))
        if entry is None or entry[0] is not expected:
            entry = memo[id(expected)] = (expected, [], [False])   # keeps `expected` alive: its id stays unique
        _, chain, fixed = entry
        while len(chain) < n and not fixed[0]:
            nxt = round_trip(chain[-1] if chain else expected)
            if same(nxt, chain[-1] if chain else expected):
                fixed[0] = True
                if not chain:
                    chain.append(nxt)
            else:
                chain.append(nxt)
        return chain[:n]

    return variants



class HostSlotChecker:
    """Host-side byte check: every RESIDENT host block holds the slot image of its oracle bytes.

    The harness learns the whole token prefix of every full block any sequence has had (chained
    with the connector's own namespace digest), so for a resident host block it can rebuild the
    expected slot: the oracle block written into a one-block scratch cache and gathered with the
    transfer reference in the pool's host format (lossy formats: also after 1..n round trips, n
    being how many times this prefix was restored so far, for blocks demoted again after a lossy
    restore; the chain stops growing at its fixed point). This catches a slot holding the
    wrong bytes even if that block is never restored. Same ``check(label)`` / ``stats`` interface
    as :class:`KVChecker`; the byte comparison runs every ``every`` calls (and registration on all).
    """

    def __init__(self, engine: CpuEngine, every: int = 5, raise_on_error: bool = True):
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
        self.trips = round_trips(engine)
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

    def _candidates(self, rank_state, digest: int, trips: int) -> list[torch.Tensor]:
        """Slot images ``q(f^j(oracle))`` for ``j = 0..trips`` (lazily extended, memoised per
        digest, stopping at the chain's fixed point; ``q`` = gather, ``f`` = one round trip)."""
        kv, oracle, scratch, layout, fmt, flat, memo = rank_state
        ids = torch.zeros(1, dtype=torch.long)
        entry = memo.get(digest)
        if entry is None:
            tokens = self.prefixes[digest].numpy()
            expected = oracle.expected_block(tokens, len(tokens) // self.block_size - 1)
            pages = torch.arange(kv.pages_per_block).repeat_interleave(kv.kernel_block_size)
            offs = torch.arange(self.block_size) % kv.kernel_block_size
            for name, data in expected.items():
                scratch.views[name][:, pages, offs] = data
            slot = torch.zeros(1, fmt.slot_bytes, dtype=torch.uint8)
            self._reference.gather(flat, layout, fmt, ids, slot)
            entry = memo[digest] = ([slot[0].clone()], [not fmt.lossy])
        slots, fixed = entry
        while len(slots) < 1 + trips and not fixed[0]:
            self._reference.scatter(slots[-1].unsqueeze(0).clone(), layout, fmt, ids, flat)
            nxt = torch.zeros(1, fmt.slot_bytes, dtype=torch.uint8)
            self._reference.gather(flat, layout, fmt, ids, nxt)
            if torch.equal(nxt[0], slots[-1]):
                fixed[0] = True
            else:
                slots.append(nxt[0].clone())
        return slots[:1 + trips]

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
                trips = self.trips.of_digest(digest)
                if any(torch.equal(actual, c) for c in self._candidates(rank_state, digest, trips)):
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
