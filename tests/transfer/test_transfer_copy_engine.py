"""CpuCopyEngine: ordering, completion by polling, fault injection, validation, close."""
from __future__ import annotations

import pytest
import torch

from transfer_helpers import build_caches, naive_slot, same_bytes, snapshot
from lmdeploy_hostcache.transfer import (CopyResult, CpuCopyEngine, CudaCopyEngine, HostPool, KVRowLayout,
                                         make_copy_engine)


def _engine(fmt="same", backend="torch", num_slots=6, qp=0, **kw):
    caches, plan, _ = build_caches(qp, torch.float16, num_layers=2, num_blocks=8)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    pool = HostPool(layout, num_slots, fmt, chunk_bytes=2 * layout.slot_bytes(fmt))  # 3 chunks of 2 slots
    return caches, plan.kernel_blocks_per_logical_block, pool, make_copy_engine(layout, pool, caches,
                                                                                backend=backend, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_demotions_are_gathered_before_loads_reuse_the_pages(backend):
    caches, ppb, pool, eng = _engine(backend=backend)
    assert isinstance(eng, CpuCopyEngine)
    orig = snapshot(caches)
    eng.submit(1, demotions=[(3, 0), (5, 1)], loads=[])
    assert eng.poll() == [CopyResult(1, True, num_demotions=2)]
    # one op: demote blocks 6, 7 into slots 2, 5 and load slots 0, 1 into the same pages 6, 7
    eng.submit(2, demotions=[(6, 2), (7, 5)], loads=[(0, 7), (1, 6)])
    (res,) = eng.poll()
    assert res.ok and res.num_demotions == 2 and res.num_loads == 2
    assert torch.equal(pool.slot_view(2), naive_slot(orig, ppb, 6))
    assert torch.equal(pool.slot_view(5), naive_slot(orig, ppb, 7))   # slot in another chunk
    assert torch.equal(naive_slot(caches, ppb, 7), naive_slot(orig, ppb, 3))
    assert torch.equal(naive_slot(caches, ppb, 6), naive_slot(orig, ppb, 5))
    assert eng.stats.blocks_stored == 4 and eng.stats.blocks_loaded == 2
    eng.close()
    assert pool.closed


def test_lossy_engine_round_trip_is_close():
    caches, ppb, pool, eng = _engine(fmt="int8")
    orig = snapshot(caches)
    eng.submit(1, [(2, 4)], [])
    eng.submit(2, [], [(4, 0)])
    assert [r.ok for r in eng.poll()] == [True, True]
    a = naive_slot(orig, ppb, 2).view(torch.float16).float()
    b = naive_slot(caches, ppb, 0).view(torch.float16).float()
    assert float((a - b).norm() / a.norm()) < 0.01
    eng.close()


def test_results_wait_for_polls_and_come_in_order():
    caches, ppb, pool, eng = _engine(delay_polls=2)
    eng.submit(7, [(1, 0)], [])
    eng.submit(8, [], [(0, 2)])
    assert eng.num_inflight == 2
    assert eng.poll() == []
    with pytest.raises(ValueError, match="op_id 7 is already in flight"):
        eng.submit(7, [], [])
    assert eng.poll() == []
    assert [r.op_id for r in eng.poll()] == [7, 8]
    eng.submit(9, [(2, 1)], [])
    eng.wait_all()
    assert [r.op_id for r in eng.poll()] == [9]
    assert eng.num_inflight == 0


def test_copies_land_as_late_as_a_stream_allows():
    """A demotion's gather runs at submit; everything else lands at the op's poll, at wait_all, or
    before a later op's gather (stream order), never sooner: a caller that uses bytes before the op
    is reported sees them missing, as it could on a GPU."""
    caches, ppb, pool, eng = _engine(delay_polls=1)
    orig = snapshot(caches)
    pool.slot_view(0).fill_(0)
    eng.submit(1, [(2, 0)], [])                 # demote block 2 into slot 0 (gathered now)
    caches_after_submit = snapshot(caches)
    for rows in caches.values():                # the forward rewrites block 2 right after the gather
        rows[2 * ppb:(2 + 1) * ppb].fill_(7)
    assert not pool.slot_view(0).any(), "the slot is written only when the op completes"
    assert eng.poll() == []
    assert not pool.slot_view(0).any()
    (res,) = eng.poll()
    assert res.ok and torch.equal(pool.slot_view(0), naive_slot(orig, ppb, 2))   # the bytes at submit
    # a load lands at its poll, or before a later op's gather
    eng.submit(2, [], [(0, 5)])
    assert torch.equal(naive_slot(caches, ppb, 5), naive_slot(caches_after_submit, ppb, 5)), "not landed yet"
    eng.submit(3, [(5, 1)], [])                 # stream order: op 2's load runs before this gather
    assert torch.equal(naive_slot(caches, ppb, 5), naive_slot(orig, ppb, 2))
    eng.wait_all()
    assert torch.equal(pool.slot_view(1), naive_slot(orig, ppb, 2)) and [r.op_id for r in eng.poll()] == [2, 3]
    eng.close()


@pytest.mark.parametrize("kind", ["load", "store"])
def test_injected_failures_leave_destinations_untouched(kind):
    caches, ppb, pool, eng = _engine()
    eng.submit(1, [(0, 0), (1, 1)], [])
    eng.poll()
    pool.slot_view(3).fill_(0xAB)
    before_caches, before_slot = snapshot(caches), pool.slot_view(3).clone()
    eng.fail_next(1, kind)
    other_only = ([(4, 3)], []) if kind == "load" else ([], [(3, 4)])   # not hit by this kind
    eng.submit(2, *other_only)
    eng.submit(3, [(5, 3)], [(0, 6), (1, 7)])                            # hit
    eng.submit(4, *(([], [(1, 2)]) if kind == "load" else ([(1, 2)], [])))  # n=1: no longer hit
    r2, r3, r4 = eng.poll()
    assert r2.ok and r4.ok
    assert not r3.ok and r3.error == f"{kind} failed (injected)"
    assert (r3.loads_ok, r3.stores_ok) == ((False, True) if kind == "load" else (True, False))
    if kind == "load":
        for b in (6, 7):
            assert torch.equal(naive_slot(caches, ppb, b), naive_slot(before_caches, ppb, b))
        assert torch.equal(pool.slot_view(3), naive_slot(before_caches, ppb, 5))
    else:
        assert torch.equal(pool.slot_view(3), before_slot)                  # failed store: slot untouched
        assert torch.equal(naive_slot(caches, ppb, 4), before_slot)
        assert torch.equal(naive_slot(caches, ppb, 6), naive_slot(before_caches, ppb, 0))
    assert eng.stats.failed_ops == 1


def test_submit_validates_before_any_byte_moves():
    caches, ppb, pool, eng = _engine()
    before = snapshot(caches)
    slots_before = [pool.slot_view(s).clone() for s in range(pool.num_slots)]
    bad = [
        (([(0, 1), (2, 1)], []), "demotions has duplicate destination host_slots \\[1\\]"),
        (([], [(0, 3), (1, 3)]), "loads has duplicate destination gpu_blocks \\[3\\]"),
        (([(8, 0)], []), "gpu_block 8 outside \\[0, 8\\)"),
        (([(0, 6)], []), "host_slot 6 outside \\[0, 6\\)"),
        (([(0, 0)], [(0, -1)]), "gpu_block -1 outside"),
        (([(0, 0)], [(1,)]), "must be a \\(host_slot, gpu_block\\) pair"),
        (([(0.5, 0)], []), "must be an int"),
    ]
    for (dem, loads), match in bad:
        with pytest.raises(ValueError, match=match):
            eng.submit(1, dem, loads)
    with pytest.raises(ValueError, match="op_id must be an int"):
        eng.submit("x", [], [])
    with pytest.raises(ValueError, match="kind must be one of"):
        eng.fail_next(1, "both")
    assert same_bytes(before, caches)
    assert all(torch.equal(pool.slot_view(s), slots_before[s]) for s in range(pool.num_slots))
    assert eng.poll() == [] and eng.num_inflight == 0
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(2, [], [])


def test_engine_rejects_caches_of_another_layout():
    caches, ppb, pool, eng = _engine()
    other, _, _ = build_caches(0, torch.float16, num_layers=3, num_blocks=8)
    with pytest.raises(ValueError, match="differ from the layout"):
        CpuCopyEngine(eng.layout, pool, other)


def test_cuda_engine_refuses_cpu_rows_and_pools_must_match():
    caches, ppb, pool, eng = _engine()
    with pytest.raises(ValueError, match="needs CUDA rows"):
        CudaCopyEngine(eng.layout, pool, caches)
    other_layout = KVRowLayout.from_connector_caches(caches, ppb)
    with pytest.raises(ValueError, match="different KVRowLayout"):
        CpuCopyEngine(other_layout, pool, caches)
    with pytest.raises(ValueError, match="differs from the kv_caches device"):
        make_copy_engine(eng.layout, pool, caches, device="cuda:0")


def _raise_after_first(monkeypatch, eng, name):
    """``eng.<name>(slots, x)`` moves its first block, then raises (a copy that dies part-way)."""
    orig = getattr(eng, name)

    def broken(slots, x):
        orig(slots[:1], x[:1])
        raise RuntimeError(f"{name} died")

    monkeypatch.setattr(eng, name, broken)


def test_a_load_fault_keeps_the_op_s_landed_demotions(monkeypatch):
    """The load half raising after the demotions landed fails the loads only: the demoted slots hold
    their blocks and are reported stored."""
    caches, ppb, pool, eng = _engine()
    orig = snapshot(caches)
    eng.submit(1, [(0, 0), (1, 1)], [])
    eng.poll()
    _raise_after_first(monkeypatch, eng, "_load")
    eng.submit(2, demotions=[(4, 2), (5, 3)], loads=[(0, 6), (1, 7)])
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok, r.ok) == (True, False, False)
    assert "load failed: RuntimeError: _load died" in r.error and "store" not in r.error
    assert torch.equal(pool.slot_view(2), naive_slot(orig, ppb, 4))
    assert torch.equal(pool.slot_view(3), naive_slot(orig, ppb, 5))
    assert eng.stats.blocks_stored == 4 and eng.stats.blocks_loaded == 0 and eng.stats.failed_ops == 1


