"""Eviction policies for the host index.

The index decides *which blocks may be evicted*; a policy decides *which of those goes first*.

Contract between ``HostIndex`` and a policy:

* ``on_insert(block)`` when a block enters the index, ``on_access(block)`` on every hit or touch,
  ``on_remove(block, evicted)`` when it leaves (``evicted`` is True when the policy chose it).
* ``add_candidate(block)`` / ``remove_candidate(block)`` when a block becomes / stops being an
  eviction candidate: resident, unpinned, with no host-resident child (leaf-first eviction).
  ``block.candidate`` is maintained by the index, not by the policy.
* ``pop_victim()`` returns one current candidate (and forgets it as a candidate) or None.
  It must never return a non-candidate.

Blocks carry ``last_access`` (the index's logical clock), ``hits`` (accesses after insertion) and
a free attribute ``pdata`` for the policy's own bookkeeping.
"""
from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .host_index import HostBlock


class EvictionPolicy:
    """Base class; subclasses override the hooks they need and ``pop_victim``."""

    name = "base"

    def on_insert(self, block: "HostBlock") -> None:
        pass

    def on_access(self, block: "HostBlock") -> None:
        pass

    def on_remove(self, block: "HostBlock", evicted: bool) -> None:
        pass

    def add_candidate(self, block: "HostBlock") -> None:
        raise NotImplementedError

    def remove_candidate(self, block: "HostBlock") -> None:
        raise NotImplementedError

    def pop_victim(self) -> "HostBlock | None":
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used leaf first (what LMDeploy's BlockTrie does on the GPU).

    A min-heap of ``(last_access, seq, block)`` with lazy deletion: an entry is valid only while
    the block is a candidate and its ``last_access`` still equals the entry's key.  A block that
    becomes a candidate again re-enters at its *own* access time, not at the MRU end, which an
    ordered dict could not do.  The heap is compacted when stale entries dominate.
    """

    name = "lru"

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, "HostBlock"]] = []
        self._live = 0

    def _push(self, block: "HostBlock") -> None:
        heapq.heappush(self._heap, (block.last_access, block.seq, block))

    def add_candidate(self, block: "HostBlock") -> None:
        self._live += 1
        self._push(block)
        if len(self._heap) > 64 and len(self._heap) > 4 * self._live:
            self._heap = [e for e in self._heap if e[2].candidate and e[0] == e[2].last_access]
            heapq.heapify(self._heap)

    def remove_candidate(self, block: "HostBlock") -> None:
        self._live -= 1  # its heap entry goes stale (block.candidate is False now)

    def on_access(self, block: "HostBlock") -> None:
        if block.candidate:  # old entry is stale (last_access changed): push the new position
            self._push(block)

    def pop_victim(self) -> "HostBlock | None":
        heap = self._heap
        while heap:
            key, _, block = heapq.heappop(heap)
            if block.candidate and key == block.last_access:
                self._live -= 1
                return block
        return None


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
}
DEFAULT_POLICY = "lru"


def make_policy(policy: "str | EvictionPolicy") -> EvictionPolicy:
    """A policy instance from a name in ``POLICIES`` (or an instance, returned as is)."""
    if isinstance(policy, EvictionPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"eviction_policy {policy!r} is not one of {sorted(POLICIES)}") from None
