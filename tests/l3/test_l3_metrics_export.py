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
    assert line.startswith("[DP1 l3-tier] lookups=3 hit_blocks=5/6 (83.3%) put_blocks=7")
    assert "to_l3=1.00GiB from_l3=0.50GiB errors=2 (timeouts=1 missing=0 corrupt=1)" in line
    assert "get_latency_mean=3.00ms" in line
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
    lat = fams["lmdeploy:l3_cache_call_latency_seconds"]
    got = {(s.name, s.labels["op"]): s.value for s in lat.samples}
    assert got[("lmdeploy:l3_cache_call_latency_seconds_count", "get")] == 2
    assert abs(got[("lmdeploy:l3_cache_call_latency_seconds_sum", "get")] - 0.006) < 1e-9
    # the store's keys never leak into the host tier's generic gauges
    assert not any(n.startswith("lmdeploy:host_cache_l3_") for n in fams)
