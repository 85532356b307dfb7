"""Worker role of ``HostTierConnector``: moves bytes between LMDeploy's cache rows and host slots.

One ``HostTierWorker`` per TP rank, inside LMDeploy's model agent. It never decides what to
copy: the scheduler role ships a ``HostTierMetadata`` per engine step (through LMDeploy's
``build_connector_meta`` -> executor -> ``bind_connector_metadata``) and this side reports
terminal progress back through ``get_finished`` (-> executor TP aggregation ->
``Scheduler.update_connector_output``). Nothing else connects the two roles.

Per step (``start_load_kv``, run by LMDeploy before ``cache_swapping`` and the forward):
  one ``CopyEngine.submit`` with the step's demotions *and* loads. The copy engine gathers the
  demoted pages before it writes any load destination (a page freed by an eviction may be a
  load destination, or any block the forward writes, in the very same step) and makes the
  forward stream wait for the gathers, so the forward never overwrites a page before it is
  copied out.

``checksum`` (HostCacheConfig): when on, this side hashes every host slot (xxh3-64 of its
bytes) once its demotion has completed, before reporting it (so before the scheduler can
mark the block RESIDENT and plan a load of it), and re-hashes a slot before loading it. A
mismatch (host-memory corruption, a stray write) fails that request's load without moving a
byte: LMDeploy rolls it back and the prefix is recomputed. Every mismatching slot is reported too,
as ``corrupt_slot_marker(slot)``, in the same output as the load it failed: the scheduler drops
that host block (and its host subtree), so the block the GPU recomputes is demoted into a fresh
slot again instead of being skipped as "already on host" for ever. A slot is re-hashed before it is
written back to a shared store too: a mismatching slot is not written back (the store object
would wrap the bad bytes in a fresh checksum that every other node then trusts; logged, and
counted in the worker's ``corrupt_write_backs``). Cost: one pass over the slot's bytes on each side, on this process's CPU.

Readable slots (always on, independent of ``checksum``): a pool is new memory with undefined
bytes, so this side keeps one flag per slot, set when a demotion into the slot completed in *this*
pool and cleared when a new one is submitted. A load naming a slot without the flag is refused
before a byte moves (reported failed: LMDeploy rolls it back and recomputes) and the output
carries ``pool_reset_marker(first_step)``: the scheduler's index lists blocks this pool never got
(its pool was rebuilt without the scheduler seeing it), and only copies shipped from metadata
step ``first_step`` on (the first this worker received) reached this pool. Every later pool (first
metadata step above 1) also reports that marker once, at its first poll: a rebuild the scheduler never saw may have dropped
copies in flight (their outcomes died with the old worker), and without it their requests would
wait for ever with their slots pinned; the scheduler ignores the marker of a pool whose teardown
it saw (``first_step`` is then its floor). Invariant: no load ever reads a host slot that was not
written since its pool was created.

Copy-engine faults. A copy op's demotions and loads fail independently (``CopyResult.stores_ok`` /
``loads_ok``; a load reading a slot its own op's failed demotion was writing fails with it). A
``poll`` of the copy engine that raises never reaches LMDeploy's step: the worker first waits for
every copy in flight (``wait_all``: once it returns, no copy of those ops moves a byte any more),
then reports every op in flight as failed (their requests recompute, their demotion batches are
dropped, their slots stay unreadable; a result the engine reports for them later is ignored). If
``wait_all`` raises too, the copies cannot be shown to have stopped: the engine is retired (never
polled or submitted to again; every later copy is reported failed at once, so the server runs on
as if without a host tier, recomputing) and the ops in flight are reported failed all the same,
since their requests would otherwise wait for ever with their slots pinned. Loads refused before
submit and failed submits are kept until the output carrying them is built: a fault while
polling never loses them. The first poll failure is logged with its traceback, later ones at
debug level; ``poll_failures`` counts them.

Teardown. ``shutdown`` (LMDeploy calls it at engine sleep, any level, at wakeup's
``build_cache_engine`` before a new connector is built, and at engine close) drains every
submitted copy, records what the drain completed in ``last_drain`` (and the log; LMDeploy
discards the step outputs that would have carried it), then releases the copy engine and the
pool. A drain that raises (a device error) never reaches LMDeploy: it is logged, the engine is
retired, the ops in flight are listed as failed, and the pool is still released. A worker is never
reused: LMDeploy builds a new one, with a new pool, at wakeup.

``start_save_kv`` is a no-op on purpose: the tier is write-back on eviction. Evicted pages must
be read *before* the forward that may reuse them, which is ``start_load_kv``'s slot; nothing
needs saving after the forward.

Completion encoding in LMDeploy's ``KVConnectorOutput`` (aggregated over TP ranks by the ray
executor; ids complete only when every rank reported them, invalid ids are unioned):
  * ``finished_receiving``: request ids whose load op ended (ok or not);
  * ``completed_save_ids``: demotion batch ids whose op ended (ok or not);
  * ``invalid_block_ids``: destination GPU blocks of a failed load, ``-1 - batch`` for a
    failed demotion batch (negative, so never a GPU block id; batch ids stay below ``2**61 - 1``),
    ``corrupt_slot_marker(slot)`` (in ``(POOL_RESET_MARKER_BASE, CORRUPT_SLOT_MARKER_BASE]``,
    ``CORRUPT_SLOT_MARKER_BASE = -2**61``: below every batch marker) for a source slot whose bytes
    failed their checksum, reported with the load it failed, and ``pool_reset_marker(step)``
    (``<= POOL_RESET_MARKER_BASE = -2**62``, below every other marker) when a load was refused
    because its slot was never written in this worker's pool.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xxhash
from lmdeploy.pytorch.kv_connector.base import KVConnectorMetadata, KVConnectorOutput

from ..config import HostCacheConfig

__all__ = [
    "CORRUPT_SLOT_MARKER_BASE",
    "POOL_RESET_MARKER_BASE",
    "DrainReport",
    "HostLoad",
    "HostTierMetadata",
    "HostTierWorker",
    "corrupt_slot",
    "corrupt_slot_marker",
    "failed_demotion_marker",
    "planned_tensor_specs",
    "pool_reset_marker",
    "pool_reset_step",
    "resolve_num_slots",
]

logger = logging.getLogger("lmdeploy_hostcache.worker")


def failed_demotion_marker(batch_id: int) -> int:
    """The ``invalid_block_ids`` entry that says demotion batch ``batch_id`` failed."""
    return -1 - int(batch_id)


POOL_RESET_MARKER_BASE = -(1 << 62)


def pool_reset_marker(first_step: int) -> int:
    """The ``invalid_block_ids`` entry that says: this worker's pool only holds copies shipped in
    metadata steps ``>= first_step``; a load named a slot it never had written."""
    return POOL_RESET_MARKER_BASE - int(first_step)


def pool_reset_step(marker: int) -> int | None:
    """``first_step`` of a ``pool_reset_marker``, or None for any other id."""
    return POOL_RESET_MARKER_BASE - marker if marker <= POOL_RESET_MARKER_BASE else None


CORRUPT_SLOT_MARKER_BASE = -(1 << 61)


def corrupt_slot_marker(slot: int) -> int:
    """The ``invalid_block_ids`` entry that says: host slot ``slot`` failed its checksum when a load
    read it (its bytes changed since they were hashed), so the block the scheduler keeps there is bad."""
    slot = int(slot)
    if not 0 <= slot < (1 << 61):
        raise ValueError(f"host slot {slot} is outside the corrupt-slot marker range")
    return CORRUPT_SLOT_MARKER_BASE - slot


def corrupt_slot(marker: int) -> int | None:
    """The slot of a ``corrupt_slot_marker``, or None for any other id."""
    if POOL_RESET_MARKER_BASE < marker <= CORRUPT_SLOT_MARKER_BASE:
        return CORRUPT_SLOT_MARKER_BASE - marker
    return None


@dataclass(frozen=True)
class DrainReport:
    """What ``HostTierWorker.shutdown`` found when it drained the copy engine."""

    completed_batches: tuple[int, ...] = ()   # demotion batches whose copies completed
    failed_batches: tuple[int, ...] = ()
    finished_loads: tuple[int, ...] = ()      # request ids whose loads completed
    failed_loads: tuple[int, ...] = ()


@dataclass(frozen=True)
class HostLoad:
    """One request's restore: ``slots[i]`` is copied into GPU block ``gpu_blocks[i]``."""

    request_id: int
    slots: tuple[int, ...]
    gpu_blocks: tuple[int, ...]


