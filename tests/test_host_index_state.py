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
* ``hold_hit`` / ``end_hold``: the connector's lookup-time ``hold`` of a hit, ended by ``release``
  either alone (the request was not admitted) or after ``prepare_load`` of part of it (its load
  starts; the load's pins replace the hold, and the blocks may have left the host meanwhile);
* plus lookups from anywhere, touches, bad loads, ``drop_subtree`` of any digest and ``evict(n)``.

The same machine runs with ``keep_restored=True`` (``KeepRestoredMachine``): a successful load of a
block that is not doomed keeps it RESIDENT on host flagged ``on_gpu`` (``kept_restores``); an
unpinned ``on_gpu`` block, leaf or not, is no policy candidate and nobody's child (it left its
parent's children as a promotion would: the parent may become a leaf) but waits in the
kept-restore queue, which the model keeps itself, in order (a block goes to its end each time it
becomes unpinned).  ``prepare_store`` and ``evict(n)`` reclaim the queue's oldest block before
asking the policy (``promoted``, not an eviction; its host children stay, reachable through its GPU
copy; ``evict`` drains the whole queue before every policy victim and does not count it);
re-demoting an ``on_gpu`` block copies nothing (``kept_reused``, not ``refreshes``: it is its
parent's child and a policy block again).  ``drop_all`` dooms kept restores too.  Exclusivity
becomes: a block is in both tiers only when its host copy is flagged ``on_gpu`` (or the GPU
recomputed it past a host hit), and every ``on_gpu`` block (not doomed) is on the GPU.

The regression tests at the end are minimal sequences this machine found in tier/host_index.py,
then three hand-checked walks through kept restores (reclaimed before a policy victim, reused
without a copy, the queue's order).

The model predicts every return value and every statistic itself (slots, states, pins,
doomed/promoted, on_gpu, the kept-restore queue in order, which ``prepare_store`` evicts or
reclaims); only *which* candidate a policy picks is taken from the index (``on_evict``), and then
checked to be a legal candidate (LRU: the least recently used one).  The blocks a
``prepare_store`` or ``evict`` removes are checked in order (a listener on the index), every
step's RESIDENT arrivals and departures as a multiset.  After every step: ``check_invariants``,
the index equals the model block for block (no slot leak, pinned blocks never moved),
exclusivity, prefix closure and statistics.
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
    pins: int           # write pin + read pins + hold pins
    doomed: bool = False
    promoted: bool = False
    on_gpu: bool = False  # keep_restored: a load moved it to the GPU and the host copy stayed


@dataclass
class Load:
    digests: tuple[int, ...]
    gpu_prefix: tuple[int, ...]


@dataclass
class Hold:
    digests: tuple[int, ...]
    gpu_prefix: tuple[int, ...]


class HostIndexMachine(RuleBasedStateMachine):
    NUM_SLOTS = 4
    POLICY = "lru"
    CHECK_LRU_ORDER = True
    KEEP_RESTORED = False

    def __init__(self):
        super().__init__()
        self.idx = HostIndex(self.NUM_SLOTS, policy=self._make_policy(), on_evict=self._on_evict,
                             keep_restored=self.KEEP_RESTORED)
        self.idx_stored: list[int] = []    # the index's listener: blocks that became RESIDENT
        self.idx_removed: list[int] = []   # ... and RESIDENT blocks that left it, in order
        self.idx.add_listener(lambda b: self.idx_stored.append(b.digest),
                              lambda b: self.idx_removed.append(b.digest))
        self.host: dict[int, ModelBlock] = {}
        # keep_restored: the unpinned RESIDENT on_gpu blocks, oldest first (dict: insertion order)
        self.kept: dict[int, None] = {}
        self.gpu: set[int] = set()
        self.promoted_on_gpu: set[int] = set()  # moved host -> GPU by a load, not demoted since
        self.recomputed: set[int] = set()       # computed on the GPU while a host copy existed
        self.loads: list[Load] = []
        self.holds: list[Hold] = []
        self.stores: list[int] = []
        self.registry: dict[int, tuple[int, bytes]] = {}  # digest -> (parent, tokens)
        self.stats: Counter[str] = Counter()
        self.stored_log: list[int] = []    # the model's view of the listener's two logs
        self.removed_log: list[int] = []
        self.evicted_now: list[int] = []
        self.expect_evictions = False
        self.drain_before_evict = False

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

    def extend(self, parent: int, blocks: list[int]) -> tuple[list[int], list[bytes]]:
        """The chain of ``blocks`` continuing from ``parent`` (registered)."""
        digests, data = chain_digests(NAMESPACE, [t for i in blocks for t in BLOCK_TOKENS[i]], parent=parent)
        for x, b, p in zip(digests, data, [parent] + digests[:-1]):
            self.registry[x] = (p, b)
        return digests, data

    def children(self, d: int) -> list[int]:
        """The host children of ``d``: a kept restore (on_gpu) is nobody's child (it left its
        parent's children as an exclusive tier's promotion would)."""
        return [c for c, b in self.host.items() if b.parent == d and not b.on_gpu]

    def is_candidate(self, d: int) -> bool:
        """A policy candidate: an unpinned RESIDENT leaf, not doomed, not a kept restore."""
        b = self.host[d]
        return b.state == "R" and b.pins == 0 and not b.doomed and not b.on_gpu and not self.children(d)

    def is_kept(self, d: int) -> bool:
        """In the kept-restore queue: an unpinned on_gpu block (RESIDENT), leaf or not (its GPU
        copy keeps its host children reachable), not doomed."""
        b = self.host[d]
        return b.on_gpu and b.pins == 0 and not b.doomed

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
        if b.state == "R":
            self.removed_log.append(d)
        self.stats["evictions" if evicted else "promoted" if b.promoted else "dropped"] += 1
        if not b.on_gpu:         # (a kept restore left its parent's children when it was kept)
            self._detached(b.parent)

    def _detached(self, parent: int) -> None:
        """A child left ``parent``'s host children: the parent may have become a leaf."""
        if parent in self.host and not self.children(parent):
            self.settle(parent)

    def settle(self, d: int) -> None:
        """After a pin, state or child change: a doomed block goes at its last unpin; an on_gpu
        block enters the kept queue (at its end) when it becomes unpinned, and leaves it when it
        is pinned (or stops being on_gpu)."""
        b = self.host.get(d)
        if b is None:
            return
        if b.doomed:
            if b.pins == 0:
                self.remove(d, evicted=False)
        elif self.is_kept(d):
            self.kept.setdefault(d, None)
        else:
            self.kept.pop(d, None)

    def reclaim_kept(self) -> None:
        """``_reclaim_kept``: the oldest kept restore leaves the host (promoted, no eviction);
        its host children stay (their parent is on the GPU)."""
        d = next(iter(self.kept))
        del self.kept[d]
        self.host[d].promoted = True
        self.remove(d, evicted=False)

    def doom_subtree(self, root: int, include_self: bool) -> None:
        stack = [root] if include_self else self.children(root)
        order = []
        while stack:
            d = stack.pop()
            if d in self.host:
                order.append(d)
                stack.extend(self.children(d))
        for d in reversed(order):  # deepest first, as the index does
            b = self.host[d]
            if not b.doomed:      # an orphan (every caller here: drop_all is modelled apart), counted once
                self.stats["orphaned"] += 1
            b.doomed = True       # a pinned kept restore stays on_gpu (and nobody's child)
            self.kept.pop(d, None)
            if b.pins == 0:
                self.remove(d, evicted=False)

    def held_gpu(self) -> set[int]:
        return {d for r in (*self.loads, *self.holds) for d in r.gpu_prefix}

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
        if self.drain_before_evict:      # evict(n): every kept restore goes before a policy victim
            while self.kept:
                self.reclaim_kept()
        assert not self.kept, f"policy evicted {victim} while kept restores were reclaimable"
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
    def _expecting_evictions(self, drain_kept: bool = False):
        """Evictions are legal only inside this block; ``evicted_now`` lists them.  The blocks the
        index removes inside it must be the model's, in the same order."""
        self.expect_evictions, self.evicted_now, self.drain_before_evict = True, [], drain_kept
        idx_start, model_start = len(self.idx_removed), len(self.removed_log)
        try:
            yield
        finally:
            self.expect_evictions = self.drain_before_evict = False
        assert self.idx_removed[idx_start:] == self.removed_log[model_start:], (
            "removed other blocks than the model", self.idx_removed[idx_start:], self.removed_log[model_start:])

    # ------------------------------------------------------------------ rules
    @initialize(blocks=CHAINS)
    def warm_gpu(self, blocks):
        self.gpu.update(self.chain(blocks)[0])

    def _compute(self, digests: list[int]) -> None:
        self.recomputed.update(d for d in digests if d in self.host)
        self.gpu.update(digests)

    @rule(data=st.data(), through_host=st.booleans(), blocks=CHAINS, extra=EXTRA)
    def compute(self, data, through_host, blocks, extra):
        """A request computes its prompt on the GPU (also when part of it is on host: a host hit
        too short to be worth loading is recomputed, so a block can sit in both tiers)."""
        digests, _ = self._prompt(data, through_host, blocks, extra)
        self._compute(digests)

    @precondition(lambda self: any(self.resident(d) for d in self.host))
    @rule(data=st.data(), extra=st.lists(st.integers(0, len(BLOCK_TOKENS) - 1), min_size=1, max_size=2))
    def branch_and_demote(self, data, extra):
        """A request recomputes past a host-resident block, then GPU pressure demotes its new
        blocks (deepest first): new host children under a parent that has host children."""
        digests, _ = self._prompt(data, True, [], extra, prefer_parents=True)
        self._compute(digests)
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
        self.recomputed.discard(d)
        free = self.NUM_SLOTS - len(self.host)
        new = not (self.present(d) or d in self.host)
        # A new block's parent stops being a policy candidate before a slot is taken (the model's
        # candidates(exclude=parent)); a kept parent stays in the kept queue and may be reclaimed
        # for its own child (its GPU copy keeps the child reachable).
        with self._expecting_evictions():
            if self.present(d):   # found on host: nothing to copy (a kept restore is reused)
                expect, kind = None, "kept_reused" if self.host[d].on_gpu else "refreshes"
            elif d in self.host:
                expect, kind = None, "store_rejected"        # doomed copy still read-pinned
            elif free > 0:
                expect, kind = "slot", "inserts"
            elif self.kept:
                expect, kind = "slot", "inserts"             # the oldest kept restore's slot
                self.reclaim_kept()
            elif self.candidates(exclude=parent):
                expect, kind = "evict", "inserts"
            else:
                expect, kind = None, "store_rejected"
            slot = self.idx.prepare_store(d, parent, tokens)
        self.stats[kind] += 1
        assert len(self.evicted_now) == (1 if expect == "evict" else 0), (expect, self.evicted_now)
        if kind == "kept_reused":   # back among its parent's children and the policy's blocks
            self.host[d].on_gpu = False
            self.kept.pop(d, None)
        if new and expect is None:
            self.settle(parent)
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
    @rule(data=st.data(), ok=OUTCOMES, more=st.integers(0, 3))
    def finish_store(self, data, ok, more):
        """Copies in flight complete: one (``ok``), then up to ``more`` others (demotions come
        in batches; without batches the small host tier is mostly WRITING)."""
        self._finish_store(data.draw(st.sampled_from(self.stores)), ok)
        for _ in range(more):
            if not self.stores:
                break
            self._finish_store(data.draw(st.sampled_from(self.stores)), data.draw(OUTCOMES))

    def _finish_store(self, d: int, ok: bool) -> None:
        self.stores.remove(d)
        self.idx.complete_store(d, ok)
        b = self.host[d]
        if not ok:   # its host subtree is doomed while it still holds its write pin, then itself
            self.stats["store_failures"] += 1
            self.doom_subtree(d, include_self=False)
            b.doomed = True
        b.pins -= 1
        if ok and not b.doomed:   # a doomed block stays WRITING until it is freed (just below)
            b.state = "R"
            self.stored_log.append(d)
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
        hit = self._hit(data, through_host, blocks, extra)
        if hit is not None:
            self._prepare_load(*hit)

    @rule(data=st.data(), through_host=st.booleans(), blocks=CHAINS, extra=EXTRA, raced=st.booleans(),
          targeted=st.booleans())
    def hold_hit(self, data, through_host, blocks, extra, raced, targeted):
        """The connector's lookup: its hit is held until the request's load starts.  ``raced``:
        another request with the same hit loads it meanwhile (keep_restored: the held blocks
        become on_gpu, and the held request's ``prepare_load`` pins on_gpu blocks; exclusive:
        they are doomed, so that ``prepare_load`` fails).  ``targeted``: a request that surely
        hits (``_loadable_hit``) rather than a random one."""
        if targeted and self.loadable():
            hit = self._loadable_hit(data)
        else:
            hit = self._hit(data, through_host, blocks, extra)
        if hit is None:
            return
        digests, gpu_prefix = hit
        self.idx.hold(list(digests))
        for d in digests:
            self.host[d].pins += 1
            self.kept.pop(d, None)
        self.stats["holds"] += len(digests)
        self.holds.append(Hold(digests, gpu_prefix))
        if raced:
            self._prepare_load(digests, gpu_prefix)
            self._finish_load(len(self.loads) - 1, True)

    @precondition(lambda self: self.loadable())
    @rule(data=st.data(), then=st.sampled_from(["stay", "continue", "continue", "redemote", "redemote",
                                                "evict", "evict", "pool_gone", "pool_gone_midway"]),
          more=st.lists(st.integers(0, len(BLOCK_TOKENS) - 1), min_size=1, max_size=2))
    def restore(self, data, then, more):
        """A request whose GPU match ends where a host hit starts restores it at once
        (``complete_load`` ok), then either stays, or ``continue``s: computes ``more`` blocks past
        the restored ones, which GPU pressure demotes at once (deepest first: new host children
        of the restored blocks, which keep_restored may have kept), or ``redemote``s: the GPU
        evicts the restored blocks again (deepest first, while they are GPU leaves), or the
        host tier is asked to ``evict`` some blocks, or its pool is gone (``drop_all``) after the
        load or while it is in flight (``pool_gone_midway``: the loaded blocks are doomed)."""
        digests, gpu_prefix = self._loadable_hit(data)
        self._prepare_load(digests, gpu_prefix)
        if then == "pool_gone_midway":
            self._drop_all()
        self._finish_load(len(self.loads) - 1, True)
        if then == "evict":
            self._evict(data.draw(st.integers(0, 2)))
        elif then == "pool_gone":
            self._drop_all()
        if then == "continue":
            new, _ = self.extend(digests[-1], more)
            self._compute(list(gpu_prefix + digests) + new)
            victims = new
        elif then == "redemote":
            victims = list(digests)
        else:
            return
        for d in reversed(victims):
            if d not in self.gpu_leaves():
                break
            self._demote(d)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), admitted=st.booleans())
    def end_hold(self, data, admitted):
        """The held request's load starts (``prepare_load`` of part of the hit, then ``release``),
        or it was not admitted (``release`` only).  The hit may have been doomed meanwhile, or
        (keep_restored) moved to the GPU by another request's load: on_gpu blocks are loaded too."""
        hold = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))
        if admitted:
            h = data.draw(st.integers(1, len(hold.digests)))
            if all(self.resident(d) for d in hold.digests[:h]):
                self._prepare_load(hold.digests[:h], hold.gpu_prefix)
            else:
                with pytest.raises(KeyError, match="not host-resident"):
                    self.idx.prepare_load(list(hold.digests[:h]))
        self.idx.release(list(hold.digests))
        for d in hold.digests:
            self.host[d].pins -= 1
            self.settle(d)

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
            more, more_tokens = self.extend(digests[-1], extra)
            digests, tokens = digests + more, tokens + more_tokens
        return digests, tokens

    def _hit(self, data, through_host, blocks, extra) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """A request's GPU match, then ``lookup`` from where it ended: (part of the host hit, the
        GPU prefix the request holds), or None without a host hit."""
        digests, tokens = self._prompt(data, through_host, blocks, extra)
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
            return None
        m = data.draw(st.integers(1, n))
        return tuple(rest[:m]), tuple(digests[:k])

    def loadable(self) -> list[int]:
        """Host-resident blocks a request can start loading at: not on the GPU, their parent is."""
        return sorted(d for d, b in self.host.items()
                      if self.resident(d) and d not in self.gpu and (b.parent == ROOT or b.parent in self.gpu))

    def _loadable_hit(self, data) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Like ``_hit``, for a request that surely hits: its GPU match ends at a ``loadable``
        block and it continues down host-resident children."""
        d = data.draw(st.sampled_from(self.loadable()))
        rest = [d]
        while data.draw(st.booleans()):
            kids = sorted(c for c in self.children(rest[-1]) if self.resident(c))
            if not kids:
                break
            rest.append(data.draw(st.sampled_from(kids)))
        prefix, p = [], self.registry[d][0]
        while p != ROOT:
            prefix.append(p)
            p = self.registry[p][0]
        n = self.idx.lookup(rest, [self.registry[x][1] for x in rest])
        assert n == self.model_lookup(rest) == len(rest)
        self.stats["lookups"] += 1
        self.stats["lookup_blocks"] += n
        self.stats["hit_blocks"] += n
        m = data.draw(st.integers(1, n))
        return tuple(rest[:m]), tuple(prefix[::-1])

    def _prepare_load(self, digests: tuple[int, ...], gpu_prefix: tuple[int, ...]) -> None:
        slots = self.idx.prepare_load(list(digests))
        assert slots == [self.host[d].slot for d in digests]
        for d in digests:
            self.host[d].pins += 1
            self.kept.pop(d, None)
        self.stats["loads"] += len(digests)
        self.loads.append(Load(digests, gpu_prefix))

    @precondition(lambda self: self.loads)
    @rule(data=st.data(), ok=OUTCOMES)
    def finish_load(self, data, ok):
        self._finish_load(data.draw(st.integers(0, len(self.loads) - 1)), ok)

    def _finish_load(self, i: int, ok: bool) -> None:
        load = self.loads.pop(i)
        self.idx.complete_load(list(load.digests), ok)
        for d in load.digests:
            b = self.host[d]
            b.pins -= 1
            if ok and self.KEEP_RESTORED and not b.doomed:   # the host copy stays, flagged
                if not b.on_gpu:   # and leaves its parent's children, as a promotion would
                    self.stats["kept_restores"] += 1
                    b.on_gpu = True
                    self._detached(b.parent)
            elif ok:
                b.doomed = b.promoted = True
            else:
                self.stats["load_failures"] += 1
            self.settle(d)
        if ok:
            self.gpu.update(load.digests)
            self.promoted_on_gpu.update(load.digests)

    @rule(data=st.data(), n=st.integers(0, 4),
          kind=st.sampled_from(["evict"] * 6 + ["drop_subtree"] * 2 + ["drop_all"]))
    def reclaim(self, data, n, kind):
        """``evict(n)``, or (less often: it empties whole subtrees) ``drop_subtree`` of any digest,
        or (rarely) ``drop_all``.  ``evict`` reclaims every kept restore before each policy
        victim, uncounted."""
        if kind == "evict":
            self._evict(n)
        elif kind == "drop_all":
            self._drop_all()
        else:
            d = data.draw(st.sampled_from(sorted(self.registry) + [ROOT]))
            freed = self.idx.drop_subtree(d)
            expect_freed = {self.host[c].slot for c in self._descendants(d) if self.host[c].pins == 0}
            assert sorted(freed) == sorted(expect_freed)
            self.doom_subtree(d, include_self=False)

    def _evict(self, n: int) -> None:
        with self._expecting_evictions(drain_kept=True):
            got = self.idx.evict(n)
            if got < n:          # the policy ran dry: the loop drained the kept queue first
                while self.kept:
                    self.reclaim_kept()
        assert got == len(self.evicted_now) <= n
        if got < n:
            assert not self.candidates(), "evict stopped while candidates were left"

    def _drop_all(self) -> None:
        """The pool is gone: every block is doomed (kept restores too), freed at its last unpin."""
        n_live = sum(not b.doomed for b in self.host.values())
        assert self.idx.drop_all() == n_live
        self.stats["dropped_all"] += n_live
        for d in list(self.host):
            if d in self.host:
                self.host[d].doomed = True
                self.kept.pop(d, None)
                self.settle(d)

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
        return (sorted((d, b.slot, b.state, b.doomed, b.candidate, b.on_gpu, alloc.pins(b.slot))
                       for d, b in self.idx._blocks.items()), list(self.idx._kept))

    @invariant()
    def index_invariants(self):
        self.idx.check_invariants()

    @invariant()
    def index_equals_model(self):
        """No slot leak; pinned blocks keep their slot; states, doom, pins, on_gpu and the
        kept-restore queue (in order) as predicted."""
        alloc = self.idx.allocator
        assert alloc.num_used == len(self.host), f"slot leak: {alloc.num_used} used, model {len(self.host)}"
        assert set(self.idx._blocks) == set(self.host)
        for d, m in self.host.items():
            b = self.idx._blocks[d]
            assert b.slot == m.slot, f"{b} moved from slot {m.slot}"
            assert alloc.pins(b.slot) == m.pins, f"{b} has {alloc.pins(b.slot)} pins, model {m.pins}"
            assert b.state is (BlockState.WRITING if m.state == "W" else BlockState.RESIDENT)
            assert (b.doomed, b.promoted, b.on_gpu) == (m.doomed, m.promoted, m.on_gpu), (b, m)
            assert b.candidate == self.is_candidate(d), (
                f"{b} candidate={b.candidate}; model: {m}, {len(self.children(d))} host children")
            assert b.parent == m.parent and b.tokens == m.tokens
            assert (d in self.idx) == self.present(d)
            assert self.idx.is_resident(d) == self.resident(d)
        assert set(self.kept) == {d for d in self.host if self.is_kept(d)}, "model kept queue inconsistent"
        assert list(self.idx._kept) == list(self.kept), (
            f"kept-restore queue {list(self.idx._kept)}, model {list(self.kept)}")
        assert self.idx.num_free_slots == self.NUM_SLOTS - len(self.host)

    @invariant()
    def listeners_match_model(self):
        """The routing feed saw exactly the model's RESIDENT arrivals and departures."""
        assert Counter(self.idx_stored) == Counter(self.stored_log), (self.idx_stored, self.stored_log)
        assert Counter(self.idx_removed) == Counter(self.removed_log), (self.idx_removed, self.removed_log)
        for log in (self.idx_stored, self.idx_removed, self.stored_log, self.removed_log):
            log.clear()

    @invariant()
    def exclusive_tiers(self):
        for d in self.promoted_on_gpu:
            assert d in self.gpu
            if self.KEEP_RESTORED and self.present(d):   # a kept restore: still on host, flagged
                assert self.host[d].on_gpu, f"{d:032x} loaded to GPU, on host but not on_gpu"
                assert self.idx.lookup([d], [self.registry[d][1]]) == 1
                self.stats["hit_blocks"] += 1
            else:
                assert d not in self.idx and not self.idx.is_resident(d), "block loaded to GPU is still on host"
                assert self.idx.lookup([d], [self.registry[d][1]]) == 0
            self.stats["lookups"] += 1
            self.stats["lookup_blocks"] += 1
        for d in self.gpu:   # both tiers only when recomputed past a host hit, or kept (flagged)
            if self.present(d):
                assert d in self.recomputed or self.idx.get(d).on_gpu, f"{self.idx.get(d)} in both tiers"
        for d, b in self.host.items():   # (a doomed one may have left the GPU: it is invisible)
            if b.on_gpu:
                assert self.KEEP_RESTORED and b.state == "R" and (b.doomed or d in self.gpu), (
                    f"{d:032x} on_gpu but {b}")

    @invariant()
    def prefix_closure(self):
        for b in self.idx._blocks.values():
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


