"""Copy engines: move whole blocks between LMDeploy's rows and the host pool.

One interface, two implementations:

* :class:`CudaCopyEngine` - a side stream.  Per ``submit``: the copy stream waits
  for the compute stream; demoted blocks are gathered on the device into staging,
  then the compute stream waits for that gather (so the next forward cannot
  overwrite a demoted page before it is read), then staging goes D2H into the
  pinned slots; loads go H2D into staging and are scattered into their pages.
  Everything of an op runs in stream order on the copy stream, so demotions
  complete before loads that reuse the same pages, and ops complete in
  submission order.  Staging and index tensors stay referenced until the op's
  event has completed; completion is found by polling the event.
* :class:`CpuCopyEngine` - same contract, timed like a copy stream: ``submit``
  only gathers the demoted blocks; the rest of the op (demoted bytes into their
  slots, then the loads into their pages) lands when ``poll`` reports the op or,
  if sooner, when a later op is submitted.

Kernel warm-up: a :class:`CudaCopyEngine` on the Triton backend compiles its gather and
scatter kernels when it is built (``kernels.warm_up``: nothing read or written), so the
first demotion or restore of a server's life does not pay Triton's compile inside a
request's step (Triton compiles a kernel at its first launch).

Failure contract: ``submit`` validates everything first and raises ``ValueError``
before any byte moves.  An op that fails later completes with ``ok=False``: a
failed load's destination pages are **declared invalid** (their content is
undefined; an injected failure leaves them untouched, a real one may have written
part of them), a failed store's host slots are invalid.  The caller must treat
them as garbage: LMDeploy rolls a failed load back and recomputes; the host index
drops a failed store (``complete_store(..., success=False)``).

The two halves of an op fail independently: ``stores_ok`` is false only when the
demotion part failed (injected, or an exception while gathering, staging or writing
the slots) and ``loads_ok`` only when the load part failed, so a fault in one half
never drops demotions that landed nor fails loads that landed.  One exception: an
op's demotions are issued before its loads, so a load may read a slot the same op
demotes into (it then gets the demoted bytes); when that op's store part failed the
slot was not (or only partly) written, and the op's loads are failed too without
running (``loads_ok=False``): no load reads a host slot its store failed to write.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from . import reference
from .host_pool import HostPool
from .layout import KVRowLayout
from .ops import resolve_backend

FAIL_KINDS = ("load", "store")

logger = logging.getLogger("lmdeploy_hostcache.transfer")


@dataclass(frozen=True)
class CopyResult:
    """Completion of one ``submit``; ``ok`` is ``stores_ok and loads_ok``."""

    op_id: int
    ok: bool
    error: str | None = None
    stores_ok: bool = True
    loads_ok: bool = True
    num_demotions: int = 0
    num_loads: int = 0


@dataclass
class CopyStats:
    ops: int = 0
    failed_ops: int = 0
    blocks_stored: int = 0
    blocks_loaded: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0


@dataclass
class _Plan:
    op_id: int
    dem_blocks: list[int]
    dem_slots: list[int]
    load_slots: list[int]
    load_blocks: list[int]
    fail_store: bool = False
    fail_load: bool = False
    errors: list[str] = field(default_factory=list)

    def loads_read_failed_store(self) -> bool:
        """True when a load of this op reads a slot this op's demotions write (then a failed store
        fails the loads too: the slot holds unwritten or partly written bytes)."""
        return bool(self.load_blocks and self.dem_blocks and not set(self.load_slots).isdisjoint(self.dem_slots))

    def load_refused(self, store_error: str | None) -> str | None:
        """The load part's error when it must not run because its store part failed (``store_error``, or
        injected) and one of its loads reads a slot that store was writing; None when it may run."""
        if (store_error is not None or self.fail_store) and self.loads_read_failed_store():
            return "load not run: it reads a host slot whose store in the same op failed"
        return None


def _as_int(v, what: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"{what} must be an int, got {v!r}")
    return v.__index__()


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(position, first slot, count) runs of consecutive slots in ``slots`` order."""
    runs, i = [], 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1:
            j += 1
        runs.append((i, slots[i], j - i))
        i = j
    return runs