@dataclass(frozen=True)
class HostTierMetadata(KVConnectorMetadata):
    """Scheduler -> worker plan of one engine step (picklable; no save leases, ever).

    ``demotions`` are ``(gpu_block, slot)`` pairs and belong to batch ``demotion_batch``
    (None when there are none). A metadata with no work still makes LMDeploy run a
    connector step, which is how in-flight copies get polled.
    """

    step: int
    demotion_batch: int | None = None
    demotions: tuple[tuple[int, int], ...] = ()
    loads: tuple[HostLoad, ...] = ()
    # shared store tier (l3): (digest, token bytes, slot) to put before any slot is rewritten, and
    # (request_id, digests, token bytes, slots) to read from the store into slots before the loads
    l3_write_backs: tuple[tuple[int, bytes, int], ...] = ()
    l3_stages: tuple[tuple[int, tuple[int, ...], tuple[bytes, ...], tuple[int, ...]], ...] = ()

    @property
    def has_work(self) -> bool:
        return bool(self.demotions or self.loads or self.l3_write_backs or self.l3_stages)


def resolve_num_slots(extra_config: Mapping[str, Any], hostcache: HostCacheConfig, tp_size: int) -> int:
    """Host slots per TP rank; the scheduler and every worker call this with the same inputs.

    ``host_cache_blocks`` (written by the executor hook) wins. Otherwise the count is
    ``host_cache_gb`` (all ranks together) / tp_size / ``host_slot_bytes``, which needs a
    numeric ``host_cache_gb``: ``auto`` depends on free RAM at the moment of the call and would
    give the scheduler and the workers different counts.
    """
    blocks = extra_config.get("host_cache_blocks")
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError("kv_connector_extra_config['host_cache_blocks'] must be an int >= 1, "
                             f"got {blocks!r}")
        return blocks
    slot_bytes = extra_config.get("host_slot_bytes")
    if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
        raise ValueError("kv_connector_extra_config needs 'host_cache_blocks' (int >= 1) or "
                         f"'host_slot_bytes' (int >= 1) to size the host tier; got host_slot_bytes={slot_bytes!r}")
    if hostcache.host_cache_gb == "auto":
        raise ValueError("host_cache_gb='auto' needs 'host_cache_blocks' in kv_connector_extra_config "
                         "(the executor hook sets it once, so every process agrees on the slot count)")
    from ..hostmem import resolve_host_cache_bytes

    total, reason = resolve_host_cache_bytes(hostcache)
    num = total // max(1, int(tp_size)) // slot_bytes
    if num < 1:
        raise ValueError(f"host tier holds no block: {reason} {total} bytes over {tp_size} TP rank(s) "
                         f"is less than one {slot_bytes}-byte slot")
    return num


