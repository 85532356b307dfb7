"""Concurrency replay on LMDeploy's step clock: prefill steps, decode steps and admission rules.

``concurrency.ConcurrentTwoTierCache`` starts a request at its arrival and runs it for
``output / decode rate``.  LMDeploy's engine does not: it runs one *step* at a time, and a step
either prefills newly admitted requests, runs one chunk of a long prompt, or decodes every running
one.  Requests therefore start later, in bursts, and end later than that model says, and under a
squeezed GPU tier the order of starts and ends decides what is evicted (docs/planner.md "Validated
against the engine").  ``SteppedTwoTierCache`` keeps the same cache bookkeeping (pins, held slots,
output blocks, host copies in flight) and replaces the clock and the admission with an engine loop
that follows LMDeploy 0.18's ``InputsMakerAsync.do_prefill_default`` and ``_ForwardInputsTask``,
``_PrefillScheduler.schedule`` and its reorderer, ``KVLoadCoordinator`` and
``RecomputeEvictionHelper.try_make_capacity_for`` (settings: ``EngineSteps``).

The loop (``serve_at`` gives it the requests in arrival order; it decides every step before the
newest arrival, ``finish`` the rest; ``results`` holds each request's hits once it is served):

* time is counted in steps; one step lasts ``1 / decode_tokens_per_s`` seconds of the trace's
  clock (a decode step gives every running request one token);
* step ``k`` is scheduled at time ``k`` steps: a request that arrived by then waits in it;
* a prefill is due when a request waits and one of: nothing runs, fewer than ``max_batches / 2``
  run, ``prefill_interval`` decode steps ran *while a request waited* (the count restarts when the
  queue is empty), or the prompts waiting reach ``max_prefill_tokens``; otherwise the step decodes;
* a prefill pass tries the requests whose loads completed first (arrival order), then the queue in
  its turn policy's order, while ``max_batches`` minus the requests running allows.  With no long
  prompt waiting the order is arrival order.  Each attempt (``_attempt``) matches the prompt in the
  trie (refreshing the matched blocks' access times), then: the token budget (a second request
  whose prompt less its GPU match exceeds what is left of ``max_prefill_tokens`` is refused,
  nothing evicted); room for the whole prefill (the prompt plus ``prefill_interval`` preallocated
  tokens): cached GPU blocks are evicted up to the number missing (its matched prefix held) and
  those evictions stand even if it then does not fit (``attempt_evictions``); a request that does
  not fit beside what running requests and started loads hold is refused (one larger than the
  whole tier runs when nothing runs and no load is in flight).  A refusal stops the pass, except on
  a short-only turn, where it skips the request; a refusal after the capacity making refreshes the
  matched blocks again (``_rollback``: LMDeploy's rollback frees them, which stamps them);
* **long prompts** (longer than ``max_prefill_tokens`` before any match) are prefilled in chunks of
  ``max_prefill_tokens`` tokens, one long prompt at a time (``_Chunked``), each chunk a forward of
  its own that allocates only its own blocks (the last one adds the preallocation and gives the
  first token).  While one waits, a prefill turn is first a *short-only* pass (short prompts,
  smallest first; a long prompt whose match leaves at most one chunk counts as short) and, when
  that admits nothing or ``short_turns`` short passes ran since the latest chunk, a *long-first*
  pass: the smallest long prompt (in chunks, less one chunk per ``long_aging_s`` of waiting; with
  ``long_policy`` ``fifo``, the earliest) first, then the short ones, smallest first; a long
  prompt's first chunk ends the pass.  After a chunk the decode step goes first; the next chunk
  waits for up to ``short_turns`` short passes; the last chunk is never deferred.  A chunk's blocks
  are reserved like an admission;
* **reclaim**: when the free blocks do not cover what an admission attempt, a chunk or a decode
  step's growth needs, the engine first takes the blocks of requests whose load completed and that
  wait for their prefill (LMDeploy's eviction helper with the connector's reclaim of completed
  loads: for an attempt, from the back of the pass's queue, those it has not tried yet, then those it
  skipped, the last first in each (``_evictable_sequences``); for the next chunk of the prompt being
  chunked and for a growth, all of them, in the order they completed), one at a time, each followed
  by cached-block evictions
  (``_reclaim_queued``, ``_reclaim_load``: the request goes back to the queue; its loaded blocks
  stay cached and count as restored when it matches them again);
* a request whose prompt continues in the host tier *loads* instead: the connector's lookup
  refreshes its hit in the host tier and holds it while the attempt makes room for the whole
  prefill; the load starts only if the free blocks also cover the soft reservations (the tails of
  the loads not prefilled yet, the chunks still to come of a chunked prompt), and takes only its
  matched and loaded blocks (later arrivals may use the rest).  It completes two steps later (its
  completion reaches the scheduler after the next step is scheduled), one more per further step its copy
  takes and ``load_delay_steps`` more (``EngineSteps.load_steps``; the engine is busy until then): until
  then its blocks are not matched on the GPU and the host copies it reads stay pinned in the host tier.
  A load whose hit includes blocks another load is still writing takes destinations of its own for them too and
  restores them (LMDeploy's trie does not hold them yet); those duplicate blocks are freed when it
  completes (``_publish`` deduplicates them back to the trie's), and no admission counts such blocks
  as shared with the load that writes them.  Then, when a prefill is due, its tail is stored if it fits (else the pass stops at it, after evicting what it
  can).  A pass goes on after a load starts (``LOAD_STARTED``: no batch slot, no token budget); a
  step whose passes only started loads decodes;
* a request's first output token comes from its prefill step (or last chunk), each further one
  from a decode step; it ends with its last token, and its blocks are free one step later.
  **Growth** (``_grow_due``, LMDeploy's ``schedule_running``): a running request takes one more
  block at a *decode* step whose scheduler has seen tokens that fill what it holds.  The
  scheduler sees a forward's token two steps after it (the next step is scheduled before the
  output is read), so in a run of decode steps the growth comes one decode step after the token
  that fills the last slot, and at the first decode step after a prefill or a chunk it comes one
  decode step sooner; a growth due at a prefill step waits for the next decode step.  When no
  block is free, the eviction helper first reclaims completed loads waiting for their prefill
  (one at a time, each followed by cached-block evictions), then evicts (the host copies that
  landed before the step are resident by then, pass or no pass: its demotions may evict them); the
  running requests are served from the latest admitted.  **Preemption** (``_preempt``): a request still without a block
  is preempted.  As in LMDeploy it keeps its blocks (*parked*, ``_Parked``) and its continuation (the
  prompt and the output the scheduler has seen: the token of the forward in flight is dropped) waits
  at its arrival's place as a one-token prompt (the seen token not computed yet).  A prefill pass
  that admits it resumes it with its blocks plus what its preallocation needs (``_attempt_parked``;
  its full blocks join the trie then); a capacity making that reaches it first (an admission's, from
  the back of the pass's queue; a growth's or a chunk's, in waiting order, beside the completed
  loads) takes its blocks (``_reclaim_parked``: its prompt's and the output blocks of its last growth
  stay cached) and it is then a whole prompt, prefilled again.  Its hits are not counted again either
  way.  A decode step whose requests were all preempted runs no forward.  A request's output blocks
  stay cached only up to its last growth (``schedule_running`` attaches a decoding sequence's full
  blocks to the trie when it grows): the blocks its output filled after that are freed.  Those it keeps
take the trace's ``output_hash_ids`` where it names them (``concurrency._end``), so a later prompt that
re-sends the reply hits them; a preempted request's continuation names its prompt's output blocks by them too.  An idle
  engine (no forward in the previous step) dispatches a forward and the next step's at once: both take
  one time slot, and it reads the first forward's output before it schedules again, so the host copies
  that forward's scheduling started land a step sooner (``_sooner_writes``).

Counters (``SteppedStats``): ``prefill_steps``, ``decode_steps``, ``chunk_steps`` (every chunk's
forward, a continuation's too), ``chunked_requests`` (requests prefilled in chunks, their own prompt or
a continuation after a preemption: each once), ``load_waits`` (requests that waited for a host load:
those whose counted admission is a load; a load reclaimed before its prefill is taken back, and a
continuation's load is not counted, as its hits are not), ``reclaimed_loads`` (loads, a continuation's
included), ``attempt_evictions``, ``preemptions`` (of which ``resumed_preemptions`` resumed with their
blocks and ``reclaimed_preemptions`` lost them to a capacity making), plus ``ConcurrencyStats``
(``queued_requests``/``queue_delay_s``: requests whose prefill (or first chunk) ran after the first
step they could have run in, and those waits). A trace request counts once in each per-request counter
however often it is preempted: ``gpu_overflow_requests`` too (a continuation counts as its request,
``_overflow_key``). Not modelled: a forward's own duration (a step is a step). Invariants: steps only
move forward; a running request's end and block-growth events are kept in *decode-step* counts, so a
prefill or chunk step inserted while it runs delays them by one step, as in the engine (a growth is
taken only at a decode step, ``_grow_due``); a started load's blocks are pinned from its start and its
tail's from its prefill, a chunked prompt's from its chunks, a preempted request's stay pinned and held
while it is parked; every pin is released at the request's end or when its load or its parked blocks are
reclaimed (``finish`` leaves no pin, hold, load, chunk or parked request).

Cost: LMDeploy tries every queued request in a short-only pass and each try refreshes its match, so
a saturated queue costs the model work that grows with its square; the GPU tier (``_GpuTierIndex``:
a lazy LRU heap, an inlined touch), a per-request match cache keyed by the GPU tier's version and
skipping a short-only pass that would repeat one that changed nothing (``_pass_state``), the queue's
turn orders kept until it changes (``_view``; the long-first order as a lazy merge of chunk-count
groups) and, when a short-only pass would skip the same long prompts with the same matches as the last
one that skipped them all, one refresh per block in last-refresh order (``_skip_refresh``) keep that
cheaper without changing any result: the GPU tier's LRU order depends only on the order of last
refreshes.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import Sequence

from ..tier.eviction import LRUPolicy
from ..tier.host_index import HostIndex
from .concurrency import ConcurrencyStats, ConcurrentTwoTierCache, Lifetimes, _Running, decode_growth_tokens
from .replay import PreparedRequest, progress
from .traces import Request

# LMDeploy 0.18 PytorchEngineConfig defaults (max_batch_size is chosen per device: an assumption here)
DEFAULT_PREFILL_INTERVAL = 16
DEFAULT_MAX_PREFILL_TOKENS = 8192
DEFAULT_MAX_BATCHES = 128
DEFAULT_SHORT_TURNS = 3       # LMDEPLOY_PT_TTFT_SHORT_TURNS
DEFAULT_LONG_AGING_S = 2.0    # LMDEPLOY_PT_TTFT_AGING_SEC
LONG_POLICIES = ("size", "fifo")   # LMDEPLOY_PT_TTFT_POLICY (LMDeploy's default first)


@dataclass(frozen=True)
class EngineSteps:
    """The engine's admission settings the step model follows (LMDeploy's names in brackets)."""

    max_batches: int = DEFAULT_MAX_BATCHES                 # (max_batch_size)
    prefill_interval: int = DEFAULT_PREFILL_INTERVAL       # (prefill_interval)
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS   # (max_prefill_token_num)
    # the long-prefill lane's settings (environment: LMDEPLOY_PT_TTFT_SHORT_TURNS, LMDEPLOY_PT_TTFT_AGING_SEC,
    # LMDEPLOY_PT_TTFT_POLICY)
    short_turns: int = DEFAULT_SHORT_TURNS                 # short prefill passes between two long chunks
    long_aging_s: float = DEFAULT_LONG_AGING_S             # a waiting long prompt gains one chunk of priority per
    long_policy: str = LONG_POLICIES[0]                    # "size": fewest chunks first, aged; "fifo": arrival order
    # how long a host load's copy takes (an assumption, like the decode rate): a load lands 2 steps after it starts
    # when its copy fits in a step, later otherwise (``load_steps``)
    load_delay_steps: int = 0                              # steps every load takes beyond that, whatever its size
    load_block_s: float = 0.0                              # seconds of the trace's clock one block's copy takes

    def __post_init__(self) -> None:
        for name in ("max_batches", "prefill_interval", "max_prefill_tokens", "short_turns"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        v = self.long_aging_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"long_aging_s must be a number > 0, got {v!r}")
        v = self.load_delay_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"load_delay_steps must be an int >= 0, got {v!r}")
        v = self.load_block_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"load_block_s must be a finite number >= 0, got {v!r}")
        if self.long_policy not in LONG_POLICIES:
            raise ValueError(f"long_policy must be one of {', '.join(LONG_POLICIES)}, got {self.long_policy!r}")

    def load_steps(self, blocks: int, steps_per_s: float) -> int:
        """The steps from a host load's start to the step that sees it complete, for a load of ``blocks``
        blocks: 2 when its copy takes at most one step (the connector polls it in the next step, whose
        completion reaches the scheduler after the step after is scheduled), one more per further step the
        copy takes (``blocks`` x ``load_block_s`` seconds, ``steps_per_s`` steps a second), plus
        ``load_delay_steps``.  The harness's ``copy_delay_polls`` = k lands every copy k polls later: k here."""
        copy_steps = blocks * self.load_block_s * steps_per_s
        return 2 + self.load_delay_steps + max(0, math.ceil(copy_steps - 1e-9) - 1)

    def describe(self) -> str:
        load = ""
        if self.load_block_s:
            ms = self.load_block_s * 1e3
            load += f", a host load copies a block in {ms:,.0f} ms" if ms >= 100 else \
                f", a host load copies a block in {ms:.3g} ms"
        if self.load_delay_steps:
            load += f", every host load takes {self.load_delay_steps} more step(s)"
        return (f"LMDeploy step model: max_batches {self.max_batches}, prefill_interval {self.prefill_interval}, "
                f"max_prefill_tokens {self.max_prefill_tokens}{load}")

    def as_dict(self) -> dict:
        return {"max_batches": self.max_batches, "prefill_interval": self.prefill_interval,
                "max_prefill_tokens": self.max_prefill_tokens, "short_turns": self.short_turns,
                "long_aging_s": self.long_aging_s, "long_policy": self.long_policy,
                "load_delay_steps": self.load_delay_steps, "load_block_s": self.load_block_s}


