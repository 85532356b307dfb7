"""Triton kernels: raw block gather/scatter and LMDeploy-format quantizing variants.

Addressing: every row and every slot is reached as ``base + byte offset`` where
``base`` is the first row (rows side) or the staging tensor (slot side); offsets of
other rows are ``row.data_ptr() - base.data_ptr()``, so rows living in different
allocations are served by one launch.  Raw copies move the widest unit (8/4/2/1
bytes) that divides every address, offset and length.

fp16/bf16 values are loaded and stored as their 16-bit patterns and converted with
integer bit operations (bf16) or native casts (fp16), all arithmetic in fp32, so the
kernels compute the same bits on a GPU and under ``TRITON_INTERPRET=1`` (whose bf16
support is not IEEE).  The arithmetic is the one spelled out in :mod:`.quant`;
divisions use Triton's ``/`` exactly like LMDeploy's ``fill_kv_cache`` kernel.

Callers go through :mod:`.ops`, which validates inputs first.
"""
from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

from .layout import HostFormat, KVRowLayout


@triton.jit
def _copy_segments_kernel(row_base, slot_base, seg_tab, block_ids, slot_offs,
                          COUNT: tl.constexpr, LENGTH: tl.constexpr, ITERS: tl.constexpr,
                          TO_SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (block i, segment s, chunk c): copy chunk c of every piece of one segment, in units.

    All segments of one launch share ``COUNT`` pieces of ``LENGTH`` units; loop bounds
    are compile-time constants (the interpreter cannot loop to a loaded bound).
    """
    i = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    nc = tl.num_programs(2)
    tab = seg_tab + s * 6
    row_off = tl.load(tab + 0)
    blk_stride = tl.load(tab + 1)
    slot_off = tl.load(tab + 2)
    row_stride = tl.load(tab + 3)
    slot_stride = tl.load(tab + 4)
    zero = tl.load(tab + 5)
    blk = tl.load(block_ids + i)
    r0 = row_off + blk * blk_stride
    s0 = tl.load(slot_offs + i) + slot_off
    lane = tl.arange(0, BLOCK).to(tl.int64)
    for k in range(COUNT):
        rk = r0 + k * row_stride
        sk = s0 + k * slot_stride
        for j in range(ITERS):
            offs = (j * nc + c).to(tl.int64) * BLOCK + lane
            m = offs < LENGTH
            if TO_SLOTS:
                v = tl.load(row_base + rk + offs, mask=m & (zero == 0), other=0)
                tl.store(slot_base + sk + offs, v, mask=m)
            else:
                v = tl.load(slot_base + sk + offs, mask=m)
                tl.store(row_base + rk + offs, v, mask=m)


@triton.jit
def _f32_from_bits(raw, IS_BF16: tl.constexpr):
    """16-bit pattern (uint16) -> fp32, exact."""
    if IS_BF16:
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _bits_from_f32(x, IS_BF16: tl.constexpr):
    """fp32 -> 16-bit pattern of the cache dtype, round to nearest even."""
    if IS_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + ((b >> 16) & 1) + 0x7FFF
        return (b >> 16).to(tl.uint16)
    else:
        return x.to(tl.float16).to(tl.uint16, bitcast=True)


@triton.jit
def _nonfinite(v):
    return (v != v) | (tl.abs(v) == float("inf"))


@triton.jit
def _quant_field_ptrs(row_base, slot_base, fld_tab, block_ids, slot_offs, i, f, p):
    """Pointers of (block i, field f, page p): the fp16/bf16 page in the row, its codes and its
    scale/zero pairs in the slot.  Table entry f = (row offset, block stride, page bytes, codes
    offset, scale/zero offset, bytes per page record)."""
    tab = fld_tab + f * 6
    row_off = tl.load(tab + 0)
    blk_stride = tl.load(tab + 1)
    page_bytes = tl.load(tab + 2)
    codes_off = tl.load(tab + 3)
    sz_off = tl.load(tab + 4)
    rec = tl.load(tab + 5)
    blk = tl.load(block_ids + i)
    slot0 = tl.load(slot_offs + i)
    vals = (row_base + row_off + blk * blk_stride + p * page_bytes).to(tl.pointer_type(tl.uint16))
    codes = slot_base + slot0 + codes_off + p * rec
    sz = (slot_base + slot0 + sz_off + p * rec).to(tl.pointer_type(tl.uint16))
    return vals, codes, sz


@triton.jit
def _quant_gather_kernel(row_base, slot_base, fld_tab, block_ids, slot_offs,
                         NR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, IS_BF16: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (block i, field f, page p): quantize ``[NR, D]`` values into codes + scale/zero."""
    src, codes, sz = _quant_field_ptrs(row_base, slot_base, fld_tab, block_ids, slot_offs,
                                       tl.program_id(0), tl.program_id(1), tl.program_id(2))
    d = tl.arange(0, BLOCK_D)
    if BITS == 8:
        QMAX: tl.constexpr = 255.0
        dm = d < D
    else:
        QMAX: tl.constexpr = 15.0
        HALF: tl.constexpr = D // 2
        dm = d < HALF
    for r0 in range(0, NR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < NR
        m2 = rm[:, None] & dm[None, :]
        if BITS == 8:
            x = _f32_from_bits(tl.load(src + r[:, None] * D + d[None, :], mask=m2, other=0), IS_BF16)
            mn = tl.min(tl.where(dm[None, :], x, float("inf")), 1)
            mx = tl.max(tl.where(dm[None, :], x, float("-inf")), 1)
            scale = (mx - mn) / 255
        else:
            lo = _f32_from_bits(tl.load(src + r[:, None] * D + d[None, :], mask=m2, other=0), IS_BF16)
            hi = _f32_from_bits(tl.load(src + r[:, None] * D + HALF + d[None, :], mask=m2, other=0), IS_BF16)
            mn = tl.minimum(tl.min(tl.where(dm[None, :], lo, float("inf")), 1),
                            tl.min(tl.where(dm[None, :], hi, float("inf")), 1))
            mx = tl.maximum(tl.max(tl.where(dm[None, :], lo, float("-inf")), 1),
                            tl.max(tl.where(dm[None, :], hi, float("-inf")), 1))
            scale = (mx - mn) / 15
        zero = -mn / scale
        s_st = _f32_from_bits(_bits_from_f32(scale, IS_BF16), IS_BF16)
        z_st = _f32_from_bits(_bits_from_f32(zero, IS_BF16), IS_BF16)
        bad = (s_st == 0.0) | _nonfinite(s_st) | _nonfinite(z_st)
        one = tl.full(scale.shape, 1.0, tl.float32)
        fallback = tl.where(scale == 0.0, one, tl.maximum(scale, tl.abs(mn) * 6.103515625e-05))
        fallback = tl.where(_f32_from_bits(_bits_from_f32(fallback, IS_BF16), IS_BF16) == 0.0, one, fallback)
        scale = tl.where(bad, fallback, scale)
        zero = tl.where(bad, -mn / scale, zero)
        s_bits = _bits_from_f32(scale, IS_BF16)
        z_bits = _bits_from_f32(zero, IS_BF16)
        if BITS == 8:
            q = x / scale[:, None] + zero[:, None] + 0.5
            q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.uint8)
            tl.store(codes + r[:, None] * D + d[None, :], q, mask=m2)
        else:
            q_lo = lo / scale[:, None] + zero[:, None] + 0.5
            q_hi = hi / scale[:, None] + zero[:, None] + 0.5
            q_lo = tl.minimum(tl.maximum(q_lo, 0.0), QMAX).to(tl.uint8).to(tl.int32)
            q_hi = tl.minimum(tl.maximum(q_hi, 0.0), QMAX).to(tl.uint8).to(tl.int32)
            tl.store(codes + r[:, None] * HALF + d[None, :], (q_lo + q_hi * 16).to(tl.uint8), mask=m2)
        tl.store(sz + r * 2, s_bits, mask=rm)
        tl.store(sz + r * 2 + 1, z_bits, mask=rm)


@triton.jit
def _dequant_scatter_kernel(row_base, slot_base, fld_tab, block_ids, slot_offs,
                            NR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, IS_BF16: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (block i, field f, page p): codes + scale/zero -> ``[NR, D]`` fp16/bf16 values."""
    dst, codes, sz = _quant_field_ptrs(row_base, slot_base, fld_tab, block_ids, slot_offs,
                                       tl.program_id(0), tl.program_id(1), tl.program_id(2))
    d = tl.arange(0, BLOCK_D)
    if BITS == 8:
        dm = d < D
    else:
        HALF: tl.constexpr = D // 2
        dm = d < HALF
    for r0 in range(0, NR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < NR
        m2 = rm[:, None] & dm[None, :]
        s = _f32_from_bits(tl.load(sz + r * 2, mask=rm, other=0), IS_BF16)
        z = _f32_from_bits(tl.load(sz + r * 2 + 1, mask=rm, other=0), IS_BF16)
        s_z = _f32_from_bits(_bits_from_f32(s * z, IS_BF16), IS_BF16)
        if BITS == 8:
            q = tl.load(codes + r[:, None] * D + d[None, :], mask=m2, other=0).to(tl.float32)
            out = q * s[:, None] - s_z[:, None]
            tl.store(dst + r[:, None] * D + d[None, :], _bits_from_f32(out, IS_BF16), mask=m2)
        else:
            b = tl.load(codes + r[:, None] * HALF + d[None, :], mask=m2, other=0).to(tl.int32)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            out_lo = lo * s[:, None] - s_z[:, None]
            out_hi = hi * s[:, None] - s_z[:, None]
            tl.store(dst + r[:, None] * D + d[None, :], _bits_from_f32(out_lo, IS_BF16), mask=m2)
            tl.store(dst + r[:, None] * D + HALF + d[None, :], _bits_from_f32(out_hi, IS_BF16), mask=m2)


_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Device-side launch tables per layout (weakly held): building them once keeps ``submit``
# free of blocking host-to-device copies (a pageable H2D on the copy stream would wait
# for the forward the copy stream waits on).
_LAUNCH_TABLES: "weakref.WeakKeyDictionary[KVRowLayout, dict]" = weakref.WeakKeyDictionary()


def _cached(layout: KVRowLayout, key, build):
    per_layout = _LAUNCH_TABLES.setdefault(layout, {})
    if key not in per_layout:
        if len(per_layout) > 32:
            per_layout.clear()
        per_layout[key] = build()
    return per_layout[key]


def _unit_bytes(values) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for unit in (8, 4, 2, 1):
        if g % unit == 0:
            return unit
    return 1


def _as_units(t: torch.Tensor, unit: int) -> torch.Tensor:
    return t.view(torch.uint8).view(_UNIT_DTYPES[unit]) if unit > 1 else t.view(torch.uint8)


def _copy_launches(rows, layout: KVRowLayout, fmt: HostFormat, slots_ptr: int, to_slots: bool):
    """(unit, [(count, length, device table)]) for the raw segments of ``fmt``."""
    segs = [sg for sg in fmt.segments if to_slots or not sg.zero]
    base = rows[0]
    entries, values = [], [base.data_ptr(), slots_ptr, fmt.slot_bytes, base.numel()]
    for sg in segs:
        row = layout.rows[sg.row]
        entry = [rows[sg.row].data_ptr() - base.data_ptr() + sg.row_offset, layout.pages_per_block * row.page_bytes,
                 sg.slot_offset, sg.row_stride, sg.slot_stride]
        values += entry + [sg.length]
        entries.append((sg.count, sg.length, entry, int(sg.zero)))
    unit = _unit_bytes(values)
    groups: dict[tuple[int, int], list] = {}
    for count, length, entry, zero in entries:
        groups.setdefault((count, length // unit), []).append([v // unit for v in entry] + [zero])
    return unit, [(count, length, torch.tensor(table, dtype=torch.int64, device=base.device))
                  for (count, length), table in groups.items()]


def _launch(kernel, grid, compile_only: bool, *args, **constexprs) -> None:
    """``kernel[grid](...)``, or with ``compile_only`` Triton's ``warmup``: compile, launch nothing."""
    if compile_only:
        kernel.warmup(*args, grid=grid, **constexprs)
    else:
        kernel[grid](*args, **constexprs)


def _launch_copy(rows, layout: KVRowLayout, fmt: HostFormat, ids: torch.Tensor, slots: torch.Tensor,
                 to_slots: bool, compile_only: bool = False) -> None:
    if ids.numel() == 0 or not any(to_slots or not sg.zero for sg in fmt.segments):
        return
    base = rows[0]
    dev = base.device
    align = next(u for u in (8, 4, 2, 1) if slots.data_ptr() % u == 0)
    key = ("copy", fmt.name, to_slots, align, tuple(r.data_ptr() for r in rows))
    unit, launches = _cached(layout, key, lambda: _copy_launches(rows, layout, fmt, align, to_slots))
    slot_offs = torch.arange(ids.numel(), dtype=torch.int64, device=dev) * (fmt.slot_bytes // unit)
    row_units = _as_units(base, unit)
    slot_units = _as_units(slots.view(-1), unit)
    block = 1024 if dev.type == "cuda" else 256
    for count, length, tab in launches:
        chunks = max(1, min(triton.cdiv(length, block), 32)) if dev.type == "cuda" else 1
        iters = triton.cdiv(length, block * chunks)
        grid = (ids.numel(), tab.shape[0], chunks)
        _launch(_copy_segments_kernel, grid, compile_only, row_units, slot_units, tab, ids, slot_offs,
                COUNT=count, LENGTH=length, ITERS=iters, TO_SLOTS=to_slots, BLOCK=block)


def _launch_quant(rows, layout: KVRowLayout, fmt: HostFormat, ids: torch.Tensor, slots: torch.Tensor,
                  to_slots: bool, compile_only: bool = False) -> None:
    if not fmt.quant_fields or ids.numel() == 0:
        return
    base = rows[0]
    dev = base.device
    groups: dict[tuple[int, int], list] = {}
    for qf in fmt.quant_fields:
        groups.setdefault((qf.rows_per_page, qf.head_dim), []).append(qf)
    slot_offs = torch.arange(ids.numel(), dtype=torch.int64, device=dev) * fmt.slot_bytes
    is_bf16 = fmt.scale_dtype == torch.bfloat16
    for (nr, d), fields in groups.items():
        def build(fields=fields):
            table = []
            for qf in fields:
                row = layout.rows[qf.row]
                table.append([rows[qf.row].data_ptr() - base.data_ptr() + qf.src_offset,
                              layout.pages_per_block * row.page_bytes, qf.page_bytes, qf.codes_offset,
                              qf.scale_zero_offset, qf.record_bytes])
            return torch.tensor(table, dtype=torch.int64, device=dev)
        tab = _cached(layout, ("quant", fmt.name, nr, d, tuple(r.data_ptr() for r in rows)), build)
        width = d if fmt.bits == 8 else d // 2
        block_d = triton.next_power_of_2(width)
        block_r = max(1, min(triton.next_power_of_2(nr), 4096 // block_d))
        grid = (ids.numel(), tab.shape[0], layout.pages_per_block)
        kernel = _quant_gather_kernel if to_slots else _dequant_scatter_kernel
        _launch(kernel, grid, compile_only, base, slots.view(-1), tab, ids, slot_offs, NR=nr, D=d, BITS=fmt.bits,
                IS_BF16=is_bf16, BLOCK_R=block_r, BLOCK_D=block_d)


def gather(rows, layout: KVRowLayout, fmt: HostFormat, block_ids: torch.Tensor, slots: torch.Tensor) -> None:
    """Blocks ``block_ids`` of ``rows`` -> ``slots[i]`` in host format ``fmt`` (one or two launches)."""
    _launch_copy(rows, layout, fmt, block_ids, slots, to_slots=True)
    _launch_quant(rows, layout, fmt, block_ids, slots, to_slots=True)


def scatter(slots: torch.Tensor, layout: KVRowLayout, fmt: HostFormat, block_ids: torch.Tensor, rows) -> None:
    """``slots[i]`` -> blocks ``block_ids`` of ``rows`` (dequantizing lossy fields)."""
    _launch_copy(rows, layout, fmt, block_ids, slots, to_slots=False)
    _launch_quant(rows, layout, fmt, block_ids, slots, to_slots=False)


def warm_up(rows, layout: KVRowLayout, fmt: HostFormat, slots: torch.Tensor) -> None:
    """Compile the gather and scatter kernels that ``rows`` and ``fmt`` use, launching none of them.

    A Triton kernel compiles on its first launch: without this, the first
    demotion or restore of a server's life pays it inside a request's step. Nothing is read
    or written: Triton's ``warmup`` builds the kernel for the launch's argument types,
    alignments and constants and returns. ``slots`` is any staging tensor of the device
    (its alignment picks the copy unit, as a real staging buffer's does). Under
    ``TRITON_INTERPRET=1`` there is nothing to compile and this does nothing.
    """
    ids = torch.zeros(1, dtype=torch.int64, device=rows[0].device)
    for to_slots in (True, False):
        _launch_copy(rows, layout, fmt, ids, slots, to_slots, compile_only=True)
        _launch_quant(rows, layout, fmt, ids, slots, to_slots, compile_only=True)