class CopyEngine:
    """Common validation, fault injection and bookkeeping; subclasses move the bytes."""

    def __init__(self, layout: KVRowLayout, pool: HostPool, kv_caches, backend: str = "auto"):
        if pool.layout is not layout:
            raise ValueError("pool was built for a different KVRowLayout")
        self.layout = layout
        self.pool = pool
        self.format = pool.format
        self.rows = layout.check_caches(kv_caches)
        self.device = self.rows[0].device
        self.backend = resolve_backend(backend, self.device)
        self.stats = CopyStats()
        self._fail = {"load": 0, "store": 0}
        self._inflight: set[int] = set()
        self._closed = False

    # public API -------------------------------------------------------------------
    def fail_next(self, n: int = 1, kind: str = "load") -> None:
        """Fault injection: the next ``n`` ops holding ``kind`` work complete with that part failed."""
        if kind not in FAIL_KINDS:
            raise ValueError(f"kind must be one of {FAIL_KINDS}, got {kind!r}")
        if _as_int(n, "n") < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._fail[kind] += n

    def submit(self, op_id: int, demotions, loads) -> None:
        """Queue demotions ``[(gpu_block, slot)]`` then loads ``[(slot, gpu_block)]`` as one op."""
        plan = self._validate(op_id, demotions, loads)
        if plan.dem_blocks and self._fail["store"]:
            self._fail["store"] -= 1
            plan.fail_store = True
            plan.errors.append("store failed (injected)")
        if plan.load_blocks and self._fail["load"]:
            self._fail["load"] -= 1
            plan.fail_load = True
            plan.errors.append("load failed (injected)")
        self._inflight.add(plan.op_id)
        try:
            self._enqueue(plan)
        except BaseException:
            self._inflight.discard(plan.op_id)   # never queued: no result will come for it
            raise

    def poll(self) -> list[CopyResult]:
        """Ops completed since the last poll, in submission order."""
        done = self._collect()
        for r in done:
            self._inflight.discard(r.op_id)
            self.stats.ops += 1
            self.stats.failed_ops += not r.ok
        return done

    def wait_all(self) -> None:
        """Block until every submitted op has completed (results stay for ``poll``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Wait for in-flight ops, free staging and release the pool; idempotent."""
        if self._closed:
            return
        self.wait_all()
        self._closed = True
        self._release()
        self.pool.close()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # internals --------------------------------------------------------------------
    def _validate(self, op_id, demotions, loads) -> _Plan:
        if self._closed:
            raise RuntimeError("copy engine is closed")
        op_id = _as_int(op_id, "op_id")
        if op_id in self._inflight:
            raise ValueError(f"op_id {op_id} is already in flight")
        nb, ns = self.layout.num_blocks, self.pool.num_slots
        plan = _Plan(op_id, [], [], [], [])
        for name, pairs, first, second in (("demotions", demotions, "gpu_block", "host_slot"),
                                           ("loads", loads, "host_slot", "gpu_block")):
            for k, pair in enumerate(pairs or ()):
                try:
                    a, b = pair
                except (TypeError, ValueError):
                    raise ValueError(f"{name}[{k}] must be a ({first}, {second}) pair, got {pair!r}") from None
                a, b = _as_int(a, f"{name}[{k}].{first}"), _as_int(b, f"{name}[{k}].{second}")
                blk, slot = (a, b) if name == "demotions" else (b, a)
                if not 0 <= blk < nb:
                    raise ValueError(f"{name}[{k}]: gpu_block {blk} outside [0, {nb})")
                if not 0 <= slot < ns:
                    raise ValueError(f"{name}[{k}]: host_slot {slot} outside [0, {ns})")
                if name == "demotions":
                    plan.dem_blocks.append(blk)
                    plan.dem_slots.append(slot)
                else:
                    plan.load_slots.append(slot)
                    plan.load_blocks.append(blk)
        for name, dests, what in (("demotions", plan.dem_slots, "host_slot"),
                                  ("loads", plan.load_blocks, "gpu_block")):
            seen, dup = set(), set()
            for d in dests:
                (dup if d in seen else seen).add(d)
            if dup:
                raise ValueError(f"{name} has duplicate destination {what}s {sorted(dup)[:8]}")
        return plan

    def _impl(self):
        if self.backend == "triton":
            from . import kernels
            return kernels
        return reference

    def _result(self, plan: _Plan, store_error: str | None = None, load_error: str | None = None) -> CopyResult:
        """Each half's outcome from its own failure only (injected in ``plan``, or the error its
        phase raised); ``error`` joins every message."""
        stores_ok = not plan.fail_store and store_error is None
        loads_ok = not plan.fail_load and load_error is None
        errors = plan.errors + [e for e in (store_error, load_error) if e]
        if stores_ok and plan.dem_blocks:
            self.stats.blocks_stored += len(plan.dem_blocks)
            self.stats.bytes_to_host += len(plan.dem_blocks) * self.format.slot_bytes
        if loads_ok and plan.load_blocks:
            self.stats.blocks_loaded += len(plan.load_blocks)
            self.stats.bytes_to_device += len(plan.load_blocks) * self.format.slot_bytes
        return CopyResult(plan.op_id, stores_ok and loads_ok, "; ".join(errors) or None, stores_ok, loads_ok,
                          len(plan.dem_blocks), len(plan.load_blocks))

    def _enqueue(self, plan: _Plan) -> None:
        raise NotImplementedError

    def _collect(self) -> list[CopyResult]:
        raise NotImplementedError

    def _release(self) -> None:
        pass


