"""Host slot allocator: which of the N host slots are free, and which are pinned.

Invariants (checked by ``check_invariants``):

* every slot is either free or used, never both; ``num_free + num_used == num_slots``;
* only a used slot can be pinned; a pinned slot cannot be freed (its bytes are being read or
  written by a copy in flight);
* allocate and free are O(1) (a LIFO free stack, so recently freed slots, still warm in the
  CPU cache and TLB, are reused first).
"""
from __future__ import annotations


class SlotError(RuntimeError):
    """A slot operation that would break an allocator invariant."""


class SlotAllocator:
    __slots__ = ("num_slots", "_free", "_used", "_pins")

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be an int >= 0, got {num_slots!r}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._used = bytearray(num_slots)
        self._pins = [0] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        if not self._used[slot]:
            raise SlotError(f"slot {slot} freed twice")
        if self._pins[slot]:
            raise SlotError(f"slot {slot} freed while pinned ({self._pins[slot]} pins)")
        self._used[slot] = 0
        self._free.append(slot)

    def pin(self, slot: int) -> None:
        self._check(slot)
        if not self._used[slot]:
            raise SlotError(f"slot {slot} pinned while free")
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._check(slot)
        if self._pins[slot] <= 0:
            raise SlotError(f"slot {slot} unpinned more often than pinned")
        self._pins[slot] -= 1

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    def is_used(self, slot: int) -> bool:
        return bool(self._used[slot])

    def _check(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots):
            raise SlotError(f"slot {slot} out of range [0, {self.num_slots})")

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a slot is on the free list twice"
        for s in range(self.num_slots):
            assert (s in free) != bool(self._used[s]), f"slot {s} is both free and used, or neither"
            assert self._pins[s] >= 0, f"slot {s} has negative pins"
            assert not (s in free and self._pins[s]), f"free slot {s} is pinned"
