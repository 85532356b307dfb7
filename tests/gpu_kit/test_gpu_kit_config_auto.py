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
