"""HostCacheConfig: every field's bad values, normalisation, YAML round trip, unknown keys."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmdeploy_hostcache import config as config_mod
from lmdeploy_hostcache.config import (
    AUTO,
    ConfigError,
    HostCacheConfig,
    eviction_policy_names,
    load_config,
)

FIELDS = HostCacheConfig.field_names()


def test_field_list_is_the_documented_one():
    assert FIELDS == ("host_cache_gb", "host_memory_reserve_gb", "host_kv_format", "eviction_policy",
                      "min_restore_tokens", "keep_restored_blocks", "pin_memory", "verify_tokens", "checksum", "tenant_salt", "capture",
                      "capture_max_mb", "capture_keep_files", "capture_offload", "l3")


def test_defaults():
    cfg = HostCacheConfig()
    assert cfg.host_cache_gb == AUTO
    assert cfg.host_memory_reserve_gb == 8.0
    assert cfg.host_kv_format == "same"
    assert cfg.eviction_policy == "lru"  # eviction.DEFAULT_POLICY, chosen in docs/eviction.md
    assert cfg.min_restore_tokens == 256
    assert cfg.keep_restored_blocks is True
    assert cfg.pin_memory is True and cfg.verify_tokens is True and cfg.checksum is False
    assert cfg.tenant_salt == ""
    assert cfg.enabled
    assert not HostCacheConfig(host_cache_gb=0).enabled


# (field, bad value) for every field; each must raise naming that field and the value.
BAD_VALUES = [
    ("host_cache_gb", -1), ("host_cache_gb", -0.5), ("host_cache_gb", "lots"), ("host_cache_gb", ""),
    ("host_cache_gb", True), ("host_cache_gb", None), ("host_cache_gb", [64]), ("host_cache_gb", math.nan),
    ("host_cache_gb", math.inf), ("host_cache_gb", "inf"), ("host_cache_gb", "-3"), ("host_cache_gb", 10**400),
    ("host_memory_reserve_gb", -1), ("host_memory_reserve_gb", "auto"), ("host_memory_reserve_gb", False),
    ("host_memory_reserve_gb", None), ("host_memory_reserve_gb", math.nan),
    ("host_kv_format", "fp8"), ("host_kv_format", "int2"), ("host_kv_format", 4), ("host_kv_format", None),
    ("host_kv_format", ""),
    ("eviction_policy", "fifo"), ("eviction_policy", "belady"), ("eviction_policy", 1), ("eviction_policy", None),
    ("min_restore_tokens", -1), ("min_restore_tokens", 1.5), ("min_restore_tokens", "12.5"),
    ("min_restore_tokens", "-4"), ("min_restore_tokens", True), ("min_restore_tokens", "many"),
    ("min_restore_tokens", None), ("min_restore_tokens", math.inf),
    ("keep_restored_blocks", 1), ("keep_restored_blocks", "maybe"), ("keep_restored_blocks", None),
    ("pin_memory", 1.5), ("pin_memory", 1), ("pin_memory", 0), ("pin_memory", "maybe"), ("pin_memory", None),
    ("pin_memory", "yes"),
    ("verify_tokens", 1.5), ("verify_tokens", "on"), ("verify_tokens", None), ("verify_tokens", [True]),
    ("checksum", 2), ("checksum", "nope"), ("checksum", None),
    ("tenant_salt", 1234), ("tenant_salt", None), ("tenant_salt", b"salt"), ("tenant_salt", ["a"]),
    ("capture", 5), ("capture", ["a.jsonl"]), ("capture", "a\0b"), ("capture", True),
    ("capture", "capture"), ("capture", "c.jsonl.gz"), ("capture", "c.log"),
    ("capture_max_mb", 0), ("capture_max_mb", 1e-7), ("capture_max_mb", 0.5), ("capture_max_mb", -1), ("capture_max_mb", "big"), ("capture_max_mb", None),
    ("capture_max_mb", True), ("capture_max_mb", math.inf),
    ("capture_keep_files", -1), ("capture_keep_files", 1.5), ("capture_keep_files", "many"), ("capture_keep_files", True),
    ("capture_keep_files", None), ("capture_keep_files", 10**6 + 1), ("capture_keep_files", "1" + "0" * 40),
    ("capture_offload", 1), ("capture_offload", "yes"), ("capture_offload", None),
    ("l3", "yes"), ("l3", 5), ("l3", True), ("l3", ["a"]),   # the section's own fields: tests/l3/test_l3_config.py
]


def test_every_field_has_bad_value_cases():
    assert {f for f, _ in BAD_VALUES} == set(FIELDS)


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_names_field_value_and_allowed(field, value):
    for build in (lambda: HostCacheConfig.from_dict({field: value}), lambda: HostCacheConfig(**{field: value}),
                  lambda: HostCacheConfig().replace(**{field: value})):
        with pytest.raises(ConfigError) as info:
            build()
        err = info.value
        assert isinstance(err, ValueError)
        assert err.field == field
        assert [e.field for e in err.errors] == [field]
        msg = str(err)
        assert msg.count(field) >= 1 and "allowed:" in msg
        if isinstance(value, int) and value.bit_length() > 256:   # shown by its size, not 400 digits
            assert f"an int of {value.bit_length()} bits" in msg
        else:
            assert repr(value) in msg or str(value) in msg


def test_belady_is_refused_with_reason():
    with pytest.raises(ConfigError, match="offline evaluation only"):
        HostCacheConfig(eviction_policy="belady")


def test_all_bad_fields_reported_together():
    with pytest.raises(ConfigError) as info:
        HostCacheConfig.from_dict({"host_cache_gb": -1, "pin_memory": 1.5, "evicton_policy": "lru"})
    fields = [e.field for e in info.value.errors]
    assert sorted(fields) == ["evicton_policy", "host_cache_gb", "pin_memory"]


@pytest.mark.parametrize(("key", "suggestion"), [
    ("evicton_policy", "eviction_policy"), ("host_cache_size_gb", "host_cache_gb"),
    ("pin_mem", "pin_memory"), ("verify_token", "verify_tokens"), ("checksums", "checksum"),
    ("host_kv_fmt", "host_kv_format"), ("min_restore_token", "min_restore_tokens"),
    ("tenantsalt", "tenant_salt"),
])
def test_unknown_key_suggests(key, suggestion):
    with pytest.raises(ConfigError) as info:
        HostCacheConfig.from_dict({key: "x"})
    assert info.value.field == key
    assert f"did you mean {suggestion!r}?" in str(info.value)
    assert "unknown field" in str(info.value)


def test_unknown_key_without_close_match_lists_known_fields():
    with pytest.raises(ConfigError) as info:
        HostCacheConfig.from_dict({"zzz": 1})
    msg = str(info.value)
    assert "did you mean" not in msg
    assert all(name in msg for name in FIELDS)


def test_replace_rejects_unknown_names():
    with pytest.raises(ConfigError, match="did you mean 'pin_memory'"):
        HostCacheConfig().replace(pin_memroy=False)


def test_flat_dict_normalisation():
    cfg = HostCacheConfig.from_dict({
        "host-cache-gb": " 64 ", "host_memory_reserve_gb": "2.5", "host_kv_format": "INT4",
        "eviction_policy": "LRU", "min_restore_tokens": "512", "pin_memory": "false",
        "verify_tokens": "True", "checksum": "TRUE", "tenant_salt": "team-a",
    })
    assert cfg.host_cache_gb == 64.0 and isinstance(cfg.host_cache_gb, float)
    assert cfg.host_memory_reserve_gb == 2.5
    assert cfg.host_kv_format == "int4" and cfg.eviction_policy == "lru"
    assert cfg.min_restore_tokens == 512 and isinstance(cfg.min_restore_tokens, int)
    assert cfg.pin_memory is False and cfg.verify_tokens is True and cfg.checksum is True
    assert HostCacheConfig(host_cache_gb="AUTO").host_cache_gb == AUTO
    assert HostCacheConfig(min_restore_tokens=64.0).min_restore_tokens == 64
    assert HostCacheConfig(host_cache_gb=0).host_cache_gb == 0.0


def test_same_field_twice_rejected():
    with pytest.raises(ConfigError, match="given twice"):
        HostCacheConfig.from_dict({"host-cache-gb": 1, "host_cache_gb": 2})


def test_ignore_keys():
    cfg = HostCacheConfig.from_dict({"host_cache_gb": 4, "host_cache_blocks": 1000},
                                    ignore_keys={"host_cache_blocks"})
    assert cfg.host_cache_gb == 4.0
    with pytest.raises(ConfigError, match="host_cache_blocks"):
        HostCacheConfig.from_dict({"host_cache_gb": 4, "host_cache_blocks": 1000})


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        HostCacheConfig.from_dict(["host_cache_gb", 4])


def test_frozen_and_error_leaves_original_untouched():
    cfg = HostCacheConfig(host_cache_gb=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.host_cache_gb = 32  # type: ignore[misc]
    with pytest.raises(ConfigError):
        cfg.replace(host_cache_gb=-1)
    assert cfg.host_cache_gb == 16.0
    assert cfg.replace(host_cache_gb="8").host_cache_gb == 8.0


def test_salt_is_masked_in_repr_but_kept_in_dict():
    cfg = HostCacheConfig(tenant_salt="s3cret")
    assert "s3cret" not in repr(cfg) and "***" in repr(cfg)
    assert cfg.to_dict()["tenant_salt"] == "s3cret"
    assert cfg.redacted_dict()["tenant_salt"] == "***"
    assert "tenant_salt=''" in repr(HostCacheConfig())


# -- YAML -----------------------------------------------------------------------------------

configs = st.builds(
    HostCacheConfig,
    host_cache_gb=st.one_of(st.just(AUTO), st.floats(0, 1e6, allow_nan=False), st.integers(0, 4096)),
    host_memory_reserve_gb=st.floats(0, 1e4, allow_nan=False),
    host_kv_format=st.sampled_from(config_mod.HOST_KV_FORMATS),
    eviction_policy=st.sampled_from(eviction_policy_names()),
    min_restore_tokens=st.integers(0, 1 << 40),
    pin_memory=st.booleans(), verify_tokens=st.booleans(), checksum=st.booleans(),
    tenant_salt=st.one_of(st.sampled_from(["", "yes", "no", "null", "~", "123", "0x1f", "1e3", "true",
                                           "a: b", "- x", "#c", " lead", "'q'", "\"dq\"", "auto"]),
                          st.text(max_size=40)),
)


@given(configs)
def test_yaml_and_dict_round_trip(cfg):
    text = cfg.to_yaml()
    back = HostCacheConfig.from_yaml_text(text)
    assert back == cfg
    assert back.to_yaml() == text  # byte-identical second trip
    assert HostCacheConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_file_round_trip(tmp_path):
    cfg = HostCacheConfig(host_cache_gb=64, host_kv_format="int8", min_restore_tokens=0,
                          pin_memory=False, checksum=True, tenant_salt="no")
    path = tmp_path / "hc.yaml"
    path.write_text(cfg.to_yaml())
    assert HostCacheConfig.from_yaml(path) == cfg
    assert HostCacheConfig.from_yaml(str(path)) == cfg


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("host_cache_gb: -2\n")
    with pytest.raises(ConfigError) as info:
        HostCacheConfig.from_yaml(bad)
    assert str(bad) in str(info.value) and info.value.field == "host_cache_gb"

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert HostCacheConfig.from_yaml(empty) == HostCacheConfig()

    for text, field in [("- 1\n- 2\n", "<top level>"), ("host_cache_gb: [\n", "<yaml>"),
                        ("pin_memory: true\npin_memory: false\n", "<yaml>"),
                        ("tenant_salt: 0123\n", "tenant_salt"), ("pin_memory: 1\n", "pin_memory")]:
        path = tmp_path / "case.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            HostCacheConfig.from_yaml(path)
        assert info.value.field == field, text
    with pytest.raises(ConfigError, match="duplicate key 'pin_memory'"):
        HostCacheConfig.from_yaml_text("pin_memory: true\npin_memory: false\n")
    with pytest.raises(ConfigError, match="cannot read"):
        HostCacheConfig.from_yaml(tmp_path / "missing.yaml")


# -- load_config ----------------------------------------------------------------------------

def test_load_config_sources_and_overrides(tmp_path):
    path = tmp_path / "hc.yaml"
    path.write_text("host_cache_gb: 32\nchecksum: true\n")
    assert load_config() == HostCacheConfig()
    from_file = load_config(path)
    assert from_file.host_cache_gb == 32.0 and from_file.checksum
    # the CLI flag wins over the file; unset flags (None) are ignored
    both = load_config(str(path), host_cache_gb=64, pin_memory=None)
    assert both.host_cache_gb == 64.0 and both.checksum and both.pin_memory
    assert load_config({"host_cache_gb": "8"}, host_cache_gb="auto").host_cache_gb == AUTO
    assert load_config(from_file) is from_file
    with pytest.raises(ConfigError) as info:
        load_config(path, host_cache_gb=-1)
    assert info.value.field == "host_cache_gb"
    with pytest.raises(ConfigError, match="did you mean 'host_cache_gb'"):
        load_config(None, host_cache_g=1)
    with pytest.raises(TypeError, match="load_config"):
        load_config(42)  # type: ignore[arg-type]


# -- eviction policy names come from the eviction module ------------------------------------

def test_eviction_names_follow_the_policies_registry(monkeypatch):
    from lmdeploy_hostcache.tier import eviction

    assert set(eviction_policy_names()) == set(eviction.POLICIES) - {"belady"}
    monkeypatch.setitem(eviction.POLICIES, "s3fifo", object)
    monkeypatch.setitem(eviction.POLICIES, "belady", object)
    assert "s3fifo" in eviction_policy_names() and "belady" not in eviction_policy_names()
    assert HostCacheConfig(eviction_policy="s3fifo").eviction_policy == "s3fifo"
    with pytest.raises(ConfigError):
        HostCacheConfig(eviction_policy="belady")


# -- issue 9: every unusable file is a ConfigError naming it; an empty file says it means auto --------


@pytest.mark.parametrize("content, match", [
    (b"\x00\x01\x02binary", "binary data"),
    (b"host_cache_gb: \xff\xfe\n", "not UTF-8"),
    (b"host_cache_gb: [4\n", "not valid YAML"),
    (b"checksum: true\nchecksum: false\n", "duplicate key 'checksum'"),
    (None, "is a folder"),
    ("missing", "no such file"),
])
def test_load_config_raises_config_error_for_every_unusable_file(tmp_path, content, match):
    f = tmp_path / "hc.yaml"
    if content is None:
        f.mkdir()
    elif content != "missing":
        f.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    text = str(info.value)
    assert text.startswith(f"{f}: ") and match in text and "\n" not in text


def test_empty_yaml_logs_that_it_means_auto(tmp_path, caplog):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing set yet\n")
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache"):
        cfg = load_config(f)
    assert cfg.host_cache_gb == AUTO
    msgs = [r.getMessage() for r in caplog.records]
    assert any(str(f) in m and "empty" in m and "'auto'" in m for m in msgs), msgs


def test_yaml_1_2_numbers(tmp_path):
    f = tmp_path / "n.yaml"
    f.write_text("host_cache_gb: 1.0e2\nhost_memory_reserve_gb: 2e0\n")
    cfg = load_config(f)
    assert (cfg.host_cache_gb, cfg.host_memory_reserve_gb) == (100.0, 2.0)
    salt = HostCacheConfig(tenant_salt="1e3")
    assert HostCacheConfig.from_yaml_text(salt.to_yaml()) == salt  # a number-like string stays a string
