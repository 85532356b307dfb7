"""A digest collision never returns a wrong block: the index compares stored token bytes."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.tier import digest as digest_mod
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.host_index import BlockState, HostIndex

NS = Namespace(model="test/collision", block_size=4)


def _store_chain(idx: HostIndex, digests, blocks, parent=None) -> list[int]:
    parent = NS.root if parent is None else parent
    slots = []
    for d, b in zip(digests, blocks):
        slot = idx.prepare_store(d, parent, b)
        assert slot is not None
        idx.complete_store(d, True)
        slots.append(slot)
        parent = d
    return slots


def _tokens(*blocks):
    return [t for b in blocks for t in b]


A1, A2, A3 = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
B2 = [50, 60, 70, 80]


def test_lookup_under_a_chosen_colliding_digest_returns_nothing():
    """A block stored under digest D; another block's request carries the same D."""
    idx = HostIndex(4)
    (d1,), (t1,) = chain_digests(NS, A1)
    _store_chain(idx, [d1], [t1])
    (_,), (other,) = chain_digests(NS, B2)
    assert other != t1
    assert idx.lookup([d1], [other]) == 0
    assert idx.stats.verify_mismatches == 1
    assert idx.stats.hit_blocks == 0
    assert idx.lookup([d1], [t1]) == 1  # the genuine owner still hits


def test_prepare_store_refuses_to_overwrite_a_colliding_block():
    idx = HostIndex(4)
    (d1,), (t1,) = chain_digests(NS, A1)
    (slot,) = _store_chain(idx, [d1], [t1])
    (_,), (other,) = chain_digests(NS, B2)
    before = (idx.num_free_slots, idx.stats.inserts, idx.stats.refreshes)
    assert idx.prepare_store(d1, NS.root, other) is None
    b = idx.get(d1)
    assert (b.tokens, b.slot, b.state) == (t1, slot, BlockState.RESIDENT), "colliding store overwrote the block"
    assert (idx.num_free_slots, idx.stats.inserts, idx.stats.refreshes) == before
    assert idx.stats.verify_mismatches == 1
    idx.check_invariants()


def test_prepare_store_collision_under_another_parent_keeps_the_tree():
    """The colliding block claims another parent: the stored block keeps its own."""
    idx = HostIndex(4)
    (a1, a2), (t1, t2) = chain_digests(NS, _tokens(A1, A2))
    _store_chain(idx, [a1, a2], [t1, t2])
    (b1,), _ = chain_digests(NS, [40, 41, 42, 43])
    assert idx.prepare_store(a2, b1, digest_mod.encode_tokens(B2)) is None
    assert idx.get(a2).parent == a1
    assert b1 not in idx._children
    idx.check_invariants()


@pytest.fixture
def weak_digest(monkeypatch):
    """Make every chained digest collide: hash only the parent and the *first* token of a block.

    The index is left as it is; whatever it returns must still be the request's own blocks.
    """
    real = digest_mod._xxh3_128

    def weak(data: bytes, seed: int = 0) -> int:
        return real(data[:digest_mod.DIGEST_BYTES + 4], seed)

    monkeypatch.setattr(digest_mod, "_xxh3_128", weak)


def test_forced_chain_collision_stops_the_lookup_at_the_colliding_block(weak_digest):
    # A and B share block 1 and the first token of block 2, so block 2 (and every later block)
    # collides; the tokens differ from block 2 on.
    b2 = [A2[0], 99, 98, 97]
    da, ta = chain_digests(NS, _tokens(A1, A2, A3))
    db, tb = chain_digests(NS, _tokens(A1, b2, A3))
    assert da == db, "the weak digest must make the chains collide"
    assert ta[1] != tb[1]
    idx = HostIndex(8)
    _store_chain(idx, da, ta)
    n = idx.lookup(db, tb)
    assert n == 1, "only the genuinely shared first block may match"
    assert idx.stats.verify_mismatches == 1
    slots = idx.prepare_load(db[:n])
    for d, s in zip(db[:n], slots):
        blk = idx.get(d)
        assert blk.slot == s and blk.tokens == tb[db.index(d)], "a loaded slot holds another prompt's tokens"
    idx.complete_load(db[:n], success=False)
    # B's blocks cannot take A's place either.
    assert idx.prepare_store(db[1], db[0], tb[1]) is None
    assert idx.get(db[1]).tokens == ta[1]
    idx.check_invariants()


def test_without_verification_the_collision_would_return_the_wrong_block(weak_digest):
    """Control: the same collision with verify_tokens off matches the wrong blocks."""
    b2 = [A2[0], 99, 98, 97]
    da, ta = chain_digests(NS, _tokens(A1, A2, A3))
    db, tb = chain_digests(NS, _tokens(A1, b2, A3))
    idx = HostIndex(8, verify_tokens=False)
    _store_chain(idx, da, ta)
    assert idx.lookup(db) == 3


def test_lookup_requires_block_bytes_when_verifying():
    idx = HostIndex(2)
    (d1,), (t1,) = chain_digests(NS, A1)
    _store_chain(idx, [d1], [t1])
    before = idx.stats.as_dict()
    with pytest.raises(ValueError, match="block_bytes"):
        idx.lookup([d1])
    assert idx.stats.as_dict() == before, "a rejected lookup must not count as a lookup"


def test_a_colliding_digest_with_the_same_tokens_under_another_prefix_is_not_returned():
    """Block X (tokens T) was stored under prefix a1.  A request whose chain is b1 then (by a collision) X's
    digest, with the same tokens T, must not get X: X holds KV computed after another prefix."""
    idx = HostIndex(8)
    (a1, x), (ta1, tx) = chain_digests(NS, _tokens(A1, A3))
    (b1,), (tb1,) = chain_digests(NS, B2)
    _store_chain(idx, [a1, x], [ta1, tx])
    _store_chain(idx, [b1], [tb1])
    assert idx.lookup([a1, x], [ta1, tx]) == 2                 # the genuine chain
    assert idx.lookup([b1, x], [tb1, tx]) == 1                 # stops at X: its parent is a1, not b1
    assert idx.stats.verify_mismatches == 1
    assert idx.lookup([x], [tx], parent=b1) == 0               # a chain that starts at X after b1's match
    assert idx.lookup([x], [tx], parent=a1) == 1 and idx.stats.verify_mismatches == 2
    idx.check_invariants()


def test_a_doomed_block_waiting_only_for_its_spare_copy_passes_the_checks():
    """First copy and a spare copy in flight, the subtree dropped, the first copy ends: a legal state in
    which only the spare's write pin keeps the block; both slots are freed once the spare's copy ends."""
    for first_ok in (True, False):
        idx = HostIndex(4)
        first = idx.prepare_store(1, 0, b"a")
        spare = idx.prepare_spare(1, b"a")
        assert first is not None and spare is not None and first != spare
        idx.drop_subtree(0)
        idx.complete_store(1, first_ok, slot=first)
        idx.check_invariants()
        idx.complete_store(1, True, slot=spare)
        idx.check_invariants()
        assert idx.get(1) is None and idx.num_free_slots == 4
