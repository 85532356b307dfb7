"""Fixtures for the store tier: a real mooncake_master on 127.0.0.1 and clients of it.

Skipped, with the reason, when ``mooncake.store`` cannot import (no wheel, no libibverbs).
Every master a test starts is killed (process group) when the fixture ends.
"""
from __future__ import annotations

import pytest

from l3_helpers import MOONCAKE_MISSING, open_client

from lmdeploy_hostcache.l3.master import LoopbackMaster, loopback_env


@pytest.fixture(scope="module")
def master():
    """One master per test module (faults use their own, function-scoped one)."""
    if MOONCAKE_MISSING:
        pytest.skip(MOONCAKE_MISSING)
    loopback_env()
    with LoopbackMaster() as m:
        yield m


@pytest.fixture
def own_master():
    """A master this test may kill or pause."""
    if MOONCAKE_MISSING:
        pytest.skip(MOONCAKE_MISSING)
    loopback_env()
    with LoopbackMaster() as m:
        yield m


@pytest.fixture(scope="module")
def client(master):
    c = open_client(master.address)
    try:
        yield c
    finally:
        c.close()
