"""Byte checker: every KV block LMDeploy considers valid must hold the oracle's bytes.

Checked after every engine step:
- every sequence that owns blocks: positions ``[0, num_history_ids)`` (for a sequence that is
  waiting for an external load only ``[0, fallback_step)``: the rest is being written);
- every node of the prefix-cache trie (full blocks): these are the blocks that get demoted and
  that later requests reuse.

Incremental mode (the default) compares only what can have changed, without weakening the check:
the checker keeps a snapshot of the whole cache as of its previous check and, per physical block,
the identity of the expectation it last verified there (hash of the exact token prefix up to the
block's last valid position, and the valid count). A block is compared again when its raw bytes
differ from the snapshot (any pool, padding included) or when LMDeploy now expects different
content in it; a block that changed while nothing expected anything of it loses its verified
identity. Invariant: ``verified[b] == key`` means block ``b``'s bytes equal what was verified
against expectation ``key`` and have not changed since. Lossy acceptance only grows with a
block's restore count, so a block verified once stays valid. Blocks a load just restored are
always compared (``restored_verified`` counts them; a load is restored when LMDeploy's
``KVLoadCoordinator`` moves its record out of ``LOADING`` with the sequence published).
``incremental=False`` compares every expected block on every check (the reference behaviour).

A block matches when its typed K/V (and scale/zero) storage equals the oracle exactly, or -- for
lossy host formats -- equals ``f^k(oracle)`` for some ``1 <= k <= n``, where ``f`` is the transfer
path's torch reference of one host round trip (quantise on demotion, dequantise on restore) and
``n`` is the number of restores this very prefix has had so far (``round_trips``): a block
restored, demoted again and restored again went through ``f`` twice, and ``f`` is not idempotent
(fp16 through int4 can take tens of round trips to reach a fixed point), so the bound follows the
block's actual history, never a fixed count. Comparison is bitwise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from lmdeploy.pytorch.messages import MessageStatus

from .kv_layout import CpuKVCache
from .oracle import PrefixOracle

# (expected storage name -> [layers, n, heads, last], n) -> [f^1(expected), ..., f^m(expected)], m <= n
# (shorter when f reached a fixed point: every deeper round trip gives the last one again)
VariantFn = Callable[[dict[str, torch.Tensor], int], list[dict[str, torch.Tensor]]]
# (prefix tokens, block index) -> how many times that block was restored through the host tier so far
RoundTripsFn = Callable[[np.ndarray, int], int]
DEFAULT_ROUND_TRIPS = 6   # bound used only when no RoundTripsFn is given


class KVMismatch(AssertionError):
    """A block held bytes that no oracle variant explains."""


@dataclass
class CheckStats:
    checks: int = 0
    seq_blocks: int = 0
    trie_blocks: int = 0
    lossy_blocks: int = 0
    wrong_blocks: int = 0
    wrong_bytes: int = 0
    first_error: str | None = None
    max_lossy_depth: int = 0        # most quantise->dequantise round trips seen on one block
    compared_blocks: int = 0        # blocks whose bytes were compared (the rest were unchanged and verified)
    restored_verified: int = 0      # blocks of completed host/external loads compared right after the load


def _words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 tensor as the widest integer words that tile its last axis (same bytes,
    fewer elements to compare)."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if t.shape[-1] % size == 0 and t.is_contiguous():
            return t.view(dtype)
    return t


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


class KVChecker:
    """Checks a :class:`CpuKVCache` against a :class:`PrefixOracle` using the scheduler's view."""

    def __init__(self, cache: CpuKVCache, oracle: PrefixOracle, scheduler, variants: VariantFn | None = None,
                 raise_on_error: bool = True, round_trips: RoundTripsFn | None = None, incremental: bool = True):
        self.cache = cache
        self.incremental = bool(incremental)
        self.shared_walk: dict | None = None               # set by rank_checkers: one trie walk per iteration
        self._snapshot: list[torch.Tensor] | None = None   # raw pool bytes as of the previous check
        self._changed: np.ndarray | None = None            # per physical block: bytes differ from the snapshot
        self._examined: set[int] = set()                   # blocks some expectation covered in this check
        self._verified: dict[int, bytes] = {}              # physical block -> chained key of what was verified
        self._loading: dict[int, tuple[int, int]] = {}     # seq_id -> (fallback_step, remote_step) while LOADING
        self.oracle = oracle
        self.scheduler = scheduler
        self.variants = variants
        self.round_trips = round_trips
        self.raise_on_error = raise_on_error
        self.stats = CheckStats()

    # -- one block -------------------------------------------------------------------------
    def _compare(self, block_id: int, expected: dict[str, torch.Tensor], n: int) -> int:
        wrong = 0
        for name, exp in expected.items():
            actual = self.cache.block_tokens(name, block_id)[:, :n]
            a, e = _as_bytes(actual), _as_bytes(exp)
            if not torch.equal(a, e):
                wrong += int((a != e).sum())
        return wrong

    def check_block(self, where: str, tokens, block_index: int, block_id: int, num_valid: int,
                    force: bool = False, key: bytes | None = None) -> bool:
        """Compare one block with its expectation (incremental mode: only if it changed, its
        expectation changed, or ``force``). ``tokens`` may be a callable returning them (built only
        if a comparison is needed); ``key`` is the expectation's chained key (:func:`chain_keys`),
        computed from ``tokens`` when not given."""
        if self.incremental and self._changed is not None:
            if key is None:
                key = chain_keys(_tokens(tokens)[:block_index * self.cache.block_size + num_valid],
                                 self.cache.block_size)[-1]
            self._examined.add(block_id)
            if not force and self._unchanged_since_verified(block_id, key):
                return True
            ok = self._compare_block(where, _tokens(tokens), block_index, block_id, num_valid)
            if ok:
                self._verified[block_id] = key
            else:
                self._verified.pop(block_id, None)
            return ok
        return self._compare_block(where, _tokens(tokens), block_index, block_id, num_valid)

    def _unchanged_since_verified(self, block_id: int, key: bytes) -> bool:
        """Incremental mode: the block's bytes did not change since they were verified against ``key``
        (it counts as examined in this check)."""
        if self._changed is None or self._changed[block_id] or self._verified.get(block_id) != key:
            return False
        self._examined.add(block_id)
        return True

    def _compare_block(self, where: str, tokens, block_index: int, block_id: int, num_valid: int) -> bool:
        self.stats.compared_blocks += 1
        expected = self.oracle.expected_block(tokens, block_index, None if num_valid == self.cache.block_size
                                              else num_valid)
        wrong = self._compare(block_id, expected, num_valid)
        if wrong == 0:
            return True
        if self.variants is not None and num_valid == self.cache.block_size:
            trips = (DEFAULT_ROUND_TRIPS if self.round_trips is None
                     else int(self.round_trips(np.asarray(tokens), block_index)))
            for depth, variant in enumerate(self.variants(expected, trips), start=1):
                if self._compare(block_id, variant, num_valid) == 0:
                    self.stats.lossy_blocks += 1
                    self.stats.max_lossy_depth = max(self.stats.max_lossy_depth, depth)
                    return True
        self.stats.wrong_blocks += 1
        self.stats.wrong_bytes += wrong
        msg = (f'{where}: block #{block_index} (physical {block_id}, {num_valid} valid tokens) has '
               f'{wrong} wrong bytes')
        if self.stats.first_error is None:
            self.stats.first_error = msg
        if self.raise_on_error:
            raise KVMismatch(msg)
        return False

    # -- whole engine state ----------------------------------------------------------------
    def _begin(self) -> None:
        """Incremental mode: which physical blocks changed since the previous check."""
        self._examined = set()
        if not self.incremental:
            return
        pools = [pool.tensor for pool in self.cache.allocation.pools if pool.nbytes]
        if self._snapshot is None or len(self._snapshot) != len(pools) or any(
                a.shape != b.shape for a, b in zip(self._snapshot, pools)):
            self._snapshot = [t.clone() for t in pools]
            self._changed = np.ones(self.cache.cache_config.num_gpu_blocks, dtype=bool)
            self._verified.clear()
            return
        ppb = self.cache.pages_per_block
        changed = None
        for snap, cur in zip(self._snapshot, pools):
            a, b = _words(snap), _words(cur)
            diff = (a != b).reshape(cur.shape[0], cur.shape[1] // ppb, -1).any(-1).any(0)
            changed = diff if changed is None else changed | diff
            if bool(diff.any()):
                snap.copy_(cur)
        self._changed = changed.numpy()

    def _end(self) -> None:
        """A block that changed while no expectation covered it loses its verified identity."""
        if not self.incremental or self._changed is None:
            return
        for block_id in np.flatnonzero(self._changed):
            if int(block_id) not in self._examined:
                self._verified.pop(int(block_id), None)

    def _restored_ranges(self, loads) -> dict[int, tuple[int, int]]:
        """Sequences whose load completed successfully since the previous check -> restored block range."""
        from lmdeploy.pytorch.paging.kv_load_coordinator import _LoadPhase

        bs = self.cache.block_size
        done = {}
        for seq_id, (fallback, remote) in list(self._loading.items()):
            record = loads.get(seq_id)
            if record is None or record.phase is not _LoadPhase.LOADING:
                del self._loading[seq_id]
                if record is not None and record.remote_step == remote:   # published (READY / PREFILLING)
                    done[seq_id] = (fallback // bs, remote // bs)
        for seq_id, record in loads.items():
            if record.phase is _LoadPhase.LOADING:
                self._loading[int(seq_id)] = (int(record.fallback_step), int(record.remote_step))
        return done

    def _warm_restored(self, sched, restored: dict[int, tuple[int, int]]) -> None:
        expected = []
        for seq in sched.seq_manager.get_all_sequences():
            first, end = restored.get(int(seq.seq_id), (0, 0))
            end = min(end, int(seq.num_history_ids) // self.cache.block_size)
            tokens = seq.all_ids
            for b in range(first, end):
                trips = DEFAULT_ROUND_TRIPS if self.round_trips is None else int(self.round_trips(tokens, b))
                expected.append((self.oracle.expected_block(tokens, b), trips))
        self.variants.warm(expected)

    def check(self, label: str = '') -> None:
        self.stats.checks += 1
        self._begin()
        sched = self.scheduler
        bs = self.cache.block_size
        loads = getattr(sched.kv_load_coordinator, '_loads', {})
        restored = self._restored_ranges(loads)
        if restored and hasattr(self.variants, 'warm'):   # lossy: first round trip of every restored block, batched
            self._warm_restored(sched, restored)
        for seq in sched.seq_manager.get_all_sequences():
            if seq.num_blocks == 0:
                continue
            valid = int(seq.num_history_ids)
            if seq.status == MessageStatus.WAITING_FOR_REMOTE_KVS:
                record = loads.get(int(seq.seq_id))
                valid = min(valid, record.fallback_step) if record is not None else 0
            if valid == 0:
                continue
            table = sched.block_manager.get_block_table(seq)
            tokens = np.asarray(seq.all_ids, dtype=np.int64)
            num_blocks = (valid + bs - 1) // bs
            if len(table) < num_blocks:
                raise KVMismatch(f'{label} seq {seq.seq_id}: {valid} valid tokens but only {len(table)} blocks')
            first, end = restored.pop(int(seq.seq_id), (0, 0))
            keys = chain_keys(tokens[:valid], bs) if self.incremental else [None] * num_blocks
            where = f'{label} seq {seq.seq_id} ({seq.status.name})'
            self.stats.seq_blocks += num_blocks
            for b, block_id in enumerate(table[:num_blocks].tolist()):
                was_restored = first <= b < end
                if not was_restored and self._unchanged_since_verified(block_id, keys[b]):
                    continue
                ok = self.check_block(where, tokens, b, block_id, min(bs, valid - b * bs), force=was_restored,
                                      key=keys[b])
                if was_restored and ok:
                    self.stats.restored_verified += 1
        self.check_trie(label)
        self._end()

    def trie_nodes(self):
        """Yield ``(node, path_tokens)`` for every attached trie node (depth first)."""
        for node, _, _, link in _walk_trie(self.scheduler.block_trie, keys=False):
            yield node, _path(link)

    def _trie_walk(self, label: str):
        """``(entries, physical blocks)`` of every attached trie node: ``(node, chained key, prefix
        length, path link)``, each node's prefix length checked. TP ranks check the same scheduler
        state in the same iteration, so the first rank's walk of an iteration is reused by the others
        (``shared``; a rank whose check count differs from the walk's walks again itself)."""
        share = self.shared_walk
        trie = self.scheduler.block_trie
        if share is not None and share.get('trie') is trie and share.get('checks') == self.stats.checks \
                and share.get('owner') is not self:
            return share['nodes'], share['physical']
        nodes = _walk_trie(trie, keys=self.incremental)
        for node, _, length, _ in nodes:
            if node.prefix_len != length:
                raise KVMismatch(f'{label} trie node prefix_len {node.prefix_len} != path length {length}')
        physical = []
        if nodes:
            allocator = self.scheduler.block_manager.allocator
            physical = allocator.get_physical_blocks(np.array([n.block_id for n, _, _, _ in nodes])).tolist()
        if share is not None:
            share.update(trie=trie, checks=self.stats.checks, owner=self, nodes=nodes, physical=physical)
        return nodes, physical

    def check_trie(self, label: str = '') -> None:
        """Every attached trie node (a full block): its prefix length, then its bytes. The walk
        carries each node's chained key; the node's whole token path is built only for a comparison."""
        bs = self.cache.block_size
        nodes, physical = self._trie_walk(label)
        if not nodes:
            return
        self.stats.trie_blocks += len(nodes)
        for (node, key, length, link), phys in zip(nodes, physical):
            if self._unchanged_since_verified(phys, key):
                continue
            self.check_block(f'{label} trie node @{length}', lambda lk=link: _path(lk), length // bs - 1, phys, bs,
                             key=key)


def _walk_trie(trie, keys: bool) -> list[tuple]:
    """Every attached node of ``trie``, depth first, as ``(node, chained key or None, prefix
    length, path link)``; a node's token path is ``_path(link)`` (built only when needed)."""
    nodes = []
    for root in list(trie._roots.values()):
        stack = [(root, b'', 0, None)]
        while stack:
            node, key, length, link = stack.pop()
            for child in list(node.children.values()):
                ids = np.asarray(child.token_ids, dtype=np.int64)
                entry = (child, _next_key(key, ids) if keys else None, length + len(ids), (link, ids))
                nodes.append(entry)
                stack.append(entry)
    return nodes


def _next_key(prev: bytes, block_tokens: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(prev + block_tokens.tobytes())


def chain_keys(tokens: np.ndarray, block_size: int) -> list[bytes]:
    """Chained keys of the blocks of ``tokens`` (int64; the last block may be partial): key ``b``
    names the exact tokens ``[0, end of block b)``, the same whether it is computed over a
    sequence's tokens or along trie nodes."""
    keys, prev = [], b''
    for start in range(0, len(tokens), block_size):
        prev = _next_key(prev, tokens[start:start + block_size])
        keys.append(prev)
    return keys


def _path(link) -> np.ndarray:
    parts = []
    while link is not None:
        link, ids = link
        parts.append(ids)
    return np.concatenate(parts[::-1])


def _tokens(tokens):
    return tokens() if callable(tokens) else tokens


def check_gpu_refcounts_balanced(scheduler) -> dict[str, int]:
    """With no live sequence left: only the trie holds refs, one per node; everything else is free."""
    if scheduler.seq_manager.get_all_sequences():
        raise AssertionError(f'{len(scheduler.seq_manager.get_all_sequences())} sequences still registered')
    if scheduler.sessions:
        raise AssertionError(f'{len(scheduler.sessions)} sessions still open')
    if scheduler.has_remote_loading():
        raise AssertionError('remote loads still tracked')
    if scheduler.kv_save_coordinator.has_pending():
        raise AssertionError('save leases still pinned')
    allocator = scheduler.block_manager.allocator
    trie = scheduler.block_trie
    node_blocks = []
    for root in trie._roots.values():
        stack = [root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                node_blocks.append(int(child.block_id))
                stack.append(child)
    if len(set(node_blocks)) != len(node_blocks):
        raise AssertionError('two trie nodes share one logical block')
    if node_blocks:
        refs = allocator.get_ref_count(np.array(node_blocks))
        bad = [b for b, r in zip(node_blocks, refs) if int(r) != 1]
        if bad:
            raise AssertionError(f'trie blocks with ref_count != 1 after all sequences ended: {bad[:8]}')
    usable = scheduler.block_manager.num_gpu_blocks - scheduler.cache_config.num_reserved_gpu_blocks
    free = scheduler.block_manager.get_num_free_gpu_blocks()
    if free + len(node_blocks) != usable:
        raise AssertionError(f'GPU blocks leaked: free {free} + trie {len(node_blocks)} != usable {usable}')
    return {'trie_blocks': len(node_blocks), 'free_gpu_blocks': free, 'usable_gpu_blocks': usable}
