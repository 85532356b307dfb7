"""Fixtures shared by the integration tests."""
from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def active():
    """The extension activated over LMDeploy with every patched module imported (skips when the
    guard refuses this LMDeploy); yields the ``activate`` module."""
    pytest.importorskip("lmdeploy")
    from lmdeploy_hostcache.integration import activate as act

    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    for name in act.PATCHERS:
        importlib.import_module(name)
    return act
