"""``kernels.warm_up`` compiles and launches nothing: no byte of the rows or the staging moves.

Under ``TRITON_INTERPRET=1`` (CI) it goes through the same launch code as a real copy, with
Triton's ``warmup`` in place of the launch; the GPU test in ``test_transfer_cuda.py`` checks that
it compiles exactly the variants a copy then uses.
"""
from __future__ import annotations

import os

import pytest
import torch

from transfer_helpers import build_caches, snapshot
from lmdeploy_hostcache.transfer import KVRowLayout

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs "
                                "TRITON_INTERPRET=1")


@pytest.mark.parametrize("qp,fmt", [(0, "same"), (8, "same"), (0, "int8"), (0, "int4")])
def test_warm_up_moves_no_byte(qp, fmt):
    from lmdeploy_hostcache.transfer import kernels

    caches, plan, _ = build_caches(qp, torch.float16)
    layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
    rows = layout.check_caches(caches)
    form = layout.host_format(fmt)
    staging = torch.full((1, form.slot_bytes), 0xA5, dtype=torch.uint8)
    orig = snapshot(caches)
    kernels.warm_up(rows, layout, form, staging)
    assert all(torch.equal(orig[k], caches[k]) for k in caches)
    assert bool((staging == 0xA5).all())
