"""Host pool: ``num_slots`` contiguous slots of ``slot_bytes``, pinned when CUDA is available.

Invariants: slot ``s`` is one contiguous byte run of ``slot_bytes`` (one block across
all rows); slots never move; the pool is allocated (and pinned) in chunks of about
``chunk_bytes`` with progress in the log; RAM is checked before anything is
allocated; a failed pin frees what was already allocated and raises naming the
locked-memory limit; :meth:`close` (or garbage collection) unpins and frees.
"""
from __future__ import annotations

import logging
import resource
import time
import weakref

import torch

from .layout import KVRowLayout

logger = logging.getLogger("lmdeploy_hostcache.transfer")

GIB = 1 << 30


def _available_ram() -> int | None:
    """Available RAM, the container's cgroup limit included (``hostmem.read_host_memory``)."""
    try:
        from ..hostmem import read_host_memory
        return read_host_memory().usable_available_bytes
    except Exception:  # pragma: no cover - fall back to the machine's figure
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except Exception:
            return None


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, as torch's own helper does


def _pin(t: torch.Tensor) -> None:
    """Page-lock ``t``'s memory in place (no power-of-two rounding, unlike ``pin_memory=True``)."""
    code = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(),
                                                    CUDA_HOST_REGISTER_PORTABLE))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister returned cudaError {code}")


def _unpin(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def _release(chunks: list, pinned: bool) -> None:
    if pinned:
        for t in chunks:
            try:
                _unpin(t)
            except Exception:  # pragma: no cover - best effort during shutdown
                pass
    chunks.clear()


class HostPool:
    """Host slots for one :class:`KVRowLayout` in one ``host_kv_format``.

    ``pin_memory``: None = pin when CUDA is available; True without CUDA raises.
    ``ram_headroom``: fraction of currently available RAM the pool may take.
    """

    def __init__(self, layout: KVRowLayout, num_slots: int, host_kv_format: str = "same",
                 pin_memory: bool | None = None, chunk_bytes: int = GIB, ram_headroom: float = 0.9):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if not 0 < ram_headroom <= 1:
            raise ValueError(f"ram_headroom must be in (0, 1], got {ram_headroom!r}")
        self.layout = layout
        self.format = layout.host_format(host_kv_format)
        self.host_kv_format = host_kv_format
        self.slot_bytes = self.format.slot_bytes
        self.num_slots = num_slots
        cuda = torch.cuda.is_available()
        if pin_memory is None:
            pin_memory = cuda
        if pin_memory and not cuda:
            raise ValueError("pin_memory=True needs CUDA, which is not available; use pin_memory=None or False")
        self.pinned = bool(pin_memory)
        self.nbytes = num_slots * self.slot_bytes
        if self.format.lossy and self.slot_bytes >= layout.block_bytes:
            logger.warning("host_kv_format=%r gives %d-byte slots, not smaller than the raw %d-byte block "
                           "(tiny pages: alignment padding dominates)", host_kv_format, self.slot_bytes,
                           layout.block_bytes)
        avail = _available_ram()
        if avail is not None and self.nbytes > avail * ram_headroom:
            raise MemoryError(f"host pool of {num_slots} slots x {self.slot_bytes} B = {self.nbytes / GIB:.2f} GiB "
                              f"exceeds {ram_headroom:.0%} of available RAM ({avail / GIB:.2f} GiB); "
                              f"lower the host cache size")
        limit = memlock_limit() if self.pinned else None
        if limit is not None and self.nbytes > limit:
            logger.warning("host pool needs %.2f GiB pinned but RLIMIT_MEMLOCK (ulimit -l) is %.2f GiB; CUDA "
                           "registration usually bypasses it, if pinning fails raise the limit",
                           self.nbytes / GIB, limit / GIB)
        self.slots_per_chunk = max(1, min(num_slots, chunk_bytes // self.slot_bytes))
        self._chunks: list[torch.Tensor] = []
        self._finalizer = weakref.finalize(self, _release, self._chunks, self.pinned)
        self._allocate(limit)

    def _allocate(self, limit: int | None) -> None:
        start = time.monotonic()
        done = 0
        n_chunks = -(-self.num_slots // self.slots_per_chunk)
        logger.info("allocating host pool: %d slots x %d B = %.2f GiB in %d chunk(s), %s", self.num_slots,
                    self.slot_bytes, self.nbytes / GIB, n_chunks, "pinned" if self.pinned else "pageable")
        for c in range(n_chunks):
            n = min(self.slots_per_chunk, self.num_slots - c * self.slots_per_chunk)
            try:
                chunk = torch.empty((n, self.slot_bytes), dtype=torch.uint8)
                if self.pinned:
                    _pin(chunk)
            except (RuntimeError, MemoryError) as exc:
                self.close()
                lim = "unlimited" if limit is None else f"{limit / GIB:.2f} GiB"
                raise MemoryError(f"host pool allocation failed at chunk {c + 1}/{n_chunks} after "
                                  f"{done / GIB:.2f} of {self.nbytes / GIB:.2f} GiB "
                                  f"({'pinning' if self.pinned else 'allocating'}; RLIMIT_MEMLOCK={lim}, "
                                  f"available RAM={(_available_ram() or 0) / GIB:.2f} GiB): {exc}") from exc
            self._chunks.append(chunk)
            done += chunk.numel()
            elapsed = time.monotonic() - start
            logger.info("host pool: chunk %d/%d, %.2f/%.2f GiB %s (%.1f s, %.2f GiB/s)", c + 1, n_chunks,
                        done / GIB, self.nbytes / GIB, "pinned" if self.pinned else "allocated", elapsed,
                        done / GIB / max(elapsed, 1e-9))

    # access -----------------------------------------------------------------------
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not hasattr(slot, "__index__"):
            raise ValueError(f"slot must be an int, got {slot!r}")
        slot = slot.__index__()
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.num_slots})")
        if self.closed:
            raise RuntimeError("host pool is closed")
        return slot

    def slot_view(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` as a contiguous uint8 tensor of ``slot_bytes`` (a view, no copy)."""
        slot = self._check_slot(slot)
        return self._chunks[slot // self.slots_per_chunk][slot % self.slots_per_chunk]

    def slot_range_view(self, first: int, count: int) -> torch.Tensor | None:
        """Slots ``first..first+count-1`` as one ``[count, slot_bytes]`` view if they share a chunk, else None."""
        first = self._check_slot(first)
        last = self._check_slot(first + count - 1)
        if first // self.slots_per_chunk != last // self.slots_per_chunk:
            return None
        off = first % self.slots_per_chunk
        return self._chunks[first // self.slots_per_chunk][off:off + count]

    @property
    def chunks(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._chunks)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unpin and free every chunk; idempotent."""
        self._finalizer()

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"HostPool(slots={self.num_slots}, slot_bytes={self.slot_bytes}, format={self.host_kv_format!r}, "
                f"pinned={self.pinned}, chunks={len(self._chunks)}, closed={self.closed})")
