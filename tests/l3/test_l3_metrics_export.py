"""Store-tier counters next to the host tier's: stats-log line and Prometheus families."""
from __future__ import annotations

from lmdeploy_hostcache.integration.metrics_export import (L3_COUNTERS, HostTierCollector, format_l3_log_line,
                                                           format_log_line)
from lmdeploy_hostcache.tier.metrics import HostTierMetrics, L3TierMetrics


def _snapshots():
    host = HostTierMetrics()
    host.add(lookups=2, lookup_blocks=10, hit_blocks=4)
    l3 = L3TierMetrics()
    l3.add(lookups=3, lookup_blocks=6, hit_blocks=5, put_blocks=7, bytes_to_l3=1 << 30, bytes_from_l3=1 << 29,
           get_blocks=5, errors=2, timeouts=1, corrupt=1)
    l3.observe("get", 0.004)
    l3.observe("get", 0.002)
    l3.observe("exists", 0.001)
    return host.snapshot(), {**host.snapshot(), **l3.prefixed_snapshot()}


def test_log_lines():
    host_only, both = _snapshots()
    assert format_l3_log_line(host_only) is None
    line = format_l3_log_line(both, dp_rank=1)
    assert line.startswith("[DP1 l3-tier] lookups=3 hit_blocks=5/6 (83.3%) write_backs=7")
    assert "write_back=1.00GiB from_l3=0.50GiB errors=2 (timeouts=1)" in line
    assert "exists_latency_mean=1.00ms" in line
    # the scheduler side never sees a put's outcome or an object's check: none is claimed
    assert "refused" not in line and "corrupt" not in line and "missing" not in line
    assert format_log_line(both).startswith("[host-tier] lookups=2 hit_blocks=4/10")


def test_prometheus_families_next_to_the_host_tier():
    host_only, both = _snapshots()
    c = HostTierCollector()
    c.update(("m", "0"), host_only)
    names = {f.name for f in c.collect()}
    assert not any(n.startswith("lmdeploy:l3_cache_") for n in names)
    c.update(("m", "1"), both)
    fams = {f.name: f for f in c.collect()}
    assert "lmdeploy:host_cache_lookups" in fams
    for key, (name, _) in L3_COUNTERS.items():
        fam = fams["lmdeploy:l3_cache_" + name]
        assert [s.value for s in fam.samples if s.labels["engine"] == "1"] == [float(both[key])]
    assert not any(n.startswith(("lmdeploy:l3_cache_put_refused", "lmdeploy:l3_cache_corrupt",
                                 "lmdeploy:l3_cache_missing")) for n in fams)
    lat = fams["lmdeploy:l3_cache_call_latency_seconds"]
    got = {(s.name, s.labels["op"]): s.value for s in lat.samples}
    assert got[("lmdeploy:l3_cache_call_latency_seconds_count", "exists")] == 1
    assert abs(got[("lmdeploy:l3_cache_call_latency_seconds_sum", "exists")] - 0.001) < 1e-9
    # the store's keys never leak into the host tier's generic gauges
    assert not any(n.startswith("lmdeploy:host_cache_l3_") for n in fams)


def test_a_worker_rank_logs_what_only_it_sees(caplog):
    """Puts and object checks run in the workers: each rank warns once when the store refuses a put or
    serves an object that fails its checks, and logs a summary at most every LOG_EVERY_S seconds."""
    import logging
    from types import SimpleNamespace

    from lmdeploy_hostcache.integration.l3_tier import WorkerL3

    m = L3TierMetrics()
    w = WorkerL3(SimpleNamespace(write_back_errors=0), m, tp_rank=1)
    with caplog.at_level(logging.INFO, logger="lmdeploy_hostcache.l3"):
        m.add(put_blocks=3, put_refused=2)
        w.log_progress(now=w._logged_at + 1)          # too soon for a summary; the refusal warns at once
        m.add(put_refused=5, corrupt=1, errors=1)
        w.log_progress(now=w._logged_at + 2)
        w.log_progress(now=w._logged_at + WorkerL3.LOG_EVERY_S + 1)
        w.log_progress(now=w._logged_at + 2 * WorkerL3.LOG_EVERY_S + 2)   # nothing moved: no new line
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("refused a put" in x for x in msgs) == 1 and sum("failed its checks" in x for x in msgs) == 1
    summaries = [x for x in msgs if x.startswith("l3 tier rank 1: put_blocks=")]
    assert summaries == ["l3 tier rank 1: put_blocks=3 put_refused=7 get_blocks=0 errors=1 timeouts=0 missing=0 "
                         "corrupt=1 corrupt_removed=0, write-back errors 0"]
