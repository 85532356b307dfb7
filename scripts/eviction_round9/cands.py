"""Candidate default policies (prototypes, issue-12 guard on agents with restarts)."""
import sys
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from collections import OrderedDict
from lmdeploy_hostcache.tier.eviction import TreeARCPolicy, LRUPolicy, EvictionPolicy


class ArcPFloor(TreeARCPolicy):
    """p clamped to [pmin, pmax]."""
    def __init__(self, pmin=0.25, pmax=1.0, **kw):
        super().__init__(**kw); self.pmin, self.pmax = pmin, pmax
    def on_insert(self, block):
        super().on_insert(block)
        self.p = min(self.pmax, max(self.pmin, self.p))


class ArcPDecay(TreeARCPolicy):
    """p relaxes toward 0.5 with time constant tau x c index accesses."""
    def __init__(self, tau=4.0, **kw):
        super().__init__(**kw); self.tau = tau
    def _relax(self):
        c = max(1, self._n[1] + self._n[2])
        self.p += (0.5 - self.p) / (self.tau * c)
    def on_insert(self, block):
        super().on_insert(block); self._relax()
    def on_access(self, block):
        super().on_access(block); self._relax()


class ArcRun(TreeARCPolicy):
    """ARC's p adapts on the first ghost hit of each re-inserted run (a chain's missed part),
    not on every block of it."""
    def __init__(self, **kw):
        super().__init__(**kw); self._last = None; self._adapted = False
    def on_insert(self, block):
        if block.parent != self._last:
            self._adapted = False
        self._last = block.digest
        if self._adapted:
            d = block.digest
            b1, b2 = self._ghost[1], self._ghost[2]
            seg = 1
            if d in b1:
                b1.pop(d); seg = 2
            elif d in b2:
                b2.pop(d); seg = 2
            from lmdeploy_hostcache.tier.eviction import _ArcMeta
            block.pdata = _ArcMeta(seg); self._n[seg] += 1
            return
        p0 = self.p
        super().on_insert(block)
        if self.p != p0:
            self._adapted = True


class _RMeta:
    __slots__ = ("seg", "spared")
    def __init__(self, seg):
        self.seg = seg; self.spared = 0


class _ArcChooser(TreeARCPolicy):
    """``arc`` whose victim choice a subclass may overrule where it disagrees with LRU's."""

    def _tops(self):
        """(T1's oldest leaf, resident count, LRU's victim, ``arc``'s victim), or None when a segment has no
        candidate (then ``arc`` and LRU agree: ``TreeARCPolicy.pop_victim``)."""
        t1, t2 = self._heaps[1].peek(), self._heaps[2].peek()
        if t1 is None or t2 is None:
            return None
        c = self._n[1] + self._n[2]
        oldest = t1 if t1.last_access < t2.last_access else t2
        if oldest.last_access < self._now - self.horizon * c:
            return t1, c, oldest, oldest      # past the horizon: arc takes LRU's victim
        return t1, c, oldest, (t1 if self._n[1] > self.p * c else t2)

    def _take(self, victim, t1):
        heap = self._heaps[1] if victim is t1 else self._heaps[2]
        heap.live -= 1
        return heap.pop()


