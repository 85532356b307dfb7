"""CudaCopyEngine's stream/event protocol, exercised on CPU with recording fakes.

No GPU here: torch.cuda's Stream/Event are replaced by fakes that log what the
engine asks for, and the copies run on CPU tensors.  This checks the ordering
protocol (copy stream waits for compute; compute waits for the demotion gather;
completion only through event polling; staging kept until then), not CUDA itself.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from transfer_helpers import build_caches, naive_slot, snapshot
from lmdeploy_hostcache.transfer import CudaCopyEngine, HostPool, KVRowLayout

LOG: list = []


class FakeEvent:
    def __init__(self):
        self.done = False
        LOG.append(("event", self))

    def record(self, stream=None):
        LOG.append(("record", self, stream.name))

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


class FakeStream:
    def __init__(self, name="copy", device=None):
        self.name = name

    def wait_stream(self, other):
        LOG.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        LOG.append(("wait_event", self.name, event))


COMPUTE = FakeStream("compute")


class CpuRowsCudaEngine(CudaCopyEngine):
    def _require_cuda_rows(self):
        pass


def _fake_cuda(monkeypatch) -> None:
    """torch.cuda's streams and events replaced by the recording fakes."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: COMPUTE)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


@pytest.fixture
def engine(monkeypatch):
    LOG.clear()
    _fake_cuda(monkeypatch)
    caches, plan, _ = build_caches(0, torch.float16, num_layers=2, num_blocks=8)
    ppb = plan.kernel_blocks_per_logical_block
    layout = KVRowLayout.from_connector_caches(caches, ppb, plan.tensor_specs)
    pool = HostPool(layout, 6, "same", chunk_bytes=2 * layout.slot_bytes())
    eng = CpuRowsCudaEngine(layout, pool, caches, backend="torch", max_staging_bytes=2 * layout.slot_bytes())
    return caches, ppb, pool, eng


def test_stream_protocol_and_polling(engine):
    caches, ppb, pool, eng = engine
    orig = snapshot(caches)
    # 3 demotions (2 staging buffers of 2 blocks), loads into the demoted pages
    eng.submit(1, [(5, 4), (6, 0), (7, 1)], [])
    eng.submit(2, [(2, 3)], [(0, 7), (1, 6), (4, 5)])
    kinds = [e[0] for e in LOG]
    assert LOG[kinds.index("wait_stream")] == ("wait_stream", "copy", "compute")  # before any copy
    waits = [e for e in LOG if e[0] == "wait_event"]
    assert len(waits) == 2 and all(w[1] == "compute" for w in waits)   # forward waits for each gather
    assert eng.poll() == []                                           # events not done yet
    assert len(eng._pending[0][1]) > 0                                 # staging kept alive
    eng._pending[0][0].done = True
    (r1,) = eng.poll()
    assert r1.op_id == 1 and r1.ok
    eng.wait_all()
    (r2,) = eng.poll()
    assert r2.ok and r2.num_loads == 3
    assert torch.equal(pool.slot_view(4), naive_slot(orig, ppb, 5))
    assert torch.equal(pool.slot_view(3), naive_slot(orig, ppb, 2))
    assert torch.equal(naive_slot(caches, ppb, 7), naive_slot(orig, ppb, 6))
    assert torch.equal(naive_slot(caches, ppb, 6), naive_slot(orig, ppb, 7))
    assert torch.equal(naive_slot(caches, ppb, 5), naive_slot(orig, ppb, 5))
    eng.close()
    assert pool.closed


def test_injected_load_failure_skips_the_copy(engine):
    caches, ppb, pool, eng = engine
    eng.submit(1, [(3, 2)], [])
    eng.wait_all()
    eng.poll()
    before = snapshot(caches)
    eng.fail_next(1, "load")
    eng.submit(2, [], [(2, 0)])
    eng.wait_all()
    (r,) = eng.poll()
    assert not r.ok and not r.loads_ok and r.stores_ok
    assert torch.equal(naive_slot(caches, ppb, 0), naive_slot(before, ppb, 0))


def _triton_engine(monkeypatch):
    _fake_cuda(monkeypatch)
    caches, plan, _ = build_caches(0, torch.float16, num_layers=2, num_blocks=8)
    ppb = plan.kernel_blocks_per_logical_block
    layout = KVRowLayout.from_connector_caches(caches, ppb, plan.tensor_specs)
    pool = HostPool(layout, 4, "same")
    return caches, ppb, pool, layout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_engine_warms_its_kernels_up_when_built(monkeypatch):
    from lmdeploy_hostcache.transfer import kernels

    calls = []
    real = kernels.warm_up
    monkeypatch.setattr(kernels, "warm_up", lambda *a: (calls.append(a[2].name), real(*a)))
    caches, ppb, pool, layout = _triton_engine(monkeypatch)
    orig = snapshot(caches)
    eng = CpuRowsCudaEngine(layout, pool, caches, backend="triton")
    assert calls == ["same"] and eng.warm_up_s is not None
    assert all(torch.equal(orig[k], caches[k]) for k in caches)
    torch_eng = CpuRowsCudaEngine(layout, HostPool(layout, 4, "same"), caches, backend="torch")
    assert calls == ["same"] and torch_eng.warm_up_s is None   # nothing to compile for torch
    eng.close()
    torch_eng.close()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_a_failed_warm_up_is_logged_and_the_copies_still_run(monkeypatch, caplog):
    from lmdeploy_hostcache.transfer import kernels

    def broken(*a):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "warm_up", broken)
    caches, ppb, pool, layout = _triton_engine(monkeypatch)
    orig = snapshot(caches)
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache.transfer"):
        eng = CpuRowsCudaEngine(layout, pool, caches, backend="triton")
    assert eng.warm_up_s is None
    assert "compiling the copy kernels at start-up failed (RuntimeError: no compiler)" in caplog.text
    eng.submit(1, [(3, 0)], [])
    eng.wait_all()
    (r,) = eng.poll()
    assert r.ok and torch.equal(pool.slot_view(0), naive_slot(orig, ppb, 3))
    eng.close()


