"""HostIndex against a reference model of both tiers (hypothesis state machine).

The model plays LMDeploy's GPU prefix cache and the connector flows of docs/architecture.md:

* ``compute``: a request computes a chain on the GPU (every prefix becomes GPU-resident), also
  past a host-resident prefix (a host hit too short to load), so a block can sit in both tiers;
* ``branch_and_demote``: such a request's new blocks are demoted at once, deepest first (new host
  children under a parent that already has host children: the sibling-eviction case);
* ``demote``: the GPU evicts a leaf (never one an in-flight load's request holds): it leaves the
  GPU and ``prepare_store`` is asked for a slot; when the block ends up in no tier, its host
  descendants are reclaimed with ``drop_subtree`` (the connector's ``on_evict``);
* ``finish_store``: ``complete_store(ok | fail)`` of a demotion in flight;
* ``start_load``: GPU match, ``lookup`` from where it ended, ``prepare_load`` of a prefix of the
  hit; the request holds its GPU prefix until ``finish_load``: ``complete_load(ok | fail)``, after
  which (ok) the blocks are GPU-resident and must have left the host (exclusive tiers);
* plus lookups from anywhere, touches, bad loads, ``drop_subtree`` of any digest and ``evict(n)``.

The two regression tests at the end are minimal sequences this machine found in tier/host_index.py.

The model predicts every return value and every statistic itself (slots, states, pins,
doomed/promoted, which ``prepare_store`` evicts); only *which* candidate a policy picks is taken
from the index (``on_evict``), and then checked to be a legal candidate (LRU: the least recently
used one).  After every step: ``check_invariants``, the index equals the model block for block
(no slot leak, pinned blocks never moved), exclusivity, prefix closure and statistics.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lmdeploy_hostcache.tier import eviction
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.host_index import BlockState, HostIndex

BLOCK_SIZE = 2
# Two distinct blocks and chains up to 4 deep: prefixes are shared all the time.
BLOCK_TOKENS = ([1, 2], [3, 1])
CHAINS = st.lists(st.integers(0, len(BLOCK_TOKENS) - 1), min_size=1, max_size=4)
EXTRA = st.lists(st.integers(0, len(BLOCK_TOKENS) - 1), max_size=2)
NAMESPACE = Namespace(model="test/state-machine", block_size=BLOCK_SIZE)
ROOT = NAMESPACE.root
# Copies and loads mostly succeed, so the host fills up and evicts; failures still happen often.
OUTCOMES = st.sampled_from([True] * 5 + [False])


@dataclass
class ModelBlock:
    parent: int
    tokens: bytes
    slot: int
    state: str          # "W" (being written) or "R" (resident)
    pins: int           # write pin + read pins
    doomed: bool = False
    promoted: bool = False


@dataclass
class Load:
    digests: tuple[int, ...]
    gpu_prefix: tuple[int, ...]


class HostIndexMachine(RuleBasedStateMachine):
    NUM_SLOTS = 4
    POLICY = "lru"
    CHECK_LRU_ORDER = True

    def __init__(self):
        super().__init__()
        self.idx = HostIndex(self.NUM_SLOTS, policy=self._make_policy(), on_evict=self._on_evict)
        self.host: dict[int, ModelBlock] = {}
        self.gpu: set[int] = set()
        self.promoted_on_gpu: set[int] = set()  # moved host -> GPU by a load, not demoted since
        self.loads: list[Load] = []
        self.stores: list[int] = []
        self.registry: dict[int, tuple[int, bytes]] = {}  # digest -> (parent, tokens)
        self.stats: Counter[str] = Counter()
        self.evicted_now: list[int] = []
        self.expect_evictions = False

    def _make_policy(self):
        return self.POLICY

    # ------------------------------------------------------------------ model helpers
    def chain(self, blocks: list[int]) -> tuple[list[int], list[bytes]]:
        tokens = [t for i in blocks for t in BLOCK_TOKENS[i]]
        digests, data = chain_digests(NAMESPACE, tokens)
        parent = ROOT
        for d, b in zip(digests, data):
            self.registry[d] = (parent, b)
            parent = d
        return digests, data

    def children(self, d: int) -> list[int]:
        return [c for c, b in self.host.items() if b.parent == d]

    def is_candidate(self, d: int) -> bool:
        b = self.host[d]
        return b.state == "R" and b.pins == 0 and not b.doomed and not self.children(d)

    def candidates(self, exclude: int | None = None) -> list[int]:
        return [d for d in self.host if d != exclude and self.is_candidate(d)]

    def present(self, d: int) -> bool:
        b = self.host.get(d)
        return b is not None and not b.doomed

    def resident(self, d: int) -> bool:
        b = self.host.get(d)
        return b is not None and not b.doomed and b.state == "R"

    def remove(self, d: int, evicted: bool) -> None:
        b = self.host.pop(d)
        self.stats["evictions" if evicted else "promoted" if b.promoted else "dropped"] += 1

    def settle(self, d: int) -> None:
        b = self.host.get(d)
        if b is not None and b.doomed and b.pins == 0:
            self.remove(d, evicted=False)

    def doom_subtree(self, root: int, include_self: bool) -> None:
        stack = [root] if include_self else self.children(root)
        order = []
        while stack:
            d = stack.pop()
            if d in self.host:
                order.append(d)
                stack.extend(self.children(d))
        for d in order:
            self.host[d].doomed = True
            self.settle(d)

    def held_gpu(self) -> set[int]:
        return {d for load in self.loads for d in load.gpu_prefix}

    def gpu_leaves(self) -> list[int]:
        parents = {self.registry[d][0] for d in self.gpu}
        held = self.held_gpu()
        return sorted(d for d in self.gpu if d not in parents and d not in held)

    def model_lookup(self, digests: list[int]) -> int:
        n = 0
        for d in digests:
            if not self.resident(d):
                break
            n += 1
        return n

    def _on_evict(self, victim) -> None:
        d = victim.digest
        assert self.expect_evictions, f"unexpected eviction of {victim}"
        assert d in self.host, f"evicted {victim} the model does not hold"
        assert self.is_candidate(d), (
            f"evicted a non-candidate {victim}: model {self.host[d]}, children {len(self.children(d))}")
        if self.CHECK_LRU_ORDER:
            others = [b.last_access for b in self.idx._blocks.values()
                      if b.candidate and b.digest != victim.parent]
            assert not others or victim.last_access <= min(others), "LRU evicted a more recent block"
        self.remove(d, evicted=True)
        self.evicted_now.append(d)

    @contextmanager
    def _expecting_evictions(self):
        """Evictions are legal only inside this block; ``evicted_now`` lists them."""
        self.expect_evictions, self.evicted_now = True, []
        try:
            yield
        finally:
            self.expect_evictions = False

    # ------------------------------------------------------------------ rules
    @initialize(blocks=CHAINS)
    def warm_gpu(self, blocks):
        self.gpu.update(self.chain(blocks)[0])

    @rule(data=st.data(), through_host=st.booleans(), blocks=CHAINS, extra=EXTRA)
    def compute(self, data, through_host, blocks, extra):
        """A request computes its prompt on the GPU (also when part of it is on host: a host hit
        too short to be worth loading is recomputed, so a block can sit in both tiers)."""
        digests, _ = self._prompt(data, through_host, blocks, extra)
        self.gpu.update(digests)

    @precondition(lambda self: any(self.resident(d) for d in self.host))
    @rule(data=st.data(), extra=st.lists(st.integers(0, len(BLOCK_TOKENS) - 1), min_size=1, max_size=2))
    def branch_and_demote(self, data, extra):
        """A request recomputes past a host-resident block, then GPU pressure demotes its new
        blocks (deepest first): new host children under a parent that has host children."""
        digests, _ = self._prompt(data, True, [], extra, prefer_parents=True)
        self.gpu.update(digests)
        for d in reversed(digests[-len(extra):]):
            if d not in self.gpu_leaves():
                break
            self._demote(d)

    @precondition(lambda self: self.gpu_leaves())
    @rule(data=st.data(), count=st.integers(1, 4))
    def demote(self, data, count):
        for _ in range(count):
            leaves = self.gpu_leaves()
            if not leaves:
                break
            self._demote(data.draw(st.sampled_from(leaves)))

    def _demote(self, d: int) -> None:
        parent, tokens = self.registry[d]
        self.gpu.discard(d)
        self.promoted_on_gpu.discard(d)
        free = self.NUM_SLOTS - len(self.host)
        if self.present(d):
            expect, kind = None, "refreshes"
        elif d in self.host:
            expect, kind = None, "store_rejected"        # doomed copy still read-pinned
        elif free > 0:
            expect, kind = "slot", "inserts"
        elif self.candidates(exclude=parent):
            expect, kind = "evict", "inserts"
        else:
            expect, kind = None, "store_rejected"
        with self._expecting_evictions():
            slot = self.idx.prepare_store(d, parent, tokens)
        self.stats[kind] += 1
        assert len(self.evicted_now) == (1 if expect == "evict" else 0), (expect, self.evicted_now)
        if expect is None:
            assert slot is None, f"prepare_store gave slot {slot}, model expected {kind}"
            if not self.present(d):  # the block left every tier: reclaim its host descendants
                self.idx.drop_subtree(d)
                self.doom_subtree(d, include_self=False)
            return
        assert slot is not None, f"prepare_store refused, model expected {expect}"
        held = {b.slot for b in self.host.values()}
        assert slot not in held, f"slot {slot} handed out while another block holds it"
        self.host[d] = ModelBlock(parent, tokens, slot, "W", pins=1)
        self.stores.append(d)

    @precondition(lambda self: self.stores)
    @rule(data=st.data(), ok=OUTCOMES)
    def finish_store(self, data, ok):
        d = data.draw(st.sampled_from(self.stores))
        self.stores.remove(d)
        self.idx.complete_store(d, ok)
        b = self.host[d]
        b.pins -= 1
        if ok:
            b.state = "R"
        else:
            self.stats["store_failures"] += 1
            self.doom_subtree(d, include_self=True)
        self.settle(d)

    @rule(blocks=CHAINS, start=st.integers(0, 3), kind=st.sampled_from(["lookup", "touch", "bad_load"]))
    def query(self, blocks, start, kind):
        """Side-effect-free verbs on any chain: lookup, touch, and a prepare_load that must fail."""
        digests, data = self.chain(blocks)
        digests, data = digests[start:], data[start:]
        before = self._snapshot()
        if kind == "lookup":
            n = self.idx.lookup(digests, data)
            assert n == self.model_lookup(digests)
            self.stats["lookups"] += 1
            self.stats["lookup_blocks"] += len(digests)
            self.stats["hit_blocks"] += n
        elif kind == "touch":
            self.idx.touch(digests)
        elif all(self.resident(d) for d in digests):
            return
        else:  # prepare_load of a chain with a block that is not resident raises and pins nothing
            with pytest.raises(KeyError, match="not host-resident"):
                self.idx.prepare_load(digests)
        assert self._snapshot() == before, f"{kind} changed block state"

    @rule(data=st.data(), through_host=st.booleans(), blocks=CHAINS, extra=EXTRA)
    def start_load(self, data, through_host, blocks, extra):
        """A request: GPU match, host lookup from where it ended, prepare_load of part of the hit."""
        digests, tokens = self._prompt(data, through_host, blocks, extra)
        self._load(digests, tokens, data)

    def _prompt(self, data, through_host, blocks, extra, prefer_parents=False) -> tuple[list[int], list[bytes]]:
        """A random chain or, with ``through_host``, one running through a host-resident block
        (the path from the root to it, plus ``extra`` blocks); ``prefer_parents`` picks a block
        with host children when there is one, so the new blocks get host siblings."""
        resident = sorted(d for d in self.host if self.resident(d))
        if not (through_host and resident):
            return self.chain(blocks)
        if prefer_parents:
            resident = [d for d in resident if self.children(d)] or resident
        d = data.draw(st.sampled_from(resident))
        path = []
        while d != ROOT:
            path.append(d)
            d = self.registry[d][0]
        digests = path[::-1]
        tokens = [self.registry[x][1] for x in digests]
        if extra:
            more, more_tokens = chain_digests(
                NAMESPACE, [t for i in extra for t in BLOCK_TOKENS[i]], parent=digests[-1])
            for x, b, p in zip(more, more_tokens, [digests[-1]] + more[:-1]):
                self.registry[x] = (p, b)
            digests, tokens = digests + more, tokens + more_tokens
        return digests, tokens

    def _load(self, digests: list[int], tokens: list[bytes], data) -> None:
        k = 0
        while k < len(digests) and digests[k] in self.gpu:
            k += 1
        rest, rest_tokens = digests[k:], tokens[k:]
        n = self.idx.lookup(rest, rest_tokens)
        assert n == self.model_lookup(rest)
        self.stats["lookups"] += 1
        self.stats["lookup_blocks"] += len(rest)
        self.stats["hit_blocks"] += n
        if n == 0:
            return
        m = data.draw(st.integers(1, n))
        slots = self.idx.prepare_load(rest[:m])
        assert slots == [self.host[d].slot for d in rest[:m]]
        for d in rest[:m]:
            self.host[d].pins += 1
        self.stats["loads"] += m
        self.loads.append(Load(tuple(rest[:m]), tuple(digests[:k])))

    @precondition(lambda self: self.loads)
    @rule(data=st.data(), ok=OUTCOMES)
    def finish_load(self, data, ok):
        i = data.draw(st.integers(0, len(self.loads) - 1))
        load = self.loads.pop(i)
        self.idx.complete_load(list(load.digests), ok)
        for d in load.digests:
            b = self.host[d]
            b.pins -= 1
            if ok:
                b.doomed = b.promoted = True
            else:
                self.stats["load_failures"] += 1
            self.settle(d)
        if ok:
            self.gpu.update(load.digests)
            self.promoted_on_gpu.update(load.digests)

    @rule(data=st.data(), n=st.integers(0, 4), kind=st.sampled_from(["evict"] * 3 + ["drop_subtree"]))
    def reclaim(self, data, n, kind):
        """``evict(n)``, or (less often: it empties whole subtrees) ``drop_subtree`` of any digest."""
        if kind == "evict":
            with self._expecting_evictions():
                got = self.idx.evict(n)
            assert got == len(self.evicted_now) <= n
            if got < n:
                assert not self.candidates(), "evict stopped while candidates were left"
            return
        d = data.draw(st.sampled_from(sorted(self.registry) + [ROOT]))
        freed = self.idx.drop_subtree(d)
        expect_freed = {self.host[c].slot for c in self._descendants(d) if self.host[c].pins == 0}
        assert sorted(freed) == sorted(expect_freed)
        self.doom_subtree(d, include_self=False)

    # ------------------------------------------------------------------ invariants
    def _descendants(self, d: int) -> list[int]:
        out, stack = [], self.children(d)
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(self.children(c))
        return out

    def _snapshot(self):
        alloc = self.idx.allocator
        return sorted((d, b.slot, b.state, b.doomed, b.candidate, alloc.pins(b.slot))
                      for d, b in self.idx._blocks.items())

    @invariant()
    def index_invariants(self):
        self.idx.check_invariants()

    @invariant()
    def index_equals_model(self):
        """No slot leak; pinned blocks keep their slot; states, doom and pins as predicted."""
        alloc = self.idx.allocator
        assert alloc.num_used == len(self.host), f"slot leak: {alloc.num_used} used, model {len(self.host)}"
        assert set(self.idx._blocks) == set(self.host)
        for d, m in self.host.items():
            b = self.idx._blocks[d]
            assert b.slot == m.slot, f"{b} moved from slot {m.slot}"
            assert alloc.pins(b.slot) == m.pins, f"{b} has {alloc.pins(b.slot)} pins, model {m.pins}"
            assert b.state is (BlockState.WRITING if m.state == "W" else BlockState.RESIDENT)
            assert (b.doomed, b.promoted) == (m.doomed, m.promoted), b
            assert b.candidate == self.is_candidate(d), (
                f"{b} candidate={b.candidate}; model: {m}, {len(self.children(d))} host children")
            assert b.parent == m.parent and b.tokens == m.tokens
            assert (d in self.idx) == self.present(d)
            assert self.idx.is_resident(d) == self.resident(d)
        assert self.idx.num_free_slots == self.NUM_SLOTS - len(self.host)

    @invariant()
    def exclusive_tiers(self):
        for d in self.promoted_on_gpu:
            assert d in self.gpu
            assert d not in self.idx and not self.idx.is_resident(d), "block loaded to GPU is still on host"
            assert self.idx.lookup([d], [self.registry[d][1]]) == 0
            self.stats["lookups"] += 1
            self.stats["lookup_blocks"] += 1

    @invariant()
    def prefix_closure(self):
        for d, b in self.idx._blocks.items():
            if b.doomed:
                continue
            p = b.parent
            assert p == ROOT or p in self.gpu or p in self.idx, (
                f"{b} is on host but its parent is in no tier")

    @invariant()
    def statistics_match_model(self):
        got = self.idx.stats.as_dict()
        want = {k: self.stats.get(k, 0) for k in got}
        assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}


HostIndexMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestHostIndexLRU = HostIndexMachine.TestCase


def _contract_policies() -> dict[str, object]:
    """Every policy the index can be built with, for the contract-only run (no LRU order check)."""
    out = {name: factory for name, factory in eviction.POLICIES.items()}
    belady = getattr(eviction, "BeladyPolicy", None)
    if belady is not None and "belady" not in out:
        out["belady"] = lambda: belady({})  # no future known: every block's next use is "never"
    return out


@pytest.mark.parametrize("policy_name", sorted(_contract_policies()))
def test_every_policy_keeps_the_index_contract(policy_name):
    factory = _contract_policies()[policy_name]

    class Machine(HostIndexMachine):
        CHECK_LRU_ORDER = policy_name == "lru"

        def _make_policy(self):
            return factory()

    run_state_machine_as_test(Machine, settings=settings(max_examples=25, stateful_step_count=40, deadline=None))


def test_evicting_a_sibling_does_not_make_the_new_blocks_parent_evictable():
    """Regression (found by the machine above): prepare_store(x, parent=p) on a full index whose
    LRU victim is p's only host child left p a candidate although x is now its child; a later
    eviction then removed p and orphaned x (prefix closure broken)."""
    ns = Namespace(model="test/regression", block_size=2)
    (a1, a2), (ta1, ta2) = chain_digests(ns, [1, 2, 1, 2])
    (b1, b2), (tb1, tb2) = chain_digests(ns, [3, 1, 3, 1])
    (_, x), (_, tx) = chain_digests(ns, [3, 1, 1, 2])
    idx = HostIndex(4)
    for d, p, t in ((a1, ns.root, ta1), (a2, a1, ta2), (b1, ns.root, tb1), (b2, b1, tb2)):
        idx.prepare_store(d, p, t)
        idx.complete_store(d, True)
    idx.touch([a2])                       # b2 is now the least recently used leaf
    assert idx.prepare_store(x, b1, tx) is not None
    assert b2 not in idx, "b2 was the LRU victim"
    assert not idx.get(b1).candidate, "b1 has a host child (x) and must not be an eviction candidate"
    idx.check_invariants()
    idx.complete_store(x, True)
    idx.evict(1)
    assert b1 in idx and x in idx, "b1 evicted while its child x stays on host"
    idx.check_invariants()


def test_failed_store_of_a_doomed_block_with_a_host_child_frees_it_once():
    """Regression (found by the machine above): d is being written when its parent leaves every
    tier (drop_subtree dooms d, still write-pinned); a child c is then stored under d; the copy
    of d fails.  complete_store unpinned d first, so removing c settled d (doomed, unpinned) and
    freed it, then the subtree loop freed d again (KeyError)."""
    ns = Namespace(model="test/regression", block_size=2)
    (d, c), (td, tc) = chain_digests(ns, [1, 2, 3, 4])
    idx = HostIndex(4)
    assert idx.prepare_store(d, ns.root, td) is not None
    idx.drop_subtree(ns.root)
    assert idx._blocks[d].doomed and d not in idx
    assert idx.prepare_store(c, d, tc) is not None
    idx.complete_store(c, True)
    idx.check_invariants()
    idx.complete_store(d, False)
    idx.check_invariants()
    assert len(idx) == 0 and idx.num_free_slots == 4
    assert (idx.stats.store_failures, idx.stats.dropped) == (1, 2)
