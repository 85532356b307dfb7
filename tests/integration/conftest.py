"""Fixtures shared by the integration tests."""
from __future__ import annotations

import importlib
import itertools
import types

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


@pytest.fixture
def exact_lru_clock(monkeypatch):
    """LMDeploy's block manager stamps access times with int(perf_counter()), so which GPU block is
    evicted (and the whole step timeline after it) depends on how fast the machine ran and on what
    ran before in the process; give it a counter, so a harness run is the same every time."""
    from lmdeploy.pytorch.paging.block_manager import base_block_manager

    ticks = itertools.count(1)
    monkeypatch.setattr(base_block_manager, 'time', types.SimpleNamespace(perf_counter=lambda: next(ticks)))