class ArcRegret(_ArcChooser):
    """arc whose segment choice is gated by a counterfactual score kept at the disagreements only.

    When the segment rule would evict ``v`` but LRU's victim is ``o`` (v is not o), the policy
    follows ``mode`` (arc -> v, lru -> o).  The victim x goes into a small ghost tagged with the
    rule that chose it; the spared block y is flagged with the rule that chose x.  Later:
    x re-inserted -> +1 for the other rule; y accessed -> +1 for the rule that chose x.
    Scores decay with time constant ``window`` x c index accesses.  Mode switches to arc when
    score_arc > (1 + margin) score_lru, to lru when score_lru > (1 + margin) score_arc.
    """
    name = "arcr"
    ARC, LRU = 1, 2

    def __init__(self, window=4.0, margin=0.0, start="arc", **kw):
        super().__init__(**kw)
        self.window, self.margin = window, margin
        self.mode = self.ARC if start == "arc" else self.LRU
        self.score = [0.0, 0.0, 0.0]
        self.gain = 1.0
        self._dev = OrderedDict()   # digest -> rule that chose to evict it
        self.switches = 0
        self.followed = [0, 0, 0]

    def _credit(self, rule):
        c = max(1, self._n[1] + self._n[2])
        self.gain *= 1.0 + 1.0 / (self.window * c)
        if self.gain > 1e100:
            self.score = [s / self.gain for s in self.score]; self.gain = 1.0
        self.score[rule] += self.gain
        a, l = self.score[self.ARC], self.score[self.LRU]
        if self.mode == self.LRU and a > (1 + self.margin) * l:
            self.mode = self.ARC; self.switches += 1
        elif self.mode == self.ARC and l > (1 + self.margin) * a:
            self.mode = self.LRU; self.switches += 1

    def on_insert(self, block):
        rule = self._dev.pop(block.digest, 0)
        super().on_insert(block)
        m = block.pdata
        block.pdata = _RMeta(m.seg)
        if rule:
            self._credit(3 - rule)   # the evicted block came back: the other rule would have kept it

    def on_access(self, block):
        m = block.pdata
        if m.spared:
            self._credit(m.spared); m.spared = 0  # the spared block was used: the chooser was right
        super().on_access(block)

    def pop_victim(self):
        tops = self._tops()
        if tops is None:
            return super().pop_victim()
        t1, c, oldest, v = tops
        if v is oldest:
            return self._take(v, t1)
        # disagreement: arc wants v, lru wants oldest
        self.followed[self.mode] += 1
        x, y = (v, oldest) if self.mode == self.ARC else (oldest, v)
        self._dev[x.digest] = self.mode
        lim = max(1, c)
        while len(self._dev) > lim:
            self._dev.popitem(last=False)
        y.pdata.spared = self.mode
        return self._take(x, t1)


# --- round 7 guarded arc with full shadows (needs the slot count) ---
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', 'eviction_round7'))
from guarded import FollowLeader, GuardedARC  # noqa: E402


class LazyGuarded(EvictionPolicy):
    """GuardedARC that learns the slot count from the harness (bind)."""
    name = "guarded"
    def __init__(self, **kw):
        self.kw = kw; self.g = None
    def bind(self, slots):
        self.g = GuardedARC(slots, **self.kw)
    def on_insert(self, b): self.g.on_insert(b)
    def on_access(self, b): self.g.on_access(b)
    def on_remove(self, b, e): self.g.on_remove(b, e)
    def add_candidate(self, b): self.g.add_candidate(b)
    def remove_candidate(self, b): self.g.remove_candidate(b)
    def pop_victim(self): return self.g.pop_victim()


def install():
    """Make HostIndex bind the slot count into policies that want it (eval harness only)."""
    import lmdeploy_hostcache.eviction_eval as ev
    from lmdeploy_hostcache.tier.host_index import HostIndex
    if getattr(ev.HostIndex, '_ev9', False):
        return
    class BHI(HostIndex):
        _ev9 = True
        def __init__(self, num_slots, policy="lru", *a, **k):
            super().__init__(num_slots, policy, *a, **k)
            if hasattr(self.policy, 'bind'):
                self.policy.bind(num_slots)
    ev.HostIndex = BHI


CANDS = {
    'lru': lambda: 'lru',
    'arc': lambda: 'arc',
    'h1.0': lambda: TreeARCPolicy(horizon=1.0),
    'h1.25': lambda: TreeARCPolicy(horizon=1.25),
    'h1.5': lambda: TreeARCPolicy(horizon=1.5),
    'pf0.25': lambda: ArcPFloor(pmin=0.25),
    'pf0.35': lambda: ArcPFloor(pmin=0.35),
    'pdec4': lambda: ArcPDecay(tau=4.0),
    'pdec1': lambda: ArcPDecay(tau=1.0),
    'run': lambda: ArcRun(),
    'regret': lambda: ArcRegret(),
    'regret_l': lambda: ArcRegret(start='lru'),
    'regret_w1': lambda: ArcRegret(window=1.0),
    'regret_w16': lambda: ArcRegret(window=16.0),
    'guarded': lambda: LazyGuarded(window=4.0, margin=0.0),
}