@dataclass
class SteppedStats(ConcurrencyStats):
    prefill_steps: int = 0
    decode_steps: int = 0
    chunk_steps: int = 0          # forwards of one long prompt's chunk (the last one included)
    chunked_requests: int = 0     # requests prefilled in chunks (their prompt, or a continuation's): each once
    load_waits: int = 0           # requests whose counted admission waited for a host load (not continuations')
    reclaimed_loads: int = 0      # loads whose blocks a chunk or an admission took before they prefilled
    attempt_evictions: int = 0    # GPU blocks evicted by admission attempts that found too little room
    preemptions: int = 0          # running requests sent back to the queue: no block for their growth
    resumed_preemptions: int = 0  # preempted requests admitted again with the blocks they kept
    reclaimed_preemptions: int = 0   # preempted requests whose blocks a capacity making took (prefilled again)


# LMDeploy's prefill turn policies (``_PrefillTurnPolicy``): STANDARD tries the queue in arrival order and
# may start a long prompt's first chunk; SHORT_ONLY tries short prompts (smallest first) and skips long
# ones; LONG_FIRST tries the smallest long prompt first, then the short ones, smallest first
STANDARD, SHORT_ONLY, LONG_FIRST = "standard", "short-only", "long-first"


class _GpuTierIndex(HostIndex):
    """The step model's GPU tier: ``HostIndex`` with ``LRUPolicy`` (an access pushes nothing: a heap
    entry lagging its block's access time is pushed again at it when it reaches the top) and a ``touch``
    that does ``_access``'s work inline, since queued requests touch their matched blocks in every pass."""

    def __init__(self, num_slots: int, verify_tokens: bool, on_evict) -> None:
        super().__init__(num_slots, policy=LRUPolicy(), verify_tokens=verify_tokens, on_evict=on_evict)

    def touch(self, digests) -> None:
        blocks, clock = self._blocks, self._clock
        for d in digests:
            b = blocks.get(d)
            if b is not None and not b.doomed:
                clock += 1
                b.last_access = clock
                b.hits += 1
        self._clock = clock


def _last_refresh_order(matches: list) -> tuple:
    """The blocks refreshed by refreshing each of ``matches`` in turn (each parent-first), once each, in the
    order of their last refresh: refreshing these in this order leaves the LRU order the whole sequence
    leaves (the GPU tier's order is by last refresh alone)."""
    seen: set = set()
    order = []
    for matched in reversed(matches):
        for d in reversed(matched):
            if d not in seen:
                seen.add(d)
                order.append(d)
    order.reverse()
    return tuple(order)


class _Chunked:
    """A prompt being prefilled in chunks (LMDeploy's ``LongContextChunker``): one at a time."""

    __slots__ = ("pr", "done", "pinned", "held", "stored_to", "admitted", "g", "restored")

    def __init__(self, pr: PreparedRequest, done: int, pinned: tuple, stored_to: int, admitted: int,
                 g: int, restored: int) -> None:
        self.pr = pr
        self.done = done              # prompt tokens computed (or matched, or loaded) so far
        self.pinned = pinned          # its blocks in the trie, pinned
        self.held: list[int] = []     # the slot of the partial block at the end of the latest chunk
        self.stored_to = stored_to    # blocks [0, stored_to) are its pinned ones
        self.admitted = admitted      # the step of its first chunk
        self.g, self.restored = g, restored


class _Parked:
    """A preempted request waiting in the queue with the blocks it kept (LMDeploy's preempted sequence: WAITING,
    its blocks and its step kept, until a capacity making reclaims them or a prefill pass resumes it)."""

    __slots__ = ("run", "cont", "since")

    def __init__(self, run: _Running, cont: PreparedRequest, since: int) -> None:
        self.run = run        # its state when it was preempted: its pins and held slots are still taken
        self.cont = cont      # its continuation (prompt and output seen), queued at its arrival's place
        self.since = since    # the step it re-entered the waiting queue in


