"""Host slot allocator: which of the N host slots are free, and which are pinned.

Invariants (checked by ``check_invariants``):

* every slot is either free or used, never both; ``num_free + num_used == num_slots``;
* only a used slot can be pinned; a pinned slot cannot be freed (its bytes are being read or
  written by a copy in flight);
* allocate and free are O(1) (a LIFO free stack, so recently freed slots, still warm in the
  CPU cache and TLB, are reused first; slots never handed out are taken in order 0, 1, 2...);
* memory follows the slots handed out so far, never ``num_slots``: slots past the
  high-water mark are free without any per-slot state, so a capacity far larger than what is
  ever used (the planner's ``--host-gb 1e9``) costs nothing.
"""
from __future__ import annotations


class SlotError(RuntimeError):
    """A slot operation that would break an allocator invariant."""


class SlotAllocator:
    __slots__ = ("num_slots", "_free", "_used", "_pins")

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 0:
            raise ValueError(f"num_slots must be an int >= 0, got {num_slots!r}")
        self.num_slots = num_slots
        self._free: list[int] = []        # freed slots below the high-water mark (LIFO)
        self._used = bytearray()          # per slot below the high-water mark len(_used)
        self._pins: list[int] = []

    @property
    def high_water(self) -> int:
        """Slots ever handed out: slots at or above it are free and carry no state."""
        return len(self._used)

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_slots - len(self._used)

    @property
    def num_used(self) -> int:
        return len(self._used) - len(self._free)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is in use."""
        if self._free:
            slot = self._free.pop()
            self._used[slot] = 1
            return slot
        slot = len(self._used)
        if slot >= self.num_slots:
            return None
        self._used.append(1)
        self._pins.append(0)
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        if not self.is_used(slot):
            raise SlotError(f"slot {slot} freed twice")
        if self._pins[slot]:
            raise SlotError(f"slot {slot} freed while pinned ({self._pins[slot]} pins)")
        self._used[slot] = 0
        self._free.append(slot)

    def pin(self, slot: int) -> None:
        self._check(slot)
        if not self.is_used(slot):
            raise SlotError(f"slot {slot} pinned while free")
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._check(slot)
        if self.pins(slot) <= 0:
            raise SlotError(f"slot {slot} unpinned more often than pinned")
        self._pins[slot] -= 1

    def pins(self, slot: int) -> int:
        return self._pins[slot] if 0 <= slot < len(self._pins) else 0

    def is_used(self, slot: int) -> bool:
        return 0 <= slot < len(self._used) and bool(self._used[slot])

    def _check(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots):
            raise SlotError(f"slot {slot} out of range [0, {self.num_slots})")

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a slot is on the free list twice"
        hw = len(self._used)
        assert hw <= self.num_slots and len(self._pins) == hw, "high-water mark beyond num_slots"
        assert all(0 <= s < hw for s in free), "a free-list slot beyond the high-water mark"
        for s in range(hw):
            assert (s in free) != bool(self._used[s]), f"slot {s} is both free and used, or neither"
            assert self._pins[s] >= 0, f"slot {s} has negative pins"
            assert not (s in free and self._pins[s]), f"free slot {s} is pinned"
