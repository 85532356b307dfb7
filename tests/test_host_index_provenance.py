"""Byte provenance of every host slot under any interleaving of HostIndex's verbs, second-chance
copies (``prepare_spare``) included (hypothesis state machine).

``test_host_index_state.py`` predicts every return value against a model of both tiers but does not
drive ``prepare_spare``; this machine drives every public verb in any order and models only the host
pool: ``pool[slot] = (epoch, digest)`` written by the last *successful* copy into that slot
(``drop_all`` starts a new pool: a new epoch). After every step:

* ``check_invariants()``;
* every RESIDENT block that is not doomed has its own bytes in its slot (no block ever reads bytes
  another block wrote, a failed copy left, or an older pool held);
* a copy that completes writes into a slot still owned by that digest (its slot or a spare), still
  pinned, and owned by no other block;
* a lookup hit and ``prepare_load`` give slots holding the right bytes, unchanged until ``complete_load``;
* no counter is negative; each policy's live count equals the eviction candidates (per segment or
  queue); the ghost lists stay bounded by the slot count.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.host_index import BlockState, HostIndex

NS = Namespace(model="provenance", block_size=2)
ROOT = NS.root
TOKENS = ([1, 2], [3, 1])                                # two block contents: chains branch and repeat
CHAINS = st.lists(st.integers(0, 1), min_size=1, max_size=4)
IN_FLIGHT = ("written, copy not complete",)
FAILED = ("a failed copy's bytes",)


def chain(blocks):
    return chain_digests(NS, [t for b in blocks for t in TOKENS[b]])


class ProvenanceMachine(RuleBasedStateMachine):
    @initialize(slots=st.integers(1, 5), policy=st.sampled_from(["lru", "arc", "s3fifo"]), keep=st.booleans())
    def init(self, slots, policy, keep):
        self.idx = HostIndex(slots, policy, keep_restored=keep)
        self.epoch = 0
        self.pool: dict[int, tuple] = {}
        self.copies: list[tuple[int, int, int]] = []          # (digest, slot, epoch) in flight
        self.loads: list[tuple[list[int], list[int], int]] = []
        self.holds: list[list[int]] = []
        self.block_bytes: dict[int, bytes] = {}

    def _holds_bytes_of(self, d, s):
        assert self.pool.get(s) == (self.epoch, d), f"slot {s} holds {self.pool.get(s)}, read for {d:032x}"

    def _owns_copy_slot(self, d, s):
        b = self.idx._blocks.get(d)
        assert b is not None, f"a copy into slot {s} completes for a digest the index forgot"
        assert s == b.slot or (b.spares and s in b.spares), f"slot {s} no longer belongs to {b}"
        assert self.idx.allocator.pins(s) >= 1, f"copy in flight into unpinned slot {s}"
        for o in self.idx._blocks.values():
            if o is not b:
                assert s != o.slot and not (o.spares and s in o.spares), f"slot {s} also owned by {o}"

    def _started(self, d, s):
        if s is not None:
            self.pool[s] = IN_FLIGHT
            self.copies.append((d, s, self.epoch))

    @rule(blocks=CHAINS, pos=st.integers(0, 3))
    def store(self, blocks, pos):
        ds, bs = chain(blocks)
        pos = min(pos, len(ds) - 1)
        self.block_bytes[ds[pos]] = bs[pos]
        self._started(ds[pos], self.idx.prepare_store(ds[pos], ds[pos - 1] if pos else ROOT, bs[pos]))

    @rule(blocks=CHAINS, pos=st.integers(0, 3))
    def second_chance(self, blocks, pos):
        ds, bs = chain(blocks)
        pos = min(pos, len(ds) - 1)
        self._started(ds[pos], self.idx.prepare_spare(ds[pos], bs[pos]))

    @precondition(lambda self: self.copies)
    @rule(data=st.data())
    def second_chance_of_a_copy_in_flight(self, data):
        """The GPU evicts a block again while its first copy is in flight (the connector's case)."""
        d = self.copies[data.draw(st.integers(0, len(self.copies) - 1))][0]
        self._started(d, self.idx.prepare_spare(d, self.block_bytes[d]))

    @precondition(lambda self: self.copies)
    @rule(data=st.data(), ok=st.booleans())
    def finish_copy(self, data, ok):
        d, s, epoch = self.copies.pop(data.draw(st.integers(0, len(self.copies) - 1)))
        self._owns_copy_slot(d, s)
        if epoch == self.epoch:
            self.pool[s] = (epoch, d) if ok else FAILED
        self.idx.complete_store(d, ok, slot=s)

    @rule(blocks=CHAINS, start=st.integers(0, 3), parent_known=st.booleans())
    def lookup(self, blocks, start, parent_known):
        ds, bs = chain(blocks)
        start = min(start, len(ds) - 1)
        parent = (ds[start - 1] if start else ROOT) if parent_known else None
        n = self.idx.lookup(ds[start:], bs[start:], parent=parent)
        for d in ds[start:start + n]:
            self._holds_bytes_of(d, self.idx.get(d).slot)

    @rule(blocks=CHAINS, start=st.integers(0, 3), k=st.integers(1, 4))
    def load(self, blocks, start, k):
        ds, bs = chain(blocks)
        start = min(start, len(ds) - 1)
        m = min(k, self.idx.lookup(ds[start:], bs[start:], parent=ds[start - 1] if start else ROOT))
        if m:
            sel = ds[start:start + m]
            slots = self.idx.prepare_load(sel)
            for d, s in zip(sel, slots):
                self._holds_bytes_of(d, s)
            self.loads.append((sel, slots, self.epoch))

    @precondition(lambda self: self.loads)
    @rule(data=st.data(), ok=st.sampled_from([True, True, False]))
    def finish_load(self, data, ok):
        sel, slots, epoch = self.loads.pop(data.draw(st.integers(0, len(self.loads) - 1)))
        for d, s in zip(sel, slots):
            if epoch == self.epoch:
                self._holds_bytes_of(d, s)      # unchanged while it was read
            b = self.idx._blocks.get(d)
            assert b is not None and b.slot == s and self.idx.allocator.pins(s) >= 1, "a read slot moved"
        self.idx.complete_load(sel, ok)

    @rule(blocks=CHAINS)
    def hold(self, blocks):
        ds, bs = chain(blocks)
        n = self.idx.lookup(ds, bs, parent=ROOT)
        if n:
            self.idx.hold(ds[:n])
            self.holds.append(ds[:n])

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data):
        self.idx.release(self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1))))

    @rule(blocks=CHAINS)
    def touch(self, blocks):
        self.idx.touch(chain(blocks)[0])

    @rule(blocks=CHAINS, pos=st.integers(-1, 3))
    def drop_subtree(self, blocks, pos):
        ds, _ = chain(blocks)
        pos = min(pos, len(ds) - 1)
        self.idx.drop_subtree(ds[pos] if pos >= 0 else ROOT)

    @rule(n=st.integers(0, 3))
    def evict(self, n):
        self.idx.evict(n)

    @rule()
    def drop_all(self):
        self.idx.drop_all()
        self.epoch += 1
        self.pool = {}

    @invariant()
    def every_slot_holds_its_own_bytes(self):
        if not hasattr(self, "idx"):
            return
        idx = self.idx
        idx.check_invariants()
        for b in idx._blocks.values():
            if not b.doomed and b.state is BlockState.RESIDENT:
                self._holds_bytes_of(b.digest, b.slot)
        stats = idx.stats.as_dict()
        assert all(v >= 0 for v in stats.values()), stats
        pol = idx.policy
        candidates = [b for b in idx._blocks.values() if b.candidate]
        if hasattr(pol, "_heap"):
            assert pol._heap.live == len(candidates)
        else:
            heaps = pol._heaps
            key = "queue" if hasattr(pol, "small_ratio") else "seg"
            for q, h in enumerate(heaps):
                if h is not None:
                    assert h.live == sum(1 for b in candidates if getattr(b.pdata, key) == q), (key, q)
        if hasattr(pol, "_n"):
            assert all(x >= 0 for x in pol._n), pol._n
            assert sum(pol._n) == sum(1 for b in idx._blocks.values() if not b.on_gpu), pol._n
        if hasattr(pol, "_ghost"):
            g = pol._ghost
            ghosts = sum(len(x) for x in g) if isinstance(g, tuple) else len(g)
            assert ghosts <= 4 * (idx.num_slots + 1) + 4, f"ghosts grew to {ghosts}"


ProvenanceMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None,
                                               suppress_health_check=list(HealthCheck))
TestProvenance = ProvenanceMachine.TestCase


# Seeded weighted walks over the same machine: second chances are aimed at copies in flight and
# copies fail often, so the interleavings of a doomed, failed or spared copy come up in every run
# (hypothesis's uniform rule choice reaches them only now and then).
WALK_RULES = {"store": 14, "store_chain": 6, "second_chance": 8, "finish_copy": 16, "lookup": 4, "load": 10,
              "finish_load": 8, "hold": 4, "release": 4, "touch": 3, "drop_subtree": 3, "evict": 2, "drop_all": 0.4}


def _walk(seed: int, steps: int = 120) -> dict:
    import random

    rng = random.Random(seed)
    m = ProvenanceMachine.__new__(ProvenanceMachine)
    ProvenanceMachine.init(m, rng.randint(1, 6), rng.choice(["lru", "arc", "s3fifo"]), rng.random() < 0.5)
    names, weights = list(WALK_RULES), list(WALK_RULES.values())

    def blocks():
        return [rng.randint(0, 1) for _ in range(rng.randint(1, 4))]

    for _ in range(steps):
        r = rng.choices(names, weights)[0]
        if r == "store":
            ProvenanceMachine.store(m, blocks(), rng.randint(0, 3))
        elif r == "store_chain":          # a whole prompt demoted, root first
            b = blocks()
            for pos in range(len(b)):
                ProvenanceMachine.store(m, b, pos)
        elif r == "second_chance":
            if m.copies and rng.random() < 0.8:
                d = rng.choice(m.copies)[0]
                m._started(d, m.idx.prepare_spare(d, m.block_bytes[d]))
            else:
                ProvenanceMachine.second_chance(m, blocks(), rng.randint(0, 3))
        elif r == "finish_copy" and m.copies:
            d, s, epoch = m.copies.pop(rng.randrange(len(m.copies)))
            ok = rng.random() < 0.6
            m._owns_copy_slot(d, s)
            if epoch == m.epoch:
                m.pool[s] = (epoch, d) if ok else FAILED
            m.idx.complete_store(d, ok, slot=s)
        elif r == "lookup":
            ProvenanceMachine.lookup(m, blocks(), rng.randint(0, 3), rng.random() < 0.5)
        elif r == "load":
            ProvenanceMachine.load(m, blocks(), rng.randint(0, 3), rng.randint(1, 4))
        elif r == "finish_load" and m.loads:
            sel, slots, epoch = m.loads.pop(rng.randrange(len(m.loads)))
            for d, s in zip(sel, slots):
                if epoch == m.epoch:
                    m._holds_bytes_of(d, s)
                b = m.idx._blocks.get(d)
                assert b is not None and b.slot == s and m.idx.allocator.pins(s) >= 1, "a read slot moved"
            m.idx.complete_load(sel, rng.random() < 0.7)
        elif r == "hold":
            ProvenanceMachine.hold(m, blocks())
        elif r == "release" and m.holds:
            m.idx.release(m.holds.pop(rng.randrange(len(m.holds))))
        elif r == "touch":
            ProvenanceMachine.touch(m, blocks())
        elif r == "drop_subtree":
            ProvenanceMachine.drop_subtree(m, blocks(), rng.randint(-1, 3))
        elif r == "evict":
            ProvenanceMachine.evict(m, rng.randint(0, 3))
        elif r == "drop_all":
            ProvenanceMachine.drop_all(m)
        ProvenanceMachine.every_slot_holds_its_own_bytes(m)
    return m.idx.stats.as_dict()


def test_weighted_walks_keep_every_slot_with_its_own_bytes():
    from collections import Counter

    total = Counter()
    for seed in range(400):
        total.update(_walk(seed))
    # the walks reach the second-chance paths they exist for
    assert total["second_chances"] > 50 and total["store_failures"] > 500, dict(total)