def planned_tensor_specs(extra_config: Mapping[str, Any], kv_caches: Mapping[str, Any]):
    """Tensor specs the executor planned (``host_tensor_specs``), fitted to these rows; or None.

    The executor hook records the packed page fields of LMDeploy's cache plan. When it had to
    rebuild the plan (Ray/mp workers), operator-requested fields LMDeploy packs after the K/V
    fields are not in it; their bytes are then described as one raw ``unplanned_tail`` field,
    which every host format copies verbatim (the slot size the executor planned already counts
    them raw).
    """
    raw = extra_config.get("host_tensor_specs")
    if raw is None:
        return None
    from ..transfer.layout import LMDEPLOY_PACKED_POOL_PREFIX, TensorSpec
    from .engine_config import decode_tensor_specs

    specs = decode_tensor_specs(raw)
    row = next((t for name, t in kv_caches.items() if str(name).startswith(LMDEPLOY_PACKED_POOL_PREFIX)), None)
    if row is None or row.dim() < 1 or row.shape[0] == 0:
        return specs  # KVRowLayout names the problem
    page_bytes = row.numel() * row.element_size() // int(row.shape[0])
    tail = page_bytes - sum(s.aligned_size for s in specs)
    if tail > 0:
        import torch

        logger.info("host tier: %d bytes per page after the planned fields are copied raw", tail)
        specs = (*specs, TensorSpec("unplanned_tail", (tail,), torch.uint8, alignment=1))
    return specs