class KeepRestoredMachine(HostIndexMachine):
    """The same flows with ``keep_restored=True``: loads leave the host copy (``on_gpu``)."""

    KEEP_RESTORED = True


HostIndexMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestHostIndexLRU = HostIndexMachine.TestCase
KeepRestoredMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestHostIndexLRUKeepRestored = KeepRestoredMachine.TestCase


def _contract_policies() -> dict[str, object]:
    """Every policy the index can be built with, for the contract-only run (no LRU order check)."""
    out = {name: factory for name, factory in eviction.POLICIES.items()}
    belady = getattr(eviction, "BeladyPolicy", None)
    if belady is not None and "belady" not in out:
        out["belady"] = lambda: belady({})  # no future known: every block's next use is "never"
    return out


@pytest.mark.parametrize("keep_restored", [False, True], ids=["exclusive", "keep_restored"])
@pytest.mark.parametrize("policy_name", sorted(_contract_policies()))
def test_every_policy_keeps_the_index_contract(policy_name, keep_restored):
    factory = _contract_policies()[policy_name]

    class Machine(HostIndexMachine):
        CHECK_LRU_ORDER = policy_name == "lru"
        KEEP_RESTORED = keep_restored

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


def _stored(idx: HostIndex, chain: list[tuple[int, int, bytes]]) -> None:
    for d, p, t in chain:
        assert idx.prepare_store(d, p, t) is not None
        idx.complete_store(d, True)


