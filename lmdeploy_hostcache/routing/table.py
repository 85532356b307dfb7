"""``BlockTable``: which node holds which published block id, in which tier (the proxy's index).

One table for the whole cluster: a published id (``ids.publish_id``) maps to two node bitmasks,
one per tier (GPU, host).  Storage is numpy, so a cached block costs a few bytes instead of a
Python object: buckets of ``BUCKET`` slots, each id lives in one of two buckets (2-choice
hashing on the id's low and high 32 bits, modulo the bucket count), and a full pair of buckets doubles the table.

Invariants:
- exact: ``match`` reports a bit for (id, node, tier) iff ``add`` set it and no later
  ``remove``/``clear_node`` cleared it: an id whose two buckets are full goes to a small
  Python stash, and the table doubles when the stash passes 0.1% of the entries;
- a slot holds an id iff one of its masks is non-zero (empty slots hold id 0);
- batch operations are vectorized; duplicates within a batch are allowed.
"""
from __future__ import annotations

import numpy as np

BUCKET = 8
CHUNK = 1 << 18
STASH_MIN = 64        # ids kept in the Python-side stash before the table doubles
INITIAL_LOAD = 0.85   # initial_blocks fill this fraction of the slots; a full bucket pair doubles the table
GPU, HOST = 0, 1
TIERS = (GPU, HOST)


def _mask_dtype(max_nodes: int):
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_nodes <= np.iinfo(dt).bits:
            return dt
    raise ValueError(f"max_nodes must be <= 64, got {max_nodes}")