class ArcPair(_ArcChooser):
    """arc gated by pairwise outcomes at its disagreements with LRU.

    When arc's segment rule and LRU pick different victims (v: arc's, o: LRU's, the oldest
    candidate), the policy evicts the one its current ``mode`` picks (x) and spares the other (y),
    and records the pair.  The pair resolves at the first later reference (hit or re-insertion)
    to either digest: y first -> the chooser was right (the block needed sooner was kept), x first
    -> the other rule was right.  Scores decay with time constant ``window`` x c references; the
    mode switches when the other rule's score exceeds (1 + margin) x the current one's.
    At most ``rec_ratio`` x c unresolved pairs are kept (oldest dropped unresolved).
    """
    name = "arcpair"
    ARC, LRU = 1, 2

    def __init__(self, window=4.0, margin=0.0, start="arc", rec_ratio=1.0, **kw):
        super().__init__(**kw)
        self.window, self.margin, self.rec_ratio = window, margin, rec_ratio
        self.mode = self.ARC if start == "arc" else self.LRU
        self.score = [0.0, 0.0, 0.0]
        self.gain = 1.0
        self._rec = OrderedDict()   # rid -> (x digest, y digest, chooser)
        self._by = {}               # digest -> [rid, ...]
        self._rid = 0
        self.switches = 0
        self.followed = [0, 0, 0]
        self.resolved = [0, 0, 0]

    def _tick(self, c):
        self.gain *= 1.0 + 1.0 / (self.window * c)
        if self.gain > 1e100:
            self.score = [s / self.gain for s in self.score]; self.gain = 1.0

    def _ref(self, d):
        rids = self._by.pop(d, None)
        if not rids:
            return
        rec = self._rec
        for rid in rids:
            r = rec.pop(rid, None)
            if r is None:
                continue
            x, y, chooser = r
            winner = chooser if d == y else 3 - chooser
            self.score[winner] += self.gain
            self.resolved[winner] += 1
            other = x if d == y else y
            lst = self._by.get(other)
            if lst is not None:
                try:
                    lst.remove(rid)
                except ValueError:
                    pass
                if not lst:
                    del self._by[other]
        a, l = self.score[self.ARC], self.score[self.LRU]
        if self.mode == self.LRU and a > (1 + self.margin) * l:
            self.mode = self.ARC; self.switches += 1
        elif self.mode == self.ARC and l > (1 + self.margin) * a:
            self.mode = self.LRU; self.switches += 1

    def on_insert(self, block):
        super().on_insert(block)
        self._tick(max(1, self._n[1] + self._n[2]))
        self._ref(block.digest)

    def on_access(self, block):
        super().on_access(block)
        self._tick(max(1, self._n[1] + self._n[2]))
        self._ref(block.digest)

    def pop_victim(self):
        tops = self._tops()
        if tops is None:
            return super().pop_victim()
        t1, c, oldest, v = tops
        if v is not oldest:
            self.followed[self.mode] += 1
            x, y = (v, oldest) if self.mode == self.ARC else (oldest, v)
            self._rid += 1
            rid = self._rid
            self._rec[rid] = (x.digest, y.digest, self.mode)
            self._by.setdefault(x.digest, []).append(rid)
            self._by.setdefault(y.digest, []).append(rid)
            while len(self._rec) > max(1, self.rec_ratio * c):
                orid, (ox, oy, _) = self._rec.popitem(last=False)
                for dd in (ox, oy):
                    lst = self._by.get(dd)
                    if lst is not None:
                        try:
                            lst.remove(orid)
                        except ValueError:
                            pass
                        if not lst:
                            del self._by[dd]
            v = x
        return self._take(v, t1)


CANDS.update({
    'pair': lambda: ArcPair(),
    'pair_l': lambda: ArcPair(start='lru'),
    'pair_w1': lambda: ArcPair(window=1.0),
    'pair_w16': lambda: ArcPair(window=16.0),
    'pair_m10': lambda: ArcPair(margin=0.1),
})