def test_keep_restored_reclaims_the_kept_copy_before_a_policy_victim():
    """keep_restored: a loaded chain stays on host (on_gpu: out of the policy's reach and out of
    its parent's children); when a store needs a slot the oldest kept restore is reclaimed
    (promoted, not evicted) although a policy candidate exists: a1 first, although a2 descends
    from it (a1's GPU copy keeps a2 reachable), then a2; only then does the policy pick a victim."""
    ns = Namespace(model="test/keep", block_size=2)
    (a1, a2), (ta1, ta2) = chain_digests(ns, [1, 2, 1, 2])
    (b1, b2), (tb1, tb2) = chain_digests(ns, [3, 1, 3, 1])
    (c1, c2, c3), (tc1, tc2, tc3) = chain_digests(ns, [5, 6, 5, 6, 5, 6])
    evicted = []
    idx = HostIndex(4, keep_restored=True, on_evict=lambda b: evicted.append(b.digest))
    _stored(idx, [(a1, ns.root, ta1), (a2, a1, ta2)])
    assert idx.prepare_load([a1, a2]) == [idx.get(a1).slot, idx.get(a2).slot]
    idx.complete_load([a1, a2], True)
    assert idx.is_resident(a1) and idx.is_resident(a2), "keep_restored leaves the host copy"
    assert idx.get(a1).on_gpu and idx.get(a2).on_gpu
    assert not idx.get(a1).candidate and not idx.get(a2).candidate
    assert list(idx._kept) == [a1, a2], "kept restores wait outside the policy, oldest first"
    assert (idx.stats.kept_restores, idx.stats.promoted) == (2, 0)
    idx.check_invariants()
    _stored(idx, [(b1, ns.root, tb1), (b2, b1, tb2)])     # the host is full now
    assert idx.num_free_slots == 0 and idx.get(b2).candidate

    slot_a1 = idx.get(a1).slot
    assert idx.prepare_store(c1, ns.root, tc1) == slot_a1, "the oldest kept copy's slot is reused"
    assert a1 not in idx and a2 in idx and b2 in idx
    assert (idx.stats.evictions, idx.stats.promoted, evicted) == (0, 1, [])
    assert list(idx._kept) == [a2] and idx.lookup([a2], [ta2]) == 1, "a2 stays (a1 is on the GPU)"
    idx.complete_store(c1, True)
    idx.check_invariants()

    slot_a2 = idx.get(a2).slot
    assert idx.prepare_store(c2, c1, tc2) == slot_a2
    assert a2 not in idx and not idx._kept
    assert (idx.stats.evictions, idx.stats.promoted, evicted) == (0, 2, [])
    idx.complete_store(c2, True)

    assert idx.prepare_store(c3, c2, tc3) is not None      # no kept copy left: the policy's turn
    assert evicted == [b2] and (idx.stats.evictions, idx.stats.promoted) == (1, 2)
    idx.complete_store(c3, True)
    idx.check_invariants()
    assert (idx.stats.kept_reused, idx.stats.inserts, idx.stats.dropped) == (0, 7, 0)


