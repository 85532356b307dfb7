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

Policies (``POLICIES`` keys are the values of ``eviction_policy``; measurements and the choice of
``DEFAULT_POLICY`` are in docs/eviction.md):

* ``lru``    -- least recently used leaf (LMDeploy's GPU behaviour; the default: the only policy
  never below LRU on every trace measured, docs/eviction.md "Ninth round");
* ``arc``    -- ARC adapted to a leaf-first prefix index, with a recency horizon that makes it
  LRU where LRU is near-optimal (up to 12% of the Belady gap on the Mooncake traces it was tuned on;
  about 0 to 4% of it on traffic it was not chosen on; about a point below LRU on agent sessions that
  restart, so it is not the default: docs/eviction.md, ``bench eviction``);
* ``s3fifo`` -- S3-FIFO adapted the same way (scan-resistant; loses to LRU on most capacities).

``BeladyPolicy`` (offline optimum) reads the future: it is for evaluation only, absent from
``POLICIES`` and named in ``OFFLINE_ONLY``.  No module here imports torch or LMDeploy.
"""
from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
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


class _LazyHeap:
    """Min-heap of ``(key, seq, block)`` with lazy deletion; ``valid(key, block)`` decides whether an
    entry still stands.  With ``current(block)`` (a block's up-to-date key, which only grows), an entry
    may lag its block's key: when it reaches the top it is pushed again at the current key, so an
    access needs no push at all (``LRUPolicy``).

    Compaction is incremental, so no single call pays for the whole heap (at a million host blocks a
    one-shot rebuild stalled one scheduler step for most of a second): once entries outnumber live
    ones 4:1, the entries become a draining heap and move to a fresh one ``DRAIN`` at a time per
    push, stale ones dropped and one entry kept per block.  Both heaps are read until the old one is
    empty; each push moves ``DRAIN`` > 1 entries while it adds one, so the draining heap empties.
    """

    __slots__ = ("heap", "old", "moved", "live", "valid", "current")
    DRAIN = 8

    def __init__(self, valid: "Callable[[object, HostBlock], bool]",
                 current: "Callable[[HostBlock], object] | None" = None) -> None:
        self.heap: list = []
        self.old: list = []          # the draining heap (empty when no compaction is under way)
        self.moved: set = set()      # id() of the blocks the running compaction moved
        self.live = 0
        self.valid = valid
        self.current = current

    def __len__(self) -> int:
        return len(self.heap) + len(self.old)

    def push(self, key, block: "HostBlock") -> None:
        """A new key for a block (an access, or ``add``): its older entries go stale."""
        heapq.heappush(self.heap, (key, block.seq, block))
        if self.old:
            self._drain()
        elif len(self.heap) > 64 and len(self.heap) > 4 * self.live:
            self.old, self.heap, self.moved = self.heap, [], set()
            self._drain()

    def add(self, key, block: "HostBlock") -> None:
        self.live += 1
        self.push(key, block)

    def _drain(self) -> None:
        old, new, valid, moved = self.old, self.heap, self.valid, self.moved
        for _ in range(self.DRAIN):
            if not old:
                moved.clear()
                return
            e = heapq.heappop(old)
            if valid(e[0], e[2]) and id(e[2]) not in moved:
                moved.add(id(e[2]))
                heapq.heappush(new, e)

    def _top(self, heap: list):
        """``heap``'s least standing entry, or None: stale entries are dropped on the way, and an entry
        lagging its block's ``current`` key is pushed again (into ``self.heap``) at that key."""
        valid, current = self.valid, self.current
        while heap:
            e = heap[0]
            if not valid(e[0], e[2]):
                heapq.heappop(heap)
                continue
            if current is not None:
                k = current(e[2])
                if k != e[0]:
                    heapq.heappop(heap)
                    heapq.heappush(self.heap, (k, e[1], e[2]))
                    continue
            return e
        return None

    def _least(self) -> "list | None":
        """The heap whose top is the least standing entry of both, or None when neither has one."""
        b = self._top(self.old) if self.old else None   # first: its re-keyed entries land in self.heap
        a = self._top(self.heap)
        if a is None:
            return self.old if b is not None else None
        return self.old if b is not None and b[:2] < a[:2] else self.heap

    def peek(self) -> "HostBlock | None":
        heap = self._least()
        return heap[0][2] if heap is not None else None

    def pop(self) -> "HostBlock | None":
        heap = self._least()
        return heapq.heappop(heap)[2] if heap is not None else None


def _access_time(block: "HostBlock") -> int:
    """A block's up-to-date heap key in the recency-ordered policies (``_LazyHeap.current``)."""
    return block.last_access


class LRUPolicy(EvictionPolicy):
    """Least recently used leaf first (what LMDeploy's BlockTrie does on the GPU).

    A min-heap of ``(last_access, seq, block)`` with lazy deletion: an entry stands while its block
    is a candidate, and its key may lag the block's ``last_access`` (an access pushes nothing; the
    entry is pushed again at the block's access time when it reaches the top, ``_LazyHeap.current``),
    so the victim is still the candidate with the least ``(last_access, seq)``.  A block that becomes
    a candidate again re-enters at its *own* access time, not at the MRU end, which an ordered dict
    could not do.  The heap is compacted, a few entries per push, when stale entries dominate.
    """

    name = "lru"

    def __init__(self) -> None:
        self._heap = _LazyHeap(lambda key, b: b.candidate, current=_access_time)

    def add_candidate(self, block: "HostBlock") -> None:
        self._heap.add(block.last_access, block)

    def remove_candidate(self, block: "HostBlock") -> None:
        self._heap.live -= 1  # its heap entry goes stale (block.candidate is False now)

    def pop_victim(self) -> "HostBlock | None":
        block = self._heap.pop()
        if block is not None:
            self._heap.live -= 1
        return block


class _ArcMeta:
    __slots__ = ("seg",)

    def __init__(self, seg: int) -> None:
        self.seg = seg


class TreeARCPolicy(EvictionPolicy):
    """ARC adapted to a leaf-first prefix index, with a recency horizon (``arc``).

    * **Segments.** ``T1``: blocks used once since they (re-)entered the host tier; ``T2``:
      blocks used again, or re-entering after an eviction remembered by a ghost list, or after
      a promotion to the GPU.  Within a segment, victims go in LRU order among *candidates*
      (leaves), so a chain still leaves bottom-up.
    * **Ghosts.** ``B1``/``B2`` remember the digests (no bytes, no slot) of blocks evicted from
      ``T1``/``T2``, each bounded to ``ghost_ratio`` x the number of resident blocks.  A
      re-insertion found in ``B1`` means ``T1`` was too small: the target share ``p`` of
      ``T1`` grows by ``max(1, |B2|/|B1|) / c``; found in ``B2`` it shrinks symmetrically (ARC's
      rule, with ``p`` a fraction of the resident count ``c``, since a policy does not know
      the slot count).
    * **Horizon.** A candidate untouched for more than ``horizon`` x ``c`` index accesses is
      evicted first, oldest first, whatever its segment.  When the cache holds most of the
      working set, LRU's victims are older than that and the policy *is* LRU; ARC's segment
      choice only acts on victims younger than the horizon.  (Without it, plain ARC lost up to
      2.3 points of hit rate to LRU near the working-set size of the Mooncake traces; see
      docs/eviction.md.)

    Costs: O(log n) per access/candidate change (two lazy heaps), O(1) amortised per ghost
    operation, and at most ``2 * ghost_ratio`` digests of metadata per resident block.
    """

    name = "arc"

    def __init__(self, ghost_ratio: float = 2.0, horizon: float = 1.75, p0: float = 0.5) -> None:
        if not ghost_ratio > 0:
            raise ValueError(f"ghost_ratio must be > 0, got {ghost_ratio!r}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        if not 0.0 <= p0 <= 1.0:
            raise ValueError(f"p0 must be in [0, 1], got {p0!r}")
        self.ghost_ratio = ghost_ratio
        self.horizon = horizon
        self.p = p0                      # target share of T1 in the resident blocks
        self._n = [0, 0, 0]              # resident blocks per segment (index 1, 2)
        # 1: B1, 2: B2 (index 0 unused); value: True when evicted (False: promoted to the GPU)
        self._ghost: tuple[OrderedDict[int, bool], ...] = (OrderedDict(), OrderedDict(), OrderedDict())
        self._now = 0

        def valid(key: int, block: "HostBlock", seg: int) -> bool:
            return block.candidate and block.pdata.seg == seg

        # as LRUPolicy: an entry may lag its block's access time (re-keyed at the top), so an access
        # within a segment pushes nothing; only a move from T1 to T2 pushes one entry
        current = _access_time
        self._heaps = (None, _LazyHeap(lambda k, b: valid(k, b, 1), current),
                       _LazyHeap(lambda k, b: valid(k, b, 2), current))

    def on_insert(self, block: "HostBlock") -> None:
        self._now = block.last_access
        d = block.digest
        b1, b2 = self._ghost[1], self._ghost[2]
        seg = 1
        if d in b1:
            if b1.pop(d):
                c = max(1, self._n[1] + self._n[2])
                self.p = min(1.0, self.p + max(1.0, len(b2) / max(1, len(b1))) / c)
            seg = 2
        elif d in b2:
            if b2.pop(d):
                c = max(1, self._n[1] + self._n[2])
                self.p = max(0.0, self.p - max(1.0, len(b1) / max(1, len(b2))) / c)
            seg = 2
        block.pdata = _ArcMeta(seg)
        self._n[seg] += 1

    def on_access(self, block: "HostBlock") -> None:
        self._now = block.last_access
        m = block.pdata
        if m.seg == 1:
            m.seg = 2
            self._n[1] -= 1
            self._n[2] += 1
            if block.candidate:  # its T1 heap entry goes stale; the live count and the block move to T2
                self._heaps[1].live -= 1
                self._heaps[2].live += 1
                self._heaps[2].push(block.last_access, block)

    def add_candidate(self, block: "HostBlock") -> None:
        self._heaps[block.pdata.seg].add(block.last_access, block)

    def remove_candidate(self, block: "HostBlock") -> None:
        self._heaps[block.pdata.seg].live -= 1

    def on_remove(self, block: "HostBlock", evicted: bool) -> None:
        m = block.pdata
        self._n[m.seg] -= 1
        seg, m.seg = m.seg, 0
        if evicted or block.promoted:
            # A promoted block was used on the GPU: when it comes back it is a T2 block, but
            # its return says nothing about the T1/T2 split (False: no adaptation).
            ghost = self._ghost[seg if evicted else 2]
            ghost[block.digest] = evicted
            limit = max(1, int(self.ghost_ratio * (self._n[1] + self._n[2] + 1)))
            while len(ghost) > limit:
                ghost.popitem(last=False)

    def pop_victim(self) -> "HostBlock | None":
        h1, h2 = self._heaps[1], self._heaps[2]
        t1, t2 = h1.peek(), h2.peek()
        if t1 is None and t2 is None:
            return None
        if t1 is None:
            heap = h2
        elif t2 is None:
            heap = h1
        else:
            c = self._n[1] + self._n[2]
            oldest = t1 if t1.last_access < t2.last_access else t2
            if oldest.last_access < self._now - self.horizon * c:
                heap = h1 if oldest is t1 else h2
            else:
                heap = h1 if self._n[1] > self.p * c else h2
        heap.live -= 1
        return heap.pop()


class _S3Meta:
    __slots__ = ("queue", "order", "freq")

    def __init__(self, queue: int, order: int) -> None:
        self.queue = queue
        self.order = order
        self.freq = 0


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23) adapted to a leaf-first prefix index (``s3fifo``).

    New blocks enter a small FIFO (``small_ratio`` of the resident blocks), reused ones live in
    a main FIFO with reinsertion (a CLOCK: an accessed head loses one credit and goes to the
    tail).  The small queue's head leaves to the main queue if it was accessed, else it is
    evicted and its digest remembered in a ghost FIFO (as many digests as resident blocks); a
    block re-entering from the ghost goes straight to main.  Only candidates (leaves) are
    heads: a chain inserted parent-first leaves bottom-up since a parent re-enters the
    candidate set with its older FIFO position.  O(log n) per operation (lazy heaps on the
    FIFO position).
    """

    name = "s3fifo"
    SMALL, MAIN = 0, 1

    def __init__(self, small_ratio: float = 0.1, max_freq: int = 3) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio!r}")
        self.small_ratio = small_ratio
        self.max_freq = max_freq
        self._n = [0, 0]
        self._order = 0
        self._ghost: OrderedDict[int, None] = OrderedDict()

        def valid(key: int, block: "HostBlock", queue: int) -> bool:
            m = block.pdata
            return block.candidate and m.queue == queue and m.order == key

        self._heaps = (_LazyHeap(lambda k, b: valid(k, b, 0)), _LazyHeap(lambda k, b: valid(k, b, 1)))

    def _next(self) -> int:
        self._order += 1
        return self._order

    def on_insert(self, block: "HostBlock") -> None:
        q = self.MAIN if self._ghost.pop(block.digest, 0) is None else self.SMALL
        block.pdata = _S3Meta(q, self._next())
        self._n[q] += 1

    def on_access(self, block: "HostBlock") -> None:
        m = block.pdata
        if m.freq < self.max_freq:
            m.freq += 1

    def add_candidate(self, block: "HostBlock") -> None:
        m = block.pdata
        self._heaps[m.queue].add(m.order, block)

    def remove_candidate(self, block: "HostBlock") -> None:
        self._heaps[block.pdata.queue].live -= 1

    def on_remove(self, block: "HostBlock", evicted: bool) -> None:
        m = block.pdata
        self._n[m.queue] -= 1
        if evicted and m.queue == self.SMALL:
            ghost = self._ghost
            ghost[block.digest] = None
            limit = max(1, self._n[0] + self._n[1] + 1)
            while len(ghost) > limit:
                ghost.popitem(last=False)
        m.queue = -1

    def pop_victim(self) -> "HostBlock | None":
        small, main = self._heaps
        n = self._n
        while True:
            q = self.SMALL if n[0] > self.small_ratio * (n[0] + n[1]) else self.MAIN
            heap = self._heaps[q]
            block = heap.pop()
            if block is None:
                q = 1 - q
                heap = self._heaps[q]
                block = heap.pop()
                if block is None:
                    return None
            heap.live -= 1
            m = block.pdata
            if m.freq > 0:  # accessed: promote (small) or reinsert with one credit less (main)
                if q == self.SMALL:
                    n[0] -= 1
                    n[1] += 1
                    m.queue = self.MAIN
                    m.freq = 0
                else:
                    m.freq -= 1
                m.order = self._next()
                main.add(m.order, block)
                continue
            return block


class BeladyPolicy(EvictionPolicy):
    """Offline optimum (Belady/MIN): evict the candidate whose next use is farthest.

    **Evaluation only** -- it reads the future.  ``uses[digest]`` lists, ascending, the request
    indices whose chain contains the block; the replay calls ``advance(r)`` before request
    ``r``.  A block's next use is fixed between two accesses (every use of a resident block is
    an access, since a resident block's ancestors are resident too), so the key is computed on
    insert/access and a max-heap with lazy deletion suffices.  A parent's next use is never
    later than its child's, so the leaf-first rule costs this policy nothing.
    """

    name = "belady"
    NEVER = 1 << 62

    def __init__(self, uses: "dict[int, list[int]]") -> None:
        self._uses = uses
        self._now = -1
        # key: -next_use, so the min-heap pops the farthest; ties (never used again) go oldest first
        self._heap = _LazyHeap(lambda key, b: b.candidate and -key == b.pdata)

    def advance(self, now: int) -> None:
        """Current request index (monotonic)."""
        if now < self._now:
            raise ValueError(f"Belady clock went back from {self._now} to {now}")
        self._now = now

    def _next_use(self, block: "HostBlock") -> int:
        lst = self._uses.get(block.digest)
        if not lst:
            return self.NEVER
        i = bisect.bisect_right(lst, self._now)
        return lst[i] if i < len(lst) else self.NEVER

    def on_insert(self, block: "HostBlock") -> None:
        block.pdata = self._next_use(block)

    def on_access(self, block: "HostBlock") -> None:
        block.pdata = self._next_use(block)
        if block.candidate:
            self._heap.push(-block.pdata, block)

    def add_candidate(self, block: "HostBlock") -> None:
        self._heap.add(-block.pdata, block)

    def remove_candidate(self, block: "HostBlock") -> None:
        self._heap.live -= 1

    def pop_victim(self) -> "HostBlock | None":
        block = self._heap.pop()
        if block is not None:
            self._heap.live -= 1
        return block


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "arc": TreeARCPolicy,
    "s3fifo": S3FIFOPolicy,
}
# Policies that read the future: evaluation tools, never valid ``eviction_policy`` values.
# They are not in POLICIES; the name is listed so config validation can say why.
OFFLINE_ONLY = ("belady",)
DEFAULT_POLICY = "lru"  # docs/eviction.md "Ninth round": arc breaks the 0.01 guard on agent sessions that restart


def make_policy(policy: "str | EvictionPolicy") -> EvictionPolicy:
    """A policy instance from a name in ``POLICIES`` (or an instance, returned as is)."""
    if isinstance(policy, EvictionPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"eviction_policy {policy!r} is not one of {sorted(POLICIES)}") from None
