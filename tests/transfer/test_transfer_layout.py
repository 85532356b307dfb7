"""KVRowLayout and host formats against LMDeploy's own cache plans."""
from __future__ import annotations

import pytest
import torch

from transfer_helpers import build_caches
from lmdeploy_hostcache.transfer import KVRowLayout


@pytest.mark.parametrize("qp", [0, 8, 4])
def test_raw_slot_is_the_block_bytes(qp):
    caches, plan, _ = build_caches(qp, torch.bfloat16, num_layers=3, num_blocks=4)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    assert layout.block_bytes == plan.logical_block_nbytes
    fmt = layout.host_format("same")
    assert fmt.slot_bytes == plan.logical_block_nbytes
    assert fmt.row_offsets == tuple(i * fmt.slot_bytes // 3 for i in range(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,qp", [("int8", 8), ("int4", 4)])
def test_lossy_record_is_lmdeploys_quant_page(dtype, fmt, qp):
    """The host page record of a compressed row has LMDeploy's quant_policy layout, field by field."""
    geom = dict(num_layers=2, kv_heads=8, head_dim=128, block_size=64, kernel_block_size=64, num_blocks=2)
    caches, plan, _ = build_caches(0, dtype, randomize=False, **geom)
    _, qplan, _ = build_caches(qp, dtype, randomize=False, **geom)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    host = layout.host_format(fmt)
    assert host.slot_bytes == qplan.logical_block_nbytes
    offset = 0
    for field, spec in zip(host.record_fields[0], qplan.tensor_specs):
        assert (field.name, field.offset, field.shape, field.dtype, field.size) == (
            spec.name, offset, tuple(spec.desc.shape), spec.desc.dtype, spec.desc.size)
        offset += spec.desc.aligned_size
    ratio = host.slot_bytes / layout.block_bytes
    print(f"{fmt} {dtype}: slot {host.slot_bytes} B vs raw {layout.block_bytes} B ({ratio:.3f}x)")
    assert ratio < (0.52 if fmt == "int8" else 0.27)


def test_mapping_tensor_specs_and_mtp_rows():
    caches, plan, _ = build_caches(0, torch.float16, num_layers=2, num_blocks=3)
    mtp, mplan, _ = build_caches(0, torch.float16, num_layers=1, num_blocks=3, seed=5)
    rows = dict(caches)
    rows.update({f"mtp.{k}": v for k, v in mtp.items()})
    ppb = plan.kernel_blocks_per_logical_block
    only_target = KVRowLayout.from_connector_caches(rows, ppb, plan.tensor_specs)
    assert sorted(only_target.row_fields) == [0, 1]
    both = KVRowLayout.from_connector_caches(rows, ppb, {"cache_pool.0.": plan.tensor_specs,
                                                         "mtp.cache_pool.0.": mplan.tensor_specs})
    assert sorted(both.row_fields) == [0, 1, 2]
    assert len(both.host_format("int8").quant_fields) == 6
    assert len(only_target.host_format("int8").quant_fields) == 4


def _kv_specs(k=((4, 2, 16), torch.float16), v=((4, 2, 16), torch.float16), extra=()):
    from lmdeploy_hostcache.transfer import TensorSpec

    specs = [TensorSpec("k_cache", *k)] + ([TensorSpec("v_cache", *v)] if v else []) + list(extra)
    page = sum(s.aligned_size for s in specs)
    caches = {"cache_pool.0.row.0": torch.zeros((4, page), dtype=torch.uint8)}
    return KVRowLayout.from_connector_caches(caches, 2, specs)


@pytest.mark.parametrize("fmt,specs,problem", [
    ("int8", dict(v=None), "has no v_cache field"),
    ("int8", dict(k=((4, 2, 16), torch.int8), v=((4, 2, 16), torch.int8)), "is torch.int8; host int8/int4 compression needs"),
    ("int8", dict(v=((4, 2, 16), torch.bfloat16)), "k_cache and v_cache dtypes differ"),
    ("int4", dict(k=((4, 2, 15), torch.float16), v=((4, 2, 15), torch.float16)), "head_dim 15 is odd"),
    ("int8", dict(k=((4, 32), torch.float16)), "need [block, heads, head_dim]"),
    ("int8", dict(v=((4, 2, 0), torch.float16)), "empty v_cache"),
])
def test_rows_a_lossy_host_format_cannot_compress_are_refused_by_name(fmt, specs, problem):
    """Each K/V shape int8/int4 host compression cannot handle is refused with the reason, before a copy."""
    assert problem in _kv_specs(**specs).compression_error(fmt)


def test_an_odd_head_dim_is_refused_for_int4_only():
    layout = _kv_specs(k=((4, 2, 15), torch.float16), v=((4, 2, 15), torch.float16))
    assert layout.compression_error("int8") is None and layout.compression_error("same") is None