def _host_runs_failing(eng, monkeypatch, direction_to_host: bool):
    """``_host_runs`` copies its first run of the given direction, then raises (a copy that dies part-way)."""
    orig = eng._host_runs
    calls = []

    def broken(first, count, staging, to_host):
        if to_host == direction_to_host:
            calls.append(first)
            if len(calls) > 1:
                raise RuntimeError("copy died")
        return orig(first, count, staging, to_host=to_host)

    monkeypatch.setattr(eng, "_host_runs", broken)


def test_a_load_fault_keeps_the_op_s_issued_demotions(engine, monkeypatch):
    """The load part raising fails the loads only; the demotions issued before it stay in stream order
    before the op's event and are reported stored (CPU tensors stand in for the device: no GPU run)."""
    caches, ppb, pool, eng = engine
    orig = snapshot(caches)
    _host_runs_failing(eng, monkeypatch, direction_to_host=False)
    eng.submit(1, [(5, 4), (6, 0)], [(1, 2), (3, 7)])    # loads read slots 1 and 3: two runs, the second dies
    eng.wait_all()
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok) == (True, False) and r.error == "load failed: RuntimeError: copy died"
    assert torch.equal(pool.slot_view(4), naive_slot(orig, ppb, 5))
    assert torch.equal(pool.slot_view(0), naive_slot(orig, ppb, 6))


def test_a_demotion_fault_keeps_the_op_s_loads(engine, monkeypatch):
    caches, ppb, pool, eng = engine
    orig = snapshot(caches)
    eng.submit(1, [(5, 1), (6, 3)], [])
    eng.wait_all()
    eng.poll()
    _host_runs_failing(eng, monkeypatch, direction_to_host=True)
    eng.submit(2, [(2, 0), (4, 5)], [(1, 7), (3, 6)])    # demotions into slots 0 and 5: the second run dies
    eng.wait_all()
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok) == (False, True) and r.error == "store failed: RuntimeError: copy died"
    assert torch.equal(naive_slot(caches, ppb, 7), naive_slot(orig, ppb, 5))
    assert torch.equal(naive_slot(caches, ppb, 6), naive_slot(orig, ppb, 6))
    assert eng.stats.blocks_loaded == 2


def test_loads_reading_a_slot_of_the_op_s_failed_store_are_not_issued(engine, monkeypatch):
    caches, ppb, pool, eng = engine
    _host_runs_failing(eng, monkeypatch, direction_to_host=True)
    before = snapshot(caches)
    eng.submit(1, [(2, 0), (4, 5)], [(5, 7)])    # the load reads slot 5, whose demotion dies
    eng.wait_all()
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok) == (False, False)
    assert "load not run: it reads a host slot whose store in the same op failed" in r.error
    assert torch.equal(naive_slot(caches, ppb, 7), naive_slot(before, ppb, 7))


def test_a_stream_fault_fails_both_parts_and_still_completes_through_the_event(engine, monkeypatch):
    caches, ppb, pool, eng = engine

    def broken(other):
        raise RuntimeError("stream wait died")

    monkeypatch.setattr(eng.copy_stream, "wait_stream", broken)
    eng.submit(1, [(2, 0)], [(3, 4)])
    assert eng.poll() == [] and eng.num_inflight == 1     # completion only through its event
    eng.wait_all()
    (r,) = eng.poll()
    assert (r.stores_ok, r.loads_ok) == (False, False) and "stream wait died" in r.error


def test_loads_from_slots_out_of_order_land_in_their_blocks(engine):
    """Slots handed out by a LIFO free list (not ascending) load into the blocks they are paired with."""
    caches, ppb, pool, eng = engine
    orig = snapshot(caches)
    eng.submit(1, [(1, 5), (2, 0), (3, 3)], [])
    eng.submit(2, [], [(5, 6), (0, 7), (3, 4)])
    eng.wait_all()
    assert [r.ok for r in eng.poll()] == [True, True]
    for block, demoted in ((6, 1), (7, 2), (4, 3)):
        assert torch.equal(naive_slot(caches, ppb, block), naive_slot(orig, ppb, demoted)), block
