"""Validated entry points for block gather/scatter with backend selection.

``backend``: ``"triton"`` (the kernels of :mod:`.kernels`; on CPU tensors only
under ``TRITON_INTERPRET=1``), ``"torch"`` (:mod:`.reference`), or ``"auto"``
(triton when the rows are on CUDA, torch otherwise).  Every argument is checked
before any byte moves; errors are ``ValueError``/``TypeError`` naming the argument.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference
from .layout import HostFormat, KVRowLayout

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is "
                         "imported); use backend='torch' or 'auto' on machines without a GPU")
    return backend


def block_id_tensor(block_ids, num_blocks: int, name: str, unique: bool, device) -> torch.Tensor:
    """``block_ids`` as a 1-D int64 tensor on ``device``; range (and optionally uniqueness) checked."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype.is_floating_point or block_ids.dtype == torch.bool or block_ids.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {block_ids.dtype}{tuple(block_ids.shape)}")
        ids = block_ids.to(torch.long).cpu()
    else:
        vals = list(block_ids)
        for v in vals:
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise ValueError(f"{name} must hold ints, got {v!r}")
        ids = torch.tensor([v.__index__() for v in vals], dtype=torch.long)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains {bad}, outside [0, {num_blocks})")
        if unique and torch.unique(ids).numel() != ids.numel():
            vals, counts = torch.unique(ids, return_counts=True)
            raise ValueError(f"{name} has duplicate destination ids {vals[counts > 1].tolist()[:8]}")
    return ids.to(device)


def _check_slots(slots: torch.Tensor, n: int, fmt: HostFormat, name: str) -> None:
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if slots.dtype != torch.uint8 or slots.dim() != 2 or not slots.is_contiguous():
        raise ValueError(f"{name} must be a contiguous uint8 [N, slot_bytes] tensor, got "
                         f"{slots.dtype}{tuple(slots.shape)} contiguous={slots.is_contiguous()}")
    if tuple(slots.shape) != (n, fmt.slot_bytes):
        raise ValueError(f"{name} has shape {tuple(slots.shape)}, expected ({n}, {fmt.slot_bytes}) "
                         f"for {n} blocks in host format {fmt.name!r}")


def _rows(layout: KVRowLayout, rows) -> list[torch.Tensor]:
    if isinstance(rows, dict) or hasattr(rows, "keys"):
        return layout.check_caches(rows)
    rows = list(rows)
    if len(rows) != len(layout.rows):
        raise ValueError(f"got {len(rows)} rows, layout has {len(layout.rows)}")
    out = []
    for t, geo in zip(rows, layout.rows):
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != geo.num_pages * geo.page_bytes:
            raise ValueError(f"row {geo.name!r}: expected a flat uint8 view of {geo.num_pages * geo.page_bytes} "
                             f"bytes, got {t.dtype}{tuple(t.shape)}")
        out.append(t)
    return out


def gather_blocks(layout: KVRowLayout, rows, block_ids, slots: torch.Tensor, host_kv_format: str = "same",
                  backend: str = "auto") -> None:
    """Copy blocks ``block_ids`` of ``rows`` into ``slots[i]`` (format ``host_kv_format``).

    ``rows``: the kv_caches mapping or the flat uint8 rows of ``layout.check_caches``.
    ``block_ids`` may repeat (a source read twice); each must be in ``[0, num_blocks)``.
    """
    fmt, rows, ids = _validated(layout, rows, block_ids, slots, host_kv_format, unique=False)
    if ids.numel() == 0:
        return
    impl = resolve_backend(backend, rows[0].device)
    (_triton() if impl == "triton" else reference).gather(rows, layout, fmt, ids, slots)


def scatter_blocks(layout: KVRowLayout, slots: torch.Tensor, block_ids, rows, host_kv_format: str = "same",
                   backend: str = "auto") -> None:
    """Copy ``slots[i]`` (format ``host_kv_format``) into blocks ``block_ids`` of ``rows``.

    Destination ids must be unique and in ``[0, num_blocks)``.
    """
    fmt, rows, ids = _validated(layout, rows, block_ids, slots, host_kv_format, unique=True)
    if ids.numel() == 0:
        return
    impl = resolve_backend(backend, rows[0].device)
    (_triton() if impl == "triton" else reference).scatter(slots, layout, fmt, ids, rows)


def _validated(layout: KVRowLayout, rows, block_ids, slots: torch.Tensor, host_kv_format: str, unique: bool):
    """(format, flat rows, block-id tensor) after every check; raises before any byte moves."""
    fmt = layout.host_format(host_kv_format)
    rows = _rows(layout, rows)
    ids = block_id_tensor(block_ids, layout.num_blocks, "block_ids", unique=unique, device=rows[0].device)
    _check_slots(slots, ids.numel(), fmt, "slots")
    if slots.device != rows[0].device:
        raise ValueError(f"slots is on {slots.device}, rows on {rows[0].device}: stage on the rows' device")
    return fmt, rows, ids


def _triton():
    from . import kernels
    return kernels


__all__: Sequence[str] = ("BACKENDS", "resolve_backend", "gather_blocks", "scatter_blocks", "block_id_tensor")
