"""``ApproxNode``: what a node that publishes no cache state probably holds.

The proxy records every request it routes to such a node (a stock LMDeploy node, or one whose
feed stopped) and models the node's two exclusive tiers as the planner does: a GPU LRU of the
node's registered GPU capacity whose victims move to a host LRU of its registered host
capacity; a block found again moves back to the GPU tier.  Each change is returned as events
for the ``BlockTable``, so exact and approximate nodes are matched by one code path.

Invariants: at most ``gpu_blocks`` ids in the GPU LRU and ``host_blocks`` in the host LRU;
an id is in at most one of them; ``record`` returns exactly the membership changes it made.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from .table import GPU, HOST

Event = tuple[int, int, int]  # (+1 stored | -1 removed, tier, id)


class ApproxNode:
    """Two exclusive LRU tiers over published ids; see the module docstring."""

    def __init__(self, gpu_blocks: int, host_blocks: int) -> None:
        self.gpu_blocks = int(gpu_blocks)
        self.host_blocks = int(host_blocks)
        self.gpu: OrderedDict[int, None] = OrderedDict()
        self.host: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.gpu) + len(self.host)

    def record(self, ids: Iterable[int]) -> list[Event]:
        """The node served a prompt with these full-block ids (in order): all are on its GPU now.

        Touched from the last block to the first, so a prompt's first blocks are the most
        recent: LRU victims are then tails before their prefixes, as a leaf-first trie evicts."""
        ev: list[Event] = []
        gpu, host = self.gpu, self.host
        for i in reversed(list(ids)):
            if i in gpu:
                gpu.move_to_end(i)
                continue
            if i in host:
                del host[i]
                ev.append((-1, HOST, i))
            if self.gpu_blocks == 0:
                continue
            gpu[i] = None
            ev.append((1, GPU, i))
            while len(gpu) > self.gpu_blocks:
                victim, _ = gpu.popitem(last=False)
                ev.append((-1, GPU, victim))
                if self.host_blocks:
                    host[victim] = None
                    ev.append((1, HOST, victim))
                    while len(host) > self.host_blocks:
                        old, _ = host.popitem(last=False)
                        ev.append((-1, HOST, old))
        return ev

    def contents(self) -> tuple[list[int], list[int]]:
        return list(self.gpu), list(self.host)
