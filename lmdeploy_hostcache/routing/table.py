"""``BlockTable``: which node holds which published block id, in which tier (the proxy's index).

One table for the whole cluster: a published id (``ids.publish_id``) maps to two node bitmasks,
one per tier (GPU, host).  Storage is numpy, so a cached block costs a few bytes instead of a
Python object: buckets of ``BUCKET`` slots, each id lives in one of two buckets (2-choice
hashing on the id's low and high 32 bits, modulo the bucket count), and a full pair of buckets doubles the table.

The node masks are as wide as the highest node slot used so far needs (uint8 up to 8 nodes, uint16
up to 16, ...; ``max_nodes`` is the most the table accepts, at most 64): a node slot past the width
widens the masks once (an O(table) copy, when the 9th, 17th, 33rd node joins).

The table shrinks too: after a mass removal (``clear_node``, ``remove``) that leaves fewer entries
than 1/8 of its slots while it is larger than its initial size, it is rebuilt at about half load
(the same re-placement as a doubling), so a node that leaves (or a feed that is refused) does not
leave its memory behind.  Both resizes are O(table) and rare (amortized O(1) per id).

Invariants:
- exact: ``match`` reports a bit for (id, node, tier) iff ``add`` set it and no later
  ``remove``/``clear_node`` cleared it: an id whose two buckets are full goes to a small
  Python stash, and the table doubles when the stash passes 0.1% of the entries (doubling,
  shrinking and widening re-place every id with its masks unchanged);
- a slot holds an id iff one of its masks is non-zero (empty slots hold id 0);
- batch operations are vectorized; duplicates within a batch are allowed;
- ``clear_node`` of a slot given no bit since its last clear is O(1) (``touched``); a resize built
  outside the caller's lock (``build_resized``) is installed only if ``version`` did not move.
"""
from __future__ import annotations

import numpy as np

BUCKET = 8
CHUNK = 1 << 18
STASH_MIN = 64        # ids kept in the Python-side stash before the table doubles
INITIAL_LOAD = 0.85   # initial_blocks fill this fraction of the slots; a full bucket pair doubles the table
SHRINK_BELOW = 8      # a table with fewer entries than 1/SHRINK_BELOW of its slots is rebuilt smaller ...
SHRINK_LOAD = 0.5     # ... at this load (never below its initial size)
GPU, HOST = 0, 1
TIERS = (GPU, HOST)


