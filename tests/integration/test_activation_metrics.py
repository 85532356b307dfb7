"""Host-tier counters through LMDeploy's own metrics path: ScheduleMetrics -> SchedulerStats ->
LoggingStatLogger (periodic log line) and PrometheusStatLogger (/metrics registry)."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("lmdeploy")
prometheus_client = pytest.importorskip("prometheus_client")

from lmdeploy_hostcache.integration import activate as act  # noqa: E402
from lmdeploy_hostcache.integration import metrics_export  # noqa: E402
from lmdeploy_hostcache.tier.metrics import HostTierMetrics  # noqa: E402


class FakeHostTierConnector:
    """Stands in for the scheduler-side HostTierConnector: only ``.metrics`` is read."""

    def __init__(self, metrics):
        self.metrics = metrics


FakeHostTierConnector.__module__ = "lmdeploy_hostcache.integration.fake_connector"


@pytest.fixture
def active():
    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    import lmdeploy.metrics.loggers  # noqa: F401
    import lmdeploy.metrics.stats  # noqa: F401
    import lmdeploy.pytorch.engine.engine  # noqa: F401


def _metrics() -> HostTierMetrics:
    m = HostTierMetrics()
    m.add(lookups=5, lookup_blocks=40, hit_blocks=30, hit_tokens=1920, restored_tokens=1856,
          restore_failures=1, demotions=70, host_evictions=12, bytes_to_host=70 << 20, bytes_to_gpu=29 << 20)
    m.observe_restore_latency(0.004)
    m.observe_restore_latency(0.002)
    return m


def _schedule_metrics(connector):
    from lmdeploy.messages import ScheduleMetrics
    from lmdeploy.pytorch.engine.engine import Engine

    engine = SimpleNamespace(scheduler=SimpleNamespace(
        schedule_metrics=ScheduleMetrics(active_seqs=2, waiting_seqs=1, cache_usage=0.5), kv_connector=connector))
    return Engine.get_schedule_metrics(engine)


def test_schedule_metrics_carry_the_snapshot_and_survive_pickling(active):
    sm = _schedule_metrics(FakeHostTierConnector(_metrics()))
    assert sm.host_tier["hit_blocks"] == 30
    back = pickle.loads(pickle.dumps(sm))  # LMDeploy's mp engine ships it with pickle
    assert back.host_tier == sm.host_tier and back.active_seqs == 2


def test_no_host_tier_adds_nothing(active):
    sm = _schedule_metrics(None)
    assert not hasattr(sm, "host_tier")
    other = SimpleNamespace(metrics=_metrics())  # a connector that is not ours
    assert not hasattr(_schedule_metrics(other), "host_tier")


def test_periodic_log_gets_a_host_tier_line(active, capsys):
    from lmdeploy.metrics.loggers import LoggingStatLogger
    from lmdeploy.metrics.stats import SchedulerStats

    stats = SchedulerStats()
    stats.update_from_schedule_metrics(_schedule_metrics(FakeHostTierConnector(_metrics())))
    logger = LoggingStatLogger(dp_rank=0)
    logger.record_schedule(stats)
    logger.total_prompt_tokens = 100
    logger.log()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Avg thr" in lines[0]
    assert "[DP0 host-tier] lookups=5 hit_blocks=30/40 (75.0%)" in lines[1]
    assert "restored_tokens=1856" in lines[1] and "restore_latency_mean=3.00ms" in lines[1]
    logger.log()  # idle interval: LMDeploy prints nothing, neither do we
    assert capsys.readouterr().out == ""


def test_prometheus_endpoint_exports_the_counters(active):
    from lmdeploy.metrics.loggers import PrometheusStatLogger
    from lmdeploy.metrics.stats import SchedulerStats

    stats = SchedulerStats()
    stats.update_from_schedule_metrics(_schedule_metrics(FakeHostTierConnector(_metrics())))
    prom = PrometheusStatLogger(model_name="m1", max_model_len=4096, dp_rank=0)
    PrometheusStatLogger(model_name="m1", max_model_len=4096, dp_rank=0)  # re-created: still one collector
    prom.record_schedule(stats)
    text = prometheus_client.generate_latest().decode()
    labels = 'engine="0",model_name="m1"'

    def value(name):
        prefix = f"{name}{{{labels}}} "
        found = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
        assert len(found) == 1, (name, found)
        return found[0]

    assert value("lmdeploy:host_cache_hit_blocks_total") == 30
    assert value("lmdeploy:host_cache_bytes_to_host_total") == 70 << 20
    assert value("lmdeploy:host_cache_evictions_total") == 12
    assert value("lmdeploy:host_cache_restore_latency_seconds_count") == 2
    assert value("lmdeploy:host_cache_restore_latency_seconds_sum") == pytest.approx(0.006)
    assert "lmdeploy:gpu_cache_usage_perc" in text  # LMDeploy's own metrics are still there
    assert text.count("# TYPE lmdeploy:host_cache_hit_blocks_total counter") == 1


def test_extra_numeric_stats_become_gauges():
    col = metrics_export.HostTierCollector()
    col.update(("m", "0"), {"hit_blocks": 3, "host_slots_used": 7, "host_slots": 64})
    families = {f.name: f for f in col.collect()}
    assert families["lmdeploy:host_cache_host_slots_used"].samples[0].value == 7.0
    assert families["lmdeploy:host_cache_hit_blocks"].samples[0].value == 3.0
