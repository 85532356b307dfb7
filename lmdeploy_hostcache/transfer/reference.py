"""Torch implementations of the block gather/scatter kernels (reference and CPU path).

Same contract as :mod:`.kernels`: ``rows`` are the connector rows as flat uint8
views (``KVRowLayout.check_caches``), ``slots`` is a contiguous uint8 tensor
``[N, fmt.slot_bytes]`` (staging), ``block_ids`` a 1-D int64 tensor of N block
ids.  Inputs are validated by :mod:`.ops`, not here.
"""
from __future__ import annotations

import weakref

import torch

from .layout import HostFormat, KVRowLayout
from .quant import dequantize, quantize


def _row_blocks(row: torch.Tensor, layout: KVRowLayout, index: int) -> torch.Tensor:
    """``row`` as ``[num_blocks, ppb, page_bytes]``."""
    r = layout.rows[index]
    return row.view(layout.num_blocks, layout.pages_per_block, r.page_bytes)


def _slot_pages(slots: torch.Tensor, fmt: HostFormat, layout: KVRowLayout, index: int) -> torch.Tensor:
    """The row-``index`` segment of every slot as ``[N, ppb, record_bytes]`` (a strided view)."""
    start = fmt.row_offsets[index]
    rec = fmt.record_bytes[index]
    ppb = layout.pages_per_block
    return slots[:, start:start + ppb * rec].unflatten(1, (ppb, rec))


