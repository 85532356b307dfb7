"""Raw ("same") gather/scatter: bit-exact, both backends, real LMDeploy layouts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer_helpers import build_caches, naive_slot, snapshot
from lmdeploy_hostcache.transfer import KVRowLayout, gather_blocks, scatter_blocks

# (quant_policy, dtype): fp16, bf16, packed int8 and packed int4 caches
LAYOUTS = [(0, torch.float16), (0, torch.bfloat16), (8, torch.float16), (4, torch.bfloat16)]
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qp,dtype", LAYOUTS)
def test_gather_matches_naive_and_scatter_round_trips(qp, dtype, backend):
    # block_size 12 / kernel_block_size 4: 3 pages per block (odd), 7 blocks, 3 layers
    caches, plan, _ = build_caches(qp, dtype, num_layers=3, block_size=12, kernel_block_size=4, num_blocks=7)
    ppb = plan.kernel_blocks_per_logical_block
    assert ppb == 3
    layout = KVRowLayout.from_connector_caches(caches, ppb, plan.tensor_specs)
    ids = [6, 1, 4, 0]  # non-contiguous, unordered
    slots = torch.empty((len(ids), layout.slot_bytes()), dtype=torch.uint8)
    gather_blocks(layout, caches, ids, slots, backend=backend)
    for i, b in enumerate(ids):
        assert torch.equal(slots[i], naive_slot(caches, ppb, b)), f"slot {i} (block {b}) differs"

    # scatter into reversed destinations of a second, zeroed cache with the same layout
    dst, _, _ = build_caches(qp, dtype, num_layers=3, block_size=12, kernel_block_size=4, num_blocks=7,
                             randomize=False)
    before = snapshot(dst)
    dest = [5, 3, 2, 1]
    scatter_blocks(layout, slots, dest, dst, backend=backend)
    for i, b in enumerate(dest):
        assert torch.equal(naive_slot(dst, ppb, b), slots[i])
    untouched = [b for b in range(7) if b not in dest]
    for b in untouched:
        assert torch.equal(naive_slot(dst, ppb, b), naive_slot(before, ppb, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_from_several_allocations(backend):
    """Target rows plus MTP-style rows living in another allocation, and typed (non-uint8) rows."""
    caches, plan, _ = build_caches(0, torch.float16, num_layers=2, num_blocks=5)
    extra, _, _ = build_caches(8, torch.float16, num_layers=1, num_blocks=5, seed=3)
    rows = dict(caches)
    rows.update({f"mtp.{k}": v for k, v in extra.items()})
    typed = torch.randn(10, 3, 8, dtype=torch.float16)  # a per-row-contiguous style typed pool row
    rows["cache_pool.1.row.0"] = typed
    ppb = plan.kernel_blocks_per_logical_block
    layout = KVRowLayout.from_connector_caches(rows, ppb)
    ids = torch.tensor([4, 2, 0])
    slots = torch.empty((3, layout.slot_bytes()), dtype=torch.uint8)
    gather_blocks(layout, rows, ids, slots, backend=backend)
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(slots[i], naive_slot(rows, ppb, b))
    before = snapshot(rows)
    scatter_blocks(layout, slots.flip(0).contiguous(), [1, 3, 4], rows, backend=backend)
    for b, src in zip([1, 3, 4], [0, 2, 4]):
        assert torch.equal(naive_slot(rows, ppb, b), naive_slot(before, ppb, src))


def test_fast_torch_path_equals_generic_path():
    """The single index_select path and the per-segment path agree."""
    from lmdeploy_hostcache.transfer import reference
    caches, plan, _ = build_caches(0, torch.bfloat16, num_layers=4, num_blocks=9)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block)
    fmt = layout.host_format("same")
    rows = layout.check_caches(caches)
    ids = torch.tensor([8, 0, 5, 5, 2])  # a repeated source is allowed
    fast = torch.empty((5, fmt.slot_bytes), dtype=torch.uint8)
    assert reference._fast_raw(rows, layout, fmt, ids, fast, to_slots=True)
    slow = torch.empty_like(fast)
    for i, b in enumerate(ids.tolist()):
        slow[i] = naive_slot(caches, plan.kernel_blocks_per_logical_block, b)
    assert torch.equal(fast, slow)
    separate = {k: torch.zeros_like(v) for k, v in caches.items()}  # one allocation per row: no fast path
    assert not reference._fast_raw(layout.check_caches(separate), layout, fmt, ids, fast, to_slots=True)
    back, _, _ = build_caches(0, torch.bfloat16, num_layers=4, num_blocks=9, randomize=False)
    back_rows = layout.check_caches(back)
    uniq = torch.tensor([8, 0, 5, 2])
    assert reference._fast_raw(back_rows, layout, fmt, uniq, fast[[0, 1, 2, 4]].contiguous(), to_slots=False)
    for b in uniq.tolist():
        assert torch.equal(naive_slot(back, plan.kernel_blocks_per_logical_block, b),
                           naive_slot(caches, plan.kernel_blocks_per_logical_block, b))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_layouts_round_trip(data):
    """Arbitrary rows (odd page sizes, typed dtypes, separate allocations), both backends agree."""
    ppb = data.draw(st.integers(1, 3), label="ppb")
    num_blocks = data.draw(st.integers(1, 6), label="num_blocks")
    n_rows = data.draw(st.integers(1, 4), label="rows")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    rows = {}
    for r in range(n_rows):
        dtype = data.draw(st.sampled_from([torch.uint8, torch.float16, torch.bfloat16, torch.int32]))
        width = data.draw(st.integers(1, 9))
        t = torch.randint(0, 255, (num_blocks * ppb, width * 4), generator=g, dtype=torch.uint8)
        rows[f"cache_pool.{r}.row.0"] = t.view(dtype)
    layout = KVRowLayout.from_connector_caches(rows, ppb)
    ids = data.draw(st.lists(st.integers(0, num_blocks - 1), min_size=1, max_size=num_blocks, unique=True))
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    slots = torch.empty((len(ids), layout.slot_bytes()), dtype=torch.uint8)
    gather_blocks(layout, rows, ids, slots, backend=backend)
    for i, b in enumerate(ids):
        assert torch.equal(slots[i], naive_slot(rows, ppb, b))
    before = snapshot(rows)
    dest = list(reversed(ids))
    scatter_blocks(layout, slots, dest, rows, backend=backend)
    for i, b in enumerate(dest):
        assert torch.equal(naive_slot(rows, ppb, b), naive_slot(before, ppb, ids[i]))
