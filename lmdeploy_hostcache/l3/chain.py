"""The host -> store chain, both sides, without LMDeploy: what the connector and the worker call.

Scheduler side (``SchedulerChain``, one per engine, owns no bytes):

* ``on_host_evict(block)``: a host block is about to lose its slot -> a ``WriteBack`` for this
  step (its slot is read by every rank *before* anything is written into it: the worker runs
  ``write_back`` first in a step); with ``write_through`` every block that becomes
  host-resident is queued too (except blocks staged from the store);
* ``lookup(digests, block_bytes)``: how many blocks continue in the store from ``digests[0]``:
  one batched existence check over every TP rank's key; a block counts only when every rank's
  object exists; any error counts 0 (recompute). ``probe`` is the same check answering None
  when nothing was asked or the store did not answer. Neither counts lookups or hits: LMDeploy
  asks again at every admission attempt of a request turn, so the connector counts them once
  per turn (the client still counts a failed call in ``errors``/``timeouts``);
* ``reserve(digests, parents, block_bytes)``: host slots to stage those blocks in (``WRITING``,
  pinned); all or nothing;
* ``finish(digests, ok)``: staged -> ``RESIDENT``, or every reserved slot released (leaf first:
  the failure path, which dooms host blocks chained under them);
* ``finish_restored(digests)``: the load that read the staged slots succeeded on every rank:
  the blocks end as any restored host block (a kept restore, or dropped as promoted), without
  the failure path's subtree doom.
* ``stop(reason)``: the store is no longer read or written by this engine (its weights changed
  in place, so its keys no longer describe what its blocks hold): queued write-backs are
  dropped, ``lookup`` answers 0 and ``reserve`` None; stagings in flight still ``finish``.

Worker side (``WorkerChain``, one per TP rank, owns its host pool's bytes):

* ``write_back(items)``: read each slot, put it under this rank's key (best effort: a refused or
  failed put only loses that block; counted);
* ``stage(digests, block_bytes, slots)``: get every object of the batch, verify each (header,
  key, token ids, checksum, size) and only then write the payloads into the slots; any error
  -> ``False`` and nothing may be loaded from those slots. An object that failed its checks is
  removed from the store (best effort, ``L3Client.remove``): a put never replaces an object, so a
  corrupt one left there would answer every node's lookup, fail every restore through it, and
  keep the next write-back of its block from putting a good one.

Invariants: a staged slot becomes loadable only after every rank staged it (the caller ANDs
the ranks' results before ``finish(ok=True)``); a failed stage never leaves a reserved slot
pinned or indexed (``finish(False)``); write-backs of a step are taken exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .client import L3Client
from .errors import L3Corrupt, L3Error
from .keys import StoreKeyspace


@dataclass(frozen=True)
class WriteBack:
    digest: int
    tokens: bytes
    slot: int


class SchedulerChain:
    """Scheduler-side decisions of the store tier (see the module docstring)."""

    def __init__(self, index: Any, client: L3Client | None, rank_spaces: Sequence[StoreKeyspace],
                 write_policy: str = "write_back") -> None:
        if not rank_spaces:
            raise ValueError("SchedulerChain needs one StoreKeyspace per TP rank")
        self.index = index
        self.client = client
        self.rank_spaces = list(rank_spaces)
        self.write_policy = write_policy
        self._write_backs: list[WriteBack] = []
        self._staging: set[int] = set()
        self.lookup_errors = 0
        self.stopped: str | None = None   # why the store may no longer be read or written
        if write_policy == "write_through" and client is not None:
            index.add_listener(self._on_stored, lambda block: None)

    def stop(self, reason: str) -> None:
        """From now on nothing is looked up, staged or written back (queued write-backs are
        dropped); stagings already in flight still ``finish``. For a node whose keys no longer
        describe its blocks (its weights changed in place)."""
        self.stopped = reason
        self._write_backs.clear()

    # -- write path ------------------------------------------------------------------------
    def on_host_evict(self, block: Any) -> None:
        """HostIndex eviction callback: queue the victim's slot for write-back."""
        if self.client is not None and self.stopped is None:
            self._write_backs.append(WriteBack(block.digest, block.tokens, block.slot))

    def _on_stored(self, block: Any) -> None:
        """write_through: a block that just became host-resident is written too (not one that
        came from the store)."""
        if block.digest not in self._staging and self.stopped is None:
            self._write_backs.append(WriteBack(block.digest, block.tokens, block.slot))

    def take_write_backs(self) -> list[WriteBack]:
        out, self._write_backs = self._write_backs, []
        return out

    # -- read path -------------------------------------------------------------------------
    def lookup(self, digests: Sequence[int], block_bytes: Sequence[bytes] | None = None) -> int:
        """Consecutive store blocks from ``digests[0]`` present for every rank; 0 on any error."""
        return self.probe(digests) or 0

    def probe(self, digests: Sequence[int]) -> int | None:
        """``lookup``'s count, or None when no check was answered (no client, stopped, nothing asked,
        or an error: counted in ``lookup_errors``). Counts no lookup or hit (see the module docstring)."""
        if self.client is None or not digests or self.stopped is not None:
            return None
        keys = [s.key(d) for d in digests for s in self.rank_spaces]
        try:
            present = self.client.exists(keys)
        except L3Error:
            self.lookup_errors += 1
            return None
        r = len(self.rank_spaces)
        n = 0
        for i in range(len(digests)):
            if not all(present[i * r:(i + 1) * r]):
                break
            n += 1
        return n

    def reserve(self, digests: Sequence[int], parents: Sequence[int],
                block_bytes: Sequence[bytes]) -> list[int] | None:
        """Host slots to stage ``digests`` in (all reserved, WRITING), or None (nothing held; and
        always once ``stop`` was called: a hit found before it is recomputed)."""
        if self.stopped is not None:
            return None
        slots: list[int] = []
        for d, p, b in zip(digests, parents, block_bytes):
            slot = self.index.prepare_store(d, p, b)
            if slot is None:
                self.finish(digests[:len(slots)], False)
                return None
            slots.append(slot)
        return slots

    def finish_restored(self, digests: Sequence[int]) -> None:
        """Staged blocks that a load then copied to the GPU on every rank: they end as any restored host
        block does (``complete_load(success=True)``: a kept restore, or dropped as promoted while the GPU
        copy keeps their host children reachable), never through ``finish(False)``, whose failure path
        would doom host blocks demoted under them meanwhile and count a store failure."""
        self.finish(digests, True)
        live = [d for d in digests if self.index.is_resident(d)]   # one dropped meanwhile is already gone
        if live:
            self.index.prepare_load(live)
            self.index.complete_load(live, True)

    def finish(self, digests: Sequence[int], ok: bool) -> None:
        """Staging done on every rank (``ok``) -> RESIDENT; else release every reserved slot."""
        if ok:
            self._staging.update(digests)
            try:
                for d in digests:
                    self.index.complete_store(d, True)
            finally:
                self._staging.difference_update(digests)
            return
        for d in reversed(list(digests)):      # leaf first: a parent's failure dooms its children
            try:                               # (a block dropped meanwhile is only unpinned and freed)
                self.index.complete_store(d, False)
            except KeyError:                   # already gone with a failed parent
                pass


