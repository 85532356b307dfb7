"""Concurrency replay on LMDeploy's step clock: prefill steps, decode steps and admission rules.

``concurrency.ConcurrentTwoTierCache`` starts a request at its arrival and runs it for
``output / decode rate``.  LMDeploy's engine does not: it runs one *step* at a time, and a step
either prefills newly admitted requests or decodes every running one, never both.  Requests
therefore start later, in bursts, and end later than that model says, and under a squeezed GPU
tier the order of starts and ends decides what is evicted (docs/planner.md "Validated against the
engine").  ``SteppedTwoTierCache`` keeps the same cache bookkeeping (pins, held slots, output
blocks, host copies in flight) and replaces the clock and the admission, with these rules of
LMDeploy 0.18's ``InputsMakerAsync.do_prefill_default``, ``_PrefillScheduler.schedule``,
``KVLoadCoordinator`` and ``RecomputeEvictionHelper.try_make_capacity_for`` (``EngineSteps``):

* time is counted in steps; one step lasts ``1 / decode_tokens_per_s`` seconds of the trace's
  clock (a decode step gives every running request one token);
* step ``k`` is scheduled at time ``k`` steps: a request that arrived by then can run in it;
* a step prefills when a request waits and one of: nothing runs, fewer than ``max_batches / 2``
  run, ``prefill_interval`` decode steps ran *while a request waited* (the count restarts when the
  queue is empty), or the prompts waiting reach ``max_prefill_tokens`` (summed over the queue when
  ``expect`` told the model the arrivals, as ``replay_stepped`` does); otherwise it decodes;
* a prefill step's pass first tries the requests whose loads completed, then the waiting ones in
  arrival order, while ``max_batches`` minus the requests running before the pass allows; a
  request arriving in time for the pass is tried in it.  Each attempt (``_attempt``): the token
  budget (a second request whose prompt less its GPU match exceeds what is left of
  ``max_prefill_tokens`` stops the pass, nothing evicted); then room for the whole prefill (the
  prompt plus ``prefill_interval`` preallocated tokens): cached GPU blocks are evicted up to the
  number missing (its matched prefix held) and those evictions stand even if it then does not fit
  (``attempt_evictions``); a request that does not fit beside what running requests and started
  loads hold stops the pass (a request larger than the whole tier runs when nothing runs and no
  load is in flight).  Running requests do not decode in a prefill step;
* a request whose prompt continues in the host tier *loads* instead: the connector's lookup
  refreshes its hit in the host tier and holds it while the attempt makes room for the whole
  prefill; the load starts only if the free blocks also cover the tails of the loads not
  prefilled yet (the soft budget), and takes only its matched and loaded blocks (later arrivals
  may use the rest).  It completes two steps later (its completion reaches the scheduler after the
  next step is scheduled): until then its blocks are not matched on the GPU and the host copies it
  reads stay pinned in the host tier.  Then, when a prefill is due, its tail is stored if it fits
  (else the pass stops at it, after evicting what it can).  A pass that starts a load goes on to
  the next waiting request (``LOAD_STARTED``: no batch slot, no token budget); a pass that only
  started loads is a decode step;
* a request's first output token comes from its prefill step, each further one from a decode
  step; it ends with its last token, and its blocks are free one step later.  Its output blocks
  stay cached only up to its last growth (LMDeploy's ``schedule_running`` attaches a decoding
  sequence's full blocks to the trie when it grows): the blocks its output filled after that
  are freed.

Counters (``SteppedStats``): ``prefill_steps``, ``decode_steps``, ``load_waits`` (requests that
waited for a host load), ``attempt_evictions``, plus ``ConcurrencyStats``
(``queued_requests``/``queue_delay_s``: requests that prefilled after the first step they could
have run in, and those waits).  Not modelled: preemption, a waiting request's blocks reclaimed for
another request, chunked prefill of long prompts, and a prefill step's own duration (a step is a
step).  Invariants: steps only move forward; a running request's end and block-growth events are
kept in *decode-step* counts, so a prefill step inserted while it runs delays them by one step, as
in the engine; a started load's blocks are pinned from its start and its tail's from its prefill,
and every pin is released at the request's end (``finish`` leaves no pin, hold or load).
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
        # the latest prefill: (step, requests, prompt tokens, the step after it, requests its pass may admit)
        self._batch = (-1, 0, 0, -1, 0)
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
        # blocks loads are writing: not in LMDeploy's trie (no GPU match) until the load completes
        self._loading: dict[int, int] = {}
        self._loading_of: dict[int, tuple] = {}
        self._pending: PreparedRequest | None = None    # the request being served, until it takes blocks
        self._arrivals: list[PreparedRequest] | None = None   # expect(): every request, in serve order
        self._firsts: list[int] = []
        self._index = -1

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
        if self._loading_of and self._loaded:
            # a load completes: its reads end (the connector's load completion) and LMDeploy
            # publishes its blocks in the trie, prefilled or not
            for ready, _, _, lpr in self._loaded:
                if ready <= self._step:
                    self._complete_load(lpr)

    def _complete_load(self, pr: PreparedRequest) -> None:
        blocks = self._loading_of.pop(id(pr), None)
        if blocks is None:
            return
        loading = self._loading
        for d in blocks:
            n = loading[d] - 1
            if n:
                loading[d] = n
            else:
                del loading[d]
        release = self._host_pending.pop(id(pr), None)
        if release is not None:
            self._clock = self._seconds(self._step)
            self.release_host_copies(release)

    def probe(self, pr: PreparedRequest) -> tuple[int, int]:
        g, h = super().probe(pr)
        loading = self._loading
        if loading and g:
            d = pr.digests
            for i in range(g):
                if d[i] in loading:
                    # a block a load is still writing is not matched on the GPU; its host copy
                    # stays in the host tier (read-pinned) until the load completes
                    m = pr.matchable
                    h = self.host.lookup(d[i:m], pr.block_bytes[i:m]) if self.host.num_slots else 0
                    return i, min(h, self.host.num_slots // 2)
        return g, h

    def _decode_until(self, step: int, waiting: bool = False) -> None:
        """Decide every step before ``step``: a prefill step when a loaded request is ready and the
        engine would prefill, else a decode step (or nothing, on an idle engine).  ``waiting``: a
        request waits to be admitted in these steps."""
        self._fire_due()
        while self._step < step:
            loaded = self._loaded
            ready = bool(loaded) and loaded[0][0] <= self._step
            if ready and self._prefill_due():
                was_live = self._live
                n, used, stopped = self._start_ready_loads()
                if n:
                    self._close_prefill(n, used, was_live, stopped)
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
            # LMDeploy counts decode steps towards prefill_interval only while a request waits
            self._since_prefill = self._since_prefill + n if (waiting or ready) else 0
            self.stats.decode_steps += n
            self._last_busy = max(self._last_busy, self._step - 1)
            self._fire_due()

    # -- admission ---------------------------------------------------------------------------
    def _tail_tokens(self, pr: PreparedRequest, served) -> int:
        """The prompt tokens a prefill computes, which LMDeploy charges to the step's
        ``max_prefill_tokens``: those after the matched and restored prefix."""
        return pr.request.input_length - (served[0] + served[1]) * self.block_size

    def _settle_at(self, step: int) -> None:
        """The clock at ``step``; the host copies begun ``host_write_s`` before it have landed."""
        self._clock = self._seconds(step)
        self._settle_writes(self._clock)

    def _probe_at(self, pr: PreparedRequest, step: int | None = None) -> tuple[int, int]:
        """``probe`` at ``step`` (default: now): (GPU-matched blocks, host hit)."""
        self._settle_at(self._step if step is None else step)
        return self.probe(pr)

    def _matched_tail(self, pr: PreparedRequest, step: int | None = None) -> int:
        """``_tail_tokens`` of a request not served yet, from its GPU match at ``step`` (default: now)."""
        return pr.request.input_length - self._probe_at(pr, step)[0] * self.block_size

    def _admission_blocks(self, input_length: int) -> int:
        """Blocks LMDeploy allocates when it admits a prompt: the prompt plus ``prefill_interval``
        preallocated tokens (``prealloc_size``)."""
        return -(-(input_length + self.engine.prefill_interval) // self.block_size)

    def _fits(self, pr: PreparedRequest) -> bool:
        """LMDeploy admits a prefill only if the prompt plus ``prefill_interval`` preallocated tokens
        fit beside what running requests and started loads hold (cached blocks can be evicted)."""
        total = self._admission_blocks(pr.request.input_length)
        return self._occupied() + total - self._pinned_run(pr, 0) <= self.stats.gpu_blocks

    def _pinned_run(self, pr: PreparedRequest, first: int) -> int:
        """How many of the request's blocks from ``first`` on are pinned by running requests, in a row
        (blocks it shares with them, which its admission does not take again)."""
        pins, d = self._pins, pr.digests
        n = first
        while n < len(d) and d[n] in pins:
            n += 1
        return n - first

    def _prefill_due(self) -> bool:
        """Would the engine run a prefill step now for the requests waiting?"""
        e = self.engine
        return (not self._live or self._since_prefill >= e.prefill_interval or self._live < e.max_batches * 0.5
                or self._waiting_tokens() >= e.max_prefill_tokens)

    def _waiting_tokens(self) -> int:
        """The prompt tokens LMDeploy's waiting queue holds now (it prefills once they reach
        ``max_prefill_tokens``): the loads completed and not prefilled (their tails), the request
        being served if it arrived, and, when the arrivals are known (``expect``), the later ones
        that arrived by now (whole prompts: their matches are rolled back while they wait)."""
        step, cap = self._step, self.engine.max_prefill_tokens
        total = 0
        for ready, _, part, lpr in self._loaded:
            if ready <= step:
                total += self._tail_tokens(lpr, part)
        pending = self._pending
        if pending is not None and math.ceil(pending.request.timestamp * self._rate) <= step:
            total += pending.request.input_length
        arrivals = self._arrivals
        if arrivals is not None:
            firsts, j = self._firsts, self._index + 1
            while j < len(arrivals) and firsts[j] <= step and total < cap:
                total += arrivals[j].request.input_length
                j += 1
        return total

    def expect(self, prepared: Sequence[PreparedRequest]) -> None:
        """Tell the model the requests ``serve_at`` will be given, in that order, so that a request
        waiting sees the ones that arrived after it (LMDeploy's prefill rule sums the waiting queue)."""
        self._arrivals = list(prepared)
        self._firsts = [math.ceil(p.request.timestamp * self._rate) for p in self._arrivals]
        self._index = -1

    def _start_ready_loads(self) -> tuple[int, int, bool]:
        """A prefill pass at the current step first tries the requests whose loads completed (first
        come, first served): each starts if its tail (the prompt past the loaded blocks, plus the
        preallocation) fits, within the batch and token limits.  Returns (started, their prefill
        tokens, whether the pass stopped there: LMDeploy's STOP, which no later request passes)."""
        e = self.engine
        step, n, used = self._step, 0, 0
        was_live = self._live
        loaded = self._loaded
        while loaded and loaded[0][0] <= step:
            if n >= e.max_batches - was_live:
                return n, used, True
            _, _, part, lpr = loaded[0]
            tokens = self._tail_tokens(lpr, part)
            if n and used + tokens > e.max_prefill_tokens:
                return n, used, True
            if not self._tail_fits(lpr, part) and (self._live or n):
                self.stats.attempt_evictions += self._make_tail_room(lpr, part)
                return n, used, True
            heapq.heappop(loaded)
            self._start(lpr, self._finish_load(lpr, part), step)
            n, used = n + 1, used + tokens
        return n, used, False

    def _close_prefill(self, n: int, used: int, was_live: int, stopped: bool = False) -> None:
        """The step just decided was a prefill of ``n`` requests (``used`` prompt tokens); ``stopped``:
        its pass stopped at a request that did not fit, so no later arrival joins it."""
        step = self._step
        if was_live or self._last_busy >= step - 1:
            self._step += 1
        # else: an idle engine (no forward in the previous step) dispatches the prefill and, at once,
        # the next step's forward, since nothing was scheduled ahead: both happen in one time slot
        self._last_busy = max(self._last_busy, step)
        self._since_prefill = 0
        self.stats.prefill_steps += 1
        self._batch = (step, n, used, -1 if stopped else self._step, self.engine.max_batches - was_live)

    def _admit(self, pr: PreparedRequest) -> None:
        """Serve ``pr`` at the step the engine admits it, or at the step its host load starts."""
        e = self.engine
        r = pr.request
        first = math.ceil(r.timestamp * self._rate)
        tokens = r.input_length
        step, n, used, after, cap = self._batch
        if after == self._step and first <= step and n < cap:
            # the pass of the step just decided (or, ``n == 0``, of the step whose pass so far only
            # started loads) reaches this request too
            outcome = self._attempt(pr, step, n, used)
            if outcome == "admitted":
                if not n:             # the pass's first prefill: the step is a prefill step
                    self._close_prefill(1, self._tail_tokens(pr, self._served), e.max_batches - cap)
                else:
                    self._batch = (step, n + 1, used + self._tail_tokens(pr, self._served), after, cap)
                return
            if outcome == "load":
                return
            self._batch = (step, n, used, -1, cap)    # the pass stopped here
            if not n:                 # no prefill in it: the step decodes (the loads ship with it)
                self._decode_until(step + 1, waiting=True)
        self._decode_until(max(first, self._step))
        while True:
            idle = not self._live and not self._loaded
            if idle or (self._prefill_due() and self._live < e.max_batches):
                was_live = self._live
                n, used, stopped = self._start_ready_loads()
                if not stopped and self._live < e.max_batches:
                    idle = not self._live and not self._loaded
                    outcome = self._attempt(pr, self._step, n, used, idle)
                    if outcome == "admitted":
                        self._close_prefill(n + 1, used + self._tail_tokens(pr, self._served), was_live)
                        return
                    if outcome == "load":
                        if n:
                            self._close_prefill(n, used, was_live)
                        else:   # LMDeploy's pass goes on after a load starts: the next arrival joins it
                            self._batch = (self._step, 0, 0, self._step, e.max_batches - was_live)
                        return
                if n:
                    self._close_prefill(n, used, was_live, True)
                    self._fire_due()
                    continue
            self._decode_until(self._step + 1, waiting=True)

    def _attempt(self, pr: PreparedRequest, step: int, n: int, used: int, idle: bool = False) -> str:
        """One admission attempt of ``pr`` in the pass of ``step`` that admitted ``n`` requests of
        ``used`` prompt tokens so far, in LMDeploy's order: the token budget gate (nothing evicted
        when it refuses), then the resources (room for the whole prefill, evicting cached blocks;
        for a host hit, looked up and held by the connector, then the loads' soft budget), then the
        allocation.  Returns "admitted" (prefills in this step), "load" (its load starts) or "stop"
        (the pass stops at it; ``attempt_evictions`` counts what its attempt evicted)."""
        if n and used + self._matched_tail(pr, step) > self.engine.max_prefill_tokens:
            return "stop"
        fits = idle or self._fits(pr)
        g, h = self._probe_at(pr, step)
        if h:
            self.host.touch(pr.digests[g:g + h])      # the connector's lookup refreshes its hit
            evicted = self._make_room(pr, step, hold_host_hit=True)
            if fits and (idle or self._soft_budget_ok(pr)):
                self._start_load(pr, step)
                return "load"
            self.stats.attempt_evictions += evicted
            return "stop"
        if not fits:
            self.stats.attempt_evictions += self._make_room(pr, step)
            return "stop"
        self._serve_now(pr, step)
        self._start(pr, self._served, step)
        return "admitted"

    def _start_load(self, pr: PreparedRequest, step: int | None = None) -> None:
        """The load starts in this step (not a prefill: running requests decode in it): only the GPU
        match and the host hit's destinations are taken (LMDeploy allocates the loaded interval);
        the request waits for a prefill step two or more steps later, others may start meanwhile."""
        step = self._step if step is None else step
        self._settle_at(step)
        self._pending = None
        g, restored, covered = self.serve_blocks(pr, defer_host_release=True, load_only=True)
        if self.host_release is not None:
            self._host_pending[id(pr)] = self.host_release
        written = tuple(pr.digests[g:g + restored])
        self._loading_of[id(pr)] = written
        for d in written:
            self._loading[d] = self._loading.get(d, 0) + 1
        pinned = self._pin(pr.digests[:g + covered])
        # the load ships with this step (a forward of its own if need be) and the engine runs
        # connector steps until it completes: not idle when the request is ready
        self._last_busy = max(self._last_busy, step + 1)
        self.stats.load_waits += 1
        if self.schedule is not None:
            self.schedule.append((step, "load", self._position[id(pr)]))
        self._served = (g, restored, pinned, [])
        heapq.heappush(self._loaded, (step + 2, self._n_loaded, (g, restored, pinned, g + covered), pr))
        self._n_loaded += 1

    def _pin(self, digests) -> tuple:
        """Pin the ones of ``digests`` the GPU tier holds (stored now or already there: LMDeploy's trie
        deduplicates a block whose twin it caches) for a request; returns them."""
        resident = self.gpu.is_resident
        pinned = tuple(d for d in digests if resident(d))
        if pinned:
            self.gpu.prepare_load(pinned)
            pins = self._pins
            for d in pinned:
                pins[d] = pins.get(d, 0) + 1
        return pinned

    def _finish_load(self, pr: PreparedRequest, part) -> tuple:
        """A loaded request's prefill: its tail is stored and its preallocation held now."""
        g, restored, pinned, k = part
        self._settle_at(self._step)
        self._make_tail_room(pr, part)     # room for the tail first, as LMDeploy's capacity making
        covered = self.store_blocks(pr, k)
        pinned = pinned + self._pin(pr.digests[k:k + covered])
        return g, restored, pinned, self._hold_rest(pr, pinned)

    def _tail_blocks(self, pr: PreparedRequest, part) -> int:
        return max(0, self._admission_blocks(pr.request.input_length) - len(part[2]))

    def _tail_fits(self, pr: PreparedRequest, part) -> bool:
        shared = self._pinned_run(pr, part[3])
        return self._occupied() + self._tail_blocks(pr, part) - shared <= self.stats.gpu_blocks

    def _make_tail_room(self, pr: PreparedRequest, part) -> int:
        """``_make_room`` for a loaded request's tail (its matched and loaded blocks are pinned)."""
        self._settle_at(self._step)
        missing = self._tail_blocks(pr, part) - self.gpu.num_free_slots
        return self.gpu.evict(missing) if missing > 0 else 0

    def _soft_budget_ok(self, pr: PreparedRequest) -> bool:
        """LMDeploy's ``can_admit_load``: the free blocks cover this load's whole prefill and the tails
        of the loads not prefilled yet (a soft reservation that only loads respect)."""
        g, _ = self.probe(pr)
        reserved = sum(self._tail_blocks(lpr, part) for _, _, part, lpr in self._loaded)
        return self._admission_blocks(pr.request.input_length) - g + reserved <= self.gpu.num_free_slots

    def _make_room(self, pr: PreparedRequest, step: int, hold_host_hit: bool = False) -> int:
        """LMDeploy's ``try_make_capacity_for`` for ``pr``'s whole prefill at ``step``: cached GPU blocks
        are evicted (up to the blocks missing beside the free ones; the request's matched prefix is
        held by its tentative match, and with ``hold_host_hit`` its host hit by the connector's
        lookup, so the demotions cannot push it out of the host tier).  The evictions stand whether
        or not the request is then admitted.  Returns how many blocks were evicted."""
        self._settle_at(step)
        gpu = self.gpu
        g, h = self.probe(pr)
        missing = self._admission_blocks(pr.request.input_length) - g - gpu.num_free_slots
        if missing <= 0:
            return 0
        matched, hit = pr.digests[:g], (pr.digests[g:g + h] if hold_host_hit else ())
        if matched:
            gpu.prepare_load(matched)
        if hit:
            self.host.prepare_load(hit)
        evicted = gpu.evict(missing)
        if hit:
            self.host.complete_load(hit, False)
        if matched:
            gpu.complete_load(matched, False)
        return evicted

    # -- serving -----------------------------------------------------------------------------
    def _serve_now(self, pr: PreparedRequest, step: int | None = None) -> None:
        """The request takes its blocks (GPU hits, host restores, stored misses) and pins them, at
        ``step`` (default: the current one)."""
        # LMDeploy makes room for every block past the match before it allocates them (a block whose
        # twin the trie caches is deduplicated only afterwards, and that twin may be evicted first)
        self._make_room(pr, self._step if step is None else step)
        self._pending = None
        g, restored, stored = self.serve_blocks(pr)
        pinned = self._pin(pr.digests[:g + stored])
        self._served = (g, restored, pinned, self._hold_rest(pr, pinned))

    def _hold_rest(self, pr: PreparedRequest, pinned: tuple) -> list[int]:
        """Hold the blocks of the request's admission (prompt plus preallocation) beyond its pinned
        ones: its partial block and the preallocated tokens."""
        held = self._hold(max(0, self._admission_blocks(pr.request.input_length) - len(pinned)))
        self._held_now += len(held)
        st = self.stats
        st.max_held_blocks = max(st.max_held_blocks, self._occupied())
        return held

    def _start(self, pr: PreparedRequest, served, step: int) -> None:
        """``pr`` runs from its prefill in ``step``: its end and block growth, in decode steps."""
        r = pr.request
        bs = self.block_size
        if id(pr) in self._loading_of:
            self._complete_load(pr)
        else:
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
        state = _Running(pinned, held, pr.digests[-1] if pr.digests else pr.root, 0, self._n)
        self._n += 1
        d0 = self._decoded              # the prefill step gives token 1; decode step d0 + i gives token i + 1
        self._push(d0 + max(0, r.output_length - 1), 0, state)
        blocks = self._admission_blocks(r.input_length)   # taken on admission (_serve_now)
        for i in range(1, r.output_length + 1):
            need = -(-(r.input_length + i) // bs)
            if need > blocks:
                blocks = need
                self._push(d0 + i - 1, 1, state)
                # LMDeploy attaches a decoding sequence's full blocks to its trie only when it grows
                # (``schedule_running``: ``block_trie.allocate`` after the growth), then holding
                # input + i - 1 tokens; the blocks filled after its last growth are freed at its end
                state.ghosts = (r.input_length + i - 1) // bs - r.input_length // bs
        self._live += 1
        self.stats.max_running = max(self.stats.max_running, self._live)

    def serve_at(self, pr: PreparedRequest) -> tuple[int, int]:
        """Serve ``pr`` (requests in arrival order); returns (GPU-hit blocks, host-restored blocks)."""
        if self.schedule is not None:
            self._position[id(pr)] = len(self._position)
        self._served = None
        if self._arrivals is not None:
            self._index += 1
            if self._index >= len(self._arrivals) or self._arrivals[self._index] is not pr:
                self._arrivals = None        # not the order expect() was told: the queue is unknown
        self._pending = pr
        self._admit(pr)
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
    cache.expect(prepared)
    for pr in progress(prepared, desc, show_progress):
        cache.serve_at(pr)
    st = cache.finish()
    st.elapsed_s = time.perf_counter() - t0
    return st
