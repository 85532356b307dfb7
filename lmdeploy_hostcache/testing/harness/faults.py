"""Deterministic copy-failure injection for the host-tier harness.

:class:`FaultInjector` is a ``WorkloadDriver`` ``on_iteration`` callback: on every iteration ``it``
with ``it % every == every - 1`` it arms ``fail_next(1, kind=...)`` on one TP rank's transfer copy
engine, so the next load (or store) that rank submits fails. The same iteration numbers give the
same armings on every run (no randomness here). The copy engine is looked up on every call, so an
engine whose worker connectors were rebuilt (sleep/wakeup) is injected into through its new ones;
while the engine is asleep (no worker connector) nothing is armed.

Slow copies need no injector: ``HostTierSpec.copy_delay_polls`` makes every copy complete only
after that many extra polls.
"""
from __future__ import annotations

from .host_tier import copy_engine


class FaultInjector:
    """Arms ``fail_next`` on one TP rank's copy engine at fixed iterations (deterministic)."""

    def __init__(self, engine, *, load_every: int = 0, store_every: int = 0, rank: int = 0):
        self.engine = engine
        self.load_every = load_every
        self.store_every = store_every
        self.rank = rank
        self.armed_loads = 0
        self.armed_stores = 0

    def __call__(self, driver) -> None:
        if self.engine.worker_connectors[self.rank] is None:   # asleep or closed: no copy engine
            return
        it = driver.iteration
        if self.load_every and it % self.load_every == self.load_every - 1:
            copy_engine(self.engine, self.rank).fail_next(1, kind='load')
            self.armed_loads += 1
        if self.store_every and it % self.store_every == self.store_every - 1:
            copy_engine(self.engine, self.rank).fail_next(1, kind='store')
            self.armed_stores += 1