@pytest.mark.parametrize("where", ["_write_slots", "_gather"])
def test_a_demotion_fault_keeps_the_op_s_loads(monkeypatch, where):
    """The demotion half raising (gathering at submit, or writing the slots as the op lands) fails the
    demotions only: loads of other slots in the same op land and are reported ok."""
    caches, ppb, pool, eng = _engine()
    orig = snapshot(caches)
    eng.submit(1, [(0, 0), (1, 1)], [])
    eng.poll()
    if where == "_gather":
        monkeypatch.setattr(eng, "_gather", lambda blocks: (_ for _ in ()).throw(RuntimeError("_gather died")))
    else:
        _raise_after_first(monkeypatch, eng, where)
    eng.submit(2, demotions=[(4, 2), (5, 3)], loads=[(0, 6), (1, 7)])
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok, r.ok) == (False, True, False)
    assert f"store failed: RuntimeError: {where} died" in r.error and "load" not in r.error
    assert torch.equal(naive_slot(caches, ppb, 6), naive_slot(orig, ppb, 0))
    assert torch.equal(naive_slot(caches, ppb, 7), naive_slot(orig, ppb, 1))
    assert eng.stats.blocks_stored == 2 and eng.stats.blocks_loaded == 2


@pytest.mark.parametrize("fault", ["raised", "injected"])
def test_loads_reading_a_slot_of_the_op_s_failed_store_fail_without_reading(monkeypatch, fault):
    """A load may read a slot its own op demotes into (it gets the demoted bytes); when that store
    failed, the slot holds unwritten or partly written bytes, so the op's loads fail and move nothing."""
    caches, ppb, pool, eng = _engine()
    orig = snapshot(caches)
    eng.submit(1, [(4, 2), (5, 3)], [(2, 6)])     # all ok: the load gets block 4's bytes, just demoted
    (r,) = eng.poll()
    assert r.ok and torch.equal(naive_slot(caches, ppb, 6), naive_slot(orig, ppb, 4))
    before = snapshot(caches)
    if fault == "raised":
        _raise_after_first(monkeypatch, eng, "_write_slots")
    else:
        eng.fail_next(1, "store")
    eng.submit(2, demotions=[(0, 4), (1, 5)], loads=[(5, 7), (3, 2)])
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok) == (False, False)
    assert "load not run: it reads a host slot whose store in the same op failed" in r.error
    for b in (7, 2):
        assert torch.equal(naive_slot(caches, ppb, b), naive_slot(before, ppb, b))


def test_a_submit_that_raises_leaves_nothing_in_flight(monkeypatch):
    caches, ppb, pool, eng = _engine()
    monkeypatch.setattr(eng, "_enqueue", lambda plan: (_ for _ in ()).throw(RuntimeError("enqueue died")))
    with pytest.raises(RuntimeError, match="enqueue died"):
        eng.submit(1, [(0, 0)], [])
    assert eng.num_inflight == 0