@dataclass
class _CpuOp:
    """A submitted op of ``CpuCopyEngine``: its result shows after ``polls_left`` more polls; its
    demotions' bytes gathered at submit wait in ``gathered`` until the op lands."""

    plan: _Plan
    polls_left: int
    store_error: str | None = None   # the demotion part failed (gather at submit, or slot writes)
    load_error: str | None = None    # the load part failed (or did not run: it read a failed store's slot)
    gathered: torch.Tensor | None = None
    landed: bool = False


class CpuCopyEngine(CopyEngine):
    """Engine for CPU rows (tests, machines without a GPU), timed like the CUDA one.

    At submit, only the demotions' gather from the GPU blocks runs (the CUDA engine's forward waits
    for it: the blocks may be rewritten right after). The rest of an op lands as late as a CUDA copy
    stream allows: when ``poll`` reports the op, or, if sooner, when a later op is submitted (stream
    order: its gather runs after every earlier op's copies). Landing writes the gathered bytes into
    their host slots, then reads the loads from their slots and scatters them into their GPU blocks.
    A caller that treats an op as done before its result is polled therefore sees the bytes missing,
    as it could on a GPU.
    ``delay_polls``: a result becomes visible (and lands) only on the ``delay_polls+1``-th poll
    after its submit, so callers can exercise the pending state.
    """

    def __init__(self, layout: KVRowLayout, pool: HostPool, kv_caches, backend: str = "auto",
                 delay_polls: int = 0):
        super().__init__(layout, pool, kv_caches, backend)
        self.delay_polls = _as_int(delay_polls, "delay_polls")
        self._done: collections.deque[_CpuOp] = collections.deque()

    def _enqueue(self, plan: _Plan) -> None:
        for op in self._done:          # stream order: every earlier op's copies run before this gather
            self._land(op)
        op = _CpuOp(plan, self.delay_polls)
        try:
            if plan.dem_blocks and not plan.fail_store:
                op.gathered = self._gather(plan.dem_blocks)
        except Exception as exc:  # a real failure: declared invalid, reported through poll
            op.store_error = f"store failed: {type(exc).__name__}: {exc}"
        self._done.append(op)

    def _land(self, op: _CpuOp) -> None:
        """An op's copies run (once): demotions' bytes into their slots, then the loads into their blocks.
        Each half's failure becomes its own error; the loads run after a failed store part unless they
        read one of its slots (then they fail without reading it)."""
        if op.landed:
            return
        op.landed = True
        plan = op.plan
        if op.gathered is not None and op.store_error is None:
            try:
                self._write_slots(plan.dem_slots, op.gathered)
            except Exception as exc:
                op.store_error = f"store failed: {type(exc).__name__}: {exc}"
        op.gathered = None
        if plan.load_blocks and not plan.fail_load:
            op.load_error = plan.load_refused(op.store_error)
            if op.load_error is not None:
                return
            try:
                self._load(plan.load_slots, plan.load_blocks)
            except Exception as exc:
                op.load_error = f"load failed: {type(exc).__name__}: {exc}"

    def _gather(self, blocks: list[int]) -> torch.Tensor:
        ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
        staging = torch.empty((len(blocks), self.format.slot_bytes), dtype=torch.uint8, device=self.device)
        self._impl().gather(self.rows, self.layout, self.format, ids, staging)
        return staging

    def _write_slots(self, slots: list[int], staging: torch.Tensor) -> None:
        for pos, first, count in _runs(slots):
            view = self.pool.slot_range_view(first, count)
            if view is None:
                for k in range(count):
                    self.pool.slot_view(first + k).copy_(staging[pos + k])
            else:
                view.copy_(staging[pos:pos + count])

    def _load(self, slots: list[int], blocks: list[int]) -> None:
        staging = torch.empty((len(slots), self.format.slot_bytes), dtype=torch.uint8, device=self.device)
        for pos, first, count in _runs(slots):
            view = self.pool.slot_range_view(first, count)
            if view is None:
                for k in range(count):
                    staging[pos + k].copy_(self.pool.slot_view(first + k))
            else:
                staging[pos:pos + count].copy_(view)
        ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
        self._impl().scatter(staging, self.layout, self.format, ids, self.rows)

    def _collect(self) -> list[CopyResult]:
        out = []
        for op in self._done:
            op.polls_left -= 1
        while self._done and self._done[0].polls_left < 0:   # in submit order, as a stream completes them
            op = self._done.popleft()
            self._land(op)
            out.append(self._result(op.plan, op.store_error, op.load_error))
        return out

    def wait_all(self) -> None:
        for op in self._done:   # every op completes: its copies land now, its result waits for poll
            self._land(op)
            op.polls_left = 0

    def _release(self) -> None:
        self._done.clear()