def test_keep_restored_redemotion_of_a_kept_block_copies_nothing():
    """keep_restored: the GPU evicts a block it restored from host; prepare_store finds the kept
    copy (same bytes), copies nothing (kept_reused, not a refresh) and hands the block back to the
    policy and to its parent's children."""
    ns = Namespace(model="test/keep", block_size=2)
    (a1, a2), (ta1, ta2) = chain_digests(ns, [1, 2, 3, 4])
    idx = HostIndex(2, keep_restored=True)
    _stored(idx, [(a1, ns.root, ta1), (a2, a1, ta2)])
    idx.prepare_load([a1, a2])
    idx.complete_load([a1, a2], True)
    slot = idx.get(a2).slot
    assert list(idx._kept) == [a1, a2]

    assert idx.prepare_store(a2, a1, ta2) is None, "no copy: the host already holds the bytes"
    b = idx.get(a2)
    assert (b.slot, b.state, b.on_gpu, b.candidate) == (slot, BlockState.RESIDENT, False, True)
    assert idx.allocator.pins(slot) == 0 and list(idx._kept) == [a1], "a2 left the kept queue"
    assert (idx.stats.inserts, idx.stats.refreshes, idx.stats.kept_reused, idx.stats.kept_restores) == (2, 0, 1, 2)
    idx.check_invariants()
    assert idx.prepare_store(a2, a1, ta2) is None, "present (no longer kept): a refresh"
    assert (idx.stats.refreshes, idx.stats.kept_reused) == (1, 1)

    # the parent is still a kept restore (on the GPU too): evict(1) reclaims it uncounted, then
    # takes a2 as the policy's victim
    assert idx.get(a1).on_gpu and not idx.get(a1).candidate and list(idx._kept) == [a1]
    assert idx.evict(1) == 1 and a1 not in idx and a2 not in idx
    assert (idx.stats.promoted, idx.stats.evictions) == (1, 1) and len(idx) == 0
    idx.check_invariants()