def unique_ids(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids (sort-based: numpy 2's hash-based ``np.unique`` is ~20x slower on uint64)."""
    if ids.size < 2:
        return ids.copy()
    s = np.sort(ids)
    return s[np.r_[True, s[1:] != s[:-1]]]


MAX_TABLE_NODES = 64   # node masks are at most uint64


def _mask_dtype(max_nodes: int):
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_nodes <= np.iinfo(dt).bits:
            return dt
    raise ValueError(f"max_nodes must be <= {MAX_TABLE_NODES}, got {max_nodes}")


class BlockTable:
    """id -> (GPU node mask, host node mask); see the module docstring."""

    def __init__(self, max_nodes: int = 32, initial_blocks: int = 1 << 12) -> None:
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes <= 0:
            raise ValueError(f"max_nodes must be a positive int, got {max_nodes!r}")
        _mask_dtype(max_nodes)   # at most 64
        self.max_nodes = max_nodes
        self.mask_dtype = np.uint8    # widened when a higher node slot is first set (``_widen``)
        self.initial_buckets = max(1, -(-int(initial_blocks) // int(BUCKET * INITIAL_LOAD)))
        self.resizes = 0              # rebuilds (doubling, shrinking) so far
        self.version = 0              # moves with every change (``install_resized`` checks it)
        self.touched: set[int] = set()  # node slots given a bit since their last ``clear_node`` (others: none)
        self._alloc(self.initial_buckets)

    def _alloc(self, nb: int) -> None:
        self.num_buckets = nb
        self.keys = np.zeros((nb, BUCKET), dtype=np.uint64)
        self.masks = np.zeros((2, nb, BUCKET), dtype=self.mask_dtype)
        self.entries = 0
        self.stash: dict[int, list[int]] = {}   # id -> [GPU mask, host mask]: ids whose two buckets were full

    # ------------------------------------------------------------------ queries
    @property
    def mask_bits(self) -> int:
        return np.iinfo(self.mask_dtype).bits

    @property
    def slots(self) -> int:
        return self.num_buckets * BUCKET

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
        """How many ids have ``node``'s bit in ``tier`` (a full scan, in bounded chunks)."""
        if node >= self.mask_bits:
            return 0
        bit = self.mask_dtype(1 << node)
        step = max(1, CHUNK // BUCKET)
        n = sum(int(np.count_nonzero(self.masks[tier, k:k + step] & bit)) for k in range(0, self.num_buckets, step))
        return n + sum(1 for m in self.stash.values() if m[tier] >> node & 1)

    # ------------------------------------------------------------------ updates
    def _check(self, node: int, tier: int) -> None:
        if not 0 <= node < self.max_nodes:
            raise ValueError(f"node slot {node} outside [0, {self.max_nodes})")
        if tier not in TIERS:
            raise ValueError(f"tier must be 0 (GPU) or 1 (host), got {tier!r}")

    def _widen(self, node: int) -> None:
        """Make the masks wide enough for ``node``'s bit (an O(table) copy, once per width)."""
        if node < self.mask_bits:
            return
        dt = _mask_dtype(node + 1)
        self.masks = self.masks.astype(dt)
        self.mask_dtype = dt
        self.version += 1

    def add(self, ids, node: int, tier: int) -> None:
        """Set ``node``'s bit in ``tier`` for every id (inserting ids not present)."""
        self._check(node, tier)
        ids = np.asarray(ids, dtype=np.uint64)
        if ids.size == 0:
            return
        self.version += 1
        self.touched.add(node)
        self._widen(node)
        if ids.size > CHUNK:  # bounded temporaries (a snapshot can hold millions of ids)
            for k in range(0, ids.size, CHUNK):
                self.add(ids[k:k + CHUNK], node, tier)
            return
        bit = self.mask_dtype(1 << node)
        found, b, c = self._find(ids)
        if found.any():
            self.masks[tier, b[found], c[found]] |= bit
        new = unique_ids(ids[~found])
        if new.size and self.stash:
            stashed = np.isin(new, np.fromiter(self.stash, dtype=np.uint64, count=len(self.stash)))
            for i in new[stashed].tolist():
                self.stash[i][tier] |= 1 << node
            new = new[~stashed]
        if new.size:
            self._insert(new, tier, bit)

    def remove(self, ids, node: int, tier: int) -> None:
        """Clear ``node``'s bit in ``tier`` for every id present; ids left with no bit are freed."""
        self._check(node, tier)
        ids = np.asarray(ids, dtype=np.uint64)
        if ids.size == 0 or node >= self.mask_bits:   # no id has a bit the masks are too narrow for
            return
        self.version += 1
        if ids.size > CHUNK:
            for k in range(0, ids.size, CHUNK):
                self._remove(ids[k:k + CHUNK], node, tier)
        else:
            self._remove(ids, node, tier)
        self.maybe_shrink()

    def _remove(self, ids: np.ndarray, node: int, tier: int) -> None:
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

    def clear_node(self, node: int, tier: int | None = None, shrink: bool = True) -> None:
        """Forget everything ``node`` holds (in one tier, or both); ``shrink=False`` when the caller refills the
        node at once (a snapshot) and calls ``maybe_shrink`` after."""
        if node >= self.mask_bits or node not in self.touched:   # no bit of it anywhere: no scan
            return
        self.version += 1
        if tier is None:
            self.touched.discard(node)
        keep = ~self.mask_dtype(1 << node)
        step = max(1, CHUNK // BUCKET)
        for k in range(0, self.num_buckets, step):   # bounded temporaries
            sl = slice(k, k + step)
            for t in (TIERS if tier is None else (tier,)):
                self.masks[t, sl] &= keep
            empty = (self.masks[GPU, sl] == 0) & (self.masks[HOST, sl] == 0) & (self.keys[sl] != 0)
            self.entries -= int(np.count_nonzero(empty))
            self.keys[sl][empty] = 0
        for i, m in list(self.stash.items()):
            for t in (TIERS if tier is None else (tier,)):
                m[t] &= ~(1 << node)
            if m == [0, 0]:
                del self.stash[i]
                self.entries -= 1
        if shrink:
            self.maybe_shrink()

    def _free_empty(self, b: np.ndarray, c: np.ndarray) -> None:
        empty = (self.masks[GPU, b, c] == 0) & (self.masks[HOST, b, c] == 0) & (self.keys[b, c] != 0)
        if empty.any():
            eb, ec = b[empty], c[empty]
            # duplicates in the batch point at one slot: count each slot once
            self.entries -= len(set(zip(eb.tolist(), ec.tolist())))
            self.keys[eb, ec] = 0

    def _place(self, ids: np.ndarray, buckets: np.ndarray, pos: np.ndarray):
        """Put ``ids[pos[k]]`` into a free column of ``buckets[k]``; returns (placed positions, their buckets,
        their columns, positions that found no room)."""
        if pos.size == 0:
            return pos, pos, pos, pos
        order = np.argsort(buckets, kind="stable")
        buckets, pos = buckets[order], pos[order]
        first = np.r_[0, np.flatnonzero(np.diff(buckets)) + 1]
        starts = np.repeat(first, np.diff(np.r_[first, len(buckets)]))
        rank = np.arange(len(buckets)) - starts
        free = self.keys[buckets] == 0
        nth = np.cumsum(free, axis=1)
        target = free & (nth == (rank + 1)[:, None])
        ok = target.any(1)
        pb, pc = buckets[ok], target.argmax(1)[ok]
        self.keys[pb, pc] = ids[pos[ok]]
        return pos[ok], pb, pc, pos[~ok]

    def _place_two_choice(self, ids: np.ndarray) -> tuple[list, np.ndarray]:
        """Place each id in the emptier of its two buckets, else the other; returns (placed (positions, buckets,
        columns) groups, positions of the ids with no room)."""
        b1, b2 = self._buckets(ids)
        f1 = (self.keys[b1] == 0).sum(1)
        f2 = (self.keys[b2] == 0).sum(1)
        swap = f2 > f1
        first = np.where(swap, b2, b1)
        other = np.where(swap, b1, b2)
        p, pb, pc, rest = self._place(ids, first, np.arange(ids.size))
        placed = [(p, pb, pc)]
        if rest.size:   # the other bucket of each id left over
            p, pb, pc, rest = self._place(ids, other[rest], rest)
            placed.append((p, pb, pc))
        return placed, rest

    def _batch(self) -> int:
        """Ids placed per round: few enough that stale free counts rarely crowd one bucket."""
        return max(1024, self.num_buckets // 8)

    def _place_all(self, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """Two-choice placement in rounds; returns (positions in ``ids`` of the ids with both buckets full,
        placed (positions, buckets, columns) groups)."""
        placed, left = [], []
        step = self._batch()
        for k in range(0, ids.size, step):
            chunk = ids[k:k + step]
            got, rest = self._place_two_choice(chunk)
            placed += [(p + k, pb, pc) for p, pb, pc in got]
            if rest.size:
                got, rest2 = self._place_two_choice(chunk[rest])  # fresh counts
                placed += [(rest[p] + k, pb, pc) for p, pb, pc in got]
                left.append(rest[rest2] + k)
        return (np.concatenate(left) if left else np.zeros(0, dtype=np.intp)), placed

    def reserve(self, new_ids: int) -> None:
        """Make room for ``new_ids`` more ids at once (one rebuild, at least doubling) instead of several
        doublings or a crowded stash while they are added."""
        nb = self.plan_reserve(new_ids)
        if nb is not None:
            self._rebuild(nb)

    def _insert(self, ids: np.ndarray, tier: int, bit) -> None:
        self.reserve(ids.size)   # a large batch: one rebuild to fit it, not a stash
        rest, placed = self._place_all(ids)
        for _, pb, pc in placed:
            self.masks[tier, pb, pc] |= bit
        self.entries += ids.size
        for i in ids[rest].tolist():
            m = [0, 0]
            m[tier] = int(bit)
            self.stash[i] = m
        if len(self.stash) > max(STASH_MIN, self.entries // 1000):
            self._grow()

    def _grow(self) -> None:
        """Double the buckets and re-place every id (the stash too) until nothing is stashed."""
        self._rebuild(self.num_buckets * 2)

    def maybe_shrink(self) -> None:
        """After a mass removal: rebuild at ``SHRINK_LOAD`` when entries fell under 1/``SHRINK_BELOW`` of the
        slots and the table is larger than its initial size (O(1) when it does not)."""
        if self.num_buckets <= self.initial_buckets or self.entries * SHRINK_BELOW >= self.slots:
            return
        nb = max(self.initial_buckets, -(-int(self.entries) // int(BUCKET * SHRINK_LOAD)))
        if nb < self.num_buckets:
            self._rebuild(nb)

    def _live(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, GPU masks, host masks) of every entry, the stash's included (copies)."""
        keys, masks, stash = self.keys, self.masks, dict(self.stash)
        live = keys != 0
        ids, g, h = keys[live], masks[GPU][live], masks[HOST][live]
        if stash:
            dt = masks.dtype
            ids = np.concatenate([ids, np.fromiter(stash, dtype=np.uint64, count=len(stash))])
            g = np.concatenate([g, np.array([m[GPU] for m in stash.values()], dtype=dt)])
            h = np.concatenate([h, np.array([m[HOST] for m in stash.values()], dtype=dt)])
        return ids, g, h

    def _place_into(self, nb: int, ids: np.ndarray, g: np.ndarray, h: np.ndarray) -> None:
        """Fill this (emptied) table with ``ids`` and their masks: ``nb`` buckets, doubled until none is stashed."""
        while True:
            self._alloc(nb)
            rest, placed = self._place_all(ids)
            if rest.size == 0:
                break
            nb *= 2
        for p, pb, pc in placed:
            self.masks[GPU, pb, pc] = g[p]
            self.masks[HOST, pb, pc] = h[p]
        self.entries = int(ids.size)

    def _rebuild(self, nb: int) -> None:
        """Re-place every id (the stash too) with its masks into ``nb`` buckets, doubling until nothing is
        stashed."""
        ids, g, h = self._live()
        self.keys = self.masks = None   # the old arrays go before the new ones are allocated
        self._place_into(nb, ids, g, h)
        self.resizes += 1
        self.version += 1

    # ------------------------------------------------------------------ resizing outside a lock
    def plan_reserve(self, new_ids: int) -> int | None:
        """The bucket count ``reserve(new_ids)`` would rebuild to (None: it would not)."""
        need = -(-(self.entries + int(new_ids)) // int(BUCKET * INITIAL_LOAD))
        return max(need, 2 * self.num_buckets) if need > self.num_buckets else None

    def build_resized(self, nb: int) -> "BlockTable | None":
        """A copy of this table rebuilt with ``nb`` buckets, for ``install_resized``; changes nothing here. A caller
        holding the table's lock only to read ``version`` (before) and to install (after) may run it without the
        lock: a copy read while the table changed is refused by ``install_resized`` (None if it could not even be
        read)."""
        try:
            ids, g, h = self._live()
            new = BlockTable.__new__(BlockTable)
            new.max_nodes, new.mask_dtype = self.max_nodes, g.dtype.type
            new.initial_buckets, new.resizes, new.version = self.initial_buckets, self.resizes, self.version
            new._place_into(nb, ids, g, h)
            return new
        except Exception:   # read while another thread resized it: not installable anyway
            return None

    def install_resized(self, built: "BlockTable | None", version: int) -> bool:
        """Take ``built``'s arrays (``build_resized``) if this table has not changed since ``version`` was read."""
        if built is None or version != self.version or built.mask_dtype is not self.mask_dtype:
            return False
        self.num_buckets, self.keys, self.masks = built.num_buckets, built.keys, built.masks
        self.entries, self.stash = built.entries, built.stash
        self.resizes += 1
        self.version += 1
        return True