class CudaCopyEngine(CopyEngine):
    """Side-stream engine for CUDA rows and a (pinned) host pool.

    ``max_staging_bytes`` bounds one staging buffer; larger ops use several, all
    kept alive until the op's completion event has fired.  With a pageable pool
    (``pin_memory=False``) CUDA makes the host copies synchronous, so ``submit``
    then blocks until the copy stream has caught up.
    """

    def __init__(self, layout: KVRowLayout, pool: HostPool, kv_caches, backend: str = "auto",
                 max_staging_bytes: int = 256 << 20):
        super().__init__(layout, pool, kv_caches, backend)
        self._require_cuda_rows()
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self.blocks_per_staging = max(1, max_staging_bytes // self.format.slot_bytes)
        self._pending: collections.deque = collections.deque()
        self.warm_up_s = self._warm_up()

    def _warm_up(self) -> float | None:
        """Compile the Triton gather/scatter kernels now (nothing moved); their seconds, None on torch.

        A failure is logged, never raised: the first copies then compile (or fail, and a failed
        copy falls back to recompute), as without the warm-up.
        """
        if self.backend != "triton":
            return None
        from . import kernels

        t0 = time.perf_counter()
        # Triton compiles for the current device: the rows' one, as under the copy stream's context
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            with on_device:
                staging = torch.empty((1, self.format.slot_bytes), dtype=torch.uint8, device=self.device)
                kernels.warm_up(self.rows, self.layout, self.format, staging)
        except Exception as exc:  # noqa: BLE001 - serving goes on; the copies report their own failures
            logger.warning("host tier: compiling the copy kernels at start-up failed (%s: %s); the first copies "
                           "will compile them, and a copy that fails falls back to recompute",
                           type(exc).__name__, exc)
            return None
        seconds = time.perf_counter() - t0
        logger.info("host tier copy kernels compiled in %.2f s (%s, %d B per slot)", seconds, self.format.name,
                    self.format.slot_bytes)
        return seconds

    def _require_cuda_rows(self) -> None:
        if self.device.type != "cuda":
            raise ValueError(f"CudaCopyEngine needs CUDA rows, got {self.device}")

    def _ids(self, values: list[int], keep: list) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self.pool.pinned:
            host = host.pin_memory()
        keep.append(host)
        dev = host.to(self.device, non_blocking=True)
        keep.append(dev)
        return dev

    def _enqueue(self, plan: _Plan) -> None:
        """Issue the op on the copy stream: the demotion part, then the load part, then the completion
        event. Each part's exception is that part's error only (``stores_ok``/``loads_ok``); the load
        part still runs after a failed demotion part unless one of its slots is a demotion destination
        of this op (then it is not issued and fails: the slot was not, or only partly, written). What a
        failed part issued before raising stays in stream order before the event, so the op completes
        (and its staging is released) only after it."""
        keep: list = []
        store_error = load_error = None
        compute = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_stream(compute)
                if plan.dem_blocks and not plan.fail_store:
                    try:
                        self._enqueue_stores(plan, compute, keep)
                    except Exception as exc:
                        store_error = f"store failed: {type(exc).__name__}: {exc}"
                if plan.load_blocks and not plan.fail_load:
                    load_error = plan.load_refused(store_error)
                    if load_error is None:
                        try:
                            self._enqueue_loads(plan, keep)
                        except Exception as exc:
                            load_error = f"load failed: {type(exc).__name__}: {exc}"
        except Exception as exc:   # entering the copy stream or waiting for compute: neither part was issued
            error = f"{type(exc).__name__}: {exc}"
            if plan.dem_blocks and not plan.fail_store and store_error is None:
                store_error = f"store failed: {error}"
            if plan.load_blocks and not plan.fail_load and load_error is None:
                load_error = f"load failed: {error}"
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        self._pending.append((done, keep, plan, store_error, load_error))

    def _enqueue_stores(self, plan: _Plan, compute, keep: list) -> None:
        """Gather the demoted blocks into staging, make the forward wait for the gathers, then D2H."""
        step = self.blocks_per_staging
        impl = self._impl()
        order = sorted(range(len(plan.dem_slots)), key=plan.dem_slots.__getitem__)
        blocks = [plan.dem_blocks[k] for k in order]
        slots = [plan.dem_slots[k] for k in order]
        stagings = []
        for a in range(0, len(blocks), step):
            staging = torch.empty((len(blocks[a:a + step]), self.format.slot_bytes),
                                  dtype=torch.uint8, device=self.device)
            impl.gather(self.rows, self.layout, self.format, self._ids(blocks[a:a + step], keep), staging)
            stagings.append(staging)
            keep.append(staging)
        gathered = torch.cuda.Event()
        gathered.record(self.copy_stream)
        compute.wait_event(gathered)  # the forward may reuse demoted pages only after this
        for c, staging in enumerate(stagings):
            part = slots[c * step:(c + 1) * step]
            for pos, first, count in _runs(part):
                self._host_runs(first, count, staging[pos:pos + count], to_host=True)

    def _enqueue_loads(self, plan: _Plan, keep: list) -> None:
        """H2D the loaded slots into staging and scatter them into their pages."""
        step = self.blocks_per_staging
        impl = self._impl()
        order = sorted(range(len(plan.load_slots)), key=plan.load_slots.__getitem__)
        slots = [plan.load_slots[k] for k in order]
        blocks = [plan.load_blocks[k] for k in order]
        for a in range(0, len(blocks), step):
            part = slots[a:a + step]
            staging = torch.empty((len(part), self.format.slot_bytes), dtype=torch.uint8, device=self.device)
            keep.append(staging)
            for pos, first, count in _runs(part):
                self._host_runs(first, count, staging[pos:pos + count], to_host=False)
            impl.scatter(staging, self.layout, self.format, self._ids(blocks[a:a + step], keep), self.rows)

    def _host_runs(self, first: int, count: int, staging: torch.Tensor, to_host: bool) -> None:
        view = self.pool.slot_range_view(first, count)
        pairs = [(view, staging)] if view is not None else [
            (self.pool.slot_view(first + k), staging[k]) for k in range(count)]
        for host, dev in pairs:
            if to_host:
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)

    def _collect(self) -> list[CopyResult]:
        out = []
        while self._pending and self._pending[0][0].query():
            _, keep, plan, store_error, load_error = self._pending.popleft()
            keep.clear()  # staging may be reused now
            out.append(self._result(plan, store_error, load_error))
        return out

    def wait_all(self) -> None:
        for done, *_ in self._pending:
            done.synchronize()

    def _release(self) -> None:
        self._pending.clear()


def make_copy_engine(layout: KVRowLayout, pool: HostPool, kv_caches, device=None, backend: str = "auto",
                     **kwargs) -> CopyEngine:
    """:class:`CudaCopyEngine` for CUDA rows, :class:`CpuCopyEngine` otherwise."""
    rows_device = next(iter(kv_caches.values())).device
    if device is not None and torch.device(device) != rows_device and not (
            torch.device(device).type == rows_device.type == "cuda" and torch.device(device).index is None):
        raise ValueError(f"device {device} differs from the kv_caches device {rows_device}")
    if rows_device.type == "cuda":
        return CudaCopyEngine(layout, pool, kv_caches, backend=backend, **kwargs)
    return CpuCopyEngine(layout, pool, kv_caches, backend=backend, **kwargs)