def test_keep_restored_queue_order_is_when_each_block_became_unpinned():
    """keep_restored: the kept-restore queue is ordered by when each block was last unpinned (a
    hold's release or a load's completion puts it at the end); a child leaving a kept block's
    children (a failed store, a child kept in turn) does not move it."""
    ns = Namespace(model="test/keep", block_size=2)
    (x,), (tx,) = chain_digests(ns, [7, 7])
    (a1, c1), (ta1, tc1) = chain_digests(ns, [1, 2, 3, 4])
    (_, c2), (_, tc2) = chain_digests(ns, [1, 2, 5, 6])
    idx = HostIndex(4, keep_restored=True)
    _stored(idx, [(a1, ns.root, ta1), (x, ns.root, tx)])
    for d in (a1, x):
        idx.prepare_load([d])
        idx.complete_load([d], True)
    assert list(idx._kept) == [a1, x]
    assert idx.prepare_store(c1, a1, tc1) is not None       # a child of the kept a1 ...
    idx.complete_store(c1, False)                           # ... whose copy fails: it leaves
    assert c1 not in idx and list(idx._kept) == [a1, x]
    _stored(idx, [(c2, a1, tc2)])
    assert idx.get(c2).candidate, "a leaf under a kept parent is the policy's"
    idx.prepare_load([c2])
    idx.complete_load([c2], True)                           # c2 kept: it leaves a1's children
    assert list(idx._kept) == [a1, x, c2]
    idx.check_invariants()
    idx.hold([a1])                                          # pinned: out of the queue ...
    assert list(idx._kept) == [x, c2]
    idx.release([a1])                                       # ... and back at its end
    assert list(idx._kept) == [x, c2, a1]
    idx.prepare_load([x])                                   # a load of a kept block (on GPU too)
    idx.complete_load([x], False)                           # fails: still kept, at the end
    assert list(idx._kept) == [c2, a1, x] and idx.get(x).on_gpu
    assert (idx.stats.kept_restores, idx.stats.load_failures) == (3, 1)
    idx.check_invariants()
    assert idx.evict(1) == 0 and len(idx) == 0, "evict drains the kept queue, counting none"
    assert (idx.stats.promoted, idx.stats.evictions) == (3, 0)
    idx.check_invariants()


