"""HostPool: contiguous slots, chunked allocation with progress, clear errors, release."""
from __future__ import annotations

import logging

import pytest
import torch

from transfer_helpers import build_caches
from lmdeploy_hostcache.transfer import HostPool, KVRowLayout


@pytest.fixture
def layout():
    caches, plan, _ = build_caches(0, torch.float16, num_blocks=4)
    return KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)


def test_slots_are_contiguous_distinct_and_chunked(layout, caplog):
    caplog.set_level(logging.INFO, logger="lmdeploy_hostcache.transfer")
    with HostPool(layout, 7, "int4", chunk_bytes=3 * layout.slot_bytes("int4") + 5) as pool:
        assert pool.slots_per_chunk == 3 and len(pool.chunks) == 3
        assert pool.nbytes == 7 * pool.slot_bytes
        ptrs = set()
        for s in range(7):
            v = pool.slot_view(s)
            assert v.is_contiguous() and v.dtype == torch.uint8 and v.numel() == pool.slot_bytes
            ptrs.add(v.data_ptr())
            v.fill_(s)
        assert len(ptrs) == 7
        assert all(int(pool.slot_view(s)[0]) == s for s in range(7))
        assert pool.slot_range_view(3, 3).shape == (3, pool.slot_bytes)
        assert pool.slot_range_view(2, 2) is None     # crosses a chunk boundary
        assert not pool.pinned                         # no CUDA here
        with pytest.raises(ValueError, match="slot 7 outside"):
            pool.slot_view(7)
    assert pool.closed and pool.chunks == ()
    with pytest.raises(RuntimeError, match="closed"):
        pool.slot_view(0)
    progress = [r.getMessage() for r in caplog.records if "chunk" in r.getMessage()]
    assert len(progress) == 4 and "chunk 3/3" in progress[-1]


def test_last_chunk_holds_only_the_remaining_slots(layout):
    """A pool whose size is not a multiple of the chunk allocates exactly its slots, not a full last chunk."""
    with HostPool(layout, 5, "same", chunk_bytes=4 * layout.slot_bytes()) as pool:
        assert [c.shape[0] for c in pool.chunks] == [4, 1]
        assert sum(c.numel() for c in pool.chunks) == pool.nbytes == 5 * layout.slot_bytes()


def test_clear_errors(layout):
    with pytest.raises(MemoryError, match="exceeds 90% of available RAM"):
        HostPool(layout, 1 << 40)
    with pytest.raises(ValueError, match="num_slots must be a positive int"):
        HostPool(layout, 0)
    with pytest.raises(ValueError, match="host_kv_format must be one of"):
        HostPool(layout, 2, "fp4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            HostPool(layout, 2, pin_memory=True)


def test_gc_releases(layout):
    """A pool dropped without close() is released by its finalizer."""
    import gc
    pool = HostPool(layout, 2)
    fin = pool._finalizer
    del pool
    gc.collect()
    assert not fin.alive
