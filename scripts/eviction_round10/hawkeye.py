"""Round 10 prototype (issue 12, item 4): Belady-trained insertion prediction, Hawkeye/Mockingjay style.

Not in the package.  ``HawkPolicy`` is an ``EvictionPolicy`` for the leaf-first ``HostIndex``:

* **Sighting stream.** ``begin_request(digests, n_hit)`` is called once per request, right after the
  index's ``lookup`` (``install()`` patches ``eviction_eval.HostIndex`` so ``replay`` does it; in serving the
  connector knows both at ``get_num_new_matched_tokens``).  Every full block of the request is a sighting.
* **Feature class of a sighting** (the analogue of Hawkeye's load PC), known at lookup time:
  - kind (5): miss in a request with no hit / miss after a prefix hit / miss of a digest in the ghost
    (evicted within the last ``C`` evictions) / hit on a block never hit before / hit on a block hit before;
  - depth in the chain (3): < 4, < 32, >= 32 blocks;
  - distance from the request's tip (3): 0 (the tip), < 8, >= 8.
  45 classes; the predictor backs off to the kind alone (5 classes) while a class has < ``nmin`` labels.
* **OPTgen** (Jain & Lin, ISCA'16) on a hash sample of the digests: 1/R of them (``R`` a power of two,
  the largest with C/R >= ``min_sampled`` slots, at most ``rmax``), replayed as a fully associative cache
  of Cs = C/R slots.  Time is the sampled sighting count.  An occupancy vector over the last
  W = ``window`` x Cs sightings (numpy) says, when a sampled digest is seen again at T after t0, whether
  OPT (with bypass) would have kept it over [t0, T): max occupancy < Cs -> "hit", occupancy += 1 over
  the interval; else "miss".  The label trains the class the digest had at t0.  A sighting not seen again
  within W sightings is labelled "miss" when it leaves the window (most single-use blocks).
* **Predictor.** Per class, decayed counts of OPT hits and labels (a class's counts are halved when its
  label count passes ``cap``).  p = hits / labels.  A sighting is *cache-averse* when p < ``tau``
  with at least ``nmin`` labels (its class or the kind's); no confidence -> friendly.
* **Use.** One lazy heap over the candidates (leaves), key = last_access, minus ``lam`` x C for an averse
  block (``lam = inf``: every averse leaf goes before any friendly one, Hawkeye's RRPV 7).  A block is
  re-predicted at each access (its new class).  Everything else is LRU order among leaves.
* **Guard** (``duel=True``): two flat shadow caches of Cs slots on the sampled sightings, one LRU and one
  with this policy's order and predictions; hits decayed with time constant ``dwin`` x Cs sampled sightings.
  The real index evicts in LRU order unless the shadow policy's score leads the shadow LRU's by more than
  ``margin`` (relative).  It starts in LRU order.

No bypass: every missed block is admitted, so Belady bounds every share.
"""
from __future__ import annotations

import heapq
import math
import os
import sys
from collections import OrderedDict, deque

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from lmdeploy_hostcache.tier.eviction import EvictionPolicy, _LazyHeap  # noqa: E402

NK, ND, NT = 5, 3, 3
NCLS = NK * ND * NT
BIG = 1 << 50


def _depth_b(i):
    return 0 if i < 4 else (1 if i < 32 else 2)


def _tip_b(j):
    return 0 if j == 0 else (1 if j < 8 else 2)


class OPTgen:
    """Occupancy-vector OPT on one sampled stream (fully associative, ``cap`` slots)."""

    def __init__(self, cap: int, window: float, train) -> None:
        self.cap = max(1, cap)
        self.W = max(32, int(window * self.cap))
        self.occ = np.zeros(4 * self.W, dtype=np.int32)
        self.base = 0
        self.T = 0
        self.rec: dict[int, tuple[int, int]] = {}
        self.q: deque = deque()
        self.train = train
        self.n_hit = self.n_miss = self.n_expired = 0

    def sight(self, d: int, cls: int) -> None:
        T = self.T
        r = self.rec.get(d)
        if r is not None:
            t0, c0 = r
            seg = self.occ[t0 - self.base:T - self.base]
            if int(seg.max()) < self.cap:
                seg += 1
                self.n_hit += 1
                self.train(c0, 1)
            else:
                self.n_miss += 1
                self.train(c0, 0)
        self.rec[d] = (T, cls)
        self.q.append((T, d))
        T += 1
        self.T = T
        lim = T - self.W
        q, rec = self.q, self.rec
        while q and q[0][0] < lim:
            t0, dd = q.popleft()
            r = rec.get(dd)
            if r is not None and r[0] == t0:
                del rec[dd]
                self.n_expired += 1
                self.train(r[1], 0)
        if T - self.base >= len(self.occ):
            nb = lim - 1  # every live record has t0 >= lim
            k = T - nb
            self.occ[:k] = self.occ[nb - self.base:T - self.base]
            self.occ[k:] = 0
            self.base = nb


