"""Plugging the host tier (both ``HostTierConnector`` roles) into the CPU engine.

The connector is built through the factory signature of LMDeploy's ``build_kv_connector``
(``build_host_tier_connector``), the scheduler hook is installed right after
``Scheduler.__init__`` (what the activation patch does; once: not again when that patch is live
and has installed it), and the worker role registers the
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

from lmdeploy_hostcache.tier.digest import salted_root
from lmdeploy_hostcache.tier.eviction import DEFAULT_POLICY

from .checker import KVChecker, VariantFn, _as_bytes, _words, chain_keys
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
    capture: str = ''           # HostCacheConfig.capture: trace capture to this file (integration/trace_capture.py)
    capture_offload: bool = True   # HostCacheConfig.capture_offload: encode in the capture's helper process

    def kv_transfer_config(self, slots) -> KVTransferConfig:
        """``slots``: the ``HostSlotPlan`` the executor hook would compute for this cache."""
        from lmdeploy_hostcache.config import HostCacheConfig

        hostcache = HostCacheConfig(host_cache_gb=1.0, host_memory_reserve_gb=0.0, host_kv_format=self.host_kv_format,
                                    eviction_policy=self.eviction_policy, min_restore_tokens=self.min_restore_tokens,
                                    pin_memory=False, checksum=self.checksum, l3=self.l3, capture=self.capture,
                                    capture_offload=self.capture_offload)
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

    def install_once(scheduler) -> None:
        # With the activation patches live, ``Scheduler.__init__`` has installed the hook already:
        # installing it again would reset the eviction observer the routing feed chains after.
        side = getattr(getattr(scheduler, 'kv_connector', None), 'scheduler_side', None)
        if side is None or getattr(side, '_trie', None) is not scheduler.block_trie:
            install_scheduler_hook(scheduler)

    builder, after_built = build_host_tier_connector, install_once
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
    checkers = [KVChecker(kv, oracle, engine.scheduler, variants=lossy_variants(kv, host_kv_format),
                          round_trips=None if trips is None else trips.of_block)
                for kv, oracle in zip(engine.kvs, engine.oracles)]
    shared: dict = {}                 # the ranks share one trie walk per iteration
    for checker in checkers:
        checker.shared_walk = shared
    return checkers


class RoundTrips:
    """How many times each prefix (chained digest) was restored from the host tier.

    Counts the digests of every load the scheduler side completes successfully (the index's
    ``complete_load(..., success=True)``, wrapped on this engine's index instance); one engine has
    one counter (``round_trips(engine)``). A block's bytes can have gone through the lossy round
    trip at most that many times."""

    def __init__(self, engine: CpuEngine):
        from lmdeploy_hostcache.tier.digest import ChainHasher

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


class BlockCodec:
    """Batched host round trips of typed blocks through the transfer package's torch reference.

    ``gather(blocks)`` writes each block (``name -> [layers, block_size, heads, last]``) into a
    scratch cache of the same plan and gathers them into host slots of ``host_kv_format`` in one
    call; ``scatter(slots)`` does the inverse. One call per batch instead of per block: the
    reference's per-call work (one quantisation per row) dominates at the harness's sizes.
    """

    def __init__(self, cache: CpuKVCache, host_kv_format: str, capacity: int = 64):
        from lmdeploy_hostcache.transfer import reference
        from lmdeploy_hostcache.transfer.layout import KVRowLayout

        self._reference = reference
        self.capacity = int(capacity)
        self.scratch = cache.scratch_block(self.capacity)
        rows = dict(self.scratch.connector_kv_caches)
        self.layout = KVRowLayout.from_connector_caches(rows, cache.pages_per_block, tensor_specs=cache.tensor_specs)
        self.fmt = self.layout.host_format(host_kv_format)
        self.flat = self.layout.check_caches(rows)
        pages = torch.arange(cache.pages_per_block).repeat_interleave(cache.kernel_block_size)
        self._pages = [pages + i * cache.pages_per_block for i in range(self.capacity)]
        self._offs = torch.arange(cache.block_size) % cache.kernel_block_size

    def _write(self, blocks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        n = len(blocks)
        pages = torch.cat(self._pages[:n])
        offs = self._offs.repeat(n)
        for name in blocks[0]:
            self.scratch.views[name][:, pages, offs] = torch.cat([b[name] for b in blocks], dim=1)
        return torch.arange(n)

    def gather(self, blocks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[len(blocks), slot_bytes]`` host images of ``blocks``."""
        out = []
        for i in range(0, len(blocks), self.capacity):
            part = blocks[i:i + self.capacity]
            out.append(self._gather_ids(self._write(part)))
        return torch.cat(out) if out else torch.zeros(0, self.fmt.slot_bytes, dtype=torch.uint8)

    def scatter(self, slots: torch.Tensor, names) -> list[dict[str, torch.Tensor]]:
        """Typed blocks (``names``) restored from ``[n, slot_bytes]`` host images."""
        out = []
        for i in range(0, slots.shape[0], self.capacity):
            part = slots[i:i + self.capacity].clone()
            ids = torch.arange(part.shape[0])
            self._reference.scatter(part, self.layout, self.fmt, ids, self.flat)
            out.extend({name: self.scratch.block_tokens(name, j).clone() for name in names}
                       for j in range(part.shape[0]))
        return out

    def typed_slot_bytes(self) -> torch.Tensor | None:
        """Slot byte positions that carry typed K/V (and scale/zero) bytes, for a host format that
        copies whole pages (``same``): the page padding between typed rows holds whatever the GPU
        page held (never read by a kernel, and undefined after a new allocation), so slot checks
        compare typed bytes only. None for formats whose gather writes every slot byte from typed
        values alone (lossy formats zero their padding)."""
        if self.fmt.lossy:
            return None
        for pool in self.scratch.allocation.pools:
            pool.tensor.zero_()
        for view in self.scratch.views.values():   # every typed byte 0xFF, padding 0
            view.fill_(torch.full((view.element_size(),), 0xFF, dtype=torch.uint8).view(view.dtype)[0])
        marked = self._gather_ids(torch.zeros(1, dtype=torch.long))[0]
        typed = (marked != 0).nonzero().flatten()
        return None if typed.numel() == marked.numel() else typed

    def _gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        slots = torch.zeros(ids.numel(), self.fmt.slot_bytes, dtype=torch.uint8)
        self._reference.gather(self.flat, self.layout, self.fmt, ids, slots)
        return slots

    def round_trip(self, blocks: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """``f(block)`` for each block: demotion (gather) then restore (scatter)."""
        if not blocks:
            return []
        return self.scatter(self.gather(blocks), list(blocks[0]))


def _same_block(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(_as_bytes(a[k]), _as_bytes(b[k])) for k in a)


class LossyVariants:
    """Expected bytes of a block restored ``1..n`` times through a lossy host format.

    Called as ``variants(expected, n) -> [f^1(expected), ..., f^m(expected)]`` (``m <= n``), with
    ``f`` one host round trip (:class:`BlockCodec`). Per expected block the chain is computed lazily
    and memoised; it stops growing at a fixed point (``f^(k+1) == f^k``), after which every deeper
    round trip gives the same bytes. ``warm([(expected, n), ...])`` computes the chains of many
    blocks in batches (the checker warms the blocks a load just restored).
    """

    def __init__(self, cache: CpuKVCache, host_kv_format: str):
        self.codec = BlockCodec(cache, host_kv_format)
        self._memo: dict[int, tuple[dict, list, list]] = {}   # id(expected) -> (expected, chain, [fixed point])

    def _entry(self, expected):
        entry = self._memo.get(id(expected))
        if entry is None or entry[0] is not expected:
            entry = self._memo[id(expected)] = (expected, [], [False])   # keeps `expected` alive: its id stays unique
        return entry

    def _append(self, entry, nxt) -> None:
        expected, chain, fixed = entry
        if _same_block(nxt, chain[-1] if chain else expected):
            fixed[0] = True
            if not chain:
                chain.append(nxt)
        else:
            chain.append(nxt)

    def warm(self, wanted: list[tuple[dict[str, torch.Tensor], int]]) -> None:
        """Extend the chains of many ``(expected, n)`` to length ``n`` (or their fixed point), one
        batched round trip per chain level."""
        depth: dict[int, tuple[tuple, int]] = {}
        for expected, n in wanted:
            entry = self._entry(expected)
            if n > depth.get(id(expected), (None, 0))[1]:
                depth[id(expected)] = (entry, int(n))
        while True:
            todo = [entry for entry, n in depth.values() if len(entry[1]) < n and not entry[2][0]]
            if not todo:
                return
            for entry, nxt in zip(todo, self.codec.round_trip([e[1][-1] if e[1] else e[0] for e in todo])):
                self._append(entry, nxt)

    def __call__(self, expected: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
        entry = self._entry(expected)
        _, chain, fixed = entry
        while len(chain) < n and not fixed[0]:
            self._append(entry, self.codec.round_trip([chain[-1] if chain else expected])[0])
        return chain[:n]


def lossy_variants(cache: CpuKVCache, host_kv_format: str) -> VariantFn | None:
    """:class:`LossyVariants` for ``host_kv_format`` (None for ``same``: restores are exact)."""
    if host_kv_format == 'same':
        return None
    return LossyVariants(cache, host_kv_format)


class HostSlotChecker:
    """Host-side byte check: every RESIDENT host block holds the slot image of its oracle bytes.

    The harness learns the whole token prefix of every full block any sequence has had (chained
    with the connector's own namespace digest), so for a resident host block it can rebuild the
    expected slot: the oracle block written into a one-block scratch cache and gathered with the
    transfer reference in the pool's host format (lossy formats: also after 1..n round trips, n
    being how many times this prefix was restored so far, for blocks demoted again after a lossy
    restore; the chain stops growing at its fixed point). This catches a slot holding the
    wrong bytes even if that block is never restored. Same ``check(label)`` / ``stats`` interface
    as :class:`KVChecker`; the verify runs every ``every`` calls (default: every step; registration
    runs on all). The verify is incremental: a slot is compared again only when its bytes changed
    since the previous verify or it now holds a different block (see :meth:`verify`).
    """

    def __init__(self, engine: CpuEngine, every: int = 1, raise_on_error: bool = True):
        from lmdeploy_hostcache.tier.digest import ChainHasher
        from lmdeploy_hostcache.tier.host_index import BlockState

        self._chain_cls = ChainHasher
        self._resident = BlockState.RESIDENT
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
        self._chain_memo: dict[int, dict[bytes, int]] = {}  # root -> chained key of a prefix (chain_keys) -> digest
        self._node_digests: dict[int, tuple[object, int]] = {}   # id(trie node) -> (node, its chain digest)
        # per rank: (pool the snapshot is of, its chunks' bytes at the previous verify, slot -> digest verified)
        self._pool_state: list[tuple[object, list[torch.Tensor], dict[int, int]] | None] = [None] * engine.tp
        self._ranks = []
        for rank, (kv, oracle) in enumerate(zip(engine.kvs, engine.oracles)):
            pool = worker_side(engine, rank).pool
            codec = BlockCodec(kv, pool.format.name)
            if codec.fmt.slot_bytes != pool.slot_bytes:
                raise AssertionError(f'rank {rank}: scratch slot format {codec.fmt.slot_bytes} B != pool '
                                     f'{pool.slot_bytes} B')
            self._ranks.append((oracle, codec, {}))
        self._typed = [rank[1].typed_slot_bytes() for rank in self._ranks]   # per rank: None = every byte
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
            self._register_node(leaf)
            return observer(leaf, gpu_block)

        lifecycle._host_tier_observer = registering_observer

    def _register_node(self, leaf) -> None:
        """Register the block of trie node ``leaf`` (its digest -> its whole token path). The digest
        chains from the parent's, memoised per node object (held, so its id stays unique); a
        node whose ancestors are not memoised yet is registered through its whole path, which
        memoises them. A stale memo could only register a wrong digest, which then shows up as a
        resident block of unknown prefix (a reported failure), never as a skipped check."""
        parent = leaf.parent
        if parent is None or leaf.block_id < 0:
            return
        memo = self._node_digests
        hit = memo.get(id(parent))
        if parent.parent is None:          # an adapter root: chain from its (salted) root digest
            parent_digest = self._root_digest(parent)
        elif hit is not None and hit[0] is parent:
            parent_digest = hit[1]
        else:
            parent_digest = None
        if parent_digest is not None:
            chain = self._chain_cls(self.namespace, parent_digest)
            chain.extend(np.asarray(leaf.token_ids, dtype=np.int64))
            if len(chain.digests) == 1:
                memo[id(leaf)] = (leaf, chain.digests[0])
                if chain.digests[0] in self.prefixes:
                    return
        path, node, nodes = [], leaf, []
        while node is not None and node.parent is not None and node.block_id >= 0:
            path.append(np.asarray(node.token_ids, dtype=np.int64))
            nodes.append(node)
            node = node.parent
        if node is None or node.parent is not None or not path:    # not attached to an adapter root
            return
        tokens = np.concatenate(path[::-1])
        digests = self._register_tokens(tokens, self._root_digest(node))
        if len(digests) == len(nodes):
            for n, digest in zip(reversed(nodes), digests):
                memo[id(n)] = (n, digest)

    def _root_digest(self, root_node) -> int:
        """The digest a trie root's chains start from: the namespace root, or the salted root of a
        salted trie root (``salted_trie``: the root carries the request's cache salt)."""
        from lmdeploy_hostcache.integration.request_salt import node_root_salt

        return salted_root(self.namespace, node_root_salt(root_node))

    def _register_tokens(self, tokens, root: int) -> list[int]:
        """Register every full block of ``tokens`` chained from ``root`` (the namespace root, or a
        salted request's salted root) (digest -> whole prefix). The
        chain restarts from the longest prefix already hashed under the same root (memoised on the
        prefix's chained key, ``checker.chain_keys``), so the product digests are computed only for
        new blocks."""
        bs = self.block_size
        full = len(tokens) // bs
        if full == 0:
            return []
        memo = self._chain_memo.setdefault(root, {})
        tokens = np.ascontiguousarray(tokens[:full * bs], dtype=np.int64)
        keys = chain_keys(tokens, bs)
        start, parent = full, None
        while start > 0:
            parent = memo.get(keys[start - 1])
            if parent is not None:
                break
            start -= 1
        digests = [memo[k] for k in keys[:start]]
        if start == full:
            return digests
        chain = self._chain_cls(self.namespace, parent if start > 0 else root)
        chain.extend(tokens[start * bs:])
        for i, digest in enumerate(chain.digests, start=start):
            memo[keys[i]] = digest
            digests.append(digest)
            if digest not in self.prefixes:
                self.prefixes[digest] = torch.as_tensor(tokens[:(i + 1) * bs].copy())
        return digests

    def _register(self) -> None:
        from lmdeploy_hostcache.integration.request_salt import sequence_salt

        for seq in self.engine.scheduler.seq_manager.get_all_sequences():
            tokens = seq.all_ids
            full = len(tokens) // self.block_size
            if self._registered.get(int(seq.seq_id), -1) >= full:
                continue
            self._register_tokens(tokens, salted_root(self.namespace, sequence_salt(seq)))
            self._registered[int(seq.seq_id)] = full

    def _warm(self, rank_state, digests: list[int]) -> None:
        """Slot images of ``digests`` up to each one's restore count (see :meth:`_candidates`),
        computed in batches: one gather for the new base images, then one round trip per level."""
        oracle, codec, memo = rank_state
        todo = list(dict.fromkeys(d for d in digests if d not in memo))
        if todo:
            expected = []
            for digest in todo:
                tokens = self.prefixes[digest].numpy()
                expected.append(oracle.expected_block(tokens, len(tokens) // self.block_size - 1))
            for digest, slot in zip(todo, codec.gather(expected)):
                memo[digest] = ([slot], [not codec.fmt.lossy])
        if not codec.fmt.lossy:
            return
        want = {d: 1 + self.trips.of_digest(d) for d in dict.fromkeys(digests)}
        names = None
        while True:
            grow = [d for d, n in want.items() if len(memo[d][0]) < n and not memo[d][1][0]]
            if not grow:
                return
            if names is None:
                tokens = self.prefixes[grow[0]].numpy()
                names = list(oracle.expected_block(tokens, len(tokens) // self.block_size - 1))
            restored = codec.scatter(torch.stack([memo[d][0][-1] for d in grow]), names)
            for digest, nxt in zip(grow, codec.gather(restored)):
                slots, fixed = memo[digest]
                if torch.equal(nxt, slots[-1]):
                    fixed[0] = True
                else:
                    slots.append(nxt)

    def _candidates(self, rank_state, digest: int, trips: int) -> list[torch.Tensor]:
        """Slot images ``q(f^j(oracle))`` for ``j = 0..trips`` (memoised per digest, extended as
        the restore count grows, stopping at the chain's fixed point; ``q`` = gather, ``f`` = one
        round trip)."""
        self._warm(rank_state, [digest])
        return rank_state[2][digest][0][:1 + trips]

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

    def _changed_slots(self, rank: int, pool) -> tuple[np.ndarray, dict[int, int]]:
        """Slots of ``pool`` whose bytes changed since the previous verify (all of a new pool),
        and the rank's slot -> digest map of verified slots (emptied for a new pool)."""
        state = self._pool_state[rank]
        chunks = pool.chunks
        if state is None or state[0] is not pool:
            state = self._pool_state[rank] = (pool, [c.clone() for c in chunks], {})
            return np.ones(pool.num_slots, dtype=bool), state[2]
        changed = []
        for snap, cur in zip(state[1], chunks):
            diff = (_words(snap) != _words(cur)).any(-1)
            if bool(diff.any()):
                rows = diff.nonzero().flatten()
                snap[rows] = cur[rows]
            changed.append(diff)
        return torch.cat(changed).numpy(), state[2]

    def verify(self, label: str = '') -> None:
        """Compare every RESIDENT host block's slot with its expected image on every rank. A slot
        is compared again only when its bytes changed since the previous verify or it now holds a
        different block (``verified[slot] == digest`` means: compared equal, unchanged since); a
        slot that changed while no resident block covered it loses its verified entry."""
        index = self.side.index
        resident = [(d, b.slot) for d, b in index._blocks.items() if not b.doomed and b.state is self._resident]
        unknown = sum(1 for d, _ in resident if d not in self.prefixes)
        self.stats.unknown_resident = max(self.stats.unknown_resident, unknown)
        self.stats.slots_checked += len(resident) - unknown
        for rank, rank_state in enumerate(self._ranks):
            pool = self._pool(rank)
            if pool is None:    # engine asleep or closed: no pool to check against
                self._pool_state[rank] = None
                continue
            changed, verified = self._changed_slots(rank, pool)
            self._warm(rank_state, [d for d, slot in resident if d in self.prefixes
                                    and (changed[slot] or verified.get(slot) != d)])
            examined = set()
            for digest, slot in resident:
                if digest not in self.prefixes:
                    continue
                examined.add(slot)
                if not changed[slot] and verified.get(slot) == digest:
                    continue
                self.stats.slots_compared += 1
                actual = pool.slot_view(slot)
                trips = self.trips.of_digest(digest)
                typed = self._typed[rank]
                if typed is not None:
                    actual = actual[typed]
                candidates = self._candidates(rank_state, digest, trips)
                if any(torch.equal(actual, c if typed is None else c[typed]) for c in candidates):
                    verified[slot] = digest
                    continue
                verified.pop(slot, None)
                self.stats.wrong_blocks += 1
                msg = (f'{label} rank {rank}: host slot {slot} of resident block {digest:#x} '
                       f'({len(self.prefixes[digest])}-token prefix) does not hold its oracle bytes')
                if self.stats.first_error is None:
                    self.stats.first_error = msg
                if self.raise_on_error:
                    from .checker import KVMismatch
                    raise KVMismatch(msg)
            for slot in np.flatnonzero(changed):
                if int(slot) not in examined:
                    verified.pop(int(slot), None)


@dataclass
class _SlotStats:
    checks: int = 0
    slots_checked: int = 0        # resident slots covered by a verify (compared, or unchanged since compared)
    slots_compared: int = 0       # slot byte comparisons actually made
    wrong_blocks: int = 0
    unknown_resident: int = 0     # resident blocks whose prefix the harness never saw (should be 0)
    first_error: str | None = None
