"""Helpers shared by the store-tier tests (imported by name: tests/ has no packages)."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.l3.master import mooncake_import_error

MOONCAKE_MISSING = mooncake_import_error()
needs_mooncake = pytest.mark.skipif(MOONCAKE_MISSING is not None, reason=MOONCAKE_MISSING or "")


def make_config(address: str, segment_mb: int = 64, buffer_mb: int = 32, timeout_ms: int = 2000):
    from lmdeploy_hostcache.l3.config import parse_l3_section

    return parse_l3_section({"master_address": address, "global_segment_gb": segment_mb / 1024,
                             "local_buffer_gb": buffer_mb / 1024, "timeout_ms": timeout_ms})


def open_client(address: str, segment_mb: int = 64, buffer_mb: int = 32, timeout_ms: int = 2000, metrics=None):
    from lmdeploy_hostcache.l3.backend import open_mooncake
    from lmdeploy_hostcache.l3.client import L3Client

    cfg = make_config(address, segment_mb, buffer_mb, timeout_ms)
    return L3Client(open_mooncake(cfg), timeout_s=cfg.timeout_s, metrics=metrics)


