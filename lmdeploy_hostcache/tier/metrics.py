"""Host-tier counters (plain Python, no LMDeploy import).

One ``HostTierMetrics`` lives in the scheduler-side connector and is exported by
``integration.metrics_export`` to LMDeploy's stats log and Prometheus endpoint.
Invariant: counters only grow; ``snapshot()`` is a consistent copy.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


def _add_counters(metrics, deltas: dict, not_a_counter: str) -> None:
    """Add ``deltas`` to the integer counters of a metrics dataclass under its lock; a private
    field, ``not_a_counter`` or an unknown name raises AttributeError naming the class, a negative
    delta ValueError (counters only grow), and then no counter of the call changes."""
    with metrics._lock:
        for name, delta in deltas.items():
            if name.startswith("_") or name == not_a_counter or not hasattr(metrics, name):
                raise AttributeError(f"{type(metrics).__name__} has no counter {name!r}")
            if delta < 0:
                raise ValueError(f"{type(metrics).__name__}.{name}: counters only grow, got {delta}")
        for name, delta in deltas.items():
            setattr(metrics, name, getattr(metrics, name) + delta)


@dataclass
class LatencyStat:
    """Sum/count/max of a latency in seconds (enough for a mean and a worst case)."""

    sum_s: float = 0.0
    count: int = 0
    max_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.sum_s += seconds
        self.count += 1
        if seconds > self.max_s:
            self.max_s = seconds

    @property
    def mean_s(self) -> float:
        return self.sum_s / self.count if self.count else 0.0


@dataclass
class HostTierMetrics:
    """Counters of the host tier, as seen by the scheduler-side connector."""

    lookups: int = 0            # request turns that reached the host tier (a turn LMDeploy retries counts once)
    lookup_blocks: int = 0      # blocks asked for past the GPU match, each once per turn
    hit_blocks: int = 0         # blocks found host-resident and verified, each once per turn
    hit_tokens: int = 0
    # request turns (each once) whose host match stopped at a block still being demoted: not matchable until its
    # copy lands, so the rest of the prefix is recomputed unless a later attempt of the turn finds it landed
    lookups_behind_demotion: int = 0
    restored_tokens: int = 0    # tokens whose load completed successfully
    restore_failures: int = 0   # loads that failed, were cancelled, or were refused before shipping (recompute)
    demotions: int = 0          # blocks queued GPU -> host
    demotion_failures: int = 0
    demotions_skipped: int = 0  # GPU evictions of blocks already host-resident (nothing copied)
    demotions_refused: int = 0  # GPU evictions the host tier had no slot for (nothing copied)
    host_evictions: int = 0     # host blocks evicted to make room, or orphaned (a host ancestor left every tier)
    corrupt_blocks: int = 0     # host blocks dropped because a worker found their bytes changed (checksum)
    bytes_to_host: int = 0      # demotion batches copied on every TP rank
    bytes_to_gpu: int = 0       # loads copied on every TP rank (a restore cancelled after its copy included)
    restore_latency: LatencyStat = field(default_factory=LatencyStat)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add to counters by name; an unknown name raises AttributeError."""
        _add_counters(self, deltas, "restore_latency")

    def observe_restore_latency(self, seconds: float) -> None:
        with self._lock:
            self.restore_latency.observe(seconds)

    def snapshot(self) -> dict[str, float]:
        """A flat dict of every counter plus restore-latency mean/max/count."""
        with self._lock:
            out: dict[str, float] = {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if not f.name.startswith("_") and f.name != "restore_latency"
            }
            out["restore_latency_mean_s"] = self.restore_latency.mean_s
            out["restore_latency_max_s"] = self.restore_latency.max_s
            out["restore_latency_count"] = self.restore_latency.count
        return out

    def log_line(self) -> str:
        """One human-readable line for LMDeploy's periodic stats log."""
        s = self.snapshot()
        hit = s["hit_blocks"] / s["lookup_blocks"] if s["lookup_blocks"] else 0.0
        return (
            f"host-tier: lookups={s['lookups']} hit_blocks={s['hit_blocks']}/{s['lookup_blocks']} ({hit:.1%}) "
            f"restored_tokens={s['restored_tokens']} restore_failures={s['restore_failures']} "
            f"demotions={s['demotions']} host_evictions={s['host_evictions']} "
            f"to_host={s['bytes_to_host'] / 2**30:.2f}GiB to_gpu={s['bytes_to_gpu'] / 2**30:.2f}GiB "
            f"restore_latency_mean={s['restore_latency_mean_s'] * 1e3:.2f}ms"
        )