class SteppedTwoTierCache(ConcurrentTwoTierCache):
    """``ConcurrentTwoTierCache`` on LMDeploy's step clock; see the module docstring."""

    def __init__(self, gpu_blocks: int, host_blocks: int, host_policy: str = "lru", block_size: int = 1,
                 lifetimes: Lifetimes = Lifetimes(), verify_tokens: bool = True, host_write_s: float = 0.0,
                 engine: EngineSteps = EngineSteps(), record: bool = False, min_restore_tokens: int = 0) -> None:
        super().__init__(gpu_blocks, host_blocks, host_policy, block_size, lifetimes, verify_tokens, host_write_s,
                         min_restore_tokens)
        self.gpu = _GpuTierIndex(gpu_blocks, verify_tokens, self._demote)
        st = self.stats
        self.stats = SteppedStats(st.block_size, st.gpu_blocks, st.host_blocks, st.host_policy)
        self.engine = engine
        self._rate = float(lifetimes.decode_tokens_per_s)   # steps per second of the trace's clock
        self._step = 0            # the first step not decided yet
        self._decoded = 0         # decode steps so far (running requests' ends count these)
        self._last_decode_step = -2   # the step of the latest decode step
        self._empty_step = -2         # the latest step whose decode lost every request to preemption
        # block growths of running requests: (decode steps that must have run, order, its prefill step, request,
        # its output blocks in the trie after it)
        self._growths: list[tuple[int, int, int, _Running, int]] = []
        self._decode_count = 0    # LMDeploy's _decode_count: decode steps decided while a request waited
        self._short_turns = 0     # short prefill passes since the latest long chunk
        self._last_kind = None    # the kind of the latest forward ("prefill", "chunk", "last chunk", "decode")
        self._chunked: _Chunked | None = None
        self._ending: list[tuple[int, int, _Running]] = []   # (step its end is seen, order, request)
        # requests whose host load started: (first step they may prefill in, order, their blocks, request)
        self._loaded: list[tuple[int, int, tuple, PreparedRequest]] = []
        self._n_loaded = 0
        self._last_busy = -2      # the latest step that ran a forward (or shipped a load)
        # record=True: (step, "prefill" | "load" | "chunk", the request's position in serve order) per event
        self.schedule: list[tuple[int, str, int]] | None = [] if record else None
        self._position: dict[int, int] = {}
        self._first: dict[int, int] = {}           # id(pr) -> the first step it can run in
        # per request in serve order: (GPU-hit blocks, host-restored blocks), once it is served
        self.results: list[tuple[int, int] | None] = []
        # loads started: the host copies they read stay pinned until their prefill (id(pr) -> release)
        self._host_pending: dict[int, tuple] = {}
        # blocks loads are writing: not in LMDeploy's trie (no GPU match) until the load completes
        self._loading: dict[int, int] = {}
        self._loading_of: dict[int, tuple] = {}
        # id(pr) -> the slots its load took for blocks another load was writing (freed when it completes)
        self._load_twins: dict[int, list] = {}
        self._waiting: list[PreparedRequest] = []   # arrived, not admitted, no load started (arrival order)
        self._future: list[PreparedRequest] = []    # given to serve_at, not arrived yet (arrival order)
        self._served = None
        self._match_cache: dict[int, tuple] = {}     # id(pr) -> (GPU tier version, its GPU match)
        self._loading_version = 0                     # counts changes of _loading
        self._waiting_version = 0                     # counts changes of _waiting
        self._idle_pass: tuple | None = None          # the state a short-only pass that changed nothing left
        # (_waiting_version, short prompts by size, long ones in arrival order, long ones by chunk count): _view
        self._queue_view: tuple | None = None
        # the long prompts a short-only pass skipped, all of them: (what they depend on, their blocks in refresh order)
        self._skip_refresh: tuple | None = None
        self._reloaded: dict[int, set] = {}          # id(pr) -> block indices its reclaimed loads restored
        self._load_short: dict[int, int] = {}        # id(pr) -> short host hits its pending load counted
        # within a pass: the completed loads it skipped and those it has not tried yet (LMDeploy's
        # ``skipped_waiting + waiting``, the requests an admission's capacity making may reclaim)
        self._pass_skipped: list | None = None
        self._pass_pending: list | None = None
        # the connector's holds of this step's lookups (id(pr) -> the host hit it holds) and their blocks
        self._step_holds: dict[int, tuple] = {}
        self._step_held = 0
        # the continuations of preempted requests, by id (kept alive: the ids key per-request state)
        self._continues: dict[int, PreparedRequest] = {}
        # the preempted requests that still hold their blocks, by id of their continuation (in ``_waiting``),
        # in preemption order
        self._parked: dict[int, _Parked] = {}
        # the positions of the requests counted in ``chunked_requests`` (a continuation shares its request's)
        self._chunked_positions: set[int] = set()

    # -- the clock ---------------------------------------------------------------------------
    def _seconds(self, step: float) -> float:
        return step / self._rate

    def _process_next(self) -> float:
        """A request's last token: its step just ran; the engine schedules the next step before it sees
        the request end, so its blocks are free for the step after that (block growths are not in this
        heap: ``_grow_due``)."""
        t, _, order, r = heapq.heappop(self._running)
        if r.ended:
            return t        # preempted: its continuation runs under a state of its own
        self._clock = self._seconds(self._step)
        heapq.heappush(self._ending, (self._step + 1, order, r))
        return t

    def _fire_due(self) -> None:
        running, ending = self._running, self._ending
        while running and running[0][0] <= self._decoded:
            self._process_next()
        while ending and ending[0][0] <= self._step:
            r = heapq.heappop(ending)[2]
            if r.ended:
                continue        # preempted after its last token, before the engine saw its end
            self._clock = self._seconds(self._step)
            r.ended = True
            self._live -= 1
            self._end(r)
        if self._loading_of and self._loaded:
            # a load completes: its reads end (the connector's load completion) and LMDeploy
            # publishes its blocks in the trie, prefilled or not.  The connector's output handler ends
            # the step's host writes before its loads: the order decides the resident count each
            # removal sees (``arc`` bounds its ghost lists by it)
            ready_now = [lpr for ready, _, _, lpr in self._loaded if ready <= self._step]
            if ready_now:
                self._settle_at(self._step)
            for lpr in ready_now:
                self._complete_load(lpr)
        future = self._future
        if future and self._first[id(future[0])] <= self._step:
            k = 0
            while k < len(future) and self._first[id(future[k])] <= self._step:
                k += 1
            self._waiting.extend(future[:k])
            self._waiting_version += 1
            del future[:k]

    def _complete_load(self, pr: PreparedRequest) -> None:
        blocks = self._loading_of.pop(id(pr), None)
        if blocks is None:
            return
        dups = self._load_twins.pop(id(pr), None)
        if dups:
            for slot in dups:
                self.gpu.allocator.free(slot)
            self._held_now -= len(dups)
        self._loading_version += 1
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

    def _before_loading(self, pr: PreparedRequest, g: int) -> int:
        """How many of the prompt's first ``g`` GPU-resident blocks come before the first one a load is
        still writing (LMDeploy's trie does not hold that one yet: no match from there on)."""
        loading = self._loading
        if loading and g:
            d = pr.digests
            for i in range(g):
                if d[i] in loading:
                    return i
        return g

    def probe(self, pr: PreparedRequest) -> tuple[int, int]:
        """(GPU match, host hit): the hit is capped at what the connector's hold budget (half the host
        slots) leaves beside the holds other lookups of this step keep; a hit then shorter than
        ``min_restore_tokens`` is recomputed (``restorable``), as the connector decides after its caps."""
        g, h = self.probe_found(pr)
        h = min(h, self.host.num_slots // 2)
        i = self._before_loading(pr, g)
        if i < g:
            # its host copy stays in the host tier (read-pinned) until the load completes
            m = pr.matchable
            h = self.host.lookup(pr.digests[i:m], pr.block_bytes[i:m]) if self.host.num_slots else 0
            g, h = i, min(h, self.host.num_slots // 2)
        if h and self._step_held:
            others = self._step_held - len(self._step_holds.get(id(pr), ()))
            h = min(h, max(0, self.host.num_slots // 2 - others))
        return g, self.restorable(h)

    def _hold_hit(self, pr: PreparedRequest, hit: tuple) -> None:
        """The connector's lookup holds its host hit until the request's load starts or the step ends
        (``build_connector_meta``): no demotion of this step evicts it, and it counts against the hold
        budget of the step's later lookups."""
        self._release_hit(pr)
        if hit:
            self.host.hold(hit)
            self._step_holds[id(pr)] = hit
            self._step_held += len(hit)

    def _release_hit(self, pr: PreparedRequest) -> None:
        hit = self._step_holds.pop(id(pr), None)
        if hit is not None:
            self._step_held -= len(hit)
            self.host.release(hit)

    def _release_step_holds(self) -> None:
        for hit in self._step_holds.values():
            self.host.release(hit)
        self._step_holds.clear()
        self._step_held = 0

    # -- the engine loop ---------------------------------------------------------------------
    def _ready_loads(self) -> list:
        """The completed loads ready now, in arrival order (the prefill reorderer's order)."""
        return sorted((e for e in self._loaded if e[0] <= self._step), key=lambda e: self._position[id(e[3])])

    def _holders_in_waiting_order(self, step: int) -> list:
        """The queued requests that hold blocks, in the order they re-entered LMDeploy's waiting queue, which
        is the order the eviction helper takes them in for a growth or a chunk (``hanging + waiting`` in
        status-change order): the completed loads (ready by ``step``; by completion, then by start: item
        39) and the parked preempted requests (by preemption), a load completed in a step before a
        preemption in it (its completion is read before the step is scheduled)."""
        keyed = [((e[0], 0, e[1]), e) for e in self._loaded if e[0] <= step]
        keyed += [((p.since, 1), p.cont) for p in self._parked.values()]   # (a stable sort: in preemption order)
        keyed.sort(key=itemgetter(0))
        return [x for _, x in keyed]

    def _has_waiting(self) -> bool:
        return bool(self._waiting) or bool(self._loaded and self._loaded[0][0] <= self._step)   # a heap

    def _idle(self) -> bool:
        """Nothing runs, waits, loads or is left to arrive before the step decided next."""
        return not (self._live or self._waiting or self._loaded or self._chunked or self._ending)

    def _run_until(self, limit: int | None) -> None:
        """Decide every step before ``limit`` (None: until every request given has finished)."""
        while True:
            self._fire_due()
            if limit is not None and self._step >= limit:
                return
            if self._idle():
                if self._future:
                    nxt = self._first[id(self._future[0])]
                    self._step = nxt if limit is None else min(limit, nxt)
                    self._decode_count = 0
                    continue
                if not self._running:
                    if limit is not None:
                        self._step = limit
                    return
            self._engine_step(limit)

    def _next_event(self, limit: int | None) -> int:
        """Decode steps that can run before anything changes the engine's decision: the next arrival,
        the next request event (an end, a growth), an end seen, a load completing, ``limit``."""
        step = self._step
        n = (limit - step) if limit is not None else 1 << 62
        if self._future:
            n = min(n, self._first[id(self._future[0])] - step)
        if self._running:
            n = min(n, int(self._running[0][0]) - self._decoded)
        if self._ending:
            n = min(n, self._ending[0][0] - step)
        if self._loaded:
            n = min(n, self._loaded[0][0] - step)
        return max(1, n)

    def _engine_step(self, limit: int | None) -> None:
        self._engine_step_passes(limit)
        if self._step_holds:
            self._release_step_holds()    # the step's connector metadata is built: its holds end

    def _engine_step_passes(self, limit: int | None) -> None:
        """One engine iteration at ``self._step``: LMDeploy's ``do_prefill_default`` decides whether a
        prefill is due, then ``_ForwardInputsTask.run`` picks the forward: the active long prompt's
        next chunk, a prefill pass (in the turn policy of the long-prefill lane), or a decode step."""
        e = self.engine
        step, was_live = self._step, self._live
        writes = len(self._writing)     # host copies in flight before this step's passes
        chunked = self._chunked
        waiting = self._has_waiting()
        last_chunk = chunked is not None and self._is_last_chunk(chunked)
        if not waiting and not last_chunk:
            self._decode_count = 0
            if chunked is None:
                # nothing waits: decode (or idle) until the next event
                self._decode_steps(self._next_event(limit), was_live, counting=False)
                return
            prefill = False
        elif last_chunk or self._prefill_due():
            prefill = True
        elif chunked is None:
            # a request waits but no prefill is due: decode steps, counted, until one can be
            n = min(self._next_event(limit), e.prefill_interval - self._decode_count)
            self._decode_steps(max(1, n), was_live, counting=True)
            return
        else:
            self._decode_count += 1
            prefill = False
        kind = None
        tried_long = tried_short = blocked = deferred = False
        if chunked is not None:
            if last_chunk:
                kind = self._run_chunk(step)
                tried_long, blocked = True, kind is None
            elif self._last_kind == "chunk":
                deferred = True       # the decode steps go first after a chunk
            elif self._has_waiting() and self._short_turns < e.short_turns:
                tried_short = True
                kind = self._pass(step, SHORT_ONLY)
                if kind is None:
                    kind = self._run_chunk(step)
                    tried_long, blocked = True, kind is None
            else:
                kind = self._run_chunk(step)
                tried_long, blocked = True, kind is None
        elif prefill:
            has_long = self._has_waiting_long()
            if has_long and self._short_turns < e.short_turns:
                tried_short = True
                kind = self._pass(step, SHORT_ONLY)
                if kind is None:
                    tried_long = True
                    kind = self._pass(step, LONG_FIRST)
            else:
                kind = self._pass(step, LONG_FIRST if has_long else STANDARD)
                tried_long = has_long
        if kind is None and tried_long and not blocked and not tried_short and self._has_waiting():
            tried_short = True
            kind = self._pass(step, SHORT_ONLY)
        if kind is None and self._live - (self._chunked is not None) > 0:
            self._decode_steps(1, was_live, counting=False)
            self._last_kind = "decode"
            return
        if kind is None and deferred and not tried_short and self._short_turns < e.short_turns \
                and self._has_waiting():
            kind = self._pass(step, SHORT_ONLY)
        if kind is None and deferred:
            kind = self._run_chunk(step)
        if kind is None:
            # nothing to run (a load in flight, or no room yet): the step passes
            self._step += 1
            return
        self._decode_count = 0
        self._last_kind = kind
        if (was_live and self._empty_step != step - 1) or self._last_busy >= step - 1:
            self._step += 1
        else:
            # an idle engine (no forward in the previous step) dispatches this forward and, at once, the next
            # step's, since nothing was scheduled ahead: both happen in one time slot.  It then reads this
            # forward's output before it schedules again, so the host copies this step's passes started land
            # one step sooner than a pipelined step's (measured in the harness: loadable from the next slot)
            self._sooner_writes(writes)
        self._last_busy = max(self._last_busy, step)

    def _sooner_writes(self, first: int) -> None:
        """The host copies ``_writing[first:]`` (started by an idle engine's forward) land a step sooner: they
        count as started one step earlier (the list stays in start order)."""
        writing = self._writing
        if first >= len(writing):
            return
        sooner = self._seconds(1)
        writing[first:] = [(t - sooner, d) for t, d in writing[first:]]
        if first and writing[first - 1][0] > writing[first][0]:
            writing.sort(key=itemgetter(0))

    def _decode_steps(self, n: int, was_live: int, counting: bool) -> None:
        """``n`` decode steps (none run on an idle engine: the clock moves on); ``counting``: a request
        waits in them, so they count towards ``prefill_interval``.  The block growths due are taken at
        the decode step they fall in (``_grow_due``)."""
        if counting:
            self._decode_count += n
        if not was_live:
            self._step += n
            return
        growths = self._growths
        while n > 0:
            before = self.stats.preemptions
            self._grow_due()
            preempted = self.stats.preemptions != before
            if self._live - (self._chunked is not None) <= 0:
                # every decoding request was preempted: the step runs no forward (the engine is idle after it)
                self._empty_step = self._step
                self._step += 1
                return
            # within a run of decode steps the next growth is due once its decode steps have run
            m = min(n, max(1, growths[0][0] - self._decoded)) if growths else n
            if preempted:
                m = 1   # a growth preempted a request: it now waits, so the next step may be a prefill pass
            self._step += m
            self._decoded += m
            self.stats.decode_steps += m
            n -= m
            self._last_decode_step = self._step - 1
            self._last_busy = max(self._last_busy, self._step - 1)
            if preempted:
                if counting:
                    self._decode_count -= n   # the steps of the run not taken are decided afresh
                return

    def _grow_due(self) -> None:
        """LMDeploy's ``schedule_running`` at the decode step ``self._step``: a running request takes one more
        block when the tokens the scheduler has seen fill what it holds.  A token reaches the scheduler two
        steps after the forward that made it (the engine schedules the next step before it reads a
        forward's output), so the tokens seen are those of its prefill (from two steps after it) and of its
        decode steps up to two steps back: all of them but the latest when the previous step decoded, all of
        them when it did not (a prefill or a chunk ran, or nothing): there the growth comes one decode step
        earlier than in a run of decode steps.  A growth whose step is not a decode step waits for the next
        one."""
        growths, step = self._growths, self._step
        if not growths:
            return
        decoded = self._seen_decodes()
        if growths[0][0] > decoded + 1:
            return
        later, due_now = [], []
        while growths and growths[0][0] <= decoded + 1:
            entry = heapq.heappop(growths)
            due, _, prefilled, r, ghosts = entry
            if r.ended:
                continue
            if due > decoded + self._seen_prefill(prefilled):
                later.append(entry)
                continue
            due_now.append((r, ghosts))
        for entry in later:
            heapq.heappush(growths, entry)
        if not due_now:
            return
        # the host copies that landed before this step's scheduling are resident: a growth's demotions may
        # evict them (a pass settles them too, but a full batch runs no pass)
        self._settle_at(step)
        gpu = self.gpu
        # ``schedule_running`` goes through the running requests from the latest admitted
        for r, ghosts in sorted(due_now, key=lambda x: -x[0].index):
            if r.ended:
                continue
            if not gpu.num_free_slots:
                self._free_in_waiting_order(1, step)
                if not gpu.num_free_slots:
                    self._preempt(r)
                    continue
            got = self._hold(1)
            r.held.extend(got)
            r.ghosts = ghosts
            self._held_now += len(got)
            self.stats.max_held_blocks = max(self.stats.max_held_blocks, self._occupied())

    def _seen_decodes(self) -> int:
        """The decode steps whose tokens the scheduler has seen at ``self._step``: all of them but the latest
        when the previous step decoded (a token is seen two steps after its forward)."""
        return self._decoded - (self._last_decode_step == self._step - 1)

    def _overflow_key(self, pr: PreparedRequest) -> int:
        """A preempted request's continuation counts in ``gpu_overflow_requests`` as its request: by position."""
        return self._position[id(pr)]

    def _seen_prefill(self, prefilled: int) -> bool:
        """Whether the scheduler has seen the first token of a prefill (or last chunk) run at ``prefilled``."""
        return prefilled <= self._step - 2

    def _preempt(self, r) -> None:
        """No block for ``r``'s growth: LMDeploy preempts it (``preempt_seqs``: RUNNING, READY, then WAITING with
        its blocks and its step kept).  Its continuation (prompt and output so far, the rest of its output
        to come) waits in the queue at its arrival's place, *parked* (``_Parked``): it keeps its pins and
        held slots, and only the token the scheduler has seen but not computed is left to prefill, so the
        turn policies file it as a one-token prompt.  A prefill pass that admits it resumes it with its
        blocks (``_attempt_parked``); a capacity making that reaches it first takes them
        (``_reclaim_parked``: its prompt's and the output blocks of its last growth stay cached) and it is
        then a prompt like any other, prefilled again.  Its output so far is what the scheduler has seen:
        the token of the forward in flight is dropped and made again.  Its hits were counted at its first
        prefill; the continuation's are not."""
        pr = r.pr
        # the tokens the scheduler has seen (``_grow_due``); the output of the forward in flight is dropped
        produced = self._seen_prefill(r.prefilled) + self._seen_decodes() - r.d0
        left = pr.request.output_length - produced
        r.ended = True
        self._live -= 1
        self.stats.preemptions += 1
        if self.schedule is not None:
            self.schedule.append((self._step, "preempt", self._position[id(pr)]))
        if left <= 0:
            self._end(r)
            return
        # the continuation extends the first run's prompt (``base``) with the output seen: its full blocks past
        # the prompt's are output blocks, with the digests ``_end`` gives them (the trace's output ids where it
        # names them, else digests only this request produces); its own output blocks follow them
        base = pr if r.base is None else r.base
        req = base.request
        length = pr.request.input_length + produced
        bs = self.block_size
        gid = r.index if r.ghost_id < 0 else r.ghost_id
        n = length // bs - req.input_length // bs
        named, named_bytes = base.out_digests[:n], base.out_bytes[:n]
        ghosts = named + tuple((1 << 128) + (gid << 20) + k for k in range(len(named), n))
        cont_req = Request(req.timestamp, length, left, tuple(req.hash_ids) + (0,) * len(ghosts), req.session)
        digests = base.digests + ghosts
        cont = PreparedRequest(cont_req, digests, base.block_bytes + named_bytes + (b"",) * (n - len(named)),
                               min(len(digests), max(length - 1, 0) // bs), -(-length // bs), base.root,
                               base.out_digests[n:], base.out_bytes[n:])
        self._continues[id(cont)] = cont
        self._position[id(cont)] = self._position[id(pr)]
        self._first[id(cont)] = self._first[id(pr)]
        self._parked[id(cont)] = _Parked(r, cont, self._step)
        self._requeue(cont)

    def _reclaim_parked(self, p: _Parked) -> None:
        """A capacity making takes a parked request's blocks (LMDeploy's ``_reclaim_candidate``: its step goes
        back to 0): they are freed as at an end (its prompt's and its last growth's output blocks stay
        cached) and its continuation waits as a whole prompt, to be prefilled again."""
        del self._parked[id(p.cont)]
        self._end(p.run)
        self.stats.reclaimed_preemptions += 1
        self._waiting_version += 1       # its size in the turn policies' order changes

    def _queued_tokens(self, pr: PreparedRequest) -> int:
        """The tokens a waiting request has to prefill before any match (LMDeploy's ``num_token_ids``): its
        prompt, or one token for a parked preempted request."""
        return 1 if id(pr) in self._parked else pr.request.input_length

    def _requeue(self, pr: PreparedRequest) -> None:
        """``pr`` waits again, at its arrival's place in the queue."""
        pos, waiting = self._position, self._waiting
        k = 0
        while k < len(waiting) and pos[id(waiting[k])] < pos[id(pr)]:
            k += 1
        waiting.insert(k, pr)
        self._waiting_version += 1

    def _prefill_due(self) -> bool:
        """LMDeploy's ``do_prefill_default`` for the requests waiting (one waits)."""
        e = self.engine
        return (self._decode_count >= e.prefill_interval or self._waiting_tokens() >= e.max_prefill_tokens
                or self._live < e.max_batches * 0.5)

    def _waiting_tokens(self) -> int:
        """The prompt tokens LMDeploy's waiting queue holds now (it prefills once they reach
        ``max_prefill_tokens``): the loads completed and not prefilled (their tails) and the requests
        that arrived (whole prompts: their matches are rolled back while they wait)."""
        cap = self.engine.max_prefill_tokens
        total = 0
        for ready, _, part, lpr in self._loaded:
            if ready <= self._step:
                total += self._tail_tokens(lpr, part)
        tokens = self._queued_tokens
        for pr in self._waiting:
            if total >= cap:
                break
            total += tokens(pr)
        return total

    def _is_long(self, tokens: int) -> bool:
        return tokens > self.engine.max_prefill_tokens

    def _has_waiting_long(self) -> bool:
        """LMDeploy's ``has_waiting_long_prefill``: a waiting prompt (before any match) needs a chunk
        that is not its last."""
        if any(self._is_long(self._queued_tokens(pr)) for pr in self._waiting):
            return True
        return any(self._is_long(self._tail_tokens(lpr, part)) for ready, _, part, lpr in self._loaded
                   if ready <= self._step)

    def _pass_state(self, step: int) -> tuple:
        """What a short-only pass's attempts depend on (the GPU tier's access clock first)."""
        gs, hs, ch = self.gpu.stats, self.host.stats, self._chunked
        ready = sum(1 for e in self._loaded if e[0] <= step)
        return (self.gpu.access_clock, gs.inserts, gs.evictions, gs.dropped, gs.store_failures, gs.loads,
                self.gpu.num_free_slots, hs.inserts, hs.evictions, hs.dropped, hs.store_failures, hs.loads,
                hs.holds, hs.promoted, self.host.access_clock, len(self._writing), self._waiting_version,
                len(self._loaded), ready, self._n_loaded, len(self._parked), self._live, len(self._pins),
                self._held_now, None if ch is None else (id(ch), ch.done), self._loading_version)

    def _view(self) -> tuple:
        """The queue as the turn policies order it, kept until the queue changes: the short prompts by
        size (stable: arrival order among equals), the long ones in arrival order, and the long ones
        grouped by chunk count (each group in arrival order)."""
        view = self._queue_view
        if view is not None and view[0] == self._waiting_version:
            return view
        limit, tokens = self.engine.max_prefill_tokens, self._queued_tokens
        longs = [pr for pr in self._waiting if tokens(pr) > limit]
        normals = sorted((pr for pr in self._waiting if tokens(pr) <= limit), key=tokens)
        groups: dict[int, list] = {}
        for pr in longs:
            groups.setdefault(-(-pr.request.input_length // limit), []).append(pr)
        self._queue_view = view = (self._waiting_version, normals, longs, tuple(groups.items()))
        return view

    def _order(self, step: int, policy: str, loaded: list):
        """LMDeploy's ``_PrefillReorderer``: the completed loads ``loaded`` first (``_ready_loads``: arrival
        order), then the waiting requests in the turn policy's order.

        A generator over the queue as the pass found it (the pass removes the requests it admits):
        every part of the order depends only on that queue and ``step``, so a part computed when the
        pass reaches it is the part computed up front.  Long-first order (policy ``size``, LMDeploy's
        default; ``fifo`` keeps arrival order): a long prompt's priority is its chunk count less one
        per ``long_aging_s`` waited, then its chunk count, then arrival.
        Among prompts of one chunk count the earlier arrival has waited longer, so each chunk-count
        group in arrival order is already in priority order, and the whole order is their merge: a
        pass that stops at its first long prompt (a saturated queue) looks at one prompt per group."""
        _, normals, longs, groups = self._view()
        everyone = list(self._waiting) if policy == STANDARD or (policy == LONG_FIRST and not longs) else None
        for x in loaded:
            yield "loaded", x
        if everyone is not None:
            yield from (("new", pr) for pr in everyone)
            return
        if policy == SHORT_ONLY:
            yield from (("new", pr) for pr in normals)
            yield from (("new", pr) for pr in longs)
            return
        if self.engine.long_policy == "fifo":
            # LMDeploy's ``_sort_long_prefills`` keeps the long prompts in arrival order (no aging)
            yield "new", longs[0]
            yield from (("new", pr) for pr in normals)
            yield from (("new", pr) for pr in longs[1:])
            return
        aging = self.engine.long_aging_s * self._rate      # steps per chunk of priority
        first = self._first

        def by_priority(chunks: int, members: list):
            for pr in members:
                waited = step - first[id(pr)]
                yield (chunks - int(waited // aging) if waited >= aging else chunks, chunks), pr

        merged = heapq.merge(*(by_priority(c, members) for c, members in groups), key=itemgetter(0))
        yield "new", next(merged)[1]
        yield from (("new", pr) for pr in normals)
        yield from (("new", pr) for _, pr in merged)

    def _pass(self, step: int, policy: str) -> str | None:
        """One prefill pass (``_PrefillScheduler.schedule``) at ``step``: returns "prefill" when it
        admitted requests, "chunk" when it started a long prompt's first chunk, None when it admitted
        none (loads it started ship with the step)."""
        e = self.engine
        cap = e.max_batches - self._live
        if cap <= 0 or not self._has_waiting():
            return None
        n = used = 0
        kind = None
        idle_engine = not self._live and not self._loaded and self._chunked is None
        limit, bs, touch = e.max_prefill_tokens, self.block_size, self.gpu.touch
        self._settle_at(step)
        if policy == SHORT_ONLY:
            # A short-only pass that admitted, loaded and evicted nothing changed only access times, by
            # refreshing the matches it tried.  Run again on the same state with nothing accessed since,
            # it would try the same requests and refresh the same blocks in the same order: the LRU
            # order and every outcome stay as they are, so it is not run again.
            before = self._pass_state(step)
            if before == self._idle_pass:
                return None
        skipped = None     # short-only: the matches of the long prompts skipped so far (False: one was tried)
        loaded = self._ready_loads()
        order = self._order(step, policy, loaded)
        pending = list(loaded)
        holding = None     # the ids of the parked requests in the pass's queue (they hold blocks)
        reclaims = self.stats.reclaimed_preemptions
        if self._parked:
            # parked requests hold blocks too: an admission's capacity making may take theirs, from the back of
            # the pass's queue, so the order is computed up front (it depends only on the queue as found)
            order = list(order)
            parked = self._parked
            queued = [item for what, item in order if what == "new" and id(item) in parked]
            holding = {id(item) for item in queued}
            pending += queued
        self._pass_skipped, self._pass_pending = [], pending
        for what, item in order:
            if n >= cap:
                break
            if what == "loaded":
                if item in self._pass_pending:
                    self._pass_pending.remove(item)
                if item not in self._loaded:
                    # reclaimed earlier in this pass by another admission: an ordinary waiting request now
                    what, item, skipped = "new", item[3], False
            elif holding and id(item) in holding:
                self._pass_pending = [x for x in self._pass_pending if x is not item]
            if policy == SHORT_ONLY and what == "new" and self._queued_tokens(item) > limit:
                # the short-only gate on a long prompt (most of a saturated queue): its match, then a skip
                # unless the match leaves one chunk at most (then a full attempt, which matches again)
                if skipped is None:
                    # the long prompts come last; if the queue and the GPU matches are as when a pass last
                    # skipped all of them, this pass skips them all again, refreshing the same blocks in the
                    # same order: the blocks, each at its last refresh, are refreshed once each in that order
                    gs = self.gpu.stats
                    tail = (self._waiting_version, gs.inserts, gs.evictions, gs.dropped, gs.store_failures,
                            self._loading_version)
                    if self._skip_refresh is not None and self._skip_refresh[0] == tail:
                        touch(self._skip_refresh[1])
                        break
                    skipped = []
                g = self._gpu_match(item)
                if item.request.input_length - g * bs > limit:
                    if g:
                        matched = item.digests[:g]
                        touch(matched)
                        if skipped is not False:
                            skipped.append(matched)
                    continue
                skipped = False
            if what == "loaded":
                outcome, tokens = self._attempt_loaded(item, step, n, used, policy)
                if outcome == "skip":
                    self._pass_skipped.append(item)
            else:
                idle = idle_engine and not n and not self._loaded
                outcome, tokens = self._attempt(item, step, n, used, policy, idle)
                if outcome == "skip" and holding and id(item) in holding:
                    self._pass_skipped.append(item)
                if outcome not in ("skip", "stop"):
                    self._waiting.remove(item)
                    self._waiting_version += 1
            if outcome in ("load", "skip"):
                continue
            if outcome == "stop":
                break
            n, used = n + 1, used + tokens
            if outcome == "chunk":
                kind = "chunk"
                break
            kind = "prefill"
        self._pass_skipped = self._pass_pending = None
        if skipped and self.stats.reclaimed_preemptions == reclaims:
            # (a parked request reclaimed in the pass is a whole prompt now: the next pass orders it elsewhere)
            self._skip_refresh = (tail, _last_refresh_order(skipped))
        if policy == SHORT_ONLY:
            after = self._pass_state(step)
            unchanged = kind is None and after[1:] == before[1:]
            self._idle_pass = after if unchanged else None
        if kind is not None:
            if kind == "prefill":
                self.stats.prefill_steps += 1
            if policy == SHORT_ONLY:
                self._short_turns += 1
        return kind

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

    def _gpu_match(self, pr: PreparedRequest) -> int:
        """``probe``'s GPU part now: the blocks LMDeploy's trie matches (not those a load is still
        writing).  The GPU tier does not depend on the host copies in flight: no settling needed."""
        # a queued request is matched in every pass: its match changes only when the GPU tier's blocks
        # do (a store, an eviction, a drop) or a load's blocks are published
        gs = self.gpu.stats
        version = (gs.inserts, gs.evictions, gs.dropped, gs.store_failures, self._loading_version)
        cached = self._match_cache.get(id(pr))
        if cached is not None and cached[0] == version:
            g = cached[1]
        else:
            m = pr.matchable
            g = self.gpu.lookup(pr.digests[:m], pr.block_bytes[:m])
            self._match_cache[id(pr)] = (version, g)
        return self._before_loading(pr, g)

    def _admission_blocks(self, input_length: int) -> int:
        """Blocks LMDeploy allocates when it admits a prompt: the prompt plus ``prefill_interval``
        preallocated tokens (``prealloc_size``)."""
        return -(-(input_length + self.engine.prefill_interval) // self.block_size)

    def _fits(self, pr: PreparedRequest, total: int | None = None) -> bool:
        """LMDeploy admits a prefill only if the prompt plus ``prefill_interval`` preallocated tokens
        (``total`` blocks, if given: a first chunk's) fit beside what running requests and started
        loads hold (cached blocks can be evicted)."""
        if total is None:
            total = self._admission_blocks(pr.request.input_length)
        return self._occupied() + total - self._pinned_run(pr, 0) <= self.stats.gpu_blocks

    def _pinned_run(self, pr: PreparedRequest, first: int) -> int:
        """How many of the request's blocks from ``first`` on are pinned by running requests, in a row
        (blocks it shares with them, which its admission does not take again), up to the first one a load
        is still writing (not in LMDeploy's trie yet: the admission takes a block of its own for it)."""
        pins, d, loading = self._pins, pr.digests, self._loading
        n = first
        while n < len(d) and d[n] in pins and d[n] not in loading:
            n += 1
        return n - first

    def _attempt_loaded(self, entry, step: int, n: int, used: int, policy: str) -> tuple[str, int]:
        """The admission attempt of a request whose load completed: its tail is prefilled if it fits,
        within the batch and token limits (LMDeploy tries these first in every pass).  Returns (outcome,
        prefill tokens) as ``_attempt``."""
        e = self.engine
        _, _, part, lpr = entry
        tokens = self._tail_tokens(lpr, part)
        if policy == SHORT_ONLY and self._is_long(tokens):
            return "skip", 0          # a loaded request cannot match further: still a long prompt
        count = min(tokens, e.max_prefill_tokens)
        if n and used + count > e.max_prefill_tokens:
            return ("skip" if policy == SHORT_ONLY else "stop"), 0
        if self._is_long(tokens):
            g, restored, pinned, k = part
            ch = _Chunked(lpr, k * self.block_size, pinned, k, step, g, restored)
            if not self._advance_chunk(ch, step, force=not self._live and not n):
                return "stop", 0
            self._remove_loaded(entry)
            self._end_load(lpr)
            self._begin_chunked(ch, step)
            return "chunk", count
        if not self._tail_fits(lpr, part) and (self._live or n):
            evicted = self._make_tail_room(lpr, part, exclude=entry)
            if not self._tail_fits(lpr, part):     # (reclaiming queued loads may have made the room)
                self.stats.attempt_evictions += evicted
                return "stop", 0
        self._remove_loaded(entry)
        self._start(lpr, self._finish_load(lpr, part), step)
        return "admitted", tokens

    def _end_load(self, pr: PreparedRequest) -> None:
        """The reads of ``pr``'s load end: its blocks are published if it is still loading, else the
        host copies it read are released (a request with no load: nothing)."""
        if id(pr) in self._loading_of:
            self._complete_load(pr)
        else:
            release = self._host_pending.pop(id(pr), None)
            if release is not None:
                self.release_host_copies(release)

    def _reclaim_load(self, entry) -> None:
        """A request waiting with a load loses its blocks (they stay cached, unpinned) and goes back to the
        queue: its hits are counted again when it is admitted."""
        _, _, part, lpr = entry
        self._remove_loaded(entry)
        self._end_load(lpr)
        g, restored, pinned, _ = part
        if pinned:
            self.gpu.touch(pinned)      # LMDeploy stamps a sequence's blocks with the time it frees them
        self._unpin(pinned)
        # the blocks its load restored stay cached: matched again at its next admission, they count as restored
        # (with those of its earlier reclaimed loads: a load may be reclaimed and made again several times)
        st = self.stats
        if id(lpr) not in self._continues:
            self._reloaded.setdefault(id(lpr), set()).update(range(g, g + restored))
            pos = self._position[id(lpr)]
            self._uncount(lpr, *self.results[pos], self._load_short.pop(id(lpr), 0))   # as counted at its load
            self.results[pos] = None
            st.load_waits -= 1           # (a continuation's load was not counted: ``_start_load``)
        st.reclaimed_loads += 1
        self._requeue(lpr)

    def _unpin(self, pinned: tuple) -> None:
        if pinned:
            self.gpu.complete_load(pinned, False)
            pins = self._pins
            for d in pinned:
                n = pins[d] - 1
                if n:
                    pins[d] = n
                else:
                    del pins[d]

    def _remove_loaded(self, entry) -> None:
        self._loaded.remove(entry)
        heapq.heapify(self._loaded)

    def _attempt(self, pr: PreparedRequest, step: int, n: int, used: int, policy: str = STANDARD,
                 idle: bool = False) -> tuple[str, int]:
        """One admission attempt of ``pr`` in the pass of ``step`` that admitted ``n`` requests of
        ``used`` prompt tokens so far, in LMDeploy's order (``_PrefillAdmissionAttempt.run``): the gates
        (a short-only turn skips a prompt its match leaves long; the token budget refuses a second
        prefill that would exceed it, nothing evicted), then the resources (room for the whole prefill,
        or a long prompt's first chunk, evicting cached blocks; for a host hit, looked up and held by
        the connector, then the loads' soft budget), then the allocation.  Returns (outcome, prefill
        tokens): "admitted" (prefills in this step), "chunk" (its first chunk runs in this step), "load"
        (its load starts), "skip" (the pass goes on without it) or "stop" (the pass stops at it;
        ``attempt_evictions`` counts what its attempt evicted)."""
        if id(pr) in self._parked:
            return self._attempt_parked(pr, step, n, used, policy, idle)
        e = self.engine
        limit = e.max_prefill_tokens
        g = self._gpu_match(pr)
        matched = pr.digests[:g]
        if g:
            # every attempt matches the prompt in the trie (a gate's match or the resources'), which
            # refreshes the matched blocks' access times; a rejection rolls the match back, which frees them
            # and so refreshes them again (``_rollback``): after the capacity making when the resources fail
            self.gpu.touch(matched)
        tail = pr.request.input_length - g * self.block_size
        # a rejection that a gate deferred because the match let the request through: on a short-only
        # turn it becomes a skip if the resources then fail
        gate_matched = False
        if policy == SHORT_ONLY and self._is_long(pr.request.input_length):
            if self._is_long(tail):
                return "skip", 0
            gate_matched = True
        count = min(tail, limit)
        if n:
            if used + count > limit:
                return ("skip" if policy == SHORT_ONLY else "stop"), 0
            if used + min(pr.request.input_length, limit) > limit:
                gate_matched = True
        fail = "skip" if gate_matched and policy == SHORT_ONLY else "stop"
        fits = idle or self._fits(pr)
        self._release_hit(pr)                         # the lookup first drops the request's earlier hold
        g, h = self._probe_at(pr, step)
        if h:
            hit = pr.digests[g:g + h]
            self.host.touch(hit)                      # the connector's lookup refreshes its hit
            self._hold_hit(pr, hit)
            evicted = self._make_room(pr, step)
            fits = fits or self._fits(pr)             # (reclaiming queued loads may have made the room)
            if fits and (idle or self._soft_budget_ok(pr)):
                self._start_load(pr, step)
                return "load", 0
            self._rollback(matched, evicted)
            return "stop", 0
        if self._is_long(tail):
            blocks = self._chunk_blocks(g * self.block_size)
            if not (idle or self._fits(pr, blocks)):
                evicted = self._make_room(pr, step, blocks=blocks)
                if not self._fits(pr, blocks):
                    self._rollback(matched, evicted)
                    return fail, 0
            self._make_room(pr, step, blocks=blocks)
            g, restored, _ = self.serve_blocks(pr, load_only=True)
            self._note_result(pr, g, restored)
            ch = _Chunked(pr, g * self.block_size, self._pin(pr.digests[:g]), g, step, g, restored)
            self._advance_chunk(ch, step, force=True)
            self._begin_chunked(ch, step)
            return "chunk", count
        if not fits:
            evicted = self._make_room(pr, step)
            if not self._fits(pr):
                self._rollback(matched, evicted)
                return fail, 0
        self._serve_now(pr, step)
        self._start(pr, self._served, step)
        return "admitted", tail

    def _rollback(self, matched: tuple, evicted: int) -> None:
        """A rejected attempt: the ``evicted`` blocks of its capacity making stay evicted
        (``attempt_evictions``), and it rolls its tentative match back (``_TentativePrefixMatch.rollback``):
        LMDeploy truncates the sequence's blocks, and freeing stamps them with the time, so the matched
        blocks are refreshed again, after whatever the capacity making reclaimed and evicted."""
        self.stats.attempt_evictions += evicted
        if matched:
            self.gpu.touch(matched)

    def _attempt_parked(self, pr: PreparedRequest, step: int, n: int, used: int, policy: str,
                        idle: bool) -> tuple[str, int]:
        """The admission attempt of a parked preempted request: LMDeploy's for a waiting sequence that holds
        blocks (no trie match past its private last block, one token to prefill).  The token budget, then
        room for what its prompt and preallocation need beyond the blocks it holds: other queued requests'
        blocks reclaimed from the back of the pass's queue, then cached blocks evicted.  Admitted, it
        resumes with its blocks (its hits are not counted again).  Returns (outcome, prefill tokens) as
        ``_attempt``."""
        if n and used + 1 > self.engine.max_prefill_tokens:
            return ("skip" if policy == SHORT_ONLY else "stop"), 0
        p = self._parked[id(pr)]
        r = p.run
        need = max(0, self._admission_blocks(pr.request.input_length) - len(r.pinned) - len(r.held))
        self._settle_at(step)
        gpu, st = self.gpu, self.stats
        if need > gpu.num_free_slots:
            evicted = self._free_for_admission(need)
            if need > gpu.num_free_slots and not idle:
                st.attempt_evictions += evicted
                return "stop", 0
        del self._parked[id(pr)]
        held = self._hold(need)
        self._held_now += len(held)
        st.max_held_blocks = max(st.max_held_blocks, self._occupied())
        st.resumed_preemptions += 1
        self._start(pr, (0, 0, r.pinned, r.held + held), step, parked=p)
        return "admitted", 1

    # -- long prompts: chunked prefill --------------------------------------------------------
    def _chunk_blocks(self, done: int) -> int:
        """Blocks a long prompt holds once its next (not last) chunk is allocated: its tokens up to
        ``max_prefill_tokens`` past ``done`` (LMDeploy's ``kv_token_limit``; no preallocation)."""
        return -(-(done + self.engine.max_prefill_tokens) // self.block_size)

    def _is_last_chunk(self, ch: _Chunked) -> bool:
        return not self._is_long(ch.pr.request.input_length - ch.done)

    def _begin_chunked(self, ch: _Chunked, step: int) -> None:
        """``ch``'s first chunk ran in ``step``: it is the engine's chunked prompt, and it runs."""
        self._chunked = ch
        self._short_turns = 0
        self._live += 1
        st = self.stats
        pos = self._position[id(ch.pr)]
        if pos not in self._chunked_positions:   # a preempted request's continuation chunked again: counted once
            self._chunked_positions.add(pos)
            st.chunked_requests += 1
        st.chunk_steps += 1
        st.max_running = max(st.max_running, self._live)
        if self.schedule is not None:
            self.schedule.append((step, "chunk", self._position[id(ch.pr)]))

    def _advance_chunk(self, ch: _Chunked, step: int, last: bool = False, force: bool = False,
                       reclaim: bool = False) -> bool:
        """Allocate ``ch``'s next chunk (``reserve_long_context_chunk``): room for its tokens up to the
        chunk's end (the whole prompt plus the preallocation for the last chunk), evicting cached
        blocks; its full blocks join the trie at once.  Returns False (the evictions stand) when running
        requests hold too much (``force``: allocate what fits)."""
        pr, bs = ch.pr, self.block_size
        length = pr.request.input_length
        end = length if last else ch.done + self.engine.max_prefill_tokens
        want = self._admission_blocks(length) if last else -(-end // bs)
        need = want - len(ch.pinned) - len(ch.held)
        gpu = self.gpu
        self._settle_at(step)
        if need > gpu.num_free_slots:
            self._free_in_waiting_order(need, step, reclaim=reclaim)
            if need > gpu.num_free_slots and not force:
                return False
        # the partial block of the previous chunk is full now (stored below)
        for slot in ch.held:
            gpu.allocator.free(slot)
        self._held_now -= len(ch.held)
        ch.held = []
        upto = len(pr.digests) if last else min(len(pr.digests), end // bs)
        if upto > ch.stored_to:
            covered = self.store_blocks(pr, ch.stored_to, upto)
            ch.pinned = ch.pinned + self._pin(pr.digests[ch.stored_to:ch.stored_to + covered])
            ch.stored_to = upto
        if last:
            ch.held = self._hold_rest(pr, ch.pinned)
        else:
            ch.held = self._hold(max(0, want - len(ch.pinned)))
            self._held_now += len(ch.held)
            self.stats.max_held_blocks = max(self.stats.max_held_blocks, self._occupied())
        ch.done = end
        return True

    def _run_chunk(self, step: int) -> str | None:
        """The chunked prompt's next chunk runs in ``step`` if its blocks can be allocated: "chunk", or
        "last chunk" (its first token; it decodes from now on), or None (blocked: it waits)."""
        ch = self._chunked
        last = self._is_last_chunk(ch)
        # the only running request, with no load in flight (a completed one is reclaimed first): nothing else
        # would ever free its room (LMDeploy would stall); a load in flight can be reclaimed once it completes
        force = self._live == 1 and not any(ready > step for ready, _, _, _ in self._loaded)
        if not self._advance_chunk(ch, step, last, force=force, reclaim=True):
            return None
        self._short_turns = 0
        self.stats.chunk_steps += 1
        if not last:
            if self.schedule is not None:
                self.schedule.append((step, "chunk", self._position[id(ch.pr)]))
            return "chunk"
        self._chunked = None
        held, ch.held = ch.held, []
        self._start(ch.pr, (ch.g, ch.restored, ch.pinned, held), step, admitted=ch.admitted, running=True)
        return "last chunk"

    def _start_load(self, pr: PreparedRequest, step: int | None = None) -> None:
        """The load starts in this step (not a prefill: running requests decode in it): only the GPU
        match and the host hit's destinations are taken (LMDeploy allocates the loaded interval);
        the request waits for a prefill step two or more steps later, others may start meanwhile."""
        step = self._step if step is None else step
        self._settle_at(step)
        # blocks of its host hit another load is writing: not in LMDeploy's trie yet, so this load takes
        # destinations of its own for them and restores them too (item 36); they are duplicates, freed
        # when this load completes (LMDeploy's ``_publish`` deduplicates them back to the trie's blocks)
        loading = self._loading
        twins = {d for d in pr.digests[:pr.matchable] if d in loading}
        g, restored, covered = self.serve_blocks(pr, defer_host_release=True, load_only=True)
        d = pr.digests
        if twins:
            extra = sum(1 for x in d[g:g + covered] if x in twins)
            if extra:
                st = self.stats
                st.host_hit_blocks += extra
                st.requests_with_host_hits += not restored
                h = len(self.host_release[0]) + len(self.host_release[1])
                restored += extra
                self.host_release = (d[g:g + restored], d[g + restored:g + h])
                dups = self._hold(extra)
                self._held_now += len(dups)
                self._load_twins[id(pr)] = dups
        self._release_hit(pr)            # the load's own read pins replace the lookup's hold
        if self.host_release is not None:
            self._host_pending[id(pr)] = self.host_release
        written = tuple(x for x in d[g:g + restored] if x not in twins)
        self._loading_of[id(pr)] = written
        for d in written:
            self._loading[d] = self._loading.get(d, 0) + 1
        self._loading_version += 1
        pinned = self._pin(pr.digests[:g + covered])
        # the load ships with this step (a forward of its own if need be) and the engine runs
        # connector steps until it completes: not idle when the request is ready
        ready = step + self.engine.load_steps(restored, self._rate)
        self._last_busy = max(self._last_busy, ready - 1)
        if id(pr) not in self._continues:   # a preempted request's continuation waited once already, as a request
            self.stats.load_waits += 1
        self._note_result(pr, g, restored, final=False)
        if self.schedule is not None:
            self.schedule.append((step, "load", self._position[id(pr)]))
        self._served = (g, restored, pinned, [])
        heapq.heappush(self._loaded, (ready, self._n_loaded, (g, restored, pinned, g + covered), pr))
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

    def _make_tail_room(self, pr: PreparedRequest, part, exclude=None) -> int:
        """``_make_room`` for a loaded request's tail (its matched and loaded blocks are pinned; ``exclude``:
        its own entry while it is still queued)."""
        self._settle_at(self._step)
        return self._free_for_admission(self._tail_blocks(pr, part), exclude)

    def _soft_budget_ok(self, pr: PreparedRequest) -> bool:
        """LMDeploy's ``can_admit_load``: the free blocks cover this load's whole prefill, the tails of the
        loads not prefilled yet and the rest of a prompt prefilled in chunks (soft reservations that only
        loads respect)."""
        g, _ = self.probe(pr)
        reserved = sum(self._tail_blocks(lpr, part) for _, _, part, lpr in self._loaded)
        ch = self._chunked
        if ch is not None:       # a prompt prefilled in chunks reserves the blocks of its chunks to come
            reserved += max(0, self._admission_blocks(ch.pr.request.input_length) - len(ch.pinned) - len(ch.held))
        return self._admission_blocks(pr.request.input_length) - g + reserved <= self.gpu.num_free_slots

    def _free_in_waiting_order(self, need: int, step: int, reclaim: bool = True) -> None:
        """A growth's or a chunk's capacity making at ``step`` (LMDeploy's eviction helper outside a prefill
        pass): the queued requests that hold blocks (completed loads, parked preempted requests) are
        reclaimed in the order they re-entered the waiting queue (``_holders_in_waiting_order``), each
        followed by cached-block evictions, then cached blocks are evicted, until ``need`` blocks are free
        or nothing more can go.  ``reclaim`` False: evictions only."""
        gpu = self.gpu
        if reclaim and (self._loaded or self._parked):
            self._reclaim_until(need, self._holders_in_waiting_order(step))
        if need > gpu.num_free_slots:
            gpu.evict(need - gpu.num_free_slots)

    def _free_for_admission(self, need: int, exclude=None) -> int:
        """An admission's capacity making: the queued requests that hold blocks are reclaimed
        (``_reclaim_queued``), then cached blocks are evicted, until ``need`` blocks are free or nothing
        more can go.  Returns how many cached blocks were evicted."""
        evicted = self._reclaim_queued(need, exclude)
        missing = need - self.gpu.num_free_slots
        return evicted + (self.gpu.evict(missing) if missing > 0 else 0)

    def _reclaim_queued(self, need: int, exclude=None) -> int:
        """LMDeploy's eviction helper (``try_make_capacity_for``, with the connector's reclaim of completed
        loads, ``integration/activate.py``): when the free blocks do not cover ``need``, the requests of
        the pass's queue that hold blocks (completed loads, ``_reclaim_load``; parked preempted requests,
        ``_reclaim_parked``) are reclaimed one at a time, each followed by cached-block evictions, until
        they do, from the back of the queue as ``_evictable_sequences`` walks it: those the pass has not
        tried yet, the last first, then those it skipped, the last skipped first (item 38).  Outside a
        pass, nothing.  Returns how many cached blocks were evicted."""
        if self._pass_skipped is None:
            return 0
        return self._reclaim_until(need, list(reversed(self._pass_skipped + self._pass_pending)), exclude)

    def _reclaim_until(self, need: int, entries, exclude=None) -> int:
        """Reclaim ``entries`` (completed loads and parked requests' continuations, in that order; gone or
        ``exclude``: passed over) one at a time, each followed by cached-block evictions, until the free
        blocks cover ``need``.  Returns how many cached blocks were evicted."""
        gpu = self.gpu
        evicted = 0
        for entry in entries:
            if need <= gpu.num_free_slots:
                break
            if entry is exclude:
                continue
            if isinstance(entry, tuple):
                if entry not in self._loaded:
                    continue
                self._reclaim_load(entry)
            else:
                p = self._parked.get(id(entry))
                if p is None:
                    continue
                self._reclaim_parked(p)
            evicted += gpu.evict(max(0, need - gpu.num_free_slots))
        return evicted

    def _make_room(self, pr: PreparedRequest, step: int, blocks: int | None = None) -> int:
        """LMDeploy's ``try_make_capacity_for`` for ``pr``'s whole prefill at ``step``: cached GPU blocks
        are evicted (up to the blocks missing beside the free ones; the request's matched prefix is
        held by its tentative match; a host hit is held by the connector's lookup (``_hold_hit``, no
        access-time change), so the demotions cannot push it out of the host tier).  The evictions
        stand whether or not the request is then admitted; ``blocks``: a first chunk's instead of the
        whole prefill's.
        Returns how many blocks were evicted."""
        self._settle_at(step)
        gpu = self.gpu
        g, _ = self.probe(pr)
        if blocks is None:
            blocks = self._admission_blocks(pr.request.input_length)
        missing = blocks - g - gpu.num_free_slots
        if missing <= 0:
            return 0
        matched = pr.digests[:g]
        if matched:
            gpu.prepare_load(matched)
        evicted = self._free_for_admission(blocks - g)
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
        g, restored, stored = self.serve_blocks(pr)
        self._note_result(pr, g, restored)
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

    def _uncount(self, pr: PreparedRequest, g: int, restored: int, short: int) -> None:
        """Take back what serving ``pr`` added to the totals (``serve_blocks``): ``g`` and ``restored`` hits,
        ``short`` host hits under ``min_restore_tokens``."""
        st = self.stats
        st.requests -= 1
        st.prompt_tokens -= pr.request.input_length
        st.prompt_blocks -= pr.prompt_blocks
        st.gpu_hit_blocks -= g
        st.host_hit_blocks -= restored
        st.requests_with_host_hits -= restored > 0
        st.short_host_hit_blocks -= short

    def _note_result(self, pr: PreparedRequest, g: int, restored: int, final: bool = True) -> None:
        """Count ``pr``'s hits (its admission, or ``final`` False: its load, which may still be reclaimed)."""
        self._match_cache.pop(id(pr), None)
        if id(pr) in self._continues:   # a preempted request's continuation: counted at its first prefill
            self._uncount(pr, g, restored, self.served_short)
            return
        if final:
            self._load_short.pop(id(pr), None)
        else:                           # a load, which may be reclaimed: what to take back then
            self._load_short[id(pr)] = self.served_short
        own = self._reloaded.pop(id(pr), None) if final else self._reloaded.get(id(pr))
        if own:
            # blocks its own reclaimed load restored and it now matches on the GPU: restored, not GPU hits
            k = sum(1 for i in own if i < g)
            st = self.stats
            st.gpu_hit_blocks -= k
            st.host_hit_blocks += k
            st.requests_with_host_hits += bool(k) and not restored
            g, restored = g - k, restored + k
        self.results[self._position[id(pr)]] = (g, restored)

    def _start(self, pr: PreparedRequest, served, step: int, admitted: int | None = None,
               running: bool = False, parked: _Parked | None = None) -> None:
        """``pr`` runs from its prefill (or its last chunk) in ``step``: its end and block growth, in
        decode steps.  ``admitted``: the step its first chunk ran in; ``running``: it counts as running
        already (since that chunk); ``parked``: it resumes a preempted run, whose output blocks still extend
        that run's prompt."""
        r = pr.request
        bs = self.block_size
        self._end_load(pr)
        self._reloaded.pop(id(pr), None)     # (counted at its load, if it loaded: ``_note_result``)
        _, _, pinned, held = served
        if self.schedule is not None:
            self.schedule.append((step, "prefill", self._position[id(pr)]))
        first = self._first[id(pr)]          # the first step it could have run in
        began = step if admitted is None else admitted
        if began > first and id(pr) not in self._continues:
            self.stats.queued_requests += 1
            self.stats.queue_delay_s += self._seconds(began - first)
        if parked is None:
            state = _Running(pinned, held, pr.digests[-1] if pr.digests else pr.root, 0, self._n,
                             out_digests=pr.out_digests, out_bytes=pr.out_bytes, rooted=not pr.digests)
            base_length = r.input_length
        else:
            # a preempted request resumed with its blocks: its output blocks still extend its first run's prompt,
            # and its admission attaches every full block it holds to the trie (``block_trie.allocate``)
            was = parked.run
            base = was.pr if was.base is None else was.base
            base_length = base.request.input_length
            state = _Running(pinned, held, was.ghost_parent, r.input_length // bs - base_length // bs, self._n)
            state.ghost_id = was.index if was.ghost_id < 0 else was.ghost_id
            state.base = base
            state.out_digests, state.out_bytes, state.rooted = was.out_digests, was.out_bytes, was.rooted
        self._n += 1
        d0 = self._decoded              # the prefill step gives token 1; decode step d0 + i gives token i + 1
        state.pr, state.d0, state.prefilled = pr, d0, step
        self._push(d0 + max(0, r.output_length - 1), 0, state)
        # one growth per block the decode crosses beyond those taken on admission (_serve_now)
        for i in decode_growth_tokens(r.input_length, r.output_length, bs, self._admission_blocks(r.input_length)):
            # LMDeploy attaches a decoding sequence's full blocks to its trie only when it grows
            # (``schedule_running``: ``block_trie.allocate`` after the growth), then holding
            # input + i - 1 tokens; the blocks filled after its last growth are freed at its end
            # (a growth the request's end comes before, ``_grow_due``, attaches none)
            ghosts = (r.input_length + i - 1) // bs - base_length // bs
            heapq.heappush(self._growths, (d0 + i - 1, self._events, step, state, ghosts))
            self._events += 1
        if not running:
            self._live += 1
        self.stats.max_running = max(self.stats.max_running, self._live)

    def serve_at(self, pr: PreparedRequest) -> None:
        """Give the engine ``pr`` (requests in arrival order): the steps before it arrives are decided
        now; it is served when the engine admits it (``results``, once ``finish`` has run)."""
        key = id(pr)
        self._position[key] = len(self.results)
        self.results.append(None)
        first = math.ceil(pr.request.timestamp * self._rate)
        self._first[key] = first
        self._run_until(first)
        self._future.append(pr)

    def finish(self) -> SteppedStats:
        self._run_until(None)
        self._settle_writes(float("inf"))
        return super().finish()


def replay_stepped(prepared: Sequence[PreparedRequest], gpu_blocks: int, host_blocks: int,
                   host_policy: str = "lru", block_size: int = 1, lifetimes: Lifetimes = Lifetimes(),
                   engine: EngineSteps = EngineSteps(), show_progress: bool | None = None,
                   desc: str = "replay (engine steps)", host_write_s: float = 0.0,
                   min_restore_tokens: int = 0) -> SteppedStats:
    """Replay prepared requests (in arrival order) through a fresh ``SteppedTwoTierCache``."""
    t0 = time.perf_counter()
    cache = SteppedTwoTierCache(gpu_blocks, host_blocks, host_policy, block_size, lifetimes,
                                host_write_s=host_write_s, engine=engine, min_restore_tokens=min_restore_tokens)
    for pr in progress(prepared, desc, show_progress):
        cache.serve_at(pr)
    st = cache.finish()
    st.elapsed_s = time.perf_counter() - t0
    return st
