"""Host-tier counters in LMDeploy's periodic stats log and on its Prometheus endpoint.

Data path (works whether the engine runs in the API-server process or in LMDeploy's
separate engine process, because ``ScheduleMetrics`` is pickled across):

    scheduler connector .metrics (HostTierMetrics)
      -> Engine.get_schedule_metrics(): ScheduleMetrics.host_tier = snapshot()
      -> SchedulerStats.update_from_schedule_metrics(): stats.host_tier
      -> LoggingStatLogger.log(): one extra "[DPn host-tier] ..." line after LMDeploy's own
         (``format_log_line``; and an "[DPn l3-tier] ..." line when the snapshot carries the
         store tier's ``l3_`` keys)
      -> PrometheusStatLogger.record_schedule(): HostTierCollector (lmdeploy:host_cache_*,
         and lmdeploy:l3_cache_* for the store tier)

``activate.py`` binds the wrappers built here. Invariants: one ``HostTierCollector`` per
process, registered once in ``prometheus_client.REGISTRY`` (it has no ``_name``, so
LMDeploy's "unregister every lmdeploy collector" loop leaves it alone); counters are
exported as Prometheus counters because ``HostTierMetrics`` counters only grow; with
no host tier configured nothing is added anywhere.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "COUNTERS",
    "HostTierCollector",
    "collector",
    "L3_COUNTERS",
    "format_l3_log_line",
    "format_log_line",
    "host_tier_snapshot",
    "wrap_engine_get_schedule_metrics",
    "wrap_logging_log",
    "wrap_prometheus_init",
    "wrap_prometheus_record_schedule",
    "wrap_update_from_schedule_metrics",
]

PREFIX = "lmdeploy:host_cache_"
# snapshot key -> (Prometheus name without _total, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("lookups", "Host-tier lookups (request turns that reached the host tier; a turn LMDeploy retries counts once)."),
    "lookup_blocks": ("lookup_blocks", "Blocks looked up in the host tier past the GPU prefix match."),
    "hit_blocks": ("hit_blocks", "Blocks found host-resident and verified."),
    "hit_tokens": ("hit_tokens", "Tokens in host-tier hits."),
    "lookups_behind_demotion": ("lookups_behind_demotion", "Request turns whose host match stopped at a block "
                                                           "still being demoted to host memory (each turn once)."),
    "restored_tokens": ("restored_tokens", "Tokens whose host-to-GPU restore completed."),
    "restore_failures": ("restore_failures", "Restores that failed or were aborted (recomputed instead), or were "
                                             "refused for want of host slots to stage store blocks in."),
    "demotions": ("demotions", "Blocks demoted from GPU to host memory."),
    "demotion_failures": ("demotion_failures", "Demotions that failed."),
    "demotions_skipped": ("demotions_skipped", "GPU evictions of blocks already in host memory (nothing copied)."),
    "demotions_refused": ("demotions_refused", "GPU evictions the host tier had no free or evictable slot for "
                                               "(nothing copied)."),
    "host_evictions": ("evictions", "Host blocks evicted to make room or orphaned (a host ancestor left every "
                                    "tier), each once."),
    "corrupt_blocks": ("corrupt_blocks", "Host blocks dropped because a worker found their bytes changed since "
                                         "they were written (checksum on); their host subtrees are in evictions."),
    "bytes_to_host": ("bytes_to_host", "Bytes copied GPU -> host, by demotion batches that completed on every "
                                       "TP rank."),
    "bytes_to_gpu": ("bytes_to_gpu", "Bytes copied host -> GPU, by loads that completed on every TP rank "
                                     "(a restore cancelled after its copy included)."),
}
_LATENCY_KEYS = ("restore_latency_mean_s", "restore_latency_max_s", "restore_latency_count")

# The shared store tier (``l3:``): its counters ride in the same snapshot under ``l3_`` keys
# (``metrics.L3TierMetrics.prefixed_snapshot``) and are exported as lmdeploy:l3_cache_*.
L3_PREFIX = "lmdeploy:l3_cache_"
L3_COUNTERS: dict[str, tuple[str, str]] = {
    # Only what the scheduler's side measures: the puts and the object checks happen in the worker
    # processes (each rank logs its own counters, l3_tier.WorkerL3.log_progress), and LMDeploy's
    # connector output has no channel to carry them back.
    "l3_lookups": ("lookups", "Store lookups (request turns whose existence check past the host match was "
                              "answered; a turn LMDeploy retries counts once)."),
    "l3_lookup_blocks": ("lookup_blocks", "Blocks looked up in the shared store (each once per request turn)."),
    "l3_hit_blocks": ("hit_blocks", "Blocks found in the shared store, consecutively (each once per request turn)."),
    "l3_put_blocks": ("write_back_blocks", "Blocks handed to the workers to write to the shared store "
                                           "(a put the store refuses is in the workers' log, not here)."),
    "l3_get_blocks": ("get_blocks", "Blocks read from the shared store, verified and copied to the GPU on every "
                                    "TP rank (a restore cancelled after its copy included)."),
    "l3_bytes_to_l3": ("write_back_bytes", "Bytes handed to the workers to write to the shared store."),
    "l3_bytes_from_l3": ("bytes_from_store", "Bytes of the blocks counted in get_blocks."),
    "l3_errors": ("errors", "Store lookup calls that failed, and store restores the workers reported failed "
                            "(the store read, or the host-to-GPU copy after it); each fell back to recompute. "
                            "A cancelled restore is not an error."),
    "l3_timeouts": ("timeouts", "Store lookups past their deadline."),
}
_L3_OPS = ("exists",)   # the only store call the scheduler side makes (puts and gets run in the workers)


def host_tier_snapshot(connector: Any) -> dict[str, float] | None:
    """Counters (and occupancy when offered) of the scheduler-side host tier, else None.

    Prefers ``connector.scheduler_side.stats()`` (counters plus host_slots/host_slots_used),
    falls back to ``connector.metrics.snapshot()``; any other connector gives None.
    """
    if connector is None or not type(connector).__module__.startswith("lmdeploy_hostcache."):
        return None
    try:
        stats = getattr(getattr(connector, "scheduler_side", None), "stats", None)
        if callable(stats):
            return dict(stats())
        snap = getattr(getattr(connector, "metrics", None), "snapshot", None)
        return dict(snap()) if callable(snap) else None
    except Exception:  # metrics must never break the engine's status calls
        return None


def format_log_line(s: Mapping[str, float], dp_rank: int | None = None) -> str:
    """The stats-log line ``[DPn host-tier] ...`` from a snapshot dict: ``HostTierMetrics.log_line``'s
    fields plus ``hit_tokens=`` and the restore latency's ``max=``."""
    lookup_blocks = s.get("lookup_blocks", 0)
    hit = s.get("hit_blocks", 0) / lookup_blocks if lookup_blocks else 0.0
    where = f"DP{dp_rank} " if dp_rank is not None else ""
    return (f"[{where}host-tier] lookups={s.get('lookups', 0)} "
            f"hit_blocks={s.get('hit_blocks', 0)}/{lookup_blocks} ({hit:.1%}) "
            f"hit_tokens={s.get('hit_tokens', 0)} restored_tokens={s.get('restored_tokens', 0)} "
            f"restore_failures={s.get('restore_failures', 0)} demotions={s.get('demotions', 0)} "
            f"host_evictions={s.get('host_evictions', 0)} "
            f"to_host={s.get('bytes_to_host', 0) / 2**30:.2f}GiB to_gpu={s.get('bytes_to_gpu', 0) / 2**30:.2f}GiB "
            f"restore_latency_mean={s.get('restore_latency_mean_s', 0.0) * 1e3:.2f}ms "
            f"max={s.get('restore_latency_max_s', 0.0) * 1e3:.2f}ms")


