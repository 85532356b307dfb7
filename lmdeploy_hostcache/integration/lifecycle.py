"""Eviction hook: tell the host tier about every GPU prefix-cache leaf LMDeploy evicts.

``HostTierKVBlockLifecycle`` subclasses LMDeploy 0.18.0's ``KVBlockLifecycle`` and overrides
one method, ``_try_evict_leaf``. The override is upstream's method, unchanged, plus one call::

    self._host_tier_observer(leaf, gpu_block)     # just before evicted_blocks.append(...)

made when a victim has been chosen (``ref_count == 1``, not checkpoint-pinned) and *before*
it is detached and freed, so the observer still sees the leaf's parent chain (for the chained
digest) and the GPU page it occupies (``allocator.get_physical_blocks``). The observer cannot
veto or reorder an eviction: stock eviction order is preserved exactly (tests check it).

Installation is a class swap on the live instance (``install_lifecycle_observer``), done by
``connector.install_scheduler_hook`` after LMDeploy builds its ``Scheduler``; nothing else
in LMDeploy changes. ``UPSTREAM_TRY_EVICT_LEAF_SHA256`` pins the upstream method source this
copy was made from; the activation guard refuses to activate when it differs.

Invariant: the observer must not raise. An exception would leave the leaves already detached
by this ``evict`` call unfreed, so ``HostTierScheduler.on_evict`` catches everything itself.
"""
from __future__ import annotations

import hashlib
import heapq
import inspect
from typing import Callable

from lmdeploy.pytorch.paging.block_trie.kv_lifecycle import KVBlockLifecycle
from lmdeploy.pytorch.paging.block_trie.node import Node

__all__ = [
    "EvictionObserver",
    "HostTierKVBlockLifecycle",
    "UPSTREAM_TRY_EVICT_LEAF_SHA256",
    "install_lifecycle_observer",
    "source_sha256",
]

EvictionObserver = Callable[[Node, int], None]

# sha256 of inspect.getsource(KVBlockLifecycle._try_evict_leaf) in lmdeploy 0.18.0.
UPSTREAM_TRY_EVICT_LEAF_SHA256 = "106752aaa3464858c936037e90ef2e89cf7c4e92491668ef8f7989a1b2c24670"


def source_sha256(func) -> str:
    """sha256 hex digest of a function's source text (what the guard pins)."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()


class HostTierKVBlockLifecycle(KVBlockLifecycle):
    """``KVBlockLifecycle`` that reports each evicted leaf to an observer before freeing it.

    Never constructed directly: an existing ``KVBlockLifecycle`` gets this class through
    ``install_lifecycle_observer`` so every reference LMDeploy already holds keeps working.
    """

    _host_tier_observer: EvictionObserver | None = None

    def _try_evict_leaf(self,
                        candidate_heap: list[tuple[float, int, Node]],
                        evicted_blocks: list[int]) -> tuple[bool, Node | None]:
        # Upstream 0.18.0 body (see UPSTREAM_TRY_EVICT_LEAF_SHA256) with one observer call.
        while len(candidate_heap) > 0:
            _, _, leaf = heapq.heappop(candidate_heap)
            if leaf not in self.leaves:
                continue
            if not self._is_leaf_eviction_candidate(leaf):
                self.leaves.discard(leaf)
                continue
            if self.state_checkpoints.is_pinned(leaf):
                continue
            if int(self.allocator.get_ref_count(leaf.block_id)) != 1:
                continue
            break
        else:
            return False, None

        observer = self._host_tier_observer
        if observer is not None:
            observer(leaf, int(self.allocator.get_physical_blocks(leaf.block_id)))
        evicted_blocks.append(leaf.block_id)
        self.state_checkpoints.release_checkpoint(leaf)
        parent = leaf.parent
        if parent is not None:
            leaf.detach_leaf()
        self.leaves.discard(leaf)
        return True, parent


def install_lifecycle_observer(lifecycle: KVBlockLifecycle, observer: EvictionObserver | None) -> None:
    """Swap ``lifecycle`` to ``HostTierKVBlockLifecycle`` and attach ``observer`` (idempotent).

    Raises TypeError for anything that is not exactly a stock ``KVBlockLifecycle`` (or already
    ours): a subclass from elsewhere could override ``_try_evict_leaf`` differently.
    """
    cls = type(lifecycle)
    if cls is not KVBlockLifecycle and cls is not HostTierKVBlockLifecycle:
        raise TypeError(f"cannot install the host-tier eviction hook on {cls.__module__}.{cls.__qualname__}; "
                        "expected lmdeploy's KVBlockLifecycle")
    lifecycle.__class__ = HostTierKVBlockLifecycle
    lifecycle._host_tier_observer = observer
