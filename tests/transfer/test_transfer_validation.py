"""Bad inputs raise a clear error before any byte moves."""
from __future__ import annotations

import pytest
import torch

from transfer_helpers import build_caches, same_bytes, snapshot
from lmdeploy_hostcache.transfer import KVRowLayout, TensorSpec, gather_blocks, scatter_blocks


@pytest.fixture
def setup():
    caches, plan, _ = build_caches(0, torch.float16, num_blocks=5)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    return caches, layout


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ids,match", [
    ([1, 3, 1], "duplicate destination ids \\[1\\]"),
    ([0, 5], "contains 5, outside \\[0, 5\\)"),
    ([-1], "contains -1"),
    ([True], "must hold ints"),
    ([1.0], "must hold ints"),
])
def test_scatter_bad_ids(setup, backend, ids, match):
    caches, layout = setup
    before = snapshot(caches)
    slots = torch.zeros((len(ids), layout.slot_bytes()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        scatter_blocks(layout, slots, ids, caches, backend=backend)
    assert same_bytes(before, caches)


@pytest.mark.parametrize("fmt", ["same", "int8", "int4"])
def test_gather_shape_and_dtype_mismatch(setup, fmt):
    caches, layout = setup
    n = layout.slot_bytes(fmt)
    sentinel = torch.full((2, n + 1), 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"expected \\(2, {n}\\)"):
        gather_blocks(layout, caches, [0, 1], sentinel, fmt)
    assert bool((sentinel == 7).all())
    with pytest.raises(ValueError, match="contiguous uint8"):
        gather_blocks(layout, caches, [0, 1], torch.zeros((2, n), dtype=torch.int16), fmt)
    with pytest.raises(ValueError, match="contiguous uint8"):
        gather_blocks(layout, caches, [0, 1], torch.zeros((n, 2), dtype=torch.uint8).t(), fmt)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        gather_blocks(layout, caches, torch.tensor([0.0, 1.0]), torch.zeros((2, n), dtype=torch.uint8), fmt)


def test_caches_that_do_not_match_the_layout(setup):
    caches, layout = setup
    slots = torch.zeros((1, layout.slot_bytes()), dtype=torch.uint8)
    wrong_dtype = {k: v.view(torch.float16) for k, v in caches.items()}
    with pytest.raises(ValueError, match="layout expects"):
        scatter_blocks(layout, slots, [0], wrong_dtype)
    missing = dict(list(caches.items())[:1])
    with pytest.raises(ValueError, match="differ from the layout"):
        scatter_blocks(layout, slots, [0], missing)
    with pytest.raises(ValueError, match="backend must be one of"):
        scatter_blocks(layout, slots, [0], caches, backend="cuda")


def test_layout_construction_errors():
    caches, plan, _ = build_caches(0, torch.float16, num_blocks=5)
    ppb = plan.kernel_blocks_per_logical_block
    with pytest.raises(ValueError, match="pages_per_block must be a positive int"):
        KVRowLayout.from_connector_caches(caches, 0)
    with pytest.raises(ValueError, match="not a multiple of pages_per_block 3"):
        KVRowLayout.from_connector_caches(caches, 3)
    bad = dict(caches)
    bad["cache_pool.0.row.1"] = torch.zeros(11, 512, dtype=torch.uint8)
    with pytest.raises(ValueError, match="has 11 pages"):
        KVRowLayout.from_connector_caches(bad, ppb)
    bad["cache_pool.0.row.1"] = torch.zeros(512, 10, dtype=torch.uint8).t()
    with pytest.raises(ValueError, match="not contiguous"):
        KVRowLayout.from_connector_caches(bad, ppb)
    with pytest.raises(ValueError, match="sum to 256 bytes"):
        KVRowLayout.from_connector_caches(caches, ppb, [TensorSpec("k_cache", (4, 2, 16), torch.float16)])
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        KVRowLayout.from_connector_caches({"cache_pool.0.row.0": [1, 2]}, 1)
    with pytest.raises(ValueError, match="is empty"):
        KVRowLayout.from_connector_caches({}, 1)


def test_lossy_format_refused_where_it_does_not_apply():
    caches, plan, _ = build_caches(8, torch.float16, num_blocks=5)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    with pytest.raises(ValueError, match="already holds quantized K/V"):
        layout.host_format("int4")
    assert layout.host_format("same").slot_bytes == layout.block_bytes
    no_specs = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block)
    with pytest.raises(ValueError, match="needs tensor_specs"):
        no_specs.host_format("int8")
    with pytest.raises(ValueError, match="host_kv_format must be one of"):
        no_specs.host_format("fp8")


def test_lossy_format_refused_on_rows_of_different_kv_dtypes():
    """One host format decodes every typed row with one dtype: fp16 rows next to bf16 rows would come
    back as garbage, so int8/int4 is refused there ('same' moves each row's bytes as they are)."""
    def specs(dtype):
        return [TensorSpec("k_cache", (4, 1, 8), dtype, alignment=64), TensorSpec("v_cache", (4, 1, 8), dtype, alignment=64)]

    caches = {"a.0": torch.zeros(2, 128, dtype=torch.uint8), "b.0": torch.zeros(2, 128, dtype=torch.uint8)}
    mixed = KVRowLayout.from_connector_caches(caches, 1, {"a.": specs(torch.float16), "b.": specs(torch.bfloat16)})
    for fmt in ("int8", "int4"):
        with pytest.raises(ValueError, match="needs one K/V dtype across the rows .*'a.0' is float16"):
            mixed.host_format(fmt)
    assert mixed.host_format("same").slot_bytes == mixed.block_bytes
    same = KVRowLayout.from_connector_caches(caches, 1, {"a.": specs(torch.bfloat16), "b.": specs(torch.bfloat16)})
    assert same.compression_error("int8") is None


def test_lossy_format_on_an_mla_latent_cache_names_it():
    """An MLA model's cache row holds the latent KV in k_cache and an empty v_cache: int8/int4 compression is
    refused naming that, and pointing at 'same'."""
    caches = {"cache_pool.0.row.0": torch.zeros(5, 16 * 32 * 2, dtype=torch.uint8)}
    specs = [TensorSpec("k_cache", (16, 1, 32), torch.float16), TensorSpec("v_cache", (16, 1, 0), torch.float16)]
    layout = KVRowLayout.from_connector_caches(caches, 1, specs)
    for fmt in ("int8", "int4"):
        with pytest.raises(ValueError, match="empty v_cache: an MLA model's latent KV cache.*host_kv_format='same'"):
            layout.host_format(fmt)
    assert layout.host_format("same").slot_bytes == layout.block_bytes