def format_l3_log_line(s: Mapping[str, float], dp_rank: int | None = None) -> str | None:
    """The store tier's stats-log line from the ``l3_`` keys of a snapshot; None without them."""
    if "l3_lookups" not in s:
        return None
    lb = s.get("l3_lookup_blocks", 0)
    hit = s.get("l3_hit_blocks", 0) / lb if lb else 0.0
    where = f"DP{dp_rank} " if dp_rank is not None else ""
    return (f"[{where}l3-tier] lookups={s.get('l3_lookups', 0)} hit_blocks={s.get('l3_hit_blocks', 0)}/{lb} "
            f"({hit:.1%}) write_backs={s.get('l3_put_blocks', 0)} "
            f"get_blocks={s.get('l3_get_blocks', 0)} write_back={s.get('l3_bytes_to_l3', 0) / 2**30:.2f}GiB "
            f"from_l3={s.get('l3_bytes_from_l3', 0) / 2**30:.2f}GiB errors={s.get('l3_errors', 0)} "
            f"(timeouts={s.get('l3_timeouts', 0)}) "
            f"exists_latency_mean={s.get('l3_exists_latency_mean_s', 0.0) * 1e3:.2f}ms")


class HostTierCollector:
    """A prometheus_client custom collector over the latest snapshot per (model_name, engine)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], dict[str, float]] = {}

    def update(self, labels: tuple[str, str], snapshot: Mapping[str, float]) -> None:
        with self._lock:
            self._latest[labels] = dict(snapshot)

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()

    def describe(self):  # lets REGISTRY detect name clashes without calling collect()
        return list(self._families({}))

    def collect(self):
        with self._lock:
            latest = {k: dict(v) for k, v in self._latest.items()}
        return list(self._families(latest))

    @staticmethod
    def _families(latest: dict[tuple[str, str], dict[str, float]]):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        labels = ["model_name", "engine"]
        for key, (name, help_text) in COUNTERS.items():
            fam = CounterMetricFamily(PREFIX + name, help_text, labels=labels)
            for lv, snap in latest.items():
                if key in snap:
                    fam.add_metric(list(lv), float(snap[key]))
            yield fam
        lat = SummaryMetricFamily(PREFIX + "restore_latency_seconds",
                                  "Host-to-GPU restore latency, from load start to completion.", labels=labels)
        worst = GaugeMetricFamily(PREFIX + "restore_latency_max_seconds",
                                  "Largest host-to-GPU restore latency seen.", labels=labels)
        for lv, snap in latest.items():
            count = snap.get("restore_latency_count", 0)
            lat.add_metric(list(lv), count_value=count, sum_value=snap.get("restore_latency_mean_s", 0.0) * count)
            worst.add_metric(list(lv), float(snap.get("restore_latency_max_s", 0.0)))
        yield lat
        yield worst
        yield from HostTierCollector._l3_families(latest, labels)
        # Any further numeric field the connector adds (slots in use, ...) becomes a gauge.
        extra_keys = sorted({k for snap in latest.values() for k in snap if not k.startswith("l3_")}
                            - set(COUNTERS) - set(_LATENCY_KEYS))
        for key in extra_keys:
            fam = GaugeMetricFamily(PREFIX + key, f"Host tier: {key.replace('_', ' ')}.", labels=labels)
            for lv, snap in latest.items():
                value = snap.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fam.add_metric(list(lv), float(value))
            yield fam


    @staticmethod
    def _l3_families(latest: dict[tuple[str, str], dict[str, float]], labels: list[str]):
        """lmdeploy:l3_cache_* families; only for snapshots that carry the store tier."""
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

        with_l3 = {lv: snap for lv, snap in latest.items() if "l3_lookups" in snap}
        if not with_l3:
            return
        for key, (name, help_text) in L3_COUNTERS.items():
            fam = CounterMetricFamily(L3_PREFIX + name, help_text, labels=labels)
            for lv, snap in with_l3.items():
                fam.add_metric(list(lv), float(snap.get(key, 0)))
            yield fam
        lat = SummaryMetricFamily(L3_PREFIX + "call_latency_seconds",
                                  "Latency of successful shared-store calls, by operation.", labels=labels + ["op"])
        for lv, snap in with_l3.items():
            for op in _L3_OPS:
                count = snap.get(f"l3_{op}_latency_count", 0)
                lat.add_metric(list(lv) + [op], count_value=count,
                               sum_value=snap.get(f"l3_{op}_latency_mean_s", 0.0) * count)
        yield lat


_collector: HostTierCollector | None = None
_registered = False
_reg_lock = threading.Lock()


def collector(register: bool = True) -> HostTierCollector:
    """The process-wide collector; registered in ``prometheus_client.REGISTRY`` once."""
    global _collector, _registered
    with _reg_lock:
        if _collector is None:
            _collector = HostTierCollector()
        if register and not _registered:
            from prometheus_client import REGISTRY

            REGISTRY.register(_collector)
            _registered = True
        return _collector


# -- wrappers (bound by activate.py) -------------------------------------------------------

def _mark(fn: Callable) -> Callable:
    fn.__hostcache_wrapped__ = True
    return fn


def wrap_engine_get_schedule_metrics(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_schedule_metrics(self):
        metrics = original(self)
        scheduler = getattr(self, "scheduler", None)
        snap = host_tier_snapshot(getattr(scheduler, "kv_connector", None))
        if snap is not None and metrics is not None:
            metrics.host_tier = snap
        return metrics

    return _mark(get_schedule_metrics)


def wrap_update_from_schedule_metrics(original: Callable) -> Callable:
    @functools.wraps(original)
    def update_from_schedule_metrics(self, scheduled_metrics):
        original(self, scheduled_metrics)
        self.host_tier = getattr(scheduled_metrics, "host_tier", None)

    return _mark(update_from_schedule_metrics)


def wrap_logging_log(original: Callable) -> Callable:
    @functools.wraps(original)
    def log(self):
        # LMDeploy skips the line when no token was processed since the last one; so do we.
        will_print = bool(getattr(self, "total_prompt_tokens", 0) or getattr(self, "total_generation_tokens", 0))
        original(self)
        snap = getattr(getattr(self, "last_scheduler_stats", None), "host_tier", None)
        if will_print and snap:
            print(format_log_line(snap, getattr(self, "dp_rank", None)), flush=True)
            l3_line = format_l3_log_line(snap, getattr(self, "dp_rank", None))
            if l3_line:
                print(l3_line, flush=True)

    return _mark(log)


def wrap_prometheus_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, model_name: str, max_model_len: int, dp_rank: int = 0, *args, **kwargs):
        original(self, model_name, max_model_len, dp_rank, *args, **kwargs)
        self._hostcache_labels = (str(model_name), str(dp_rank))
        collector(register=True)

    return _mark(__init__)


def wrap_prometheus_record_schedule(original: Callable) -> Callable:
    @functools.wraps(original)
    def record_schedule(self, stats):
        original(self, stats)
        snap = getattr(stats, "host_tier", None)
        labels = getattr(self, "_hostcache_labels", None)
        if snap and labels is not None:
            collector(register=True).update(labels, snap)

    return _mark(record_schedule)