@dataclass
class L3TierMetrics:
    """Counters of the shared store tier (``l3.client.L3Client`` adds to them).

    Same contract as ``HostTierMetrics``: counters only grow, ``snapshot()`` is a consistent copy.
    """

    lookups: int = 0            # scheduler: request turns with an answered store lookup (a retried turn once)
    lookup_blocks: int = 0      # blocks asked for (scheduler: each once per turn)
    hit_blocks: int = 0         # blocks found in the store, consecutively from the first (scheduler: once per turn)
    put_blocks: int = 0         # blocks written (or already present)
    put_refused: int = 0        # blocks the store refused (full)
    get_blocks: int = 0         # blocks read back and verified (scheduler: of staged loads every rank completed)
    bytes_to_l3: int = 0
    bytes_from_l3: int = 0
    errors: int = 0             # every failed call or unusable block (each falls back to recompute); scheduler:
                                # failed lookups, and staged loads the workers reported failed (never a cancellation)
    timeouts: int = 0           # calls past their deadline (also counted in errors)
    missing: int = 0            # blocks gone between lookup and read (also in errors)
    corrupt: int = 0            # blocks failing checksum/header/token checks (also in errors)
    corrupt_removed: int = 0    # of those, objects removed from the store (workers; a later write-back replaces them)
    latency: dict = field(default_factory=dict)   # op -> LatencyStat
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add to counters by name; an unknown name raises AttributeError."""
        _add_counters(self, deltas, "latency")

    def observe(self, op: str, seconds: float) -> None:
        """Latency of one successful store call (``exists``, ``put``, ``get``)."""
        with self._lock:
            self.latency.setdefault(op, LatencyStat()).observe(seconds)

    def snapshot(self) -> dict[str, float]:
        """Flat dict: every counter plus ``<op>_latency_{mean_s,max_s,count}`` per op seen."""
        with self._lock:
            out: dict[str, float] = {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if not f.name.startswith("_") and f.name != "latency"
            }
            for op, lat in sorted(self.latency.items()):
                out[f"{op}_latency_mean_s"] = lat.mean_s
                out[f"{op}_latency_max_s"] = lat.max_s
                out[f"{op}_latency_count"] = lat.count
        return out

    def prefixed_snapshot(self) -> dict[str, float]:
        """``snapshot()`` with every key prefixed ``l3_``: merged into the host tier's snapshot
        dict that travels to the stats log and Prometheus (``integration.metrics_export``)."""
        return {f"l3_{k}": v for k, v in self.snapshot().items()}

    def log_line(self) -> str:
        """One line for LMDeploy's stats log, next to the host tier's."""
        s = self.snapshot()
        hit = s["hit_blocks"] / s["lookup_blocks"] if s["lookup_blocks"] else 0.0
        return (
            f"l3-tier: lookups={s['lookups']} hit_blocks={s['hit_blocks']}/{s['lookup_blocks']} ({hit:.1%}) "
            f"put_blocks={s['put_blocks']} put_refused={s['put_refused']} get_blocks={s['get_blocks']} "
            f"to_l3={s['bytes_to_l3'] / 2**30:.2f}GiB from_l3={s['bytes_from_l3'] / 2**30:.2f}GiB "
            f"errors={s['errors']} (timeouts={s['timeouts']} missing={s['missing']} corrupt={s['corrupt']}) "
            f"get_latency_mean={s.get('get_latency_mean_s', 0.0) * 1e3:.2f}ms"
        )