class _M:
    __slots__ = ("key", "cls", "averse")

    def __init__(self, key, cls, averse):
        self.key = key
        self.cls = cls
        self.averse = averse


class HawkPolicy(EvictionPolicy):
    name = "hawk"
    LRU, HAWK = 0, 1

    def __init__(self, tau=0.2, lam=math.inf, nmin=32, cap=512, window=8.0, min_sampled=128, rmax=16,
                 duel=False, dwin=4.0, margin=0.0, kinds_only=False, soft=False):
        self.tau, self.lam, self.nmin, self.capn = tau, lam, nmin, cap
        self.window, self.min_sampled, self.rmax = window, min_sampled, rmax
        self.duel, self.dwin, self.margin = duel, dwin, margin
        self.kinds_only = kinds_only
        self.soft = soft
        self.h = [0.0] * (NCLS + NK)     # full classes, then the kinds (backoff)
        self.n = [0.0] * (NCLS + NK)
        self._heap = _LazyHeap(lambda key, b: b.candidate and key == b.pdata.key)
        self._lru = _LazyHeap(lambda key, b: b.candidate and key == b.last_access) if duel else None
        self.mode = self.LRU if duel else self.HAWK
        self._ghost: OrderedDict = OrderedDict()
        self._ds = ()
        self._nhit = 0
        self._pos = 0
        self.C = None
        self.index = None
        self.stats = dict(averse_inserts=0, friendly_inserts=0, averse_evictions=0, evictions=0,
                          requests=0, hawk_mode_requests=0, switches=0)

    # ---------------------------------------------------------------- setup
    def bind(self, num_slots, index=None):
        C = max(1, num_slots)
        self.C = C
        self.index = index
        R = 1
        while R * 2 <= self.rmax and C / (R * 2) >= self.min_sampled:
            R *= 2
        self.R = R
        self.Cs = max(1, round(C / R))
        self.opt = OPTgen(self.Cs, self.window, self._train)
        self.pen = BIG if math.isinf(self.lam) else int(self.lam * C)
        if self.duel:
            self.s_lru: OrderedDict = OrderedDict()
            self.s_hk: dict = {}
            self.s_heap: list = []
            self.s_t = 0
            self.s_pen = BIG if math.isinf(self.lam) else int(self.lam * self.Cs)
            self.sc = [0.0, 0.0]
            self.gain = 1.0
            self.gmul = 1.0 + 1.0 / (self.dwin * self.Cs)

    # ---------------------------------------------------------------- predictor
    def _train(self, c, y):
        h, n, capn = self.h, self.n, self.capn
        for k in (c, NCLS + c // (ND * NT)):
            n[k] += 1
            h[k] += y
            if n[k] > capn:
                n[k] *= 0.5
                h[k] *= 0.5

    def _prob(self, c):
        n, h = self.n, self.h
        if not self.kinds_only and n[c] >= self.nmin:
            return h[c] / n[c]
        k = NCLS + c // (ND * NT)
        if n[k] >= self.nmin:
            return h[k] / n[k]
        return None

    def _averse(self, c):
        p = self._prob(c)
        return p is not None and p < self.tau

    def _penalty(self, c, scale_pen):
        """0 for a friendly (or unknown) class; ``scale_pen`` for an averse one; with ``soft``,
        scale_pen x (tau - p) / tau."""
        if c < 0:
            return 0
        p = self._prob(c)
        if p is None or p >= self.tau:
            return 0
        if self.soft and scale_pen < BIG:
            return int(scale_pen * (self.tau - p) / self.tau)
        return scale_pen

    def _cls(self, i, kind):
        L = len(self._ds)
        return (kind * ND + _depth_b(i)) * NT + _tip_b(L - 1 - i)

    # ---------------------------------------------------------------- request hook
    def begin_request(self, ds, n_hit):
        self._ds = ds
        self._nhit = n_hit
        self._pos = 0
        st = self.stats
        st["requests"] += 1
        if self.mode == self.HAWK:
            st["hawk_mode_requests"] += 1
        R = self.R
        mask = R - 1
        blocks = self.index._blocks if self.index is not None else {}
        ghost = self._ghost
        for i, d in enumerate(ds):
            if d & mask:
                continue
            if i < n_hit:
                b = blocks.get(d)
                kind = 4 if (b is not None and b.hits > 0) else 3
            elif d in ghost:
                kind = 2
            else:
                kind = 1 if n_hit else 0
            c = self._cls(i, kind)
            if self.duel:
                self._shadow(d, c)
            self.opt.sight(d, c)

    def _shadow(self, d, c):
        # flat shadow LRU and shadow policy of Cs slots on the sampled sightings
        self.gain *= self.gmul
        if self.gain > 1e100:
            self.sc = [s / self.gain for s in self.sc]
            self.gain = 1.0
        s = self.s_lru
        if d in s:
            s.move_to_end(d)
            self.sc[0] += self.gain
        else:
            s[d] = None
            if len(s) > self.Cs:
                s.popitem(last=False)
        self.s_t += 1
        key = self.s_t - self._penalty(c, self.s_pen)
        hk = self.s_hk
        if d in hk:
            self.sc[1] += self.gain
        hk[d] = key
        heapq.heappush(self.s_heap, (key, d))
        heap = self.s_heap
        while len(hk) > self.Cs:
            k, dd = heapq.heappop(heap)
            if hk.get(dd) == k:
                del hk[dd]
        if len(heap) > 4 * self.Cs + 64:
            self.s_heap = [(k, dd) for dd, k in hk.items()]
            heapq.heapify(self.s_heap)
        lru, hw = self.sc
        if self.mode == self.LRU:
            if hw > lru * (1.0 + self.margin) and hw > 0:
                self.mode = self.HAWK
                self.stats["switches"] += 1
        elif lru > hw * (1.0 + self.margin):
            self.mode = self.LRU
            self.stats["switches"] += 1

    def _event_cls(self, block, hit):
        ds, pos = self._ds, self._pos
        if pos < len(ds) and ds[pos] == block.digest:
            self._pos = pos + 1
            if hit:
                kind = 4 if block.hits > 1 else 3   # hits was incremented by this access
            elif block.digest in self._ghost:
                kind = 2
            else:
                kind = 1 if self._nhit else 0
            return self._cls(pos, kind)
        return -1

    # ---------------------------------------------------------------- policy hooks
    def _key(self, block, c):
        pen = self._penalty(c, self.pen)
        return block.last_access - pen, pen > 0

    def on_insert(self, block):
        c = self._event_cls(block, False)
        key, av = self._key(block, c)
        block.pdata = _M(key, c, av)
        self._ghost.pop(block.digest, None)
        self.stats["averse_inserts" if av else "friendly_inserts"] += 1

    def on_access(self, block):
        c = self._event_cls(block, True)
        key, av = self._key(block, c)
        m = block.pdata
        m.key, m.cls, m.averse = key, c, av
        if block.candidate:
            self._heap.push(key, block)
            if self._lru is not None:
                self._lru.push(block.last_access, block)

    def add_candidate(self, block):
        self._heap.add(block.pdata.key, block)
        if self._lru is not None:
            self._lru.add(block.last_access, block)

    def remove_candidate(self, block):
        self._heap.live -= 1
        if self._lru is not None:
            self._lru.live -= 1

    def on_remove(self, block, evicted):
        if evicted:
            g = self._ghost
            g[block.digest] = None
            if len(g) > (self.C or 1):
                g.popitem(last=False)

    def pop_victim(self):
        if self.mode == self.LRU and self._lru is not None:
            v = self._lru.pop()
        else:
            v = self._heap.pop()
        if v is None:
            return None
        self._heap.live -= 1
        if self._lru is not None:
            self._lru.live -= 1
        self.stats["evictions"] += 1
        if v.pdata.averse:
            self.stats["averse_evictions"] += 1
        return v


def parse(name: str):
    """``hk`` or ``hk:tau=0.2,lam=inf,duel=1,...`` -> a HawkPolicy factory."""
    kw = {}
    if ":" in name:
        for part in name.split(":", 1)[1].split(","):
            k, v = part.split("=")
            if k in ("duel", "kinds_only", "soft"):
                kw[k] = v not in ("0", "False", "false")
            elif k in ("nmin", "cap", "min_sampled", "rmax"):
                kw[k] = int(v)
            else:
                kw[k] = float(v)
    return lambda: HawkPolicy(**kw)


def install():
    """Patch ``eviction_eval.HostIndex``: bind slot count and index into policies that want them,
    and call ``policy.begin_request(digests, n_hit)`` after every lookup (eval harness only)."""
    import lmdeploy_hostcache.eviction_eval as ev
    from lmdeploy_hostcache.tier.host_index import HostIndex
    if getattr(ev.HostIndex, "_r10", False):
        return

    class R10HostIndex(HostIndex):
        _r10 = True

        def __init__(self, num_slots, policy="lru", *a, **k):
            super().__init__(num_slots, policy, *a, **k)
            if hasattr(self.policy, "bind"):
                self.policy.bind(num_slots, self)
            self._br = getattr(self.policy, "begin_request", None)

        def lookup(self, digests, block_bytes=None, parent=None):
            n = super().lookup(digests, block_bytes, parent)
            if self._br is not None:
                self._br(digests, n)
            return n

    ev.HostIndex = R10HostIndex


def register(names):
    """Add every ``hk...`` name to ``eviction.POLICIES`` (for ``bench eviction --policies``)."""
    from lmdeploy_hostcache.tier import eviction
    for nm in names:
        if nm.startswith("hk") and nm not in eviction.POLICIES:
            eviction.POLICIES[nm] = parse(nm)
