"""Second chance (issue 9, item 3): a prefix the GPU evicts again while its first copy to host is
still in flight gets a second copy, so one failed copy cannot lose it from both tiers.

Scheduler side against LMDeploy's real ``Scheduler`` (worker progress written by hand, as in
``test_connector.py``), then the ``HostIndex`` verbs alone, then the CPU harness end to end with
copy failures and late completions (every GPU block and host slot byte-checked every step).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lmdeploy.pytorch.paging.scheduler")

from lmdeploy.pytorch.paging.block_trie.node import Node  # noqa: E402

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests  # noqa: E402
from lmdeploy_hostcache.tier.host_index import BlockState, HostIndex  # noqa: E402

try:  # tests/integration may or may not be a package
    from .test_connector import Rig, deterministic_lru
except ImportError:
    from test_connector import Rig, deterministic_lru


def _evicted_twice(first_ok: bool | None, second_ok: bool | None, second_first: bool = False):
    """Node P is evicted (copy 1 in flight), recomputed and evicted again (copy 2); the copies
    complete as given (None: not completed). Returns (rig, digest, meta1, meta2)."""
    rig = Rig()
    side = rig.side
    root = rig.s.block_trie._get_or_create_root(None)
    node = Node(1, 0, np.arange(4), prefix_len=4)
    node.attach_to(root)
    side.on_evict(node, 5)
    meta1 = rig.s.build_connector_meta([])
    digest = side.node_digest(node)
    assert meta1.demotions == ((5, side.index.get(digest).slot),)
    side.on_evict(node, 6)                       # the GPU recomputed P into page 6 and evicts it again
    meta2 = rig.s.build_connector_meta([])
    assert meta2 is not None and len(meta2.demotions) == 1, 'the second eviction must queue a second copy'
    (gpu, spare), = meta2.demotions
    assert gpu == 6 and spare != meta1.demotions[0][1]
    order = [(meta2, second_ok), (meta1, first_ok)] if second_first else [(meta1, first_ok), (meta2, second_ok)]
    for meta, ok in order:
        if ok is not None:
            rig.poll(rig.complete(meta, fail_demotions=not ok))
            side.index.check_invariants()
    return rig, digest, meta1, meta2


def test_first_copy_fails_second_copy_keeps_the_prefix():
    rig, d, meta1, meta2 = _evicted_twice(first_ok=False, second_ok=True)
    index = rig.side.index
    assert index.is_resident(d), 'the prefix was lost from both tiers'
    assert index.get(d).slot == meta2.demotions[0][1]
    assert index.stats.second_chances == 1
    rig.side.check_balanced()
    assert index.num_free_slots == index.num_slots - 1


def test_second_copy_done_first_then_first_copy_fails():
    rig, d, _, meta2 = _evicted_twice(first_ok=False, second_ok=True, second_first=True)
    index = rig.side.index
    assert index.is_resident(d) and index.get(d).slot == meta2.demotions[0][1]
    rig.side.check_balanced()


def test_first_copy_succeeds_spare_is_freed_whatever_it_does():
    for second_ok in (True, False):
        for second_first in (False, True):
            rig, d, meta1, _ = _evicted_twice(first_ok=True, second_ok=second_ok, second_first=second_first)
            index = rig.side.index
            assert index.is_resident(d) and index.get(d).slot == meta1.demotions[0][1]
            rig.side.check_balanced()
            assert index.num_free_slots == index.num_slots - 1, 'the spare slot leaked'


def test_both_copies_fail_drops_the_prefix():
    rig, d, _, _ = _evicted_twice(first_ok=False, second_ok=False)
    assert d not in rig.side.index
    rig.side.check_balanced()
    assert rig.side.index.num_free_slots == rig.side.index.num_slots


def test_prefix_stays_invisible_to_lookups_until_a_copy_is_written():
    rig, d, _, _ = _evicted_twice(first_ok=False, second_ok=None)
    index = rig.side.index
    b = index.get(d)
    assert b is not None and b.state is BlockState.WRITING and not index.is_resident(d)
    assert index.lookup([d], [b.tokens]) == 0


# -- HostIndex verbs --------------------------------------------------------------------------


def _chain(n=3):
    ns = Namespace(model="test/second-chance", block_size=2)
    return ns, chain_digests(ns, list(range(1, 2 * n + 1)))


def test_spare_only_for_a_block_being_written():
    ns, ((a, b, _), (ta, tb, _)) = _chain()
    idx = HostIndex(4)
    assert idx.prepare_spare(a, ta) is None                 # not in the index
    s = idx.prepare_store(a, ns.root, ta)
    assert idx.prepare_spare(a, tb) is None                 # token mismatch (verify_tokens)
    spare = idx.prepare_spare(a, ta)
    assert spare is not None and spare != s
    idx.check_invariants()
    idx.complete_store(a, True)
    assert idx.prepare_spare(a, ta) is None                 # RESIDENT: nothing to insure
    idx.complete_store(a, True, slot=spare)
    idx.check_invariants()
    assert idx.num_free_slots == 3 and idx.is_resident(a)


def test_failed_primary_with_a_child_keeps_the_child_when_a_spare_survives():
    ns, ((a, b, _), (ta, tb, _)) = _chain()
    idx = HostIndex(4)
    idx.prepare_store(a, ns.root, ta)
    spare = idx.prepare_spare(a, ta)
    idx.prepare_store(b, a, tb)
    idx.complete_store(b, True)
    idx.complete_store(a, False)                            # the spare is still in flight: a survives
    assert a in idx and b in idx and not idx.is_resident(a)
    idx.check_invariants()
    idx.complete_store(a, True, slot=spare)
    assert idx.is_resident(a) and idx.is_resident(b)
    idx.check_invariants()


def test_drop_all_with_spares_and_copies_in_flight_frees_everything_once():
    ns, ((a, b, c), (ta, tb, tc)) = _chain()
    idx = HostIndex(6)
    idx.prepare_store(a, ns.root, ta)
    idx.complete_store(a, True)
    idx.prepare_store(b, a, tb)
    spare = idx.prepare_spare(b, tb)
    idx.prepare_store(c, b, tc)
    idx.complete_store(c, True)
    assert idx.drop_all() == 3
    assert len(idx) == 1 and a not in idx and b not in idx          # only b is left: its copies are in flight
    idx.check_invariants()
    idx.complete_store(b, True, slot=spare)
    idx.check_invariants()
    idx.complete_store(b, False)
    idx.check_invariants()
    assert len(idx) == 0 and idx.num_free_slots == 6


# -- end to end -------------------------------------------------------------------------------


def test_harness_with_late_and_failing_copies_uses_spares_and_keeps_bytes_right(monkeypatch):
    """Late completions (copy_delay_polls) make second evictions of in-flight prefixes happen;
    injected store failures then fail some first copies. Every step is byte-checked. GPU LRU
    times are made distinct (LMDeploy keeps whole seconds) so the run is the same every time."""
    deterministic_lru(monkeypatch)
    try:
        from .test_harness_hosttier import assert_run_clean, run_host_tier
    except ImportError:
        from test_harness_hosttier import assert_run_clean, run_host_tier
    import torch

    engine, checker, report, faults = run_host_tier(quant_policy=0, dtype=torch.float16, host_kv_format='same',
                                                    gpu_blocks=20, host_slots=24, copy_delay_polls=4,
                                                    fail_store_every=5, abort_rate=0.0, max_turns=8)
    assert_run_clean(engine, checker, report)
    stats = engine.scheduler_connector.scheduler_side.index.stats
    assert stats.spares > 0, 'no prefix was evicted again while its first copy was in flight'
    assert stats.second_chances > 0, "no spare replaced a failed first copy"