def test_orphans_are_counted_once_each_when_doomed_never_for_drop_all():
    """``stats.orphaned``: every block doomed because a host ancestor left every tier (``drop_subtree``,
    a failed store's subtree), once, a pinned one included (it leaves at its last unpin, uncounted
    again); the blocks ``drop_all`` dooms with the pool are not orphans."""
    ns = Namespace(model="orphans", block_size=2)
    idx = HostIndex(8, policy="lru")
    (a, b, c), tokens = chain_digests(ns, list(range(6)))
    _stored(idx, [(a, ns.root, tokens[0]), (b, a, tokens[1]), (c, b, tokens[2])])
    idx.hold([c])                                   # c pinned: doomed now, freed at its release
    b_slot = idx.get(b).slot
    assert idx.drop_subtree(a) == [b_slot]
    assert idx.stats.orphaned == 2 and len(idx) == 2   # a (it stays) and c (doomed, pinned)
    idx.drop_subtree(a)                             # already doomed: not again
    idx.release([c])
    assert idx.stats.orphaned == 2 and len(idx) == 1
    idx.evict(1)
    # a failed store dooms the blocks stored under it meanwhile: orphans too (the block itself is a failure)
    p, q = chain_digests(ns, list(range(100, 104)))[0]
    idx.prepare_store(p, ns.root, b"p")
    idx.prepare_store(q, p, b"q")
    idx.complete_store(q, True)
    idx.complete_store(p, False)
    assert idx.stats.orphaned == 3 and idx.stats.store_failures == 1 and len(idx) == 0
    _stored(idx, [(a, ns.root, tokens[0]), (b, a, tokens[1])])
    assert idx.drop_all() == 2 and idx.stats.orphaned == 3
    idx.check_invariants()


