"""Round 9's ``guarded-arc`` (docs/eviction.md "Ninth round"): ``arc`` behind an online guard against LRU.

A prototype, not in the package (its cost, about six times ``arc``'s per block, kept it out of the
default); registered as ``guarded-arc`` in ``cands.CANDS``.
"""
from __future__ import annotations

from lmdeploy_hostcache.tier.eviction import EvictionPolicy, LRUPolicy, TreeARCPolicy  # noqa: F401


class GuardedARCPolicy(EvictionPolicy):
    """``arc`` behind an online guard against LRU (``guarded-arc``, the default).

    Two metadata-only shadow indexes, one ``lru`` and one ``arc``, see every block the real index
    inserts or accesses (digest and parent only, no bytes) and count their own hits with
    exponential decay (time constant ``window`` x the resident count, in references).  Each
    shadow holds as many blocks as the real policy has resident, so no slot count is needed.
    Victims come in LRU order until the ``arc`` shadow's decayed hits lead the ``lru`` shadow's
    by more than ``margin`` (relative), and in ``arc``'s order while they do; with no evidence it
    *is* LRU.  Both orders are kept on the real blocks, so a switch takes effect at once.

    Why (docs/eviction.md, ninth round): on growing agent sessions that restart
    (``AgentWorkload(sessions=80, growth_blocks=16, order='random', restart=0.3)``) ``arc`` sits
    about a point below LRU at 0.06 of the footprint on every seed: its ghost hits drive ``p``
    down and it evicts the fresh chains of restarted sessions ahead of the abandoned ones.

    Costs: three indexes' bookkeeping per block (the real one and two shadows), so about 3x the
    policy metadata and, in CPython, about 6x ``arc``'s replay time per reference.
    """

    name = "guarded-arc"
    LRU, ARC = 0, 1

    def __init__(self, window: float = 16.0, margin: float = 0.05, **arc_kw) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        from lmdeploy_hostcache.tier.host_index import BlockState, HostIndex

        self.window = window
        self.margin = margin
        self._arc = TreeARCPolicy(**arc_kw)
        self._experts = (LRUPolicy(), self._arc)
        unbounded = 1 << 62  # the allocator is lazy: shadows are trimmed to the real resident count
        self._shadows = (HostIndex(unbounded, LRUPolicy(), verify_tokens=False),
                         HostIndex(unbounded, TreeARCPolicy(**arc_kw), verify_tokens=False))
        self._score = [0.0, 0.0]
        self._gain = 1.0
        self.follow = self.LRU
        self.switches = 0
        self._resident = BlockState.RESIDENT

    def _reference(self, block: "HostBlock") -> None:
        d, parent = block.digest, block.parent
        cap = max(1, self._arc._n[1] + self._arc._n[2])
        self._gain *= 1.0 + 1.0 / (self.window * cap)
        if self._gain > 1e100:
            self._score = [s / self._gain for s in self._score]
            self._gain = 1.0
        for i, sh in enumerate(self._shadows):
            b = sh.get(d)
            if b is not None and b.state is self._resident and not b.doomed:
                sh.touch((d,))
                self._score[i] += self._gain
            elif b is None and sh.prepare_store(d, parent, b"") is not None:
                excess = sh.allocator.num_used - cap
                if excess > 0:        # the new block is still pinned: it cannot be its own victim
                    sh.evict(excess)
                sh.complete_store(d, True)
        lru, arc = self._score
        if self.follow == self.LRU:
            if arc > lru * (1.0 + self.margin) and arc > 0:
                self.follow = self.ARC
                self.switches += 1
        elif lru > arc * (1.0 + self.margin):
            self.follow = self.LRU
            self.switches += 1

    def on_insert(self, block: "HostBlock") -> None:
        for e in self._experts:
            e.on_insert(block)
        self._reference(block)

    def on_access(self, block: "HostBlock") -> None:
        for e in self._experts:
            e.on_access(block)
        self._reference(block)

    def on_remove(self, block: "HostBlock", evicted: bool) -> None:
        for e in self._experts:
            e.on_remove(block, evicted)

    def add_candidate(self, block: "HostBlock") -> None:
        for e in self._experts:
            e.add_candidate(block)

    def remove_candidate(self, block: "HostBlock") -> None:
        for e in self._experts:
            e.remove_candidate(block)

    def pop_victim(self) -> "HostBlock | None":
        victim = self._experts[self.follow].pop_victim()
        if victim is not None:
            self._experts[1 - self.follow].remove_candidate(victim)
        return victim