class WorkerChain:
    """One TP rank's store I/O over its host pool (see the module docstring)."""

    def __init__(self, client: L3Client, space: StoreKeyspace, slot_nbytes: int,
                 read_slot: Callable[[int], Any], write_slot: Callable[[int, Any], None]) -> None:
        self.client = client
        self.space = space
        self.slot_nbytes = int(slot_nbytes)
        self.read_slot = read_slot
        self.write_slot = write_slot
        self.write_back_errors = 0

    def write_back(self, items: Sequence[WriteBack]) -> int:
        """Put each slot's bytes under this rank's key; returns how many the store took."""
        if not items:
            return 0
        try:
            stored = self.client.put_blocks(self.space, [w.digest for w in items], [w.tokens for w in items],
                                            [self.read_slot(w.slot) for w in items])
        except L3Error:
            self.write_back_errors += 1
            return 0
        return sum(stored)

    def stage(self, digests: Sequence[int], block_bytes: Sequence[bytes], slots: Sequence[int]) -> bool:
        """Read, verify, then write every block into its slot; False (nothing usable) on any error."""
        try:
            payloads = self.client.get_blocks(self.space, digests, block_bytes, self.slot_nbytes)
        except L3Corrupt as exc:
            key = getattr(exc, "key", None)
            if key is not None:
                try:
                    self.client.remove([key])
                except L3Error:   # the store is failing: the next reader that finds it corrupt tries again
                    pass
            return False
        except L3Error:
            return False
        for slot, payload in zip(slots, payloads):
            self.write_slot(slot, payload)
        return True
