"""Deterministic LRU stamps for LMDeploy's block manager in harness runs.

LMDeploy 0.18.0 stamps a block's access time with ``int(perf_counter())``: within one second every
block ties and its LRU falls back to an ``id(node)`` tie-break whose order changes from run to run,
so which block is evicted first (and so whether a later request finds it on the host) varies.
``counter_access_times(monkeypatch)`` replaces the stamps with a counter: distinct, in access order.
"""
from __future__ import annotations

import numpy as np


def counter_access_times(monkeypatch) -> None:
    """Give every block access a distinct, increasing access time (pytest ``monkeypatch``: undone after the test)."""
    from lmdeploy.pytorch.paging.block_manager.base_block_manager import LogicalAllocator

    clock = iter(range(1, 1 << 40))

    def update_access_time(self, blocks):
        blocks = np.atleast_1d(np.asarray(blocks))
        self._log_mem.access_time[blocks] = [next(clock) for _ in range(len(blocks))]

    monkeypatch.setattr(LogicalAllocator, "update_access_time", update_access_time)