@pytest.mark.parametrize("keep_restored", [False, True])
def test_a_corrupt_block_leaves_with_its_subtree_and_is_stored_again_afresh(keep_restored):
    """``drop_corrupt``: a block a worker found corrupt (checksum) leaves the index with its host
    subtree (orphans); pinned by a reader it is doomed and freed at its last unpin. The same block,
    recomputed by the GPU and evicted again, then gets a fresh slot (before the fix it was "already
    present", so the corrupt copy was never replaced)."""
    ns = Namespace(model="corrupt", block_size=2)
    idx = HostIndex(8, policy="lru", keep_restored=keep_restored)
    (a, b, c), tokens = chain_digests(ns, list(range(6)))
    _stored(idx, [(a, ns.root, tokens[0]), (b, a, tokens[1]), (c, b, tokens[2])])
    slot_b = idx.get(b).slot
    idx.prepare_load([a, b])                       # the load the worker refuses
    idx.complete_load([a, b], success=False)       # the failure alone keeps the blocks (a transient copy error)
    assert idx.is_resident(b) and idx.prepare_store(b, a, tokens[1]) is None
    idx.prepare_load([a, b])
    idx.hold([b])                                  # a second reader still pins b
    assert idx.drop_corrupt([b]) == 1 and idx.drop_corrupt([b]) == 0
    assert not idx.is_resident(b) and c not in idx and idx.is_resident(a)
    assert idx.stats.corrupt == 1 and idx.stats.orphaned == 1
    idx.complete_load([a, b], success=False)
    idx.release([b])
    idx.check_invariants()
    assert len(idx) == 1 and idx.allocator.is_used(slot_b) is False
    fresh = idx.prepare_store(b, a, tokens[1])     # the recomputed block is demoted again
    assert fresh is not None
    idx.complete_store(b, True)
    assert idx.lookup([a, b], tokens[:2], parent=ns.root) == 2
    idx.check_invariants()


