"""The ``l3:`` section: field-level errors, defaults, round trip."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.config import ConfigError
from lmdeploy_hostcache.l3.config import L3Config, parse_l3_section


def test_absent_section_means_no_third_tier():
    assert parse_l3_section(None) is None
    assert parse_l3_section(False) is None


def test_defaults_and_round_trip():
    cfg = parse_l3_section({"master_address": "10.0.0.5:50051"})
    assert cfg == L3Config(master_address="10.0.0.5:50051")
    assert cfg.metadata_server == "P2PHANDSHAKE" and cfg.protocol == "tcp"
    assert cfg.write_policy == "write_back" and cfg.on_unreachable == "error"
    assert parse_l3_section(cfg.to_dict()) == cfg
    assert cfg.memory_gb == cfg.global_segment_gb + cfg.local_buffer_gb


def test_values_are_normalised():
    cfg = parse_l3_section({"master-address": "h:1", "protocol": "RDMA", "global_segment_gb": "16",
                            "timeout_ms": "500", "metadata_server": "http://m:8080/metadata",
                            "write_policy": "write_through", "on_unreachable": "warn"})
    assert cfg.protocol == "rdma" and cfg.global_segment_gb == 16.0 and cfg.timeout_ms == 500
    assert cfg.global_segment_bytes == 16 << 30


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as ei:
        parse_l3_section({"master_address": "nohostport", "protocol": "udp", "global_segment_gb": -1,
                          "timeout_ms": 0, "metadata_server": "ftp://x", "backend": "redis",
                          "local_hostname": "", "write_policy": "sometimes", "on_unreachable": 1,
                          "local_bufer_gb": 1})
    fields = {e.field for e in ei.value.errors}
    assert fields == {"l3.master_address", "l3.protocol", "l3.global_segment_gb", "l3.timeout_ms",
                      "l3.metadata_server", "l3.backend", "l3.local_hostname", "l3.write_policy",
                      "l3.on_unreachable", "l3.local_bufer_gb"}
    msg = str(ei.value)
    assert "did you mean 'local_buffer_gb'" in msg and "'tcp' or 'rdma'" in msg


def test_missing_address_and_wrong_type():
    with pytest.raises(ConfigError, match=r"l3\.master_address: missing"):
        parse_l3_section({"protocol": "tcp"})
    with pytest.raises(ConfigError, match=r"l3: got 'yes'"):
        parse_l3_section("yes")
    with pytest.raises(ConfigError, match="port"):
        parse_l3_section({"master_address": "h:70000"})
    for port in ("５００５１", "²"):          # digits, but not ASCII ones
        with pytest.raises(ConfigError, match="port in 1..65535"):
            parse_l3_section({"master_address": f"h:{port}"})


@pytest.mark.parametrize("field", ["global_segment_gb", "local_buffer_gb"])
@pytest.mark.parametrize("value", [1e-12, 0, 1e300, float("inf"), "2e7"])
def test_sizes_that_round_to_nothing_or_no_machine_has_are_refused_naming_the_field(field, value):
    low = "0.015625" if field == "global_segment_gb" else "0.001"   # Mooncake's 16 MiB segment floor
    with pytest.raises(ConfigError, match=rf"l3\.{field}: .*GiB in \[{low}, 1.04858e\+06\]"):
        parse_l3_section({"master_address": "h:1", field: value})


def test_hook_in_host_cache_config(tmp_path):
    from lmdeploy_hostcache.config import HostCacheConfig

    assert HostCacheConfig().l3 is None
    cfg = HostCacheConfig.from_dict({"host_cache_gb": 8, "l3": {"master_address": "m:7", "global_segment_gb": 2}})
    assert cfg.l3 == L3Config(master_address="m:7", global_segment_gb=2.0)
    assert HostCacheConfig.from_dict(cfg.to_dict()) == cfg
    assert HostCacheConfig.from_yaml_text(cfg.to_yaml()) == cfg
    assert cfg.replace(host_cache_gb=4).l3 == cfg.l3
    with pytest.raises(ConfigError) as ei:   # the section's errors and the flat fields' errors together
        HostCacheConfig.from_dict({"host_cache_gb": -1, "l3": {"master_address": "x", "timeout_ms": -5}})
    assert {e.field for e in ei.value.errors} == {"host_cache_gb", "l3.master_address", "l3.timeout_ms"}
    p = tmp_path / "hc.yaml"
    p.write_text("l3:\n  master_address: 10.0.0.1:50051\n  protocl: tcp\n")
    with pytest.raises(ConfigError, match=r"hc\.yaml: .*l3\.protocl: unknown field; did you mean 'protocol'"):
        HostCacheConfig.from_yaml(p)


def test_doctor_shows_the_memory_budget(tmp_path):
    from lmdeploy_hostcache.doctor import _text, collect

    p = tmp_path / "hc.yaml"
    p.write_text("host_cache_gb: 2\nl3:\n  master_address: 127.0.0.1:1\n  global_segment_gb: 1\n"
                 "  local_buffer_gb: 0.5\n")
    facts = collect(str(p))
    mb = facts["memory_budget"]
    assert mb["host_cache_bytes"] == 2 << 30 and mb["l3_segment_bytes"] == 1 << 30
    assert mb["total_bytes"] == (2 << 30) + (1 << 30) + (1 << 29)
    text = _text(facts)
    assert "mem budget   host tier 2.0 GiB + L3 segment 1.0 GiB + L3 buffer 512.0 MiB = 3.5 GiB" in text
    assert "master 127.0.0.1:1" in text
    assert collect(None)["memory_budget"] is None


def test_a_segment_mooncake_would_refuse_is_named_at_parse_and_per_client_at_start_up():
    from lmdeploy_hostcache.integration.l3_tier import check_segment_share

    with pytest.raises(ConfigError, match="l3.global_segment_gb"):
        parse_l3_section({"master_address": "h:1", "global_segment_gb": 0.01})   # under 16 MiB for the node
    cfg = parse_l3_section({"master_address": "h:1", "global_segment_gb": 0.1})
    check_segment_share(cfg, 6)                  # 17 MiB each: accepted
    with pytest.raises(ConfigError) as ei:       # TP 8: 12.8 MiB each, which Mooncake's setup refuses
        check_segment_share(cfg, 8)
    (err,) = ei.value.errors
    assert err.field == "l3.global_segment_gb" and "8 store clients" in str(ei.value) and "at least 0.125" in str(ei.value)
