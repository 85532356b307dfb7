"""Radix index of host-resident KV blocks, keyed by chained digest.

Ownership: the index owns host *slots* (through a ``SlotAllocator``) and block metadata; it never
touches KV bytes (the worker side does) and never sees GPU blocks (LMDeploy owns them).

Structure: one ``HostBlock`` per full block, keyed by its chained digest (``digest.py``).  Since a
digest names the whole prefix, the dict *is* a radix tree; ``_children`` maps a parent digest to
the digests of its host-resident children (the parent itself may live on the GPU, or nowhere).

Block lifecycle::

    prepare_store ──> WRITING ──complete_store(ok)──> RESIDENT ──prepare_load──> RESIDENT+read pins
         │                 └──complete_store(fail)──> dropped (+ its host subtree)        │
         └─(already present: touched, None)      complete_load(ok): dropped (now on GPU), or
                                                    with keep_restored: RESIDENT+on_gpu (below)
                                                 complete_load(fail): unpinned, stays
    RESIDENT ──drop_corrupt──> dropped (+ its host subtree): a worker found the slot's bytes changed

    RESIDENT ──hold──> RESIDENT+hold pin ──release──> RESIDENT   (a lookup's hit until its load
                                                                  starts; nothing is counted)

Kept restores (``keep_restored=True``, the connector's ``keep_restored_blocks``): a block a load
moved to the GPU keeps its host copy, flagged ``on_gpu`` (the GPU holds the same bytes: they came
from this slot).  To everything else it is gone exactly as an exclusive tier's promotion removes it:
it leaves its parent's children (the parent may become a leaf), the policy sees ``on_remove`` (as a
promotion) and no access.  It waits, unpinned, in its own queue (oldest first), and ``_take_slot``
reclaims it before asking the policy for a victim, so a kept copy only occupies a slot an exclusive
tier would have left free (dropped as ``promoted``, never counted as an eviction).  When the GPU
evicts it again, ``prepare_store`` re-inserts it as an exclusive tier would (new access time and
sequence, its parent's child, ``on_insert``) but returns None: nothing is copied.  So every policy
sees the same events and picks the same victims with or without kept restores
(``tests/planner/test_replay.py`` checks it request by request); only copies are saved.

Second chance (``prepare_spare``): a WRITING block whose GPU copy is evicted again (the GPU
recomputed it while the first copy was in flight) gets a *spare* slot and a second copy.  The
block becomes RESIDENT as soon as one of its copies succeeded: a failed primary copy hands the
block over to a spare (written or still in flight) instead of dropping it; spares not needed any
more are freed when their copy ends.  A block is dropped only when every copy failed.

Corrupt copies (``drop_corrupt``): a block whose slot a worker found changed since it was written
(checksum mismatch) leaves the index at once (doomed: invisible to lookups, freed at its last
unpin), its host subtree with it (orphans, as when a parent leaves every tier), so the GPU's
recomputed copy of it is demoted into a fresh slot by the next ``prepare_store`` instead of being
refused as already present.

``drop_all`` empties the index when the host pool behind it is gone (engine sleep/close, a pool
rebuilt): every block is doomed at once; blocks with a copy in flight are freed when it ends.

Invariants (``check_invariants``):

1. every block owns exactly one used slot (plus its spares) and the allocator has no other
   used slot;
2. a block with allocator pins on any of its slots (a copy in flight, or a hold) is never evicted and none of
   its slots is reused; a spare is pinned while its copy is in flight, and a written spare is kept
   only while the block is still WRITING;
3. leaf-first: only blocks without host-resident children are eviction candidates, so no chain
   keeps a child whose host parent was evicted; when a parent leaves *every* tier the caller
   reclaims its host subtree with ``drop_subtree`` (blocks mid-copy are doomed: invisible to
   lookups and freed when their last pin goes);
4. ``lookup`` returns a block only after comparing its stored token bytes with the request's and,
   its stored parent with the previous digest (for the first block, the ``parent`` the caller's
   match ended at, which the connector always passes) (when ``verify_tokens``), so a digest
   collision can never return a block with other tokens, nor one with the same tokens stored
   after another prefix.  Tokens are stored rather than a second digest because
   the comparison is exact (not merely improbable to fail) and 64 tokens cost 256 bytes, well
   inside the metadata budget;
5. an unpinned RESIDENT leaf that is not ``on_gpu`` is a policy candidate (``candidate``); an
   unpinned, not doomed ``on_gpu`` block (RESIDENT, only with ``keep_restored``), leaf or not, is in
   the kept-restore queue instead, and in no parent's children; nothing else is in either.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Callable, Iterable, Sequence

from .eviction import EvictionPolicy, make_policy
from .slot_allocator import SlotAllocator


class BlockState(IntEnum):
    WRITING = 1   # slot allocated, bytes being copied to host
    RESIDENT = 2  # bytes on host; readable


class HostBlock:
    """Metadata of one host-resident block (no KV bytes)."""

    __slots__ = ("digest", "parent", "tokens", "slot", "state", "last_access", "hits",
                 "seq", "candidate", "doomed", "promoted", "on_gpu", "pdata", "spares")

    def __init__(self, digest: int, parent: int, tokens: bytes, slot: int, now: int, seq: int) -> None:
        self.digest = digest
        self.parent = parent
        self.tokens = tokens
        self.slot = slot
        self.state = BlockState.WRITING
        self.last_access = now
        self.hits = 0
        self.seq = seq
        self.candidate = False
        self.doomed = False      # leaving the index: invisible to lookups, freed at last unpin
        self.promoted = False    # doomed because a load moved it to the GPU
        self.on_gpu = False      # kept after a load moved it to the GPU (keep_restored)
        self.pdata = None
        self.spares: dict[int, bool] | None = None   # second-chance slot -> written (False: in flight)

    def __lt__(self, other: "HostBlock") -> bool:  # heap tie-breaks never compare blocks, but be safe
        return self.seq < other.seq

    def __repr__(self) -> str:
        return (f"HostBlock({self.digest:032x}, slot={self.slot}, {self.state.name}"
                f"{', doomed' if self.doomed else ''})")


@dataclass
class HostIndexStats:
    lookups: int = 0
    lookup_blocks: int = 0       # blocks asked for
    hit_blocks: int = 0          # blocks returned by lookup
    verify_mismatches: int = 0   # digest matched, tokens did not (collision or corruption)
    inserts: int = 0             # prepare_store that took a slot
    refreshes: int = 0           # prepare_store of a block already present
    store_rejected: int = 0      # prepare_store with no free or evictable slot
    store_failures: int = 0      # complete_store(success=False)
    spares: int = 0              # prepare_spare that took a slot (second copy of a WRITING block)
    second_chances: int = 0      # failed primary copies replaced by a spare (block kept)
    dropped_all: int = 0         # blocks doomed by drop_all (pool gone)
    evictions: int = 0           # blocks evicted by the policy
    dropped: int = 0             # blocks removed by drop_subtree / failed stores (orphans)
    orphaned: int = 0            # blocks doomed because a host ancestor left every tier (drop_subtree, or a
                                 # failed store's subtree), each once, when doomed (a pinned one is freed at its
                                 # last unpin); never the blocks drop_all dooms (the pool is gone)
    loads: int = 0               # blocks pinned by prepare_load
    holds: int = 0               # blocks pinned by hold (a lookup's hit, until its load starts)
    promoted: int = 0            # blocks dropped after a successful load (now on GPU)
    kept_restores: int = 0       # blocks a successful load left on host too (keep_restored)
    kept_reused: int = 0         # of those, evicted by the GPU again and found on host (no copy)
    load_failures: int = 0
    corrupt: int = 0             # blocks dropped by drop_corrupt (a worker found their slot's bytes changed)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HostIndex:
    """Scheduler-side index of host slots; see the module docstring for the lifecycle."""

    def __init__(
        self,
        num_slots: int,
        policy: str | EvictionPolicy = "lru",
        verify_tokens: bool = True,
        on_evict: Callable[[HostBlock], None] | None = None,
        keep_restored: bool = False,
    ) -> None:
        self.allocator = SlotAllocator(num_slots)
        self.keep_restored = keep_restored
        self._kept: dict[int, HostBlock] = {}   # unpinned on_gpu blocks (not the policy's), oldest first: reclaimed first
        self.policy = make_policy(policy)
        self.verify_tokens = verify_tokens
        self.on_evict = on_evict
        self.stats = HostIndexStats()
        self._blocks: dict[int, HostBlock] = {}
        self._children: dict[int, set[int]] = {}
        self._clock = 0
        self._seq = 0
        self._listeners: list[tuple[Callable[[HostBlock], None], Callable[[HostBlock], None]]] = []

    def add_listener(self, on_stored: Callable[[HostBlock], None], on_removed: Callable[[HostBlock], None]) -> None:
        """Observe the index's contents (the routing feed): ``on_stored(block)`` when a block
        becomes RESIDENT, ``on_removed(block)`` when a block that was RESIDENT leaves the index.
        Listeners must not raise and must not call back into the index."""
        self._listeners.append((on_stored, on_removed))

    def remove_listener(self, on_stored: Callable[[HostBlock], None], on_removed: Callable[[HostBlock], None]) -> None:
        """Stop calling a pair given to ``add_listener`` (the routing feed closing); unknown pairs are ignored."""
        self._listeners = [p for p in self._listeners if p != (on_stored, on_removed)]

    # ------------------------------------------------------------------ queries
    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    @property
    def num_free_slots(self) -> int:
        return self.allocator.num_free

    @property
    def num_kept(self) -> int:
        """Kept restores waiting in their queue: slots reused before any eviction."""
        return len(self._kept)

    @property
    def access_clock(self) -> int:
        """The access counter: it advances on every access (a block's ``last_access`` is a value of it)."""
        return self._clock

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, digest: int) -> bool:
        b = self._blocks.get(digest)
        return b is not None and not b.doomed

    def get(self, digest: int) -> HostBlock | None:
        b = self._blocks.get(digest)
        return None if b is None or b.doomed else b

    def is_resident(self, digest: int) -> bool:
        b = self._blocks.get(digest)
        return b is not None and not b.doomed and b.state is BlockState.RESIDENT

    def is_writing(self, digest: int) -> bool:
        """The block is in the index with its store copy still in flight (WRITING: not matchable yet)."""
        b = self._blocks.get(digest)
        return b is not None and not b.doomed and b.state is BlockState.WRITING

    def lookup(self, digests: Sequence[int], block_bytes: Sequence[bytes] | None = None,
               parent: int | None = None) -> int:
        """How many consecutive blocks from ``digests[0]`` are RESIDENT (tokens verified).

        ``digests`` must be a chain continuing where the caller's own match ended; ``parent``, when
        given, is the digest that match ended at (the namespace root for a chain from the start), and
        the first block must have been stored under it.  No pins, no access-time change: call
        ``prepare_load`` or ``touch`` to act on the result.
        """
        verify = self.verify_tokens
        if verify and (block_bytes is None or len(block_bytes) < len(digests)):
            raise ValueError("lookup needs block_bytes (the token bytes of every digest) when verify_tokens is on")
        st = self.stats
        st.lookups += 1
        st.lookup_blocks += len(digests)
        blocks = self._blocks
        n = 0
        for i, d in enumerate(digests):
            b = blocks.get(d)
            if b is None or b.state is not BlockState.RESIDENT or b.doomed:
                break
            # verified: its own tokens, and (past the first) the parent it was stored under, so a digest
            # collision cannot hand back a block with the same tokens that followed another prefix
            if verify:
                want_parent = digests[i - 1] if i else parent
                if b.tokens != block_bytes[i] or (want_parent is not None and b.parent != want_parent):
                    st.verify_mismatches += 1
                    break
            n += 1
        st.hit_blocks += n
        return n

    # ------------------------------------------------------------------ loads (host -> GPU)
    def prepare_load(self, digests: Sequence[int]) -> list[int]:
        """Pin blocks for reading and mark them used; returns their slots, in order.

        Raises KeyError (pinning nothing) if any block is not RESIDENT.
        """
        blocks = self._resident_blocks(digests, "load")
        slots = []
        for b in blocks:
            self.allocator.pin(b.slot)
            self._access(b)
            self._unqueue(b)
            slots.append(b.slot)
        self.stats.loads += len(blocks)
        return slots

    def complete_load(self, digests: Sequence[int], success: bool) -> None:
        """Release read pins.  On success the blocks now live on the GPU: drop the host copies
        (exclusive tiers) once no other reader holds them."""
        for d in digests:
            b = self._blocks.get(d)
            if b is None:
                raise KeyError(f"complete_load of unknown block {d:032x}")
            self.allocator.unpin(b.slot)
            if success and self.keep_restored and not b.doomed:
                if not b.on_gpu:
                    self._keep(b)
            elif success:
                b.doomed = b.promoted = True  # another reader may still hold a pin
            else:
                self.stats.load_failures += 1
            self._settle(b)

    def hold(self, digests: Sequence[int]) -> None:
        """Pin RESIDENT blocks so no eviction takes them until ``release``; no access-time change.

        For a lookup's hit between the lookup and the start of its load: the evictions made to
        admit that very request must not take it.  Raises KeyError (pinning nothing) if any block
        is not RESIDENT.
        """
        self._hold_blocks(self._resident_blocks(digests, "hold"))

    def _hold_blocks(self, blocks) -> None:
        """Pin ``blocks`` (RESIDENT) out of the eviction queue, counted in ``stats.holds``."""
        for b in blocks:
            self.allocator.pin(b.slot)
            self._unqueue(b)
        self.stats.holds += len(blocks)

    def hold_chain(self, digests: Sequence[int]) -> tuple[int, ...]:
        """``hold`` a lookup's hit (a chain: each block the parent of the next) by pinning only the blocks
        an eviction or a reclaim could take while the rest stays: the deepest one, every kept restore
        (``on_gpu``: reclaimable, and detached from its parent) and every block whose next one is a kept
        restore (its leaf-ness does not count that child). Every other block has its next one, held or
        so protected, as a host-resident child, so it is no eviction candidate while they stay. Returns
        the digests pinned (for ``release``); O(len(digests)) attribute reads, O(1) pins for a plain hit.
        Raises KeyError (pinning nothing) if any block is not RESIDENT.

        Only while no block of the hit becomes a kept restore: a successful ``complete_load`` with
        ``keep_restored`` would detach an unpinned block from its parent. The connector holds a hit within
        one scheduling pass, and loads complete only in ``update_connector_output``, after it (LMDeploy
        0.18's engine loop; the connector releases any hold left when that runs). A doom
        (``drop_subtree``) frees a held hit's unpinned tail at once; ``hold`` would keep it until
        ``release``: either way that load fails and its turn recomputes."""
        blocks = self._resident_blocks(digests, "hold")
        last = len(blocks) - 1
        pick = [b for j, b in enumerate(blocks) if j == last or b.on_gpu or blocks[j + 1].on_gpu]
        self._hold_blocks(pick)
        return tuple(b.digest for b in pick)

    def release(self, digests: Sequence[int]) -> None:
        """Undo ``hold`` (or ``hold_chain``, given what it returned): unpin; a block doomed meanwhile is
        freed at its last unpin."""
        for d in digests:
            b = self._blocks.get(d)
            if b is None:
                raise KeyError(f"release of unknown block {d:032x}")
            self.allocator.unpin(b.slot)
            self._settle(b)

    # ------------------------------------------------------------------ stores (GPU -> host)
    def prepare_store(self, digest: int, parent: int, block_bytes: bytes) -> int | None:
        """Reserve a slot for a block about to be copied to host.

        Returns the slot (block WRITING, write-pinned), or None when the block is already
        present (its access time is refreshed) or no slot is free or evictable.
        """
        b = self._blocks.get(digest)
        if b is not None and not b.doomed:
            if self.verify_tokens and b.tokens != block_bytes:
                self.stats.verify_mismatches += 1
                return None
            if b.on_gpu:    # the GPU copy leaves: the host copy is the only one again
                self._unkeep(b)
                return None
            self.stats.refreshes += 1
            self._access(b)
            return None
        if b is not None:  # doomed copy still pinned by a reader: keep it, refuse a second copy
            self.stats.store_rejected += 1
            return None
        # The parent stops being a leaf *before* a victim is chosen, so it cannot be evicted
        # from under its new child.
        pb = self._blocks.get(parent)
        if pb is not None and pb.candidate:
            self._uncandidate(pb)
        slot = self._take_slot()
        if pb is not None and pb.candidate:
            # the victim was the parent's last host child: _remove made the parent a
            # leaf again, but the new block is about to become its child
            self._uncandidate(pb)
        if slot is None:
            self.stats.store_rejected += 1
            if pb is not None:
                self._settle(pb)
            return None
        self._clock += 1
        self._seq += 1
        b = HostBlock(digest, parent, block_bytes, slot, self._clock, self._seq)
        self._blocks[digest] = b
        self._attach(b)
        self.allocator.pin(slot)
        self.policy.on_insert(b)
        self.stats.inserts += 1
        return slot

    def prepare_spare(self, digest: int, block_bytes: bytes) -> int | None:
        """Second chance: a slot for another copy of a block whose first copy is still in flight.

        Called when the GPU evicts the block again while it is WRITING (its first copy may still
        fail, and the GPU page is about to be freed).  Returns the spare slot (write-pinned; pass
        it to ``complete_store(..., slot=)``), or None when the block is not WRITING or no slot is
        free or evictable.
        """
        b = self._blocks.get(digest)
        if b is None or b.doomed or b.state is not BlockState.WRITING:
            return None
        if self.verify_tokens and b.tokens != block_bytes:
            self.stats.verify_mismatches += 1
            return None
        slot = self._take_slot()
        if slot is None:
            self.stats.store_rejected += 1
            return None
        self.allocator.pin(slot)
        if b.spares is None:
            b.spares = {}
        b.spares[slot] = False
        self.stats.spares += 1
        return slot

    def complete_store(self, digest: int, success: bool, slot: int | None = None) -> None:
        """The copy to host into ``slot`` (default: the block's own slot) finished.

        Success makes the block RESIDENT.  A failed copy drops the block and its host subtree (the
        GPU copy is already gone, so its descendants are unreachable), unless a spare copy exists:
        then the spare becomes the block's slot (RESIDENT if it was written already).
        """
        b = self._blocks.get(digest)
        if b is None:
            raise KeyError(f"complete_store of block {digest:032x} that is not being written")
        if slot is not None and slot != b.slot:
            if not b.spares or b.spares.get(slot) is not False:
                raise KeyError(f"complete_store of block {digest:032x}: slot {slot} is not a spare being written")
            self._complete_spare(b, slot, success)
            return
        if b.state is not BlockState.WRITING:
            raise KeyError(f"complete_store of block {digest:032x} that is not being written")
        if b.doomed:   # dropped while in flight: freed once unpinned; a failure still dooms its subtree
            if not success:
                self.stats.store_failures += 1
                self._doom_subtree(digest, include_self=False)
            self.allocator.unpin(b.slot)
            self._settle(b)
            return
        if success:
            self._make_resident(b)
            self.allocator.unpin(b.slot)
            self._free_written_spares(b)
        else:
            self.stats.store_failures += 1
            spare = self._pick_spare(b)
            if spare is not None:
                # second chance: the failed slot is released, the block lives on in its spare
                self.allocator.unpin(b.slot)
                self.allocator.free(b.slot)
                written = b.spares.pop(spare)
                b.slot = spare
                self.stats.second_chances += 1
                if written:
                    self._make_resident(b)
                    self._free_written_spares(b)
            else:
                # Descendants first, while the block still holds its write pin: a doomed block must
                # not be unpinned while indexed, or a child's removal would free it a second time.
                self._doom_subtree(digest, include_self=False)
                b.doomed = True
                self.allocator.unpin(b.slot)
        self._settle(b)

    def _complete_spare(self, b: HostBlock, slot: int, success: bool) -> None:
        self.allocator.unpin(slot)
        if success and not b.doomed and b.state is BlockState.WRITING:
            b.spares[slot] = True          # kept until the primary copy's outcome is known
        else:                              # failed, or no longer needed
            del b.spares[slot]
            self.allocator.free(slot)
            if not success:
                self.stats.store_failures += 1
        self._settle(b)

    def _make_resident(self, b: HostBlock) -> None:
        b.state = BlockState.RESIDENT
        for on_stored, _ in self._listeners:
            on_stored(b)

    @staticmethod
    def _pick_spare(b: HostBlock) -> int | None:
        """A written spare if any, else one still in flight, else None."""
        if not b.spares:
            return None
        for slot, written in b.spares.items():
            if written:
                return slot
        return next(iter(b.spares))

    def _free_written_spares(self, b: HostBlock) -> None:
        if not b.spares:
            return
        for slot in [s for s, written in b.spares.items() if written]:
            del b.spares[slot]
            self.allocator.free(slot)

    def _is_pinned(self, b: HostBlock) -> bool:
        """A copy is in flight on the block's slot or on one of its spares."""
        pins = self.allocator.pins
        return pins(b.slot) > 0 or (b.spares is not None and any(pins(s) > 0 for s in b.spares))

    # ------------------------------------------------------------------ maintenance
    def touch(self, digests: Iterable[int]) -> None:
        for d in digests:
            b = self._blocks.get(d)
            if b is not None and not b.doomed:
                self._access(b)

    def drop_all(self) -> int:
        """Empty the index: the host pool behind it is gone.  Every block is doomed; blocks with
        no copy in flight are freed now, the others when their copy ends (a doomed block is
        invisible to lookups and its ``complete_store``/``complete_load`` only unpins).
        Returns how many blocks were doomed."""
        n = sum(1 for b in self._blocks.values() if not b.doomed)
        kept = [b.digest for b in self._blocks.values() if b.on_gpu]   # nobody's children
        roots = {b.parent for b in self._blocks.values() if b.parent not in self._blocks}
        for root in roots:
            self._doom_subtree(root, include_self=False, orphans=False)
        for d in kept:
            if d in self._blocks:
                self._doom_subtree(d, include_self=True, orphans=False)
        self.stats.dropped_all += n
        return n

    def drop_corrupt(self, digests: Iterable[int]) -> int:
        """Drop blocks whose host bytes a worker found corrupt, each with its host subtree (counted in
        ``stats.orphaned``; the corrupt blocks themselves in ``stats.corrupt``). A block pinned by a
        reader or a copy is doomed now and freed at its last unpin; one doomed or gone already is
        skipped. Returns how many blocks were dropped as corrupt."""
        n = 0
        for d in reversed(list(digests)):   # deepest first: each corrupt block is counted as such
            b = self._blocks.get(d)
            if b is None or b.doomed:
                continue
            self._doom_subtree(d, include_self=False)
            self._doom_subtree(d, include_self=True, orphans=False)
            self.stats.corrupt += 1
            n += 1
        return n

    def drop_subtree(self, parent_digest: int) -> list[int]:
        """Reclaim every host block descending from ``parent_digest`` (which left every tier).
        Returns the slots freed now; blocks mid-copy are freed when their copy completes."""
        return self._doom_subtree(parent_digest, include_self=False)

    def evict(self, n: int) -> int:
        """Evict up to ``n`` blocks by policy (leaf-first); returns how many went."""
        done = 0
        while done < n:
            if self._reclaim_kept():
                continue            # a kept restore's copy, not an eviction (the GPU holds it)
            victim = self.policy.pop_victim()
            if victim is None:
                break
            victim.candidate = False
            self._remove(victim, evicted=True)
            done += 1
        return done

    # ------------------------------------------------------------------ internals
    def _resident_blocks(self, digests: Sequence[int], verb: str) -> list[HostBlock]:
        """The RESIDENT blocks of ``digests``, in order; KeyError naming the first that is not (for
        ``prepare_load`` and ``hold``, which then pin nothing)."""
        blocks = []
        for d in digests:
            b = self._blocks.get(d)
            if b is None or b.doomed or b.state is not BlockState.RESIDENT:
                raise KeyError(f"block {d:032x} is not host-resident; cannot {verb} it")
            blocks.append(b)
        return blocks

    def _take_slot(self) -> int | None:
        """A free slot, else the slot of the policy's victim (evicted now), else None."""
        slot = self.allocator.allocate()
        if slot is None and self._reclaim_kept():
            slot = self.allocator.allocate()
        if slot is None:
            victim = self.policy.pop_victim()
            if victim is not None:
                victim.candidate = False
                self._remove(victim, evicted=True)
                slot = self.allocator.allocate()
        return slot

    def _access(self, b: HostBlock) -> None:
        if b.on_gpu:        # outside the policy, as if gone (an exclusive tier has no such block)
            return
        self._clock += 1
        b.last_access = self._clock
        b.hits += 1
        self.policy.on_access(b)

    def _reclaim_kept(self) -> bool:
        """Free the slot of the oldest kept restore (an unpinned ``on_gpu`` block); False if there is none."""
        if not self._kept:
            return False
        b = self._kept.pop(next(iter(self._kept)))
        b.promoted = True
        self._remove(b, evicted=False)
        return True

    def _keep(self, b: HostBlock) -> None:
        """A load moved ``b`` to the GPU: keep its bytes, but to the policy and to its parent's
        leaf-ness it is gone, exactly as an exclusive tier's promotion (so every policy sees the
        same events either way and chooses the same victims)."""
        self.stats.kept_restores += 1
        self._unqueue(b)
        self._detach(b)
        b.promoted = True           # the policy's view of a promotion (ARC: ghost without adaptation)
        self.policy.on_remove(b, False)
        b.promoted = False
        b.on_gpu = True

    def _unkeep(self, b: HostBlock) -> None:
        """The GPU evicted a kept restore again: it re-enters the index as an exclusive tier's
        ``prepare_store`` + ``complete_store`` would insert it (new access time and sequence, a
        child of its parent, the policy's ``on_insert``), but nothing is copied."""
        self.stats.kept_reused += 1
        self._unqueue(b)
        b.on_gpu = False
        pb = self._blocks.get(b.parent)
        if pb is not None and pb.candidate:
            self._uncandidate(pb)
        self._attach(b)
        self._clock += 1
        self._seq += 1
        b.last_access, b.seq, b.hits = self._clock, self._seq, 0
        self.policy.on_insert(b)
        self._settle(b)

    def _attach(self, b: HostBlock) -> None:
        """Make ``b`` one of its parent's children (the caller took the parent out of the candidates)."""
        kids = self._children.get(b.parent)
        if kids is None:
            self._children[b.parent] = {b.digest}
        else:
            kids.add(b.digest)

    def _detach(self, b: HostBlock) -> None:
        """Take ``b`` out of its parent's children (the parent may become a leaf)."""
        kids = self._children[b.parent]
        kids.discard(b.digest)
        if not kids:
            del self._children[b.parent]
            pb = self._blocks.get(b.parent)
            if pb is not None:
                self._settle(pb)  # parent may have become a leaf

    def _uncandidate(self, b: HostBlock) -> None:
        b.candidate = False
        self.policy.remove_candidate(b)

    def _unqueue(self, b: HostBlock) -> None:
        """Take ``b`` out of the policy's candidates or the kept-restore queue (wherever it is)."""
        if b.candidate:
            self._uncandidate(b)
        elif b.on_gpu:
            self._kept.pop(b.digest, None)

    def _settle(self, b: HostBlock) -> None:
        """Recompute what a block may be after a pin, state or child change."""
        if b.digest not in self._blocks or self._blocks[b.digest] is not b:
            return
        unpinned = not self._is_pinned(b)
        if b.doomed:
            if unpinned:
                self._unqueue(b)
                self._remove(b, evicted=False)
            return
        if b.on_gpu:
            # A kept restore: its own queue, never the policy's, and not only as a leaf (its GPU
            # copy keeps its host children reachable, as when an exclusive tier promotes it).
            if unpinned:
                self._kept.setdefault(b.digest, b)
            else:
                self._kept.pop(b.digest, None)
            return
        want = unpinned and b.state is BlockState.RESIDENT and b.digest not in self._children
        if want and not b.candidate:
            b.candidate = True
            self.policy.add_candidate(b)
        elif not want and b.candidate:
            self._uncandidate(b)

    def _remove(self, b: HostBlock, evicted: bool) -> None:
        """Forget an unpinned, non-candidate block and free its slot (a kept restore left its
        parent's children and the policy when it was kept)."""
        del self._blocks[b.digest]
        kept, b.on_gpu = b.on_gpu, False
        if not kept:
            self._detach(b)
        self.allocator.free(b.slot)
        if b.spares:                      # written spares (in-flight ones keep the block pinned)
            for slot in b.spares:
                self.allocator.free(slot)
            b.spares = None
        if not kept:
            self.policy.on_remove(b, evicted)
        if self._listeners and b.state is BlockState.RESIDENT:
            for _, on_removed in self._listeners:
                on_removed(b)
        if evicted:
            self.stats.evictions += 1
            if self.on_evict is not None:
                self.on_evict(b)
        elif b.promoted:
            self.stats.promoted += 1
        else:
            self.stats.dropped += 1

    def _doom_subtree(self, root: int, include_self: bool, orphans: bool = True) -> list[int]:
        """Doom ``root``'s host subtree (and ``root`` with ``include_self``); returns the slots freed now.
        ``orphans``: count each block not doomed before in ``stats.orphaned``."""
        freed: list[int] = []
        stack = [root] if include_self else list(self._children.get(root, ()))
        order: list[HostBlock] = []
        while stack:
            d = stack.pop()
            b = self._blocks.get(d)
            if b is None:
                continue
            order.append(b)
            stack.extend(self._children.get(d, ()))
        for b in reversed(order):  # deepest first, so parents become leaves as we go
            if orphans and not b.doomed:
                self.stats.orphaned += 1
            b.doomed = True
            self._unqueue(b)
            if not self._is_pinned(b):
                slot = b.slot
                self._remove(b, evicted=False)
                freed.append(slot)
        return freed

    # ------------------------------------------------------------------ checking
    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        alloc = self.allocator
        alloc.check_invariants()
        owned = sum(1 + len(b.spares or ()) for b in self._blocks.values())
        assert alloc.num_used == owned, f"slot leak: {alloc.num_used} used slots for {owned} block slots"
        seen_slots = set()
        for d, b in self._blocks.items():
            assert b.digest == d, f"block keyed under the wrong digest: {b}"
            for s in (b.slot, *(b.spares or ())):
                assert alloc.is_used(s), f"{b} holds a free slot {s}"
                assert s not in seen_slots, f"slot {s} shared by two blocks (or a block and a spare)"
                seen_slots.add(s)
            for s, written in (b.spares or {}).items():
                if written:
                    assert alloc.pins(s) == 0, f"{b}: written spare {s} still pinned"
                    assert b.state is BlockState.WRITING, f"{b}: written spare {s} kept after the block settled"
                else:
                    assert alloc.pins(s) >= 1, f"{b}: spare {s} in flight without a write pin"
            assert (d in self._children.get(b.parent, ())) != b.on_gpu, \
                f"{b}: a kept restore is nobody's child, every other block its parent's"
            pins = alloc.pins(b.slot)
            pinned = self._is_pinned(b)
            if b.state is BlockState.WRITING:
                # a doomed block whose first copy ended may wait for its spare's copy alone
                assert pins >= 1 or (b.doomed and pinned), f"{b} is WRITING without a write pin"
            if b.doomed:
                assert pinned, f"{b} doomed but unpinned (should have been freed)"
            want = (not pinned and b.state is BlockState.RESIDENT and not b.doomed
                    and d not in self._children)
            assert b.candidate == (want and not b.on_gpu), f"{b} candidate={b.candidate}, expected {want}"
            assert not b.on_gpu or (self.keep_restored and b.state is BlockState.RESIDENT), f"{b} on_gpu"
            kept = b.on_gpu and not pinned and not b.doomed
            assert (d in self._kept) == kept, f"{b}: kept-restore queue disagrees ({kept})"
        assert all(self._blocks.get(d) is b for d, b in self._kept.items()), "kept-restore queue holds a removed block"
        for p, kids in self._children.items():
            assert kids, f"empty children set kept for {p:032x}"
            for k in kids:
                assert k in self._blocks and self._blocks[k].parent == p, f"dangling child {k:032x}"