@pytest.mark.parametrize("policy", sorted(eviction.POLICIES))
def test_hold_chain_protects_the_whole_hit_with_a_few_pins(policy):
    """A lookup's hit is held by pinning only the blocks that could leave while the rest stays (the deepest
    one, kept restores and the blocks just above them): every slot taken afterwards by stores, all kept copies
    reclaimable and every candidate evictable, the hit is still whole, and it loads."""
    ns = Namespace(model="test/hold", block_size=2)
    hit, tokens = chain_digests(ns, [1, 2] * 6)                 # six blocks
    branch, tbranch = chain_digests(ns, [1, 2] * 6 + [9, 9])    # a seventh block under the last one
    idx = HostIndex(12, policy=policy, keep_restored=True)
    _stored(idx, [(d, p, t) for d, p, t in zip(hit, (ns.root, *hit[:-1]), tokens)])
    _stored(idx, [(branch[6], hit[5], tbranch[6])])
    idx.prepare_load([hit[2]])                                   # block 2 restored once: a kept restore
    idx.complete_load([hit[2]], True)
    assert idx.get(hit[2]).on_gpu and idx.get(hit[1]).candidate, "its parent no longer counts it as a child"
    pinned = idx.hold_chain(hit)
    assert set(pinned) == {hit[1], hit[2], hit[5]}, "the block above the kept one, the kept one, the deepest"
    others = chain_digests(ns, [7, 7] * 12)
    stored = 0
    for d, p, t in zip(others[0], (ns.root, *others[0][:-1]), others[1]):   # fill every slot it can take
        if idx.prepare_store(d, p, t) is None:
            break
        idx.complete_store(d, True)
        stored += 1
    assert stored >= 12 - len(hit)
    idx.evict(12)
    assert idx.lookup(hit, tokens) == len(hit), "a block of the held hit left the host tier"
    idx.release(pinned)
    assert len(idx.prepare_load(hit)) == len(hit)
    idx.complete_load(hit, True)
    idx.check_invariants()


@pytest.mark.parametrize("access", ["redemotion", "failed_load"])
def test_lru_an_access_to_the_older_block_makes_the_other_the_victim(access):
    """A block the GPU evicts again while its host copy is present copies nothing but counts as an access;
    so does prepare_load, even when the load then fails and the block stays on host: the next store's LRU
    victim is the other block."""
    ns = Namespace(model="test/lru", block_size=2)
    (a,), (ta,) = chain_digests(ns, [1, 2])
    (b,), (tb,) = chain_digests(ns, [3, 4])
    (c,), (tc,) = chain_digests(ns, [5, 6])
    evicted = []
    idx = HostIndex(2, policy="lru", on_evict=lambda blk: evicted.append(blk.digest))
    _stored(idx, [(a, ns.root, ta), (b, ns.root, tb)])      # a is the older one
    before = idx.get(a).last_access
    if access == "redemotion":
        assert idx.prepare_store(a, ns.root, ta) is None and idx.stats.refreshes == 1
    else:
        idx.prepare_load([a])
        idx.complete_load([a], success=False)
    assert idx.get(a).last_access > idx.get(b).last_access > before
    _stored(idx, [(c, ns.root, tc)])
    assert evicted == [b] and a in idx and b not in idx
    idx.check_invariants()


def test_failed_primary_copy_hands_over_to_a_written_spare_before_one_in_flight():
    """Second chance: when the first copy fails and one spare copy has landed while another is still in
    flight, the block lives on in the landed one and is RESIDENT at once; the late spare is freed."""
    ns = Namespace(model="test/spare", block_size=2)
    (d,), (td,) = chain_digests(ns, [1, 2])
    idx = HostIndex(8)
    assert idx.prepare_store(d, ns.root, td) is not None     # first copy in flight
    s1 = idx.prepare_spare(d, td)
    idx.complete_store(d, True, slot=s1)                    # a second copy landed
    s2 = idx.prepare_spare(d, td)                           # a third copy still in flight
    idx.complete_store(d, False)                            # the first copy failed
    assert idx.is_resident(d) and idx.get(d).slot == s1
    assert idx.lookup([d], [td], parent=ns.root) == 1
    assert (idx.stats.second_chances, idx.stats.store_failures) == (1, 1)
    idx.complete_store(d, True, slot=s2)                    # the late copy is no longer needed
    assert idx.get(d).slot == s1 and idx.num_free_slots == 7
    idx.check_invariants()


def test_keep_restored_redemotion_of_a_kept_leaf_makes_its_parent_a_parent_again():
    """keep_restored: a child restored alone leaves its parent's children (the parent becomes a leaf);
    when the GPU evicts the child again it is the parent's child once more, so the parent is no eviction
    candidate: eviction takes the child first (leaf first) and the chain stays whole on host."""
    ns = Namespace(model="test/keep", block_size=2)
    (p, c), (tp, tc) = chain_digests(ns, [1, 2, 3, 4])
    idx = HostIndex(4, policy="lru", keep_restored=True)
    _stored(idx, [(p, ns.root, tp), (c, p, tc)])
    idx.prepare_load([c])
    idx.complete_load([c], True)                            # c kept (on the GPU too): p is a leaf now
    assert idx.get(c).on_gpu and idx.get(p).candidate
    assert idx.prepare_store(c, p, tc) is None              # the GPU evicts c again: nothing copied
    assert not idx.get(p).candidate and idx.get(c).candidate
    idx.check_invariants()
    assert idx.evict(1) == 1 and p in idx and c not in idx
    assert idx.lookup([p], [tp], parent=ns.root) == 1
    idx.check_invariants()


def test_a_spare_copy_reported_twice_is_refused():
    """A spare's completion is accepted once: a second report (a duplicated worker result) raises before
    it unpins or frees anything, as any completion of a copy that is not in flight does."""
    ns = Namespace(model="test/spare", block_size=2)
    (d,), (td,) = chain_digests(ns, [1, 2])
    idx = HostIndex(8)
    assert idx.prepare_store(d, ns.root, td) is not None
    s1 = idx.prepare_spare(d, td)
    idx.complete_store(d, True, slot=s1)
    free = idx.num_free_slots
    with pytest.raises(KeyError, match="not a spare being written"):
        idx.complete_store(d, True, slot=s1)
    assert idx.num_free_slots == free
    idx.complete_store(d, True)
    idx.check_invariants()