@dataclass
class _Op:
    demotion_batch: int | None
    request_ids: tuple[int, ...]
    gpu_blocks: tuple[int, ...]
    demoted_slots: tuple[int, ...] = ()


class HostTierWorker:
    """Worker role: register cache rows, run each step's copies, report completions."""

    def __init__(self, cache_config, hostcache: HostCacheConfig, *, tp_rank: int = 0, tp_size: int = 1,
                 device=None, backend: str = "auto") -> None:
        self.cache_config = cache_config
        self.hostcache = hostcache
        self.extra = cache_config.kv_transfer_config.kv_connector_extra_config
        self.tp_rank = int(tp_rank)
        self.tp_size = int(tp_size)
        self.device = device
        self.backend = backend
        self.engine_kwargs: dict[str, Any] = {}   # extra make_copy_engine arguments (tests: delay_polls)
        self.tensor_specs = None
        block_size, kernel = int(cache_config.block_size), int(cache_config.kernel_block_size)
        if block_size % kernel:
            raise ValueError(f"block_size {block_size} is not a multiple of kernel_block_size {kernel}")
        self.pages_per_block = block_size // kernel
        self.num_slots = resolve_num_slots(self.extra, hostcache, self.tp_size)
        self.layout = None
        self.pool = None
        self.engine = None
        self._ops: dict[int, _Op] = {}
        self._next_op = 0
        self._failed_submits: list[int] = []
        self._checksums: dict[int, int] = {}           # slot -> xxh3-64 of its bytes (checksum on)
        self._rejected_loads: list[HostLoad] = []      # loads refused (checksum mismatch, unwritten slot)
        self._corrupt_slots: list[int] = []            # slots that failed their checksum, not yet reported
        self._readable: bytearray | None = None        # slot -> 1 once a demotion into it completed in this pool
        self._unwritten_reads = 0                      # refused loads since the last poll: slot never written
        self._announce_pool = False                    # a new pool not yet reported (pool_reset_marker)
        self.corrupt_write_backs = 0                   # store write-backs refused: slot checksum mismatch
        self.poll_failures = 0                         # copy-engine polls that raised (ops in flight failed)
        self.engine_retired: str | None = None         # why the copy engine is no longer used (its wait raised)
        self.first_step: int | None = None             # metadata step of the first plan this worker received
        self.last_drain: DrainReport | None = None
        self.l3 = None                                 # l3_tier.WorkerL3 with an l3: section

    # -- registration ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Mapping[str, Any], tensor_specs=None) -> None:
        """Build the row layout, the host pool (``num_slots`` slots) and the copy engine.

        ``tensor_specs`` (LMDeploy's ``BlockCachePlan.tensor_specs``) are needed only for a
        lossy ``host_kv_format``. In order: given here, preset in ``self.tensor_specs``, or
        ``host_tensor_specs`` in the extra config (written by the executor hook from the
        cache plan and shipped to every worker with the cache config: what LMDeploy's
        ``BaseModelAgent.build_cache_engine`` path uses, since it passes the rows only).

        Raises ValueError before allocating anything when the format cannot apply to these
        rows, or when one slot would be larger than the ``host_slot_bytes`` the executor
        sized the tier with (the pool would then hold more bytes than ``host_cache_gb``).
        """
        from ..transfer import HostPool, KVRowLayout, make_copy_engine

        if self.engine is not None:
            raise RuntimeError("HostTierWorker.register_kv_caches called twice")
        caches = dict(kv_caches)
        if not caches:
            raise ValueError("register_kv_caches got no cache rows")
        fmt = self.hostcache.host_kv_format
        specs = None
        if fmt != "same":
            specs = tensor_specs if tensor_specs is not None else self.tensor_specs
            if specs is None:
                specs = planned_tensor_specs(self.extra, caches)
            if specs is None:
                raise ValueError(f"host_kv_format={fmt!r} needs the cache plan's tensor_specs to find the K/V "
                                 "byte ranges: none in kv_connector_extra_config['host_tensor_specs'] (the "
                                 "executor hook writes them); pass register_kv_caches(kv_caches, tensor_specs=...)")
        layout = KVRowLayout.from_connector_caches(caches, self.pages_per_block, tensor_specs=specs)
        slot_bytes = layout.slot_bytes(fmt)  # ValueError naming the row when the format does not apply
        planned = self.extra.get("host_slot_bytes")
        if isinstance(planned, int) and not isinstance(planned, bool) and slot_bytes > planned:
            raise ValueError(f"host tier rank {self.tp_rank}: one host slot in host_kv_format={fmt!r} needs "
                             f"{slot_bytes} bytes but the tier was sized with host_slot_bytes={planned} "
                             f"({self.num_slots} slots would exceed host_cache_gb); the executor planned another "
                             "cache layout than this worker registers")
        pin = None if self.hostcache.pin_memory else False
        pool = HostPool(layout, self.num_slots, host_kv_format=fmt, pin_memory=pin)
        self.engine = make_copy_engine(layout, pool, caches, device=self.device, backend=self.backend,
                                       **self.engine_kwargs)
        self.layout, self.pool = layout, pool
        self._readable = bytearray(self.num_slots)   # a new pool: no slot holds a block yet
        self._announce_pool = True                     # the next poll reports pool_reset_marker(first_step)
        if self.hostcache.l3 is not None and self.l3 is None:
            from .l3_tier import WorkerL3

            self.l3 = WorkerL3.build(self)
        logger.info("host tier rank %d: %d slots x %d B (%s), %d rows", self.tp_rank, self.num_slots,
                    pool.slot_bytes, fmt, len(caches))

    # -- per step ----------------------------------------------------------------------
    def start_load_kv(self, meta: HostTierMetadata) -> None:
        """Submit the step's demotions and loads as one op (demotions are gathered first)."""
        if not isinstance(meta, HostTierMetadata):
            raise TypeError(f"HostTierWorker got {type(meta).__name__} metadata, expected HostTierMetadata")
        if self.first_step is None:
            self.first_step = int(meta.step)
        if not meta.has_work:
            return
        if self.engine is None:
            raise RuntimeError("host-tier copy requested before register_kv_caches (or after shutdown)")
        host_loads = meta.loads
        if meta.l3_write_backs or meta.l3_stages:
            host_loads = self._l3_step(meta, host_loads)
        if host_loads and meta.demotions:   # the engine gathers demotions first: a slot read in the same op
            rewritten = {slot for _, slot in meta.demotions}   # would hold the new block, not the asked one
            host_loads = tuple(ld for ld in host_loads if self._not_rewritten(ld, rewritten))
        if host_loads:
            host_loads = tuple(ld for ld in host_loads if self._slots_written(ld))
        if self.hostcache.checksum and host_loads:
            host_loads = tuple(ld for ld in host_loads if self._checksums_match(ld))
        if not host_loads and not meta.demotions:
            return
        for _, slot in meta.demotions:   # being (re)written: unreadable until the copy completes
            if 0 <= slot < len(self._readable):
                self._readable[slot] = 0
        op_id = self._next_op
        self._next_op += 1
        loads = [(slot, gpu) for ld in host_loads for slot, gpu in zip(ld.slots, ld.gpu_blocks, strict=True)]
        self._ops[op_id] = _Op(meta.demotion_batch if meta.demotions else None,
                               tuple(ld.request_id for ld in host_loads),
                               tuple(gpu for _, gpu in loads),
                               tuple(slot for _, slot in meta.demotions))
        if self.engine_retired is not None:   # nothing moves: reported failed at the next poll (recompute)
            self._failed_submits.append(op_id)
            return
        try:
            self.engine.submit(op_id, demotions=list(meta.demotions), loads=loads)
        except Exception:  # reported as a failed op: the scheduler falls back to recompute
            logger.exception("host tier rank %d: submit of op %d failed", self.tp_rank, op_id)
            self._failed_submits.append(op_id)

    def _l3_step(self, meta: HostTierMetadata, host_loads):
        """Store work of a step, before any copy is submitted: write-backs first (the slots are
        about to be reused), then staging of store blocks into the slots of this step's loads.
        A load whose staging failed is refused (reported failed: LMDeploy recomputes)."""
        from ..l3.chain import WriteBack

        readable = self._readable
        if self.l3 is not None and meta.l3_write_backs:
            items = [WriteBack(d, t, s) for d, t, s in meta.l3_write_backs
                     if 0 <= s < len(readable) and readable[s] and self._intact_for_store(s)]
            self.l3.chain.write_back(items)
        failed: set[int] = set()
        for req, digests, tokens, slots in meta.l3_stages:
            for slot in slots:
                readable[slot] = 0
            if self.l3 is not None and self.l3.chain.stage(digests, tokens, slots):
                for slot in slots:
                    readable[slot] = 1
                    if self.hostcache.checksum:
                        self._checksums[slot] = self._slot_digest(slot)
            else:
                failed.add(int(req))
        if self.l3 is not None:
            self.l3.log_progress()
        if not failed:
            return host_loads
        for ld in host_loads:
            if ld.request_id in failed:
                logger.warning("host tier rank %d: request %d: its store blocks could not be staged; recomputing",
                               self.tp_rank, ld.request_id)
                self._rejected_loads.append(ld)
        return tuple(ld for ld in host_loads if ld.request_id not in failed)

    def _slot_intact(self, slot: int) -> bool:
        """The slot's bytes still match the hash taken when they were written (``checksum`` on)."""
        expected = self._checksums.get(slot)
        return expected is not None and self._slot_digest(slot) == expected

    def _intact_for_store(self, slot: int) -> bool:
        """With ``checksum`` on, a slot whose bytes no longer match the hash taken when they were written is
        not written back: the store object would wrap them in a fresh, valid checksum, and every other node
        would then restore them as sound (logged, and counted in ``corrupt_write_backs``)."""
        if not self.hostcache.checksum or self._slot_intact(slot):
            return True
        logger.warning("host tier rank %d: checksum mismatch in host slot %d: not written back to the store",
                       self.tp_rank, slot)
        self.corrupt_write_backs += 1
        return False

    def _slot_digest(self, slot: int) -> int:
        return xxhash.xxh3_64_intdigest(self.pool.slot_view(slot).numpy())

    def _slots_written(self, load: HostLoad) -> bool:
        """True when every source slot was written by a completed demotion in this pool; else the
        load is queued as refused (reported failed, with the pool reset marker) and nothing moves."""
        readable = self._readable
        for slot in load.slots:
            if not (0 <= slot < len(readable) and readable[slot]):
                logger.warning("host tier rank %d: request %d asks for host slot %d, which this pool (metadata "
                               "steps >= %s) never had written; refusing the load (recompute)", self.tp_rank,
                               load.request_id, slot, self.first_step)
                self._rejected_loads.append(load)
                self._unwritten_reads += 1
                return False
        return True

    def _not_rewritten(self, load: HostLoad, rewritten: set[int]) -> bool:
        """True when no source slot of ``load`` is a demotion destination of the same step; else the
        load is queued as refused (reported failed: LMDeploy recomputes) and nothing moves.  The
        scheduler's read pins keep a slot being loaded from out of the demotions; this is the
        worker's own check that no load can read bytes another block is overwriting."""
        for slot in load.slots:
            if slot in rewritten:
                logger.warning("host tier rank %d: request %d asks for host slot %d, which the same step "
                               "demotes another block into; refusing the load (recompute)", self.tp_rank,
                               load.request_id, slot)
                self._rejected_loads.append(load)   # the pool itself is sound: no reset marker
                return False
        return True

    def _checksums_match(self, load: HostLoad) -> bool:
        """True when every source slot still holds the bytes hashed after its demotion; else the
        load is queued as failed and each mismatching slot as corrupt (both reported by the next
        ``get_finished``, the slots as ``corrupt_slot_marker``) and nothing moves."""
        bad = [slot for slot in load.slots if not self._slot_intact(slot)]
        if not bad:
            return True
        for slot in bad:
            logger.warning("host tier rank %d: checksum mismatch in host slot %d: request %d recomputes (the "
                           "block there is dropped from the host tier)", self.tp_rank, slot, load.request_id)
        self._rejected_loads.append(load)
        self._corrupt_slots.extend(bad)
        return False

    def get_finished(self) -> KVConnectorOutput:
        """Terminal progress since the last poll, in the encoding of the module docstring.

        Never raises on a copy-engine fault (see "Copy-engine faults"); refused loads and failed
        submits leave their queues only once the output reporting them has been built."""
        finished: set[int] = set()
        saved: set[int] = set()
        invalid: set[int] = set()
        rejected, failed_submits = len(self._rejected_loads), len(self._failed_submits)
        for load in self._rejected_loads[:rejected]:
            finished.add(load.request_id)
            invalid.update(load.gpu_blocks)
        corrupt = len(self._corrupt_slots)   # queued with their refused loads: reported in the same output
        invalid.update(corrupt_slot_marker(slot) for slot in self._corrupt_slots[:corrupt])
        unwritten_reads = self._unwritten_reads
        if unwritten_reads:
            invalid.add(pool_reset_marker(self.first_step if self.first_step is not None else 0))
        announce = self._announce_pool and self.first_step is not None
        if announce and self.first_step > 1:
            # once per pool: copies shipped before first_step went to an older pool, and their
            # outcomes will never come (the scheduler ignores the marker when it saw the teardown;
            # an engine's first pool, from metadata step 1, has nothing before it to report)
            invalid.add(pool_reset_marker(self.first_step))
        outcomes = [(op_id, False, False) for op_id in self._failed_submits[:failed_submits]]
        if self.engine is not None and self.engine_retired is None:
            outcomes.extend(self._poll_engine(set(self._failed_submits[:failed_submits])))
        for op_id, stores_ok, loads_ok in outcomes:
            op = self._ops.pop(op_id, None)
            if op is None:
                continue
            if op.demotion_batch is not None:
                saved.add(op.demotion_batch)
                if stores_ok:
                    for slot in op.demoted_slots:
                        self._readable[slot] = 1
                else:
                    invalid.add(failed_demotion_marker(op.demotion_batch))
                if self.hostcache.checksum:
                    for slot in op.demoted_slots:
                        if stores_ok:
                            self._checksums[slot] = self._slot_digest(slot)
                        else:
                            self._checksums.pop(slot, None)
            finished.update(op.request_ids)
            if not loads_ok:
                invalid.update(op.gpu_blocks)
        out = KVConnectorOutput(completed_save_ids=saved or None, finished_receiving=finished or None,
                                invalid_block_ids=invalid)
        # reported now: only what this output carries leaves the queues
        del self._rejected_loads[:rejected]
        del self._corrupt_slots[:corrupt]
        del self._failed_submits[:failed_submits]
        self._unwritten_reads -= unwritten_reads
        if announce:
            self._announce_pool = False
        return out

    def _poll_engine(self, reported: set[int]) -> list[tuple[int, bool, bool]]:
        """``(op_id, stores_ok, loads_ok)`` of the ops the copy engine completed. When its ``poll`` raises:
        wait for every copy in flight (retiring the engine if that raises too, see the module docstring),
        then every op in flight not in ``reported`` is failed."""
        try:
            results = self.engine.poll()
        except Exception as exc:   # noqa: BLE001 - never into LMDeploy's step: the ops in flight recompute
            self.poll_failures += 1
            in_flight = [op_id for op_id in self._ops if op_id not in reported]
            log = logger.debug if self.poll_failures > 1 else logger.error
            log("host tier rank %d: polling the copy engine failed (%s: %s); the %d copy op(s) in flight are "
                "reported failed (recompute)", self.tp_rank, type(exc).__name__, exc, len(in_flight),
                exc_info=self.poll_failures == 1)
            try:
                self.engine.wait_all()   # once it returns, no copy of the failed ops moves a byte any more
            except Exception as wait_exc:   # noqa: BLE001
                self.engine_retired = f"{type(wait_exc).__name__}: {wait_exc}"
                logger.error("host tier rank %d: waiting for the copies in flight failed too (%s); the copy engine "
                             "is retired: every later copy is reported failed and recomputed", self.tp_rank,
                             self.engine_retired)
            return [(op_id, False, False) for op_id in in_flight]
        out = []
        for res in results:
            out.append((res.op_id, bool(res.stores_ok), bool(res.loads_ok)))
            if not res.ok:
                logger.warning("host tier rank %d: copy op %d failed: %s", self.tp_rank, res.op_id, res.error)
        return out

    @property
    def num_inflight(self) -> int:
        return len(self._ops)

    def shutdown(self) -> None:
        """Drain every submitted copy, record what it completed (``last_drain``), then release the
        engine and the host pool. The pool's blocks go with it: the scheduler side drops its index
        when LMDeploy tells it the workers drained (engine sleep) or shut down (close)."""
        engine, self.engine = self.engine, None
        results = []
        if engine is not None and self.engine_retired is not None:
            # its wait already raised: nothing to drain; release what can be released
            logger.warning("host tier rank %d: shutdown of a retired copy engine (%s): not drained",
                           self.tp_rank, self.engine_retired)
            with contextlib.suppress(Exception):
                engine.pool.close()
        elif engine is not None:
            try:
                engine.wait_all()
                results = engine.poll()
            except Exception as exc:   # noqa: BLE001 - never into LMDeploy's sleep or close: it would stop half-way
                self.engine_retired = f"{type(exc).__name__}: {exc}"
                logger.error("host tier rank %d: draining the copy engine at shutdown failed (%s); its %d copy op(s) "
                             "in flight are reported failed and the host pool is released", self.tp_rank,
                             self.engine_retired, len(self._ops), exc_info=True)
            finally:
                try:
                    engine.close()
                except Exception as exc:   # noqa: BLE001
                    logger.error("host tier rank %d: closing the copy engine failed (%s: %s)", self.tp_rank,
                                 type(exc).__name__, exc)
        done, failed, loaded, load_failed = set(), set(), set(), set()
        for res in results:
            op = self._ops.pop(res.op_id, None)
            if op is None:
                continue
            if op.demotion_batch is not None:
                (done if res.stores_ok else failed).add(op.demotion_batch)
            (loaded if res.loads_ok else load_failed).update(op.request_ids)
        for op_id in self._failed_submits:
            op = self._ops.pop(op_id, None)
            if op is not None and op.demotion_batch is not None:
                failed.add(op.demotion_batch)
        for op in self._ops.values():   # not drained (the drain raised, or a retired engine): failed
            if op.demotion_batch is not None:
                failed.add(op.demotion_batch)
            load_failed.update(op.request_ids)
        self.last_drain = DrainReport(tuple(sorted(done)), tuple(sorted(failed)), tuple(sorted(loaded)),
                                      tuple(sorted(load_failed)))
        if results or failed:
            logger.info("host tier rank %d: shutdown drained %d copy op(s): demotion batches completed %s, failed %s; "
                        "loads completed %s, failed %s; the host pool (and every block in it) is released",
                        self.tp_rank, len(results), list(done), list(failed), list(loaded), list(load_failed))
        self._ops.clear()
        self._failed_submits.clear()
        self._checksums.clear()
        self._rejected_loads.clear()
        self._corrupt_slots.clear()
        self._readable = None
        self.pool = None
        if self.l3 is not None:   # its slot accessors belong to the released pool
            l3, self.l3 = self.l3, None
            l3.close()