class BlockTable:
    """id -> (GPU node mask, host node mask); see the module docstring."""

    def __init__(self, max_nodes: int = 32, initial_blocks: int = 1 << 12) -> None:
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes <= 0:
            raise ValueError(f"max_nodes must be a positive int, got {max_nodes!r}")
        self.max_nodes = max_nodes
        self.mask_dtype = _mask_dtype(max_nodes)
        self._alloc(max(1, -(-int(initial_blocks) // int(BUCKET * INITIAL_LOAD))))

    def _alloc(self, nb: int) -> None:
        self.num_buckets = nb
        self.keys = np.zeros((nb, BUCKET), dtype=np.uint64)
        self.masks = np.zeros((2, nb, BUCKET), dtype=self.mask_dtype)
        self.entries = 0
        self.stash: dict[int, list[int]] = {}   # id -> [GPU mask, host mask]: ids whose two buckets were full

    # ------------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.masks.nbytes + 120 * len(self.stash)

    def _buckets(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = np.uint64(self.num_buckets)
        return (ids % m).astype(np.intp), ((ids >> np.uint64(32)) % m).astype(np.intp)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, bucket, column) per id."""
        b1, b2 = self._buckets(ids)
        col = ids[:, None]
        eq1 = self.keys[b1] == col
        eq2 = self.keys[b2] == col
        f1 = eq1.any(1)
        f2 = eq2.any(1)
        bucket = np.where(f1, b1, b2)
        column = np.where(f1, eq1.argmax(1), eq2.argmax(1))
        return f1 | f2, bucket, column

    def match(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(GPU masks, host masks) of each id (0 where absent)."""
        ids = np.asarray(ids, dtype=np.uint64)
        found, b, c = self._find(ids)
        g = np.where(found, self.masks[GPU, b, c], 0).astype(self.mask_dtype)
        h = np.where(found, self.masks[HOST, b, c], 0).astype(self.mask_dtype)
        if self.stash:
            for k, i in enumerate(ids.tolist()):
                m = self.stash.get(i)
                if m is not None:
                    g[k], h[k] = m
        return g, h

    def count(self, node: int, tier: int) -> int:
        """How many ids have ``node``'s bit in ``tier`` (a full scan)."""
        bit = self.mask_dtype(1 << node)
        return int(np.count_nonzero(self.masks[tier] & bit)) + sum(1 for m in self.stash.values() if m[tier] >> node & 1)

    # ------------------------------------------------------------------ updates
    def _check(self, node: int, tier: int) -> None:
        if not 0 <= node < self.max_nodes:
            raise ValueError(f"node slot {node} outside [0, {self.max_nodes})")
        if tier not in TIERS:
            raise ValueError(f"tier must be 0 (GPU) or 1 (host), got {tier!r}")

    def add(self, ids, node: int, tier: int) -> None:
        """Set ``node``'s bit in ``tier`` for every id (inserting ids not present)."""
        self._check(node, tier)
        ids = np.asarray(ids, dtype=np.uint64)
        if ids.size == 0:
            return
        if ids.size > CHUNK:  # bounded temporaries (a snapshot can hold millions of ids)
            for k in range(0, ids.size, CHUNK):
                self.add(ids[k:k + CHUNK], node, tier)
            return
        bit = self.mask_dtype(1 << node)
        found, b, c = self._find(ids)
        if found.any():
            self.masks[tier, b[found], c[found]] |= bit
        new = np.unique(ids[~found])
        if new.size and self.stash:
            left = []
            for i in new.tolist():
                m = self.stash.get(i)
                if m is None:
                    left.append(i)
                else:
                    m[tier] |= 1 << node
            new = np.array(left, dtype=np.uint64)
        if new.size:
            self._insert(new, tier, bit)

    def remove(self, ids, node: int, tier: int) -> None:
        """Clear ``node``'s bit in ``tier`` for every id present; ids left with no bit are freed."""
        self._check(node, tier)
        ids = np.asarray(ids, dtype=np.uint64)
        if ids.size == 0:
            return
        if ids.size > CHUNK:
            for k in range(0, ids.size, CHUNK):
                self.remove(ids[k:k + CHUNK], node, tier)
            return
        found, b, c = self._find(ids)
        if self.stash and not found.all():
            for i in ids[~found].tolist():
                m = self.stash.get(i)
                if m is not None:
                    m[tier] &= ~(1 << node)
                    if m == [0, 0]:
                        del self.stash[i]
                        self.entries -= 1
        if not found.any():
            return
        b, c = b[found], c[found]
        self.masks[tier, b, c] &= ~self.mask_dtype(1 << node)
        self._free_empty(b, c)

    def clear_node(self, node: int, tier: int | None = None) -> None:
        """Forget everything ``node`` holds (in one tier, or both)."""
        keep = ~self.mask_dtype(1 << node)
        for t in (TIERS if tier is None else (tier,)):
            self.masks[t] &= keep
        empty = (self.masks[GPU] == 0) & (self.masks[HOST] == 0) & (self.keys != 0)
        self.entries -= int(np.count_nonzero(empty))
        self.keys[empty] = 0
        for i, m in list(self.stash.items()):
            for t in (TIERS if tier is None else (tier,)):
                m[t] &= ~(1 << node)
            if m == [0, 0]:
                del self.stash[i]
                self.entries -= 1

    def _free_empty(self, b: np.ndarray, c: np.ndarray) -> None:
        empty = (self.masks[GPU, b, c] == 0) & (self.masks[HOST, b, c] == 0) & (self.keys[b, c] != 0)
        if empty.any():
            eb, ec = b[empty], c[empty]
            # duplicates in the batch point at one slot: count each slot once
            self.entries -= len(set(zip(eb.tolist(), ec.tolist())))
            self.keys[eb, ec] = 0

    def _place(self, ids: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """Put each id into a free column of its bucket; returns the ids that found no room."""
        order = np.argsort(buckets, kind="stable")
        ids, buckets = ids[order], buckets[order]
        first = np.r_[0, np.flatnonzero(np.diff(buckets)) + 1]
        starts = np.repeat(first, np.diff(np.r_[first, len(buckets)]))
        rank = np.arange(len(buckets)) - starts
        free = self.keys[buckets] == 0
        nth = np.cumsum(free, axis=1)
        target = free & (nth == (rank + 1)[:, None])
        ok = target.any(1)
        cols = target.argmax(1)
        self.keys[buckets[ok], cols[ok]] = ids[ok]
        self._placed = (buckets[ok], cols[ok])
        return ids[~ok]

    def _place_two_choice(self, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """Place each id in the emptier of its two buckets, else the other; returns (no room, placed)."""
        b1, b2 = self._buckets(ids)
        f1 = (self.keys[b1] == 0).sum(1)
        f2 = (self.keys[b2] == 0).sum(1)
        first = np.where(f2 > f1, b2, b1)
        other = np.where(f2 > f1, b1, b2)
        placed = []
        order_ids = ids
        rest = self._place(order_ids, first)
        placed.append(self._placed)
        if rest.size:
            # the other bucket of each id left over
            pos = {int(v): k for k, v in enumerate(ids.tolist())} if rest.size < 4096 else None
            if pos is not None:
                alt = other[[pos[int(v)] for v in rest.tolist()]]
            else:
                sorter = np.argsort(ids)
                alt = other[sorter[np.searchsorted(ids, rest, sorter=sorter)]]
            rest = self._place(rest, alt)
            placed.append(self._placed)
        return rest, placed

    def _batch(self) -> int:
        """Ids placed per round: few enough that stale free counts rarely crowd one bucket."""
        return max(1024, self.num_buckets // 8)

    def _place_all(self, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """Two-choice placement in rounds; returns (ids with both buckets full, placed slots)."""
        placed, left = [], []
        step = self._batch()
        for k in range(0, ids.size, step):
            rest, got = self._place_two_choice(ids[k:k + step])
            placed += got
            if rest.size:
                rest, got = self._place_two_choice(rest)  # fresh counts
                placed += got
                left.append(rest)
        return (np.concatenate(left) if left else ids[:0]), placed

    def _insert(self, ids: np.ndarray, tier: int, bit) -> None:
        rest, placed = self._place_all(ids)
        for pb, pc in placed:
            self.masks[tier, pb, pc] |= bit
        self.entries += ids.size
        for i in rest.tolist():
            m = [0, 0]
            m[tier] = int(bit)
            self.stash[i] = m
        if len(self.stash) > max(STASH_MIN, self.entries // 1000):
            self._grow()

    def _grow(self) -> None:
        """Double the buckets and re-place every id (the stash too) until nothing is stashed."""
        keys, masks = self.keys, self.masks
        live = keys != 0
        old_ids = keys[live]
        old_g, old_h = masks[GPU][live], masks[HOST][live]
        if self.stash:
            old_ids = np.concatenate([old_ids, np.array(list(self.stash), dtype=np.uint64)])
            old_g = np.concatenate([old_g, np.array([m[GPU] for m in self.stash.values()], dtype=self.mask_dtype)])
            old_h = np.concatenate([old_h, np.array([m[HOST] for m in self.stash.values()], dtype=self.mask_dtype)])
        nb = self.num_buckets * 2
        while True:
            self._alloc(nb)
            rest, _ = self._place_all(old_ids)
            if rest.size == 0:
                break
            nb *= 2
        for k in range(0, old_ids.size, CHUNK):
            found, b, c = self._find(old_ids[k:k + CHUNK])
            assert found.all()
            self.masks[GPU, b, c] = old_g[k:k + CHUNK]
            self.masks[HOST, b, c] = old_h[k:k + CHUNK]
        self.entries = int(old_ids.size)
