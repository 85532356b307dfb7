"""GPU checks (skipped without CUDA): the CUDA copy engine and the compiled kernels.

Run on a GPU machine with ``pytest tests/transfer/test_transfer_cuda.py -q -s``.
"""
from __future__ import annotations

import pytest
import torch

from transfer_helpers import build_caches, naive_slot, snapshot
from lmdeploy_hostcache.transfer import CudaCopyEngine, HostPool, KVRowLayout, gather_blocks, make_copy_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GEOM = dict(num_layers=3, kv_heads=4, head_dim=128, block_size=64, kernel_block_size=32, num_blocks=24)


@pytest.mark.parametrize("qp,dtype", [(0, torch.float16), (0, torch.bfloat16), (8, torch.float16),
                                      (4, torch.bfloat16)])
def test_cuda_engine_round_trip_bit_exact(qp, dtype):
    caches, plan, _ = build_caches(qp, dtype, device="cuda", **GEOM)
    ppb = plan.kernel_blocks_per_logical_block
    layout = KVRowLayout.from_connector_caches(caches, ppb, plan.tensor_specs)
    pool = HostPool(layout, 20, "same", chunk_bytes=7 * layout.slot_bytes())
    assert pool.pinned and pool.slot_view(0).is_pinned()
    eng = make_copy_engine(layout, pool, caches)
    assert isinstance(eng, CudaCopyEngine)
    orig = snapshot(caches)
    dem = [(b, s) for s, b in enumerate([23, 1, 7, 8, 9, 15, 2, 0, 11, 12, 13, 14, 3, 4, 5, 6, 16, 17])]
    eng.submit(1, dem, [])
    # same op: demote 18, 19 and load earlier slots into those very pages; the slots come in
    # non-ascending order, as a LIFO free list hands them out
    eng.submit(2, [(18, 18), (19, 19)], [(7, 20), (0, 19), (1, 18)])
    eng.wait_all()
    res = eng.poll()
    assert [r.ok for r in res] == [True, True]
    for b, s in dem:
        assert torch.equal(pool.slot_view(s), naive_slot(orig, ppb, b).cpu())
    assert torch.equal(pool.slot_view(18), naive_slot(orig, ppb, 18).cpu())
    assert torch.equal(naive_slot(caches, ppb, 19), naive_slot(orig, ppb, 23))
    assert torch.equal(naive_slot(caches, ppb, 18), naive_slot(orig, ppb, 1))
    assert torch.equal(naive_slot(caches, ppb, 20), naive_slot(orig, ppb, 0))
    eng.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qp,fmt", [(8, "int8"), (4, "int4")])
def test_compiled_quant_kernel_matches_lmdeploy_on_gpu(dtype, qp, fmt):
    """On a GPU our quantizing gather and LMDeploy's fill_kv_cache should write identical bytes."""
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.kernels.cuda.fill_kv_cache import fill_kv_cache

    src, plan, alloc = build_caches(0, dtype, device="cuda", **GEOM)
    dst, qplan, qalloc = build_caches(qp, dtype, device="cuda", randomize=False, **GEOM)
    layout = KVRowLayout.from_connector_caches(src, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    ppb = plan.kernel_blocks_per_logical_block
    ids = [5, 17, 2, 9]
    pages = torch.tensor([b * ppb + p for b in ids for p in range(ppb)], device="cuda")
    kv, vv = alloc.tensor_views[0], alloc.tensor_views[1]
    qk, qv, q0, q1 = qalloc.tensor_views
    seqlen = pages.numel() * kv.shape[2]
    one = lambda v: torch.tensor([v], device="cuda")  # noqa: E731
    for layer in range(kv.shape[0]):
        fill_kv_cache(kv[layer, pages].reshape(seqlen, *kv.shape[3:]).contiguous(),
                      vv[layer, pages].reshape(seqlen, *vv.shape[3:]).contiguous(), qk[layer], qv[layer],
                      one(0), one(seqlen), one(seqlen), seqlen, pages[None], q0[layer], q1[layer],
                      quant_policy=QuantPolicy(qp))
    ours = torch.empty((len(ids), layout.slot_bytes(fmt)), dtype=torch.uint8, device="cuda")
    gather_blocks(layout, src, ids, ours, fmt, backend="triton")
    qlayout = KVRowLayout.from_connector_caches(dst, qplan.kernel_blocks_per_logical_block)
    theirs = torch.empty_like(ours)
    gather_blocks(qlayout, dst, ids, theirs, "same", backend="torch")
    ref = torch.empty_like(ours)
    gather_blocks(layout, src, ids, ref, fmt, backend="torch")
    n_lmdeploy = int((ours != theirs).sum())
    n_ref = int((ours != ref).sum())
    print(f"{fmt} {dtype}: bytes differing from LMDeploy {n_lmdeploy}, from the IEEE torch reference {n_ref} "
          f"of {ours.numel()}")
    assert n_lmdeploy == 0


@pytest.mark.parametrize("qp,fmt", [(0, "same"), (4, "same"), (0, "int4")])
def test_cuda_engine_compiles_its_kernels_when_built(qp, fmt):
    """The engine compiles the exact kernel variants its copies use, and moves no byte doing it."""
    from lmdeploy_hostcache.transfer import kernels

    # a geometry no other test uses, so that no earlier test compiled these variants
    geom = dict(num_layers=5, kv_heads=2, head_dim=64, block_size=32, kernel_block_size=32, num_blocks=12)
    caches, plan, _ = build_caches(qp, torch.float16, device="cuda", **geom)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    pool = HostPool(layout, 8, fmt)
    dev = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(k.device_caches[dev][0]) for k in (kernels._copy_segments_kernel, kernels._quant_gather_kernel,
                                                          kernels._dequant_scatter_kernel))

    orig = snapshot(caches)
    eng = CudaCopyEngine(layout, pool, caches)
    torch.cuda.synchronize()
    assert eng.warm_up_s is not None
    assert all(torch.equal(orig[k], caches[k]) for k in caches)  # warm-up moved nothing
    after_build = compiled()
    assert after_build >= (4 if fmt != "same" else 2)
    eng.submit(1, [(3, 0), (5, 1)], [])
    eng.wait_all()
    eng.submit(2, [], [(0, 7), (1, 8)])
    eng.wait_all()
    assert [r.ok for r in eng.poll()] == [True, True]
    assert compiled() == after_build  # the real copies needed no kernel the warm-up had not compiled
    eng.close()
