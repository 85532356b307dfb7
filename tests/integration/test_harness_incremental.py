"""The harness's incremental checks (issue 13, item 3) are as strong as comparing everything.

``KVChecker`` (incremental by default) compares a GPU block again only when its raw bytes changed
since the previous check or LMDeploy now expects different content in it; ``HostSlotChecker`` does
the same for host slots. These tests pin the three ways a skip could hide a wrong block:

- bytes changed under an unchanged expectation (a stray write);
- expectation changed over unchanged bytes (a block that now names another prefix);
- bytes changed while nothing expected anything of the block, then the same expectation came back.

and check that on a clean run the incremental checker finds exactly what the full checker finds
(nothing) while comparing far fewer blocks, and verifies every block a load restored.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdeploy_hostcache.testing.harness import (CpuEngine, HarnessCacheSpec, HarnessModel, KVChecker, KVMismatch,
                                                WorkloadDriver, weka_conversations)
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine,
                                                          lossy_variants, rank_checkers, round_trips, scheduler_side,
                                                          worker_side)

pytest.importorskip('lmdeploy_hostcache.integration.connector')

FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json']


def _host_run(host_kv_format: str = 'same', *, full_too: bool = True):
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=24, max_prefill_token_num=512),
                                    HostTierSpec(host_slots=48, host_kv_format=host_kv_format))
    incremental = rank_checkers(engine, host_kv_format)
    checkers = list(incremental)
    full = None
    if full_too:
        trips = round_trips(engine) if host_kv_format != 'same' else None
        full = KVChecker(engine.kv, engine.oracle, engine.scheduler, incremental=False,
                         variants=lossy_variants(engine.kv, host_kv_format),
                         round_trips=None if trips is None else trips.of_block)
        checkers.append(full)
    slots = HostSlotChecker(engine)
    report = WorkloadDriver(engine, weka_conversations(files=FILES, max_turns=6), checker=checkers + [slots],
                            max_active=3).run()
    return engine, incremental[0], full, slots, report


@pytest.mark.parametrize('host_kv_format', ['same', 'int4'])
def test_incremental_and_full_checks_agree_and_every_restore_is_verified(host_kv_format):
    engine, inc, full, slots, report = _host_run(host_kv_format)
    for c in (inc, full):
        assert c.stats.wrong_blocks == 0 and c.stats.checks == report.iterations
    assert inc.stats.seq_blocks == full.stats.seq_blocks and inc.stats.trie_blocks == full.stats.trie_blocks
    assert full.stats.compared_blocks == full.stats.seq_blocks + full.stats.trie_blocks
    assert inc.stats.compared_blocks < full.stats.compared_blocks / 3, (inc.stats, full.stats)
    # every block of every published load was compared right after the load, by both checkers
    m = scheduler_side(engine).metrics.snapshot()
    bs = engine.cache_config.block_size
    assert inc.stats.restored_verified == full.stats.restored_verified > 0
    assert inc.stats.restored_verified == m['restored_tokens'] // bs, m   # no aborts: every load was published
    assert slots.stats.wrong_blocks == 0 and slots.stats.unknown_resident == 0
    assert 0 < slots.stats.slots_compared < slots.stats.slots_checked


def _idle_stock_engine():
    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=24, quant_policy=0))
    checker = KVChecker(engine.kv, engine.oracle, engine.scheduler)
    WorkloadDriver(engine, weka_conversations(files=FILES[:1], max_turns=3), checker=checker).run()
    checker.check('settled')     # everything verified and unchanged from here on
    before = checker.stats.compared_blocks
    checker.check('idle')
    assert checker.stats.compared_blocks == before, 'an idle engine must need no comparison'
    return engine, checker


def _phys(engine, node) -> int:
    return int(engine.scheduler.block_manager.allocator.get_physical_blocks(np.array([node.block_id]))[0])


def test_a_stray_write_into_a_verified_block_is_caught():
    engine, checker = _idle_stock_engine()
    node, _ = next(iter(checker.trie_nodes()))
    page = _phys(engine, node) * engine.kv.pages_per_block
    engine.kv.views['k_cache'][0, page, 2, 0, 5].view(torch.int16).bitwise_xor_(torch.tensor(4, dtype=torch.int16))
    with pytest.raises(KVMismatch, match=f'physical {_phys(engine, node)}'):
        checker.check('after a stray write')


def test_a_block_that_now_names_another_prefix_is_compared():
    """Bytes unchanged, expectation changed: two trie nodes swap their logical blocks."""
    engine, checker = _idle_stock_engine()
    nodes = [n for n, _ in checker.trie_nodes()]
    a, b = nodes[0], nodes[1]
    a.block_id, b.block_id = b.block_id, a.block_id
    with pytest.raises(KVMismatch):
        checker.check('after swapping two blocks')


def test_a_block_changed_while_unexpected_is_compared_when_expected_again():
    """A trie leaf hidden from the checker is corrupted, checked (nothing expects it: no error, but
    it loses its verified state), then re-attached unchanged: the next check must compare it."""
    engine, checker = _idle_stock_engine()
    leaf = next(n for n, _ in checker.trie_nodes() if not n.children)
    parent, key = leaf.parent, next(k for k, v in leaf.parent.children.items() if v is leaf)
    del parent.children[key]
    page = _phys(engine, leaf) * engine.kv.pages_per_block
    engine.kv.views['v_cache'][0, page, 1, 0, 3].view(torch.int16).bitwise_xor_(torch.tensor(2, dtype=torch.int16))
    checker.check('leaf hidden')
    parent.children[key] = leaf
    with pytest.raises(KVMismatch, match=f'physical {_phys(engine, leaf)}'):
        checker.check('leaf back')


def test_host_slots_that_swap_blocks_are_compared():
    """Host side, expectation changed over unchanged bytes: two resident blocks swap slots in the index."""
    engine, inc, _, slots, _ = _host_run('same', full_too=False)
    index = scheduler_side(engine).index
    resident = [b for d, b in index._blocks.items() if d in slots.prefixes and not b.doomed
                and b.state is type(b.state).RESIDENT]
    assert len(resident) >= 2
    resident[0].slot, resident[1].slot = resident[1].slot, resident[0].slot
    with pytest.raises(KVMismatch, match='host slot'):
        slots.verify('after swapping two slots')


def test_a_host_slot_corrupted_and_restored_between_verifies_stays_verified_only_if_equal():
    """A slot rewritten with its own bytes is compared (it changed) and passes; rewritten with
    another block's bytes it fails."""
    engine, _, _, slots, _ = _host_run('same', full_too=False)
    index = scheduler_side(engine).index
    resident = [b for d, b in index._blocks.items() if d in slots.prefixes and not b.doomed
                and b.state is type(b.state).RESIDENT]
    pool = worker_side(engine).pool
    view = pool.slot_view(resident[0].slot)
    original = view.clone()
    view[7] ^= 0x01
    view[7] ^= 0x01            # same bytes again: unchanged, nothing to compare
    before = slots.stats.slots_compared
    slots.verify('same bytes')
    assert slots.stats.slots_compared == before
    view.copy_(pool.slot_view(resident[1].slot))
    with pytest.raises(KVMismatch, match=f'host slot {resident[0].slot} '):
        slots.verify('foreign bytes')
    view.copy_(original)
