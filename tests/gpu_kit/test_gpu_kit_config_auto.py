"""`min_restore_tokens: auto` in HostCacheConfig (resolved by restore_cost at engine start)."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.config import ConfigError, HostCacheConfig


def test_config_accepts_auto_and_keeps_numbers():
    assert HostCacheConfig(min_restore_tokens="auto").min_restore_tokens == "auto"
    assert HostCacheConfig(min_restore_tokens=" Auto ").min_restore_tokens == "auto"
    assert HostCacheConfig.from_dict({"min_restore_tokens": "64"}).min_restore_tokens == 64
    cfg = HostCacheConfig(min_restore_tokens="auto")
    assert HostCacheConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="min_restore_tokens: got 'autox'; allowed: .*'auto'"):
        HostCacheConfig(min_restore_tokens="autox")


def _scheduler_side(min_restore_tokens, slot_bytes, block_size=64):
    pytest.importorskip("lmdeploy.pytorch.kv_connector")
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy.pytorch.kv_connector import KVConnectorRole

    from lmdeploy_hostcache.integration.connector import CONNECTOR_NAME, build_host_tier_connector

    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"min_restore_tokens": min_restore_tokens}, "host_cache_blocks": 4,
        "host_slot_bytes": slot_bytes, "model_identity": "toy"})
    cc = CacheConfig(max_batches=4, block_size=block_size, num_cpu_blocks=0, num_gpu_blocks=8,
                     enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc)
    return build_host_tier_connector(KVConnectorRole.SCHEDULER, cc).scheduler_side


def test_connector_resolves_auto_from_the_calibration(tmp_path, monkeypatch):
    from lmdeploy_hostcache import restore_cost as rc

    monkeypatch.delenv(rc.ENV_CALIBRATION, raising=False)
    bpt = 131072  # 64-token blocks of 8 MiB: an 8B-class fp16 cache
    assert _scheduler_side("auto", bpt * 64).min_restore_tokens == 215        # the assumed figures
    assert _scheduler_side(96, bpt * 64).min_restore_tokens == 96             # a number stays as is
    cal = tmp_path / "calibration.json"
    cal.write_text('{"restore_gbps": 40, "prefill_tokens_per_s": 2000, "restore_overhead_ms": 10}')
    monkeypatch.setenv(rc.ENV_CALIBRATION, str(cal))
    # 0.01 / (1/2000 - 131072/40e9) = 20.13... -> 21 tokens
    assert _scheduler_side("auto", bpt * 64).min_restore_tokens == 21
    cal.write_text('{"restore_gbps": 40, "prefill_tokens_per_s": 0, "restore_overhead_ms": 10}')
    with pytest.raises(rc.CalibrationError, match=f"{cal}: prefill_tokens_per_s"):
        _scheduler_side("auto", bpt * 64)


def test_serve_flags_refuse_a_bad_calibration_file_before_start(tmp_path, monkeypatch):
    """`lmdeploy serve api_server ... --host-cache-config` with `min_restore_tokens: auto` checks the
    calibration file up front (one ValueError naming it, which the CLI prints as one line)."""
    import argparse

    from lmdeploy_hostcache import restore_cost as rc
    from lmdeploy_hostcache.integration.cli_patch import apply_host_cache_args

    cfg = tmp_path / "hostcache.yaml"
    cfg.write_text("host_cache_gb: 1\nmin_restore_tokens: auto\n")
    bad = tmp_path / "calibration.json"
    bad.write_text("{oops")
    monkeypatch.setenv(rc.ENV_CALIBRATION, str(bad))

    def args():
        return argparse.Namespace(host_cache_gb=None, host_cache_config=str(cfg), backend="pytorch",
                                  kv_transfer_config=None, enable_prefix_caching=True)

    with pytest.raises(ValueError, match=f"{bad}: not a JSON restore calibration"):
        apply_host_cache_args(args())
    bad.write_text('{"restore_gbps": 40, "prefill_tokens_per_s": 2000, "restore_overhead_ms": 10}')
    a = args()
    assert apply_host_cache_args(a) is True and a.kv_transfer_config is not None
