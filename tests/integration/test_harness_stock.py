"""Engine-in-the-loop CPU harness, stage 1: stock LMDeploy (no connector).

Validates the harness itself: LMDeploy's real scheduler under tight GPU capacity, with GPU
prefix-cache hits, evictions, long-context chunks, pipelined decode and aborts, must keep every
valid block equal to the prefix oracle's bytes; the checker must catch a single flipped byte.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdeploy_hostcache.testing.harness import (REPLICATED_SOURCES, CpuEngine, HarnessCacheSpec, HarnessModel, KVChecker, KVMismatch,
                      WorkloadDriver, assign_aborts, check_gpu_refcounts_balanced, mooncake_conversations,
                      scale_hash_ids, source_digest, weka_conversations)

WEKA_FILES = ['trace_0019.json', 'trace_0086.json', 'trace_0624.json']


def test_replicated_lmdeploy_sources_are_pinned():
    """The harness replicates these LMDeploy 0.18.0 functions; a change must be re-read."""
    changed = {name: source_digest(func) for name, (func, pinned) in REPLICATED_SOURCES.items()
               if source_digest(func) != pinned}
    assert not changed, f'LMDeploy changed functions the harness replicates: {changed}'


@pytest.mark.parametrize('quant_policy', [0, 4, 8])
def test_connector_rows_are_the_cache_plan_pools(quant_policy):
    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=6, quant_policy=quant_policy))
    kv = engine.kv
    rows = kv.connector_kv_caches
    pool = kv.allocation.pools[0].tensor
    assert list(rows) == [f'cache_pool.0.row.{r}' for r in range(kv.num_layers)]
    for r, row in enumerate(rows.values()):
        assert row.shape == (6 * kv.pages_per_block, pool.shape[-1]) and row.dtype == torch.uint8
        assert row.data_ptr() == pool[r].data_ptr()
    # a token written through the typed view lands in row[block*ppb + pos//kbs] of every layer
    block, pos = 3, kv.kernel_block_size + 1
    digests = engine.oracle.prefix_digests([5, 6, 7], 2, 3)
    page = block * kv.pages_per_block + pos // kv.kernel_block_size
    engine.oracle.write(torch.tensor([page]), torch.tensor([pos % kv.kernel_block_size]), digests)
    touched = [(row != 0).any(dim=-1).nonzero().flatten().tolist() for row in rows.values()]
    assert touched == [[page]] * kv.num_layers


@pytest.mark.parametrize('quant_policy', [0, 4, 8])
def test_oracle_bytes_depend_on_the_whole_prefix(quant_policy):
    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=4, quant_policy=quant_policy))
    oracle = engine.oracle
    tokens = np.arange(100, 140)
    other = tokens.copy()
    other[0] += 1
    a = oracle.prefix_digests(tokens, 0, 40)
    b = oracle.prefix_digests(other, 0, 40)
    assert (a != b).all()
    assert np.array_equal(oracle.prefix_digests(tokens, 16, 32), a[16:32])
    enc_a, enc_b = oracle.encode(a[16:32]), oracle.encode(b[16:32])
    for spec in engine.kv.tensor_specs:
        assert tuple(enc_a[spec.name].shape) == (2, 16, *spec.desc.shape[1:])
        assert enc_a[spec.name].dtype == spec.desc.dtype
        assert not torch.equal(enc_a[spec.name], enc_b[spec.name])
    full = oracle.expected_block(tokens, 1)
    assert all(torch.equal(full[k], enc_a[k]) for k in full)
    partial = oracle.expected_block(tokens, 1, num_valid=5)
    assert all(torch.equal(partial[k], enc_a[k][:, :5]) for k in full)


@pytest.mark.parametrize('bits,quant_policy', [(8, 8), (4, 4)])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_oracle_quantisation_matches_transfer_reference(bits, quant_policy, dtype):
    """Cross-check: the oracle's LMDeploy-format quantisation equals the transfer package's reference."""
    quant = pytest.importorskip('lmdeploy_hostcache.transfer.quant')
    engine = CpuEngine(HarnessModel(dtype=dtype), HarnessCacheSpec(num_gpu_blocks=4, quant_policy=quant_policy))
    digests = engine.oracle.prefix_digests(np.arange(1, 65), 0, 64)
    enc = engine.oracle.encode(digests)
    vals = engine.oracle.float_values(digests).to(dtype)
    for kind, (name, qname) in enumerate((('k_cache', 'quant_0'), ('v_cache', 'quant_1'))):
        q, scale_zero = quant.quantize(vals[kind], bits)
        assert torch.equal(enc[name], q)
        assert torch.equal(enc[qname].view(torch.int16), scale_zero.view(torch.int16))


def _run(engine, conversations, **driver_kw):
    checker = KVChecker(engine.kv, engine.oracle, engine.scheduler)
    report = WorkloadDriver(engine, conversations, checker=checker, **driver_kw).run()
    return checker, report


def test_scaled_traces_keep_prefix_sharing():
    ids_a, ids_b = list(range(1, 70)), list(range(1, 65)) + [900, 901]
    a = scale_hash_ids(ids_a, source='t', group=32, block_size=16, max_blocks=8)
    b = scale_hash_ids(ids_b, source='t', group=32, block_size=16, max_blocks=8)
    assert len(a) == 16 + 16 + 2 and len(b) == 16 + 16 + 1
    assert np.array_equal(a[:32], b[:32]) and not np.array_equal(a[32:33], b[32:33])
    convs = weka_conversations(files=WEKA_FILES[:1], max_turns=3)
    first, second = convs[0][0].prompt, convs[0][1].prompt
    assert np.array_equal(first[:112], second[:112])


@pytest.mark.parametrize('quant_policy,dtype,chunked', [(0, torch.float16, False), (0, torch.bfloat16, True),
                                                        (4, torch.float16, False), (8, torch.bfloat16, False)])
def test_stock_lmdeploy_weka_sessions_hold_oracle_bytes(quant_policy, dtype, chunked):
    engine = CpuEngine(HarnessModel(dtype=dtype), HarnessCacheSpec(num_gpu_blocks=24, quant_policy=quant_policy),
                       enable_chunked_prefill=chunked)
    convs = weka_conversations(files=WEKA_FILES, max_turns=6)
    assert assign_aborts(convs, rate=0.25, seed=3) > 0
    checker, report = _run(engine, convs)
    assert checker.stats.wrong_blocks == 0 and checker.stats.checks == report.iterations
    assert checker.stats.trie_blocks > 0 and checker.stats.seq_blocks > 0
    assert report.cached_tokens > 0, 'no GPU prefix-cache hit: the workload does not exercise reuse'
    assert engine.trie_evicted_blocks > 0, 'no GPU eviction: capacity is not tight'
    assert report.aborted > 0 and report.finished + report.aborted == report.requests
    assert report.forwards.get('chunk', 0) > 0 and report.forwards.get('decode', 0) > 0
    balance = check_gpu_refcounts_balanced(engine.scheduler)
    assert balance['trie_blocks'] > 0


def test_stock_lmdeploy_mooncake_conversations_hold_oracle_bytes():
    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=20, quant_policy=0))
    convs = mooncake_conversations(max_requests=20)
    checker, report = _run(engine, convs, max_active=4)
    assert checker.stats.wrong_blocks == 0
    assert report.cached_tokens > 0 and engine.trie_evicted_blocks > 0
    check_gpu_refcounts_balanced(engine.scheduler)


def _small_finished_engine():
    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=24, quant_policy=0))
    checker, _ = _run(engine, weka_conversations(files=WEKA_FILES[:1], max_turns=2))
    return engine, checker


def test_checker_catches_one_flipped_byte_in_a_cached_block():
    engine, checker = _small_finished_engine()
    node, _ = next(iter(checker.trie_nodes()))
    phys = int(engine.scheduler.block_manager.allocator.get_physical_blocks(np.array([node.block_id]))[0])
    page = phys * engine.kv.pages_per_block + 1          # second kernel page of the block
    engine.kv.views['v_cache'][1, page, 3, 1, 7].view(torch.int16).bitwise_xor_(torch.tensor(1, dtype=torch.int16))
    with pytest.raises(KVMismatch, match=f'physical {phys}'):
        checker.check('after corruption')


def test_checker_catches_a_block_from_another_prefix():
    engine, checker = _small_finished_engine()
    nodes = [n for n, _ in checker.trie_nodes()]
    alloc = engine.scheduler.block_manager.allocator
    a, b = (int(alloc.get_physical_blocks(np.array([n.block_id]))[0]) for n in nodes[:2])
    pool = engine.kv.allocation.pools[0].tensor
    ppb = engine.kv.pages_per_block
    pool[:, a * ppb:(a + 1) * ppb] = pool[:, b * ppb:(b + 1) * ppb].clone()
    with pytest.raises(KVMismatch):
        checker.check('after copying a foreign block')
