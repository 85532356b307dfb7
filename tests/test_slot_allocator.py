"""SlotAllocator: a fixed pool, O(1) allocate/free, pins that forbid freeing."""
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmdeploy_hostcache.tier.slot_allocator import SlotAllocator, SlotError


def test_allocates_every_slot_once_then_none():
    a = SlotAllocator(4)
    got = [a.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]
    assert got[0] == 0, "slot 0 first"
    assert a.allocate() is None
    assert (a.num_free, a.num_used) == (0, 4)
    a.check_invariants()


def test_free_is_lifo():
    a = SlotAllocator(8)
    slots = [a.allocate() for _ in range(5)]
    a.free(slots[1])
    a.free(slots[3])
    assert a.allocate() == slots[3]
    assert a.allocate() == slots[1]
    a.check_invariants()


def test_zero_slots():
    a = SlotAllocator(0)
    assert a.allocate() is None
    assert (a.num_free, a.num_used) == (0, 0)
    with pytest.raises(SlotError, match="out of range"):
        a.pin(0)


@pytest.mark.parametrize("bad", [-1, 2.5, "8", None])
def test_bad_size_names_the_argument(bad):
    with pytest.raises(ValueError, match="num_slots"):
        SlotAllocator(bad)


def test_errors_leave_state_unchanged():
    a = SlotAllocator(3)
    s = a.allocate()
    a.pin(s)
    cases = [
        (lambda: a.free(s), "pinned"),
        (lambda: a.free(1), "freed twice"),
        (lambda: a.pin(2), "pinned while free"),
        (lambda: a.unpin(2), "unpinned more often"),
        (lambda: a.free(3), "out of range"),
        (lambda: a.pin(-1), "out of range"),
    ]
    for call, msg in cases:
        before = (a.num_free, [a.pins(i) for i in range(3)], [a.is_used(i) for i in range(3)])
        with pytest.raises(SlotError, match=msg):
            call()
        assert before == (a.num_free, [a.pins(i) for i in range(3)], [a.is_used(i) for i in range(3)])
        a.check_invariants()
    a.unpin(s)
    a.free(s)
    assert a.num_free == 3
    a.check_invariants()


def test_pins_nest():
    a = SlotAllocator(1)
    s = a.allocate()
    a.pin(s)
    a.pin(s)
    a.unpin(s)
    with pytest.raises(SlotError):
        a.free(s)
    a.unpin(s)
    a.free(s)
    with pytest.raises(SlotError):
        a.unpin(s)


def test_check_invariants_detects_corruption():
    a = SlotAllocator(3)
    s = a.allocate()
    a._free.append(s)  # the slot is now both used and free
    with pytest.raises(AssertionError, match="both free and used"):
        a.check_invariants()


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free/pin/unpin against a dict model: slot -> pin count."""

    N = 6

    def __init__(self):
        super().__init__()
        self.alloc = SlotAllocator(self.N)
        self.model: dict[int, int] = {}

    @rule()
    def allocate(self):
        s = self.alloc.allocate()
        if len(self.model) == self.N:
            assert s is None
        else:
            assert s is not None and s not in self.model, f"slot {s} handed out while in use"
            self.model[s] = 0

    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.integers(0, self.N - 1))
        if s in self.model and self.model[s] == 0:
            self.alloc.free(s)
            del self.model[s]
        else:
            with pytest.raises(SlotError):
                self.alloc.free(s)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin(self, data):
        s = data.draw(st.sampled_from(sorted(self.model)))
        self.alloc.pin(s)
        self.model[s] += 1

    @rule(data=st.data())
    def unpin(self, data):
        s = data.draw(st.integers(0, self.N - 1))
        if self.model.get(s, 0) > 0:
            self.alloc.unpin(s)
            self.model[s] -= 1
        else:
            with pytest.raises(SlotError):
                self.alloc.unpin(s)

    @invariant()
    def matches_model(self):
        self.alloc.check_invariants()
        assert self.alloc.num_used == len(self.model)
        assert self.alloc.num_free + self.alloc.num_used == self.N
        for s in range(self.N):
            assert self.alloc.is_used(s) == (s in self.model)
            assert self.alloc.pins(s) == self.model.get(s, 0)


TestAllocatorMachine = AllocatorMachine.TestCase
