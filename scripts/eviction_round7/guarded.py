"""Eviction round 7's guarded ``arc`` prototype (docs/eviction.md, seventh round; not adopted).

Set dueling with two metadata-only shadow ``HostIndex``es (``lru`` and ``arc``) fed every block the
real index inserts or accesses; the real index evicts in LRU order until the ``arc`` shadow's
decayed hits lead the ``lru`` shadow's by ``margin``, and in ``arc``'s order while they do.
``guarded_eval.py`` replays it.
"""
from lmdeploy_hostcache.tier.eviction import EvictionPolicy, TreeARCPolicy, LRUPolicy
from lmdeploy_hostcache.tier.host_index import HostIndex, BlockState

class FollowLeader(EvictionPolicy):
    """Every index event goes to each expert in ``self.experts`` (name -> policy); victims come from
    ``self.experts[self.follow]``, and the others forget them. A subclass feeds its shadows in
    ``_reference(block)``, called on every insert and access, and sets ``follow``."""
    def on_insert(self, block):
        for e in self.experts.values(): e.on_insert(block)
        self._reference(block)
    def on_access(self, block):
        for e in self.experts.values(): e.on_access(block)
        self._reference(block)
    def on_remove(self, block, evicted):
        for e in self.experts.values(): e.on_remove(block, evicted)
    def add_candidate(self, block):
        for e in self.experts.values(): e.add_candidate(block)
    def remove_candidate(self, block):
        for e in self.experts.values(): e.remove_candidate(block)
    def pop_victim(self):
        self.followed[self.follow] += 1
        v = self.experts[self.follow].pop_victim()
        if v is not None:
            for k, e in self.experts.items():
                if k != self.follow: e.remove_candidate(v)
        return v


class GuardedARC(FollowLeader):
    name = "guarded"
    def __init__(self, num_slots, window=4.0, margin=0.0, start='lru'):
        self.experts = {'arc': TreeARCPolicy(), 'lru': LRUPolicy()}
        self.shadows = {k: HostIndex(num_slots, TreeARCPolicy() if k == 'arc' else LRUPolicy(), verify_tokens=False) for k in self.experts}
        self.score = {k: 0.0 for k in self.experts}
        self.follow = start
        self.gain = 1.0
        self.rate = 1.0 + 1.0 / max(1.0, window * num_slots)
        self.margin = margin
        self.switches = 0
        self.followed = {k: 0 for k in self.experts}

    def _reference(self, block):
        d, parent = block.digest, block.parent
        self.gain *= self.rate
        if self.gain > 1e100:
            for k in self.score: self.score[k] /= self.gain
            self.gain = 1.0
        for k, sh in self.shadows.items():
            b = sh.get(d)
            if b is not None and b.state is BlockState.RESIDENT and not b.doomed:
                sh.touch((d,))
                self.score[k] += self.gain
            else:
                if b is None:
                    slot = sh.prepare_store(d, parent, b"")
                    if slot is not None:
                        sh.complete_store(d, True)
        a, l = self.score['arc'], self.score['lru']
        if self.follow == 'lru':
            if a > l * (1 + self.margin) and a > 0:
                self.follow = 'arc'; self.switches += 1
        else:
            if l > a * (1 + self.margin):
                self.follow = 'lru'; self.switches += 1