from lmdeploy_hostcache.tier.host_index import HostIndex, BlockState  # noqa: E402


class ZGuarded(FollowLeader):
    """arc with two metadata-only shadows (lru, arc) fed the real reference stream; follows arc's
    order only while the decayed hit difference S = sum(arc_hit - lru_hit) exceeds k * sqrt(V),
    V = decayed count of references where exactly one shadow hit (a sign test); falls back to LRU
    when S < exit_k * sqrt(V).  Starts in LRU order."""
    name = "zguard"

    def __init__(self, window=4.0, k=2.0, exit_k=0.0, start='lru'):
        self.window, self.k, self.exit_k = window, k, exit_k
        self.experts = {'arc': TreeARCPolicy(), 'lru': LRUPolicy()}
        self.follow = start
        self.S = 0.0; self.V = 0.0
        self.switches = 0; self.followed = {'arc': 0, 'lru': 0}

    def bind(self, num_slots):
        self.shadows = {k: HostIndex(num_slots, TreeARCPolicy() if k == 'arc' else LRUPolicy(), verify_tokens=False)
                        for k in ('arc', 'lru')}
        self.decay = 1.0 - 1.0 / max(1.0, self.window * num_slots)

    def _reference(self, block):
        d, parent = block.digest, block.parent
        hit = {}
        for k, sh in self.shadows.items():
            b = sh.get(d)
            if b is not None and b.state is BlockState.RESIDENT and not b.doomed:
                sh.touch((d,)); hit[k] = 1
            else:
                hit[k] = 0
                if b is None and sh.prepare_store(d, parent, b"") is not None:
                    sh.complete_store(d, True)
        diff = hit['arc'] - hit['lru']
        dec = self.decay
        self.S = self.S * dec + diff
        self.V = self.V * dec + (1 if diff else 0)
        r = self.V ** 0.5
        if self.follow == 'lru':
            if self.S > self.k * r and self.S > 0:
                self.follow = 'arc'; self.switches += 1
        elif self.S < self.exit_k * r:
            self.follow = 'lru'; self.switches += 1



CANDS.update({
    'g16m5': lambda: LazyGuarded(window=16.0, margin=0.05),
    'g4m5': lambda: LazyGuarded(window=4.0, margin=0.05),
    'g16m0': lambda: LazyGuarded(window=16.0, margin=0.0),
    'z4k2': lambda: ZGuarded(window=4.0, k=2.0),
    'z16k2': lambda: ZGuarded(window=16.0, k=2.0),
    'z4k3': lambda: ZGuarded(window=4.0, k=3.0, exit_k=1.0),
})


class ArcCont(TreeARCPolicy):
    """arc where a *continuation* enters T2: blocks stored right after a hit whose deepest block
    was used for the first time (a private chain growing, e.g. an agent or conversation turn),
    and the rest of that run.  ``by='hits'``: deepest hit has hits == 1 after the touch;
    ``by='seg'``: deepest hit was in T1 before the touch."""
    name = "arccont"

    def __init__(self, by='hits', **kw):
        super().__init__(**kw)
        self.by = by
        self._first = None     # digest of the last accessed block if it was a first reuse
        self._last = None      # digest of the last inserted block
        self._last_cont = False
        self.conts = 0

    def on_access(self, block):
        first = block.hits == 1 if self.by == 'hits' else block.pdata.seg == 1
        self._first = block.digest if first else None
        super().on_access(block)

    def on_insert(self, block):
        par = block.parent
        cont = (par == self._first) or (par == self._last and self._last_cont)
        self._first = None
        super().on_insert(block)
        if cont and block.pdata.seg == 1:
            block.pdata.seg = 2
            self._n[1] -= 1
            self._n[2] += 1
            self.conts += 1
        self._last, self._last_cont = block.digest, cont


CANDS.update({
    'cont': lambda: ArcCont(),
    'cont_seg': lambda: ArcCont(by='seg'),
})


from guarded_arc import GuardedARCPolicy  # noqa: E402  (round 9's pick, not adopted: docs/eviction.md)

CANDS['guarded-arc'] = lambda: GuardedARCPolicy()
