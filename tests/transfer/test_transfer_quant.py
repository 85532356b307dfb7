"""Quantizing gather / dequantizing scatter: triton == torch reference == LMDeploy's own kernels."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfer_helpers import build_caches
from lmdeploy_hostcache.transfer import KVRowLayout, TensorSpec, dequantize, gather_blocks, quantize, scatter_blocks

# degenerate rows divide by zero inside the kernels before the fallback replaces them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

GEOM = dict(num_layers=2, kv_heads=2, head_dim=16, block_size=8, kernel_block_size=4, num_blocks=5)
IDS = [4, 1, 3]


def _layout(dtype, **kw):
    caches, plan, alloc = build_caches(0, dtype, **{**GEOM, **kw})
    return caches, plan, alloc, KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block,
                                                                  plan.tensor_specs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_triton_equals_torch_reference(dtype, fmt):
    caches, _, _, layout = _layout(dtype)
    out = {}
    for backend in ("torch", "triton"):
        slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
        gather_blocks(layout, caches, IDS, slots, fmt, backend=backend)
        out[backend] = slots
    assert torch.equal(out["torch"], out["triton"]), (out["torch"] != out["triton"]).sum()
    rec = {}
    for backend in ("torch", "triton"):
        dst, _, _ = build_caches(0, dtype, randomize=False, **GEOM)
        scatter_blocks(layout, out["torch"], [0, 2, 3], dst, fmt, backend=backend)
        rec[backend] = dst
    for name in caches:
        assert torch.equal(rec["torch"][name], rec["triton"][name]), name


def _lmdeploy_fill(qp: int, dtype):
    """Quantize the fp cache's blocks IDS with LMDeploy's own fill_kv_cache into an LMDeploy int cache."""
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.kernels.cuda.fill_kv_cache import fill_kv_cache

    src, plan, alloc, layout = _layout(dtype)
    dst, qplan, qalloc = build_caches(qp, dtype, randomize=False, **GEOM)
    ppb = plan.kernel_blocks_per_logical_block
    kv, vv = alloc.tensor_views[0], alloc.tensor_views[1]          # [L, pages, kbs, H, D]
    qk, qv, q0, q1 = qalloc.tensor_views
    pages = torch.tensor([b * ppb + p for b in IDS for p in range(ppb)])
    kbs = kv.shape[2]
    seqlen = pages.numel() * kbs
    for layer in range(kv.shape[0]):
        k_states = kv[layer, pages].reshape(seqlen, *kv.shape[3:]).contiguous()
        v_states = vv[layer, pages].reshape(seqlen, *vv.shape[3:]).contiguous()
        fill_kv_cache(k_states, v_states, qk[layer], qv[layer], torch.tensor([0]), torch.tensor([seqlen]),
                      torch.tensor([seqlen]), seqlen, pages[None], q0[layer], q1[layer],
                      quant_policy=QuantPolicy(qp))
    return src, dst, layout, qplan, qalloc


@pytest.mark.parametrize("qp,fmt", [(8, "int8"), (4, "int4")])
def test_host_bytes_equal_lmdeploy_fill_kv_cache(qp, fmt):
    """A compressed host block holds exactly the page bytes LMDeploy writes under that quant_policy (fp16)."""
    src, dst, layout, qplan, _ = _lmdeploy_fill(qp, torch.float16)
    for backend in ("torch", "triton"):
        slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
        gather_blocks(layout, src, IDS, slots, fmt, backend=backend)
        qlayout = KVRowLayout.from_connector_caches(dst, qplan.kernel_blocks_per_logical_block)
        assert layout.slot_bytes(fmt) == qlayout.slot_bytes("same")
        expect = torch.empty_like(slots)
        gather_blocks(qlayout, dst, IDS, expect, "same", backend="torch")
        diff = (slots != expect).nonzero()
        assert diff.numel() == 0, f"{backend}: {diff.shape[0]} bytes differ, first at {diff[:4].tolist()}"


@pytest.mark.parametrize("qp,fmt", [(8, "int8"), (4, "int4")])
def test_bf16_codes_equal_lmdeploy_fill_kv_cache(qp, fmt):
    """bf16: LMDeploy's kernel computes in fp32 after tl.min/tl.max, so its codes run correctly under the
    interpreter; only its bf16 stores truncate there (a GPU rounds to nearest even).  Codes must be
    identical, scale/zero equal or one bf16 step apart in the truncation direction."""
    src, dst, layout, qplan, qalloc = _lmdeploy_fill(qp, torch.bfloat16)
    slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
    gather_blocks(layout, src, IDS, slots, fmt, backend="triton")
    qlayout = KVRowLayout.from_connector_caches(dst, qplan.kernel_blocks_per_logical_block)
    expect = torch.empty_like(slots)
    gather_blocks(qlayout, dst, IDS, expect, "same", backend="torch")
    host = layout.host_format(fmt)
    ppb = layout.pages_per_block
    steps = 0
    for row in range(len(layout.rows)):
        start, rec = host.row_offsets[row], host.record_bytes[row]
        ours = slots[:, start:start + ppb * rec].unflatten(1, (ppb, rec))
        theirs = expect[:, start:start + ppb * rec].unflatten(1, (ppb, rec))
        for field in host.record_fields[row]:
            a = ours[..., field.offset:field.offset + field.size]
            b = theirs[..., field.offset:field.offset + field.size]
            if field.dtype == torch.uint8:
                assert torch.equal(a, b), f"row {row} {field.name} codes differ"
            else:
                ab = a.contiguous().view(torch.int16).int()
                bb = b.contiguous().view(torch.int16).int()
                assert bool(((ab - bb) >= 0).all() and ((ab - bb) <= 1).all()), f"row {row} {field.name}"
                steps += int((ab != bb).sum())
    print(f"{fmt} bf16: codes identical; {steps} scale/zero values rounded up where the interpreter truncates")


@pytest.mark.parametrize("qp,fmt", [(8, "int8"), (4, "int4")])
def test_dequant_matches_lmdeploy_flatten(qp, fmt):
    """Our dequantizing scatter agrees with LMDeploy's flatten_kv_cache to 1 ulp (it rounds q*scale first)."""
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.kernels.cuda.flatten_kv_cache import flatten_kv_cache

    src, dst, layout, qplan, qalloc = _lmdeploy_fill(qp, torch.float16)
    slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
    gather_blocks(layout, src, IDS, slots, fmt, backend="torch")
    out, plan, oalloc = build_caches(0, torch.float16, randomize=False, **GEOM)
    scatter_blocks(layout, slots, IDS, out, fmt, backend="triton")
    ppb = plan.kernel_blocks_per_logical_block
    pages = torch.tensor([b * ppb + p for b in IDS for p in range(ppb)])
    qk, qv, q0, q1 = qalloc.tensor_views
    kbs = qk.shape[2]
    seqlen = pages.numel() * kbs
    ours_k = oalloc.tensor_views[0][0, pages].reshape(seqlen, -1, GEOM["head_dim"]).transpose(0, 1)
    k_ref, _ = flatten_kv_cache(qk[0], qv[0], torch.tensor([seqlen]), pages[None], start_loc=torch.tensor([0]),
                                out_size=seqlen, out_dtype=torch.float16, k_scales_zeros=q0[0],
                                v_scales_zeros=q1[0], quant_policy=QuantPolicy(qp))
    # LMDeploy (interpreter, no FMA) rounds q*scale to fp16 before subtracting scale*zero; we subtract
    # in fp32 and round once.  The results may differ by the rounding error of q*scale, no more.
    sz = q0[0, pages].reshape(seqlen, -1, 2).transpose(0, 1).float()
    scale, zero = sz[..., 0:1], sz[..., 1:2]
    bound = 2.0 ** -11 * (scale * zero).abs() + 2.0 ** -10 * ours_k.float().abs() + 2.0 ** -24
    err = (ours_k.float() - k_ref.float()).abs()
    assert bool((err <= bound * 2).all()), float((err / bound).max())
    print(f"{fmt}: dequant vs LMDeploy flatten: {int((err > 0).sum())}/{err.numel()} values differ, "
          f"max |diff| {float(err.max()):.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("int4", 0.15)])
def test_reconstruction_error_bounded(dtype, fmt, bound):
    caches, plan, alloc, layout = _layout(dtype)
    slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
    gather_blocks(layout, caches, IDS, slots, fmt)
    out, _, oalloc = build_caches(0, dtype, randomize=False, **GEOM)
    scatter_blocks(layout, slots, IDS, out, fmt)
    ppb = plan.kernel_blocks_per_logical_block
    pages = torch.tensor([b * ppb + p for b in IDS for p in range(ppb)])
    for name, a, b in (("k", alloc.tensor_views[0], oalloc.tensor_views[0]),
                       ("v", alloc.tensor_views[1], oalloc.tensor_views[1])):
        x, y = a[:, pages].float(), b[:, pages].float()
        rel = float((x - y).norm() / x.norm())
        print(f"{fmt} {dtype} {name}: relative L2 error {rel:.5f}")
        assert rel < bound
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_constant_and_extreme_rows_stay_finite(dtype, bits):
    x = torch.zeros(6, 8, dtype=dtype)
    x[1] = 3.0
    x[2] = -1.5
    x[3, :] = 1000.0
    x[3, 0] = 1000.5                     # tiny range far from zero: LMDeploy's zero would overflow fp16
    x[4] = torch.linspace(-2, 2, 8).to(dtype)
    x[5, ::2] = 60000.0 if dtype == torch.float16 else 1e30
    codes, sz = quantize(x, bits)
    y = dequantize(codes, sz, bits)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:3], x[:3])      # constant rows come back exactly
    # the same through the triton kernels
    for backend in ("torch", "triton"):
        caches, plan, alloc = build_caches(0, dtype, randomize=False, **GEOM)
        alloc.tensor_views[0][0, 0, 0, 0, :] = 7.0
        layout = KVRowLayout.from_connector_caches(caches, plan.kernel_blocks_per_logical_block, plan.tensor_specs)
        fmt = f"int{bits}"
        slots = torch.empty((1, layout.slot_bytes(fmt)), dtype=torch.uint8)
        gather_blocks(layout, caches, [0], slots, fmt, backend=backend)
        alloc.tensor_views[0].fill_(-1)
        scatter_blocks(layout, slots, [0], caches, fmt, backend=backend)
        k = alloc.tensor_views[0][:, :plan.kernel_blocks_per_logical_block]
        assert torch.isfinite(k.float()).all()
        assert bool((k[0, 0, 0, 0] == 7.0).all()) and bool((k[1] == 0).all())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_raw_field_beside_kv_round_trips_exactly_with_two_pages_per_block(fmt):
    """A raw page field after k/v (as the worker's unplanned_tail) in a lossy host format with 2 kernel
    pages per block: both backends copy its bytes exactly, each page's to its own page."""
    specs = [TensorSpec("k_cache", (4, 2, 16), torch.float16), TensorSpec("v_cache", (4, 2, 16), torch.float16),
             TensorSpec("extra", (100,), torch.uint8)]
    page = sum(spec.aligned_size for spec in specs)
    kv = 2 * specs[0].aligned_size
    g = torch.Generator().manual_seed(0)
    orig = {f"cache_pool.0.row.{i}": torch.randint(0, 256, (8, page), dtype=torch.uint8, generator=g)
            for i in range(2)}
    for t in orig.values():   # finite fp16 K/V so that quantization is well defined
        t[:, :kv] = torch.randn(8, kv // 2, generator=g).to(torch.float16).view(torch.uint8)
    layout = KVRowLayout.from_connector_caches(orig, 2, specs)
    extra = slice(kv, kv + specs[2].size)
    out = {}
    for backend in ("torch", "triton"):
        caches = {k: v.clone() for k, v in orig.items()}
        slots = torch.zeros((2, layout.slot_bytes(fmt)), dtype=torch.uint8)
        gather_blocks(layout, caches, [1, 2], slots, fmt, backend=backend)
        scatter_blocks(layout, slots, [3, 0], caches, fmt, backend=backend)   # pages 2,3 -> 6,7; 4,5 -> 0,1
        out[backend] = slots
        for name, t in caches.items():
            assert torch.equal(t[6:8, extra], orig[name][2:4, extra]), (backend, name)
            assert torch.equal(t[0:2, extra], orig[name][4:6, extra]), (backend, name)
            x = orig[name][2:6, :kv].contiguous().view(torch.float16).float()
            y = torch.cat([t[6:8, :kv], t[0:2, :kv]]).contiguous().view(torch.float16).float()
            assert float((x - y).norm() / x.norm()) < (0.01 if fmt == "int8" else 0.15), (backend, name)
    assert torch.equal(out["torch"], out["triton"])


def _degenerate_rows(dtype, d: int) -> torch.Tensor:
    """Rows of width ``d`` that break a naive scale/zero: constant, near-constant far from zero, huge."""
    g = torch.Generator().manual_seed(3)
    rows = torch.zeros(8, d)
    rows[1] = 3.0
    rows[2] = -1.5
    rows[3] = 1000.0
    rows[3, 0] = 1000.5                  # tiny range far from zero: LMDeploy's zero would overflow fp16
    rows[4] = 1000.0 + 0.5 * torch.rand(d, generator=g)
    rows[5] = -1000.0 - 0.5 * torch.rand(d, generator=g)
    rows[6] = torch.linspace(-2, 2, d)
    rows[7, ::2] = 60000.0 if dtype == torch.float16 else 1e30
    return rows.to(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # zero overflowing fp16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_triton_equals_torch_on_constant_and_extreme_rows(dtype, fmt):
    """Constant, near-constant (values 1000..1000.5) and huge K/V rows through the Triton kernels:
    the same codes and scale/zero values as the torch reference, and finite restored values equal to its."""
    caches, plan, alloc, layout = _layout(dtype)
    for shift, view in enumerate(alloc.tensor_views[:2]):
        rows = _degenerate_rows(dtype, view.shape[-1]).roll(shift, 0)
        view.copy_(rows.repeat(view.numel() // rows.numel(), 1).reshape(view.shape))
    out, rec = {}, {}
    for backend in ("torch", "triton"):
        slots = torch.empty((len(IDS), layout.slot_bytes(fmt)), dtype=torch.uint8)
        gather_blocks(layout, caches, IDS, slots, fmt, backend=backend)
        out[backend] = slots
        dst, _, dalloc = build_caches(0, dtype, randomize=False, **GEOM)
        scatter_blocks(layout, slots, IDS, dst, fmt, backend=backend)
        rec[backend] = dst, dalloc
    ppb = plan.kernel_blocks_per_logical_block
    host = layout.host_format(fmt)
    for row in range(len(layout.rows)):
        start, size = host.row_offsets[row], ppb * host.record_bytes[row]
        ours, ref = (out[b][:, start:start + size].unflatten(1, (ppb, -1)) for b in ("triton", "torch"))
        for field in host.record_fields[row]:
            a, b = (x[..., field.offset:field.offset + field.size] for x in (ours, ref))
            if field.dtype != torch.uint8:   # scale/zero by value: an all-zero row's zero is -0.0 in torch
                a, b = a.contiguous().view(field.dtype), b.contiguous().view(field.dtype)
            assert torch.equal(a, b), f"row {row} {field.name}: {int((a != b).sum())} differ"
    pages = torch.tensor([b * ppb + p for b in IDS for p in range(ppb)])
    for name in caches:
        assert torch.equal(rec["torch"][0][name], rec["triton"][0][name]), name
    for src, view in zip(alloc.tensor_views[:2], rec["triton"][1].tensor_views[:2]):
        x, y = src[:, pages].flatten(0, -2), view[:, pages].flatten(0, -2)
        assert torch.isfinite(y.float()).all()
        const = (x == x[:, :1]).all(1)
        assert int(const.sum()) > 0 and torch.equal(y[const], x[const])   # constant rows come back exactly


@given(st.integers(0, 2**31 - 1), st.sampled_from([8, 4]), st.sampled_from([torch.float16, torch.bfloat16]),
       st.floats(1e-3, 1e3), st.floats(-50, 50))
def test_reference_round_trip_error_is_within_half_a_step(seed, bits, dtype, spread, offset):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(5, 2, 16, generator=g) * spread + offset).to(dtype)
    codes, sz = quantize(x, bits)
    assert codes.shape == (5, 2, 16 if bits == 8 else 8) and sz.shape == (5, 2, 2) and sz.dtype == dtype
    y = dequantize(codes, sz, bits).float()
    xf = x.float()
    step = (xf.amax(-1) - xf.amin(-1)) / (255 if bits == 8 else 15)
    step = torch.maximum(step, xf.amin(-1).abs() * 2.0 ** -14)  # the fp16 zero-overflow fallback
    # half a quantization step plus the rounding of scale, zero and the output dtype
    eps = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    tol = step * (0.5 + 2 ** (bits + 1) * eps) + xf.abs().amax(-1) * 4 * eps
    assert bool(((y - xf).abs() <= tol[..., None] + 1e-6).all())


def test_int4_nibble_order():
    """Byte d holds element d (low nibble) and element d + D/2 (high nibble)."""
    x = torch.tensor([[0.0, 1, 2, 3, 15, 14, 13, 12]], dtype=torch.float16)
    codes, sz = quantize(x, 4)
    assert codes.tolist() == [[0 + 16 * 15, 1 + 16 * 14, 2 + 16 * 13, 3 + 16 * 12]]
    assert sz.float().tolist() == [[1.0, 0.0]]
    assert math.isclose(float(dequantize(codes, sz, 4)[0, 4]), 15.0)