def _field(t: torch.Tensor, offset: int, size: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """Bytes ``[..., offset:offset+size]`` of ``t`` (uint8, last axis) viewed as ``dtype[..., *shape]``."""
    return t[..., offset:offset + size].contiguous().view(dtype).unflatten(-1, tuple(shape)) if shape else \
        t[..., offset:offset + size].contiguous().view(dtype)


_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_TABLES: "weakref.WeakKeyDictionary[KVRowLayout, dict]" = weakref.WeakKeyDictionary()


def _uniform_table(rows, layout: KVRowLayout):
    """``(table, row_index, unit)`` when every row is a raw run of one evenly strided storage, else None.

    ``table`` views the storage as ``[span, run/unit]`` units; block ``b`` of row ``k`` is
    table row ``row_index[k] + b``.  Cached per (layout, row addresses).
    """
    per_layout = _TABLES.setdefault(layout, {})
    key = (rows[0].data_ptr(), rows[-1].data_ptr(), len(rows))
    if key in per_layout:
        return per_layout[key]
    result = None
    page = layout.rows[0].page_bytes
    run = layout.pages_per_block * page
    base = rows[0]
    same_storage = all(r.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for r in rows)
    if same_storage and all(r.page_bytes == page for r in layout.rows):
        stride = rows[1].data_ptr() - base.data_ptr() if len(rows) > 1 else run * layout.num_blocks
        if stride > 0 and stride % run == 0 and all(
                rows[k].data_ptr() - base.data_ptr() == k * stride for k in range(len(rows))):
            unit = next(u for u in (8, 4, 2, 1) if run % u == 0 and base.data_ptr() % u == 0)
            rows_stride = stride // run
            span = (len(rows) - 1) * rows_stride + layout.num_blocks
            table = base.as_strided((span, run), (run, 1)).view(_UNIT_DTYPES[unit])
            row_index = torch.arange(len(rows), device=base.device) * rows_stride
            result = (table, row_index, unit)
    if len(per_layout) > 8:  # rows re-registered many times: keep only the latest
        per_layout.clear()
    per_layout[key] = result
    return result


def _fast_raw(rows, layout: KVRowLayout, fmt: HostFormat, ids: torch.Tensor, slots: torch.Tensor,
              to_slots: bool) -> bool:
    """One ``index_select`` / ``index_copy_`` over the whole pool when the layout allows it."""
    if fmt.lossy or slots.device != rows[0].device:
        return False
    uniform = _uniform_table(rows, layout)
    if uniform is None:
        return False
    table, row_index, unit = uniform
    if slots.data_ptr() % unit:
        return False
    index = (row_index[None, :] + ids[:, None]).reshape(-1)
    flat = slots.view(-1).view(_UNIT_DTYPES[unit]).view(index.numel(), table.shape[1])
    if to_slots:
        torch.index_select(table, 0, index, out=flat)
    else:
        table.index_copy_(0, index, flat)
    return True


def gather(rows, layout: KVRowLayout, fmt: HostFormat, block_ids: torch.Tensor, slots: torch.Tensor) -> None:
    """Blocks ``block_ids`` of ``rows`` -> ``slots[i]`` in host format ``fmt`` (quantizing if lossy)."""
    ids = block_ids.to(device=rows[0].device, dtype=torch.long)
    if _fast_raw(rows, layout, fmt, ids, slots, to_slots=True):
        return
    quant_by_row: dict[int, list] = {}
    for qf in fmt.quant_fields:
        quant_by_row.setdefault(qf.row, []).append(qf)
    for seg in fmt.segments:
        dst = slots.as_strided((slots.shape[0], seg.count, seg.length), (slots.stride(0), seg.slot_stride, 1),
                               slots.storage_offset() + seg.slot_offset)
        if seg.zero:
            dst.zero_()
            continue
        blocks = _row_blocks(rows[seg.row], layout, seg.row).flatten(1)
        src = blocks.index_select(0, ids.to(blocks.device))
        src = src.as_strided((src.shape[0], seg.count, seg.length), (src.stride(0), seg.row_stride, 1),
                             src.storage_offset() + seg.row_offset)
        dst.copy_(src)
    for row, fields in quant_by_row.items():
        pages = _row_blocks(rows[row], layout, row).index_select(0, ids)       # [N, ppb, S]
        host = _slot_pages(slots, fmt, layout, row)                            # [N, ppb, S']
        for qf in fields:
            x = _field(pages, qf.src_offset, qf.rows_per_page * qf.head_dim * fmt.scale_dtype.itemsize,
                       fmt.scale_dtype, (qf.rows_per_page, qf.head_dim))
            codes, sz = quantize(x, fmt.bits)
            start = fmt.row_offsets[row]
            c0 = qf.codes_offset - start
            s0 = qf.scale_zero_offset - start
            host[..., c0:c0 + codes[0, 0].numel()].copy_(codes.flatten(2))
            host[..., s0:s0 + sz[0, 0].numel() * sz.element_size()].copy_(sz.flatten(2).view(torch.uint8))


def scatter(slots: torch.Tensor, layout: KVRowLayout, fmt: HostFormat, block_ids: torch.Tensor, rows) -> None:
    """``slots[i]`` (host format ``fmt``) -> blocks ``block_ids`` of ``rows`` (dequantizing if lossy)."""
    ids = block_ids.to(device=rows[0].device, dtype=torch.long)
    if _fast_raw(rows, layout, fmt, ids, slots, to_slots=False):
        return
    src_slots = slots.to(rows[0].device)
    for seg in fmt.segments:
        if seg.zero:
            continue
        blocks = _row_blocks(rows[seg.row], layout, seg.row).flatten(1)       # [B, run]
        src = src_slots[:, seg.slot_offset:].as_strided(
            (src_slots.shape[0], seg.count, seg.length), (src_slots.stride(0), seg.slot_stride, 1),
            src_slots.storage_offset() + seg.slot_offset)
        if seg.count == 1 and seg.row_offset == 0 and seg.length == blocks.shape[1]:
            blocks.index_copy_(0, ids, src.reshape(src.shape[0], -1))
            continue
        cur = blocks.index_select(0, ids)
        cur.as_strided((cur.shape[0], seg.count, seg.length), (cur.stride(0), seg.row_stride, 1),
                       cur.storage_offset() + seg.row_offset).copy_(src)
        blocks.index_copy_(0, ids, cur)
    quant_by_row: dict[int, list] = {}
    for qf in fmt.quant_fields:
        quant_by_row.setdefault(qf.row, []).append(qf)
    for row, fields in quant_by_row.items():
        blocks = _row_blocks(rows[row], layout, row)
        pages = blocks.index_select(0, ids)                                    # [N, ppb, S]
        host = _slot_pages(src_slots, fmt, layout, row)
        start = fmt.row_offsets[row]
        for qf in fields:
            nr, d = qf.rows_per_page, qf.head_dim
            width = d if fmt.bits == 8 else d // 2
            c0 = qf.codes_offset - start
            s0 = qf.scale_zero_offset - start
            codes = host[..., c0:c0 + nr * width].contiguous().unflatten(-1, (nr, width))
            sz = host[..., s0:s0 + nr * 2 * fmt.scale_dtype.itemsize].contiguous().view(
                fmt.scale_dtype).unflatten(-1, (nr, 2))
            x = dequantize(codes, sz, fmt.bits)
            nbytes = nr * d * fmt.scale_dtype.itemsize
            pages[..., qf.src_offset:qf.src_offset + nbytes].copy_(x.flatten(2).view(torch.uint8))
        blocks.index_copy_(0, ids, pages)
