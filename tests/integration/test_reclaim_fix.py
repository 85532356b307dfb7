"""The remote-ready reclaim fix (activate._patch_eviction_helper) on LMDeploy's real scheduler.

LMDeploy 0.18.0's ``RecomputeEvictionHelper._reclaim_candidate`` never reclaims a request whose
external load finished but whose remaining prefill was not admitted yet. A long prefill admitted
later in chunks then waits for blocks that request holds, while the request waits for the
prefill: the engine stops. These tests run the CPU engine harness (LMDeploy's Scheduler,
KVLoadCoordinator and engine-loop order with both host-tier connector roles) on workloads that
reach that state: with the stock method it stalls, with the fix every request finishes and every
block LMDeploy treats as valid holds the oracle's bytes.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("lmdeploy")
pytest.importorskip("lmdeploy_hostcache.transfer")

from lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper import (  # noqa: E402
    RecomputeEvictionHelper,
)

from lmdeploy_hostcache.integration import activate as act  # noqa: E402

from lmdeploy_hostcache.testing.harness import HarnessCacheSpec, HarnessError, HarnessModel, WorkloadDriver, check_gpu_refcounts_balanced
from lmdeploy_hostcache.testing.harness import weka_conversations
from lmdeploy_hostcache.testing.harness.host_tier import HostTierSpec, build_host_tier_engine, check_host_tier_balanced, rank_checkers

# (gpu blocks, max_prefill_token_num, trace files): small cells where a chunked long prefill meets a
# remote-ready request. GPU LRU ties are broken by node address, so the interleaving varies a little
# between runs; each cell reached the stall with the stock method on every try here.
CELLS = [(16, 64, ["trace_0019.json", "trace_0086.json", "trace_0228.json"]),
         (16, 48, ["trace_0019.json", "trace_0086.json", "trace_0228.json"]),
         (16, 64, ["trace_0228.json", "trace_0277.json", "trace_0291.json"])]


@pytest.fixture
def fix_active():
    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    wrapper = RecomputeEvictionHelper.__dict__["_reclaim_candidate"]
    assert getattr(wrapper, "__hostcache_wrapped__", False), "the reclaim fix is not installed"
    return wrapper


def _engine(gpu_blocks, max_prefill):
    return build_host_tier_engine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=gpu_blocks,
                                                                   max_prefill_token_num=max_prefill),
                                  HostTierSpec(host_slots=24))


def _drive(engine, files, checkers=None):
    return WorkloadDriver(engine, weka_conversations(files=files, max_turns=4, max_blocks=12), checker=checkers,
                          max_active=3, max_idle=10).run()


def test_stock_reclaim_stalls_on_these_workloads(fix_active, monkeypatch):
    """Control: with LMDeploy's own method the engine stops, a remote-ready request holding
    blocks while a chunked long prefill waits for free ones."""
    monkeypatch.setattr(RecomputeEvictionHelper, "_reclaim_candidate", fix_active.__wrapped__)
    stalls = []
    for gpu_blocks, max_prefill, files in CELLS:
        engine = _engine(gpu_blocks, max_prefill)
        try:
            _drive(engine, files)
        except HarnessError as exc:
            sched = engine.scheduler
            ready = [s for s in sched.seq_manager.get_all_sequences() if sched.kv_load_coordinator.is_remote_ready(s)]
            chunker = engine.inputs_maker.long_context_chunker
            stalls.append((str(exc), len(ready), sum(s.num_blocks for s in ready), chunker.enabled()))
    assert stalls, "no cell stalled with the stock _reclaim_candidate: the workload no longer reproduces the bug"
    for msg, num_ready, ready_blocks, chunking in stalls:
        assert "no progress" in msg, msg
        assert num_ready > 0 and ready_blocks > 0 and chunking, (msg, num_ready, ready_blocks, chunking)


def test_fixed_reclaim_finishes_every_workload_with_correct_bytes(fix_active, monkeypatch):
    calls = []
    real = act._reclaim_remote_ready

    def counting(helper, seq):
        ok = real(helper, seq)
        calls.append((int(seq.seq_id), ok))
        return ok

    monkeypatch.setattr(act, "_reclaim_remote_ready", counting)
    for gpu_blocks, max_prefill, files in CELLS:
        engine = _engine(gpu_blocks, max_prefill)
        checkers = rank_checkers(engine)
        report = _drive(engine, files, checkers)
        assert report.finished + report.aborted == report.requests > 0
        for checker in checkers:
            assert checker.stats.wrong_blocks == 0, checker.stats.first_error
            assert checker.stats.checks == report.iterations
        check_gpu_refcounts_balanced(engine.scheduler)
        check_host_tier_balanced(engine)
    assert any(ok for _, ok in calls), f"no remote-ready request was reclaimed: {calls}"


# -- the fix is scoped: only our connector, only with the prefix cache on --------------------------


class _Seq:
    def __init__(self):
        self.seq_id = 7
        self.num_blocks = 3
        self.logical_state = -1
        self.prefix_cache = SimpleNamespace(suppress_match_stats=False)
        self.released = 0
        self.state = SimpleNamespace(release_paging_resources=self._release)

    def _release(self):
        self.released += 1
        self.num_blocks = 0


class _Coordinator:
    def __init__(self, connector):
        self.connector = connector
        self.released = []

    def is_remote_ready(self, seq):
        return True

    def release_tracking(self, seq):
        self.released.append(seq.seq_id)


def _helper(connector, trie_enabled):
    return SimpleNamespace(load_coordinator=_Coordinator(connector), block_trie=SimpleNamespace(enabled=trie_enabled),
                           _is_ssm=False)


def _our_connector():
    from lmdeploy_hostcache.integration.connector import HostTierConnector

    return HostTierConnector.__new__(HostTierConnector)  # type is all the fix looks at


@pytest.mark.parametrize("ours,trie_enabled,reclaimed", [(True, True, True), (False, True, False),
                                                         (True, False, False), (False, False, False)])
def test_fix_applies_only_to_our_connector_with_the_prefix_cache(fix_active, ours, trie_enabled, reclaimed):
    connector = _our_connector() if ours else SimpleNamespace()  # a foreign connector object
    helper, seq = _helper(connector, trie_enabled), _Seq()
    assert RecomputeEvictionHelper._reclaim_candidate(helper, seq) is reclaimed
    assert seq.released == int(reclaimed)
    assert helper.load_coordinator.released == ([7] if reclaimed else [])
    assert seq.prefix_cache.suppress_match_stats is reclaimed


def test_fix_skips_a_remote_ready_request_without_blocks(fix_active):
    helper, seq = _helper(_our_connector(), True), _Seq()
    seq.num_blocks = 0
    assert RecomputeEvictionHelper._reclaim_candidate(helper, seq) is False
    assert seq.released == 0 and helper.load_coordinator.released == []


def test_deactivate_restores_the_stock_method(fix_active):
    try:
        act.deactivate()
        current = RecomputeEvictionHelper.__dict__["_reclaim_candidate"]
        assert current is fix_active.__wrapped__
        helper, seq = _helper(_our_connector(), True), _Seq()
        assert RecomputeEvictionHelper._reclaim_candidate(helper, seq) is False  # LMDeploy 0.18.0's behaviour
    finally:
        act.activate()
    assert getattr(RecomputeEvictionHelper.__dict__["_reclaim_candidate"], "__hostcache_wrapped__", False)
