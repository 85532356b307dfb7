"""Concurrency replay on LMDeploy's step clock: prefill steps, decode steps and admission rules.

``concurrency.ConcurrentTwoTierCache`` starts a request at its arrival and runs it for
``output / decode rate``.  LMDeploy's engine does not: it runs one *step* at a time, and a step
either prefills newly admitted requests or decodes every running one, never both.  Requests
therefore start later, in bursts, and end later than that model says, and under a squeezed GPU
tier the order of starts and ends decides what is evicted (docs/planner.md "Validated against the
engine").  ``SteppedTwoTierCache`` keeps the same cache bookkeeping (pins, held slots, output
blocks, host copies in flight) and replaces only the clock, with these rules of LMDeploy 0.18's
``InputsMakerAsync.do_prefill_default`` and prefill scheduler (``EngineSteps``):

* time is counted in steps; one step lasts ``1 / decode_tokens_per_s`` seconds of the trace's
  clock (a decode step gives every running request one token);
* step ``k`` is scheduled at time ``k`` steps: a request that arrived by then can run in it;
* a step prefills when a request is waiting and one of: nothing runs, fewer than
  ``max_batches / 2`` run, ``prefill_interval`` decode steps ran since the last prefill, or the
  waiting prompt reaches ``max_prefill_tokens``; otherwise it decodes;
* a prefill step admits waiting requests first come, first served, while fewer than
  ``max_batches`` run, their prompt tokens stay within ``max_prefill_tokens`` (the first is
  always admitted) and their blocks (the prompt plus ``prefill_interval`` preallocated tokens,
  taken on admission as LMDeploy's ``prealloc_size``) fit beside what the running requests and the
  started loads hold; a request that does not fit waits while decode steps free blocks (a request larger than
  the whole tier runs when nothing runs and no load is in flight); the running requests do not
  decode in that step;
* an admission that finds too little room still evicts: LMDeploy's ``try_make_capacity_for``
  evicts cached GPU blocks (up to the blocks missing, the request's own matched prefix held)
  before it gives up, so at every prefill step the waiting request is tried in, those blocks go
  to the host tier then (``attempt_evictions``), not when the request finally fits;
* a request whose prompt continues in the host tier first *loads*: the load starts at the step
  that would have admitted it (its blocks, GPU and restored, are taken then; the step is not a
  prefill, so running requests decode in it), and the request is admitted at a prefill step two
  or more steps later (the load's completion reaches the scheduler after the next step is
  scheduled); the host copies it reads stay pinned in the host tier until then (the connector
  ends a load's read pins when the load completes), so they take host slots that demotions
  cannot reuse;
* a request's first output token comes from its prefill step, each further one from a decode
  step; it ends with its last token.

Counters (``SteppedStats``): ``prefill_steps``, ``decode_steps``, ``load_waits`` (requests that
waited for a host load), ``attempt_evictions``, plus ``ConcurrencyStats``
(``queued_requests``/``queue_delay_s``: requests that prefilled after the first step they could
have run in, and those waits).  Not modelled: preemption (the engine never preempted in the
validation runs), chunked prefill of long prompts, a load's soft reservation of its prompt's tail
(``KVLoadCoordinator.can_admit_load``: here a load takes its whole prompt at once), and a prefill
step's own duration (a step is a step).  Invariants: steps only move forward; a running
request's end and block-growth events are kept in *decode-step* counts, so a prefill step inserted
while it runs delays them by one step, as in the engine.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Sequence

from .concurrency import ConcurrencyStats, ConcurrentTwoTierCache, Lifetimes, _Running
from .replay import PreparedRequest, progress

# LMDeploy 0.18 PytorchEngineConfig defaults (max_batch_size is chosen per device: an assumption here)
DEFAULT_PREFILL_INTERVAL = 16
DEFAULT_MAX_PREFILL_TOKENS = 8192
DEFAULT_MAX_BATCHES = 128


@dataclass(frozen=True)
class EngineSteps:
    """The engine's admission settings the step model follows (LMDeploy's names in brackets)."""

    max_batches: int = DEFAULT_MAX_BATCHES                 # (max_batch_size)
    prefill_interval: int = DEFAULT_PREFILL_INTERVAL       # (prefill_interval)
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS   # (max_prefill_token_num)

    def __post_init__(self) -> None:
        for name in ("max_batches", "prefill_interval", "max_prefill_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def describe(self) -> str:
        return (f"LMDeploy step model: max_batches {self.max_batches}, prefill_interval {self.prefill_interval}, "
                f"max_prefill_tokens {self.max_prefill_tokens}")

    def as_dict(self) -> dict:
        return {"max_batches": self.max_batches, "prefill_interval": self.prefill_interval,
                "max_prefill_tokens": self.max_prefill_tokens}


@dataclass
class SteppedStats(ConcurrencyStats):
    prefill_steps: int = 0
    decode_steps: int = 0
    load_waits: int = 0
    attempt_evictions: int = 0    # GPU blocks evicted by admission attempts that found too little room


class SteppedTwoTierCache(ConcurrentTwoTierCache):
    """``ConcurrentTwoTierCache`` on LMDeploy's step clock; see the module docstring."""

    def __init__(self, gpu_blocks: int, host_blocks: int, host_policy: str = "lru", block_size: int = 1,
                 lifetimes: Lifetimes = Lifetimes(), verify_tokens: bool = True, host_write_s: float = 0.0,
                 engine: EngineSteps = EngineSteps(), record: bool = False) -> None:
        super().__init__(gpu_blocks, host_blocks, host_policy, block_size, lifetimes, verify_tokens, host_write_s)
        st = self.stats
        self.stats = SteppedStats(st.block_size, st.gpu_blocks, st.host_blocks, st.host_policy)
        self.engine = engine
        self._rate = float(lifetimes.decode_tokens_per_s)   # steps per second of the trace's clock
        self._step = 0            # the first step not decided yet
        self._decoded = 0         # decode steps so far (running requests' events count these)
        self._since_prefill = 0   # decode steps since the last prefill step
        self._batch = (-1, 0, 0, -1)  # the latest prefill: (step, requests, prompt tokens, the step after it)
        self._ending: list[tuple[int, int, _Running]] = []   # (step its end is seen, order, request)
        # requests whose host load started: (first step they may prefill in, order, their blocks, request)
        self._loaded: list[tuple[int, int, tuple, PreparedRequest]] = []
        self._n_loaded = 0
        self._last_busy = -2      # the latest step that ran a forward (or shipped a load)
        # record=True: (step, "prefill" | "load", the request's position in serve order) per event
        self.schedule: list[tuple[int, str, int]] | None = [] if record else None
        self._position: dict[int, int] = {}
        # loads started: the host copies they read stay pinned until their prefill (id(pr) -> release)
        self._host_pending: dict[int, tuple] = {}

    # -- the clock ---------------------------------------------------------------------------
    def _seconds(self, step: float) -> float:
        return step / self._rate

    def _process_next(self) -> float:
        t, kind, order, r = heapq.heappop(self._running)
        self._clock = self._seconds(self._step)
        if kind == 0:
            # the last token's step just ran; the engine schedules the next step before it sees the
            # request end, so its blocks are free for the step after that
            heapq.heappush(self._ending, (self._step + 1, order, r))
        elif not r.ended:
            got = self._hold(1)
            r.held.extend(got)
            self._held_now += len(got)
            self.stats.max_held_blocks = max(self.stats.max_held_blocks, self._occupied())
        return t

    def _fire_due(self) -> None:
        running, ending = self._running, self._ending
        while running and running[0][0] <= self._decoded:
            self._process_next()
        while ending and ending[0][0] <= self._step:
            r = heapq.heappop(ending)[2]
            self._clock = self._seconds(self._step)
            r.ended = True
            self._live -= 1
            self._end(r)

    def _decode_until(self, step: int) -> None:
        """Decide every step before ``step``: a prefill step when a loaded request is ready and the
        engine would prefill, else a decode step (or nothing, on an idle engine)."""
        self._fire_due()
        while self._step < step:
            loaded = self._loaded
            if loaded and loaded[0][0] <= self._step and self._prefill_due(loaded[0][3].request.input_length):
                self._prefill(None)
                self._fire_due()
                continue
            n = step - self._step
            if loaded:
                n = min(n, max(1, loaded[0][0] - self._step))
            if not self._live:            # idle engine: jump
                self._step += n
                self._since_prefill = 0
                continue
            if self._running:
                n = min(n, max(1, int(self._running[0][0]) - self._decoded))
            if self._ending:
                n = min(n, max(1, self._ending[0][0] - self._step))
            self._step += n
            self._decoded += n
            self._since_prefill += n
            self.stats.decode_steps += n
            self._last_busy = self._step - 1
            self._fire_due()

    # -- admission ---------------------------------------------------------------------------
    def _admission_blocks(self, input_length: int) -> int:
        """Blocks LMDeploy allocates when it admits a prompt: the prompt plus ``prefill_interval``
        preallocated tokens (``prealloc_size``)."""
        return -(-(input_length + self.engine.prefill_interval) // self.block_size)

    def _fits(self, pr: PreparedRequest, total: int) -> bool:
        """LMDeploy admits a prefill only if the prompt plus ``prefill_interval`` preallocated tokens fit."""
        total = self._admission_blocks(pr.request.input_length)
        pins = self._pins
        shared = 0
        for d in pr.digests:
            if d not in pins:
                break
            shared += 1
        return self._occupied() + total - shared <= self.stats.gpu_blocks

    def _prefill_due(self, tokens: int) -> bool:
        """Would the engine run a prefill step now for a waiting prompt of ``tokens``?"""
        e = self.engine
        return (not self._live or self._since_prefill >= e.prefill_interval or self._live < e.max_batches * 0.5
                or tokens >= e.max_prefill_tokens)

    def _admissible(self, pr: PreparedRequest, total: int, tokens: int) -> bool:
        if not self._live and not self._loaded:
            return True
        return self._prefill_due(tokens) and self._live < self.engine.max_batches and self._fits(pr, total)

    def _prefill(self, pr: PreparedRequest | None) -> None:
        """A prefill step now: the loaded requests that are ready (first come, first served) and
        ``pr`` (already served) start running, within the batch and token limits."""
        e = self.engine
        step, n, used = self._step, 0, 0
        was_live = self._live
        loaded = self._loaded
        while loaded and loaded[0][0] <= step and n < e.max_batches - was_live:
            tokens = loaded[0][3].request.input_length
            if n and used + tokens > e.max_prefill_tokens:
                break
            _, _, served, lpr = heapq.heappop(loaded)
            self._start(lpr, served, step)
            n, used = n + 1, used + tokens
        if pr is not None:
            self._start(pr, self._served, step)
            n, used = n + 1, used + pr.request.input_length
        if was_live or self._last_busy >= step - 1:
            self._step += 1
        # else: an idle engine (no forward in the previous step) dispatches the prefill and, at once,
        # the next step's forward, since nothing was scheduled ahead: both happen in one time slot
        self._last_busy = step
        self._since_prefill = 0
        self.stats.prefill_steps += 1
        self._batch = (step, n, used, self._step)

    def _admit(self, pr: PreparedRequest, total: int) -> None:
        """Serve ``pr`` at the step the engine admits it, or at the step its host load starts."""
        e = self.engine
        r = pr.request
        first = math.ceil(r.timestamp * self._rate)
        tokens = r.input_length
        step, n, used, after = self._batch
        if (after == self._step and first <= step and n < e.max_batches and used + tokens <= e.max_prefill_tokens
                and self._fits(pr, total) and not self._host_hit(pr)):
            self._serve_now(pr)
            self._start(pr, self._served, step)       # joins the prefill step just decided
            self._batch = (step, n + 1, used + tokens, after)
            return
        self._decode_until(max(first, self._step))
        while not self._admissible(pr, total, tokens):
            if not self._live and not self._loaded:
                break                    # larger than the whole tier: runs alone
            if self._prefill_due(tokens) and self._live < e.max_batches:
                self._failed_attempt(pr)
            self._decode_until(self._step + 1)
        if self._host_hit(pr):
            # the load starts in this step (not a prefill: running requests decode in it); the
            # request waits for a prefill step two or more steps later, others may start meanwhile
            self._serve_now(pr)
            self._last_busy = self._step     # the load ships with this step (a forward of its own if need be)
            self.stats.load_waits += 1
            if self.schedule is not None:
                self.schedule.append((self._step, "load", self._position[id(pr)]))
            heapq.heappush(self._loaded, (self._step + 2, self._n_loaded, self._served, pr))
            self._n_loaded += 1
            return
        self._serve_now(pr)
        self._prefill(pr)

    def _failed_attempt(self, pr: PreparedRequest) -> None:
        """A prefill step tried to admit ``pr`` and found too little room.  LMDeploy's
        ``try_make_capacity_for`` evicts cached GPU blocks (up to the missing count, the request's
        own matched prefix held) before it gives up, and those evictions stand: the blocks are
        demoted to the host tier now, not when the request finally fits."""
        self._clock = self._seconds(self._step)
        self._settle_writes(self._clock)
        gpu = self.gpu
        g, _ = self.probe(pr)
        missing = self._admission_blocks(pr.request.input_length) - g - gpu.num_free_slots
        if missing <= 0:
            return
        matched = pr.digests[:g]
        if matched:
            gpu.prepare_load(matched)      # the tentative match holds the request's own prefix
        self.stats.attempt_evictions += gpu.evict(missing)
        if matched:
            gpu.complete_load(matched, False)

    def _host_hit(self, pr: PreparedRequest) -> bool:
        self._clock = self._seconds(self._step)
        self._settle_writes(self._clock)
        g, h = self.probe(pr)
        return h > 0

    # -- serving -----------------------------------------------------------------------------
    def _serve_now(self, pr: PreparedRequest) -> None:
        """The request takes its blocks (GPU hits, host restores, stored misses) and pins them."""
        self._clock = self._seconds(self._step)
        self._settle_writes(self._clock)
        g, restored, stored = self.serve_blocks(pr, defer_host_release=True)
        if self.host_release is not None:
            # the load's reads end when it completes, which the scheduler sees at the prefill
            self._host_pending[id(pr)] = self.host_release
        resident = self.gpu.is_resident
        pinned = tuple(d for d in pr.digests[:g + stored] if resident(d))
        if pinned:
            self.gpu.prepare_load(pinned)
            pins = self._pins
            for d in pinned:
                pins[d] = pins.get(d, 0) + 1
        held = self._hold(max(0, self._admission_blocks(pr.request.input_length) - len(pinned)))
        self._held_now += len(held)
        self._served = (g, restored, pinned, held)
        st = self.stats
        st.max_held_blocks = max(st.max_held_blocks, self._occupied())

    def _start(self, pr: PreparedRequest, served, step: int) -> None:
        """``pr`` runs from its prefill in ``step``: its end and block growth, in decode steps."""
        r = pr.request
        bs = self.block_size
        release = self._host_pending.pop(id(pr), None)
        if release is not None:
            self.release_host_copies(release)
        _, _, pinned, held = served
        if self.schedule is not None:
            self.schedule.append((step, "prefill", self._position[id(pr)]))
        first = math.ceil(r.timestamp * self._rate)   # the first step it could have run in
        if step > first:
            self.stats.queued_requests += 1
            self.stats.queue_delay_s += self._seconds(step - first)
        ghosts = max(0, (r.input_length + r.output_length - 1) // bs - r.input_length // bs)
        state = _Running(pinned, held, pr.digests[-1] if pr.digests else pr.root, ghosts, self._n)
        self._n += 1
        d0 = self._decoded              # the prefill step gives token 1; decode step d0 + i gives token i + 1
        self._push(d0 + max(0, r.output_length - 1), 0, state)
        blocks = self._admission_blocks(r.input_length)   # taken on admission (_serve_now)
        for i in range(1, r.output_length + 1):
            need = -(-(r.input_length + i) // bs)
            if need > blocks:
                blocks = need
                self._push(d0 + i - 1, 1, state)
        self._live += 1
        self.stats.max_running = max(self.stats.max_running, self._live)

    def serve_at(self, pr: PreparedRequest) -> tuple[int, int]:
        """Serve ``pr`` (requests in arrival order); returns (GPU-hit blocks, host-restored blocks)."""
        if self.schedule is not None:
            self._position[id(pr)] = len(self._position)
        self._served = None
        self._admit(pr, -(-pr.request.input_length // self.block_size))
        self._now = self._clock
        g, restored, _, _ = self._served
        return g, restored

    def finish(self) -> SteppedStats:
        while self._running or self._ending or self._loaded:
            self._decode_until(self._step + 1)
        self._settle_writes(float("inf"))
        return super().finish()


def replay_stepped(prepared: Sequence[PreparedRequest], gpu_blocks: int, host_blocks: int,
                   host_policy: str = "lru", block_size: int = 1, lifetimes: Lifetimes = Lifetimes(),
                   engine: EngineSteps = EngineSteps(), show_progress: bool | None = None,
                   desc: str = "replay (engine steps)", host_write_s: float = 0.0) -> SteppedStats:
    """Replay prepared requests (in arrival order) through a fresh ``SteppedTwoTierCache``."""
    t0 = time.perf_counter()
    cache = SteppedTwoTierCache(gpu_blocks, host_blocks, host_policy, block_size, lifetimes,
                                host_write_s=host_write_s, engine=engine)
    for pr in progress(prepared, desc, show_progress):
        cache.serve_at(pr)
    st = cache.finish()
    st.elapsed_s = time.perf_counter() - t0
    return st
