"""Two-tier replay with request lifetimes: blocks of running requests cannot be evicted.

``replay.TwoTierCache`` serves each request and forgets it at once, so the whole GPU tier holds
reusable prefix.  In an engine a running request keeps its blocks until it finishes, and those
blocks are not eviction candidates; under load the GPU tier therefore holds less reusable
prefix than its size.  ``ConcurrentTwoTierCache`` models this:

* a request starting at ``t`` runs until
  ``t + recomputed_tokens / prefill_tokens_per_s + output_length / decode_tokens_per_s``
  (``Lifetimes``; both rates are **assumptions**, settable, printed with every result);
* it starts at its arrival (the trace's timestamp), or later when its prompt's blocks
  (``ceil(input / block_size)``, less the prefix blocks already pinned) do not fit beside what
  the running requests hold: then the running requests' events are played, in time order, until
  it fits (first come, first served, as the engine's waiting queue; a request larger than the
  whole tier runs when nothing else does);
* before a request is served, every event at or before its start is played in time order (a
  request ending, or a running request needing one more block);
* while it runs, the request pins (``HostIndex.prepare_load``: read pins, not candidates) every
  GPU block of its prompt it matched or stored, and the ones already in the GPU tier that it did
  not match (the block ending at the prompt's last token: LMDeploy recomputes that token but
  shares the trie's block, and stamps it when the request ends), holds a slot for its partial prompt block, and
  takes one more slot each time decoding crosses a block boundary, at that moment (slots taken
  from the GPU tier's allocator, evicting by policy when none is free), as LMDeploy grows a
  decoding sequence block by block;
* when it finishes, the pins and the held slots go, and the full blocks of prompt + output past
  the prompt's full blocks (``(input + output - 1) // block_size`` minus them: the blocks whose
  KV it computed) stay in the GPU tier as a chain under the prompt's last block (LMDeploy's trie
  keeps the full blocks a sequence filled while decoding).  Where the trace names them
  (``Request.output_hash_ids``, a capture's ``output_hash_ids``) they take those ids' digests, so
  a later prompt that re-sends the reply hits them (on the GPU, or on the host after a demotion),
  and one already in the GPU tier (the same reply cached before) is shared and refreshed; where it
  does not, they take digests no request can produce (the trace's next turn names its own blocks,
  so they are never hits).  They compete for space and are demoted like any evicted block.

* a GPU eviction's host copy is WRITING (pinned, not restorable) until the clock is more than
  ``host_write_s`` past the eviction (default 0: restorable by any later start).  In the engine the
  completion of a copy made while step t schedules reaches the scheduler after step t+1 has
  scheduled, so it is restorable from step t+2 (measured in the engine-in-the-loop harness,
  tests/integration/test_trace_capture.py, which passes 1.5 iterations).

Invariants: pins are balanced (every pin taken at serve is released at that request's end or at
``finish``); a held slot is never owned by a block; a request whose hold cannot be met (every GPU
block pinned) is counted in ``held_short_blocks`` and runs with what it got.  Not modelled here:
the engine's step clock and admission rules (prefill and decode steps, batch and token limits:
``engine_steps.SteppedTwoTierCache`` replaces the clock, ``plan --engine-steps``), chunked
prefill, preemption.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Sequence

from ..capture.record import kept_output_blocks
from .replay import PreparedRequest, ReplayStats, TwoTierCache, progress

DEFAULT_DECODE_TOKENS_PER_S = 40.0
# what ``plan`` says of this model's figures: the step model (engine_steps.py) is the one checked against the engine
APPROXIMATE_ADMISSION = ("approximate: a request is admitted whenever its blocks fit (no batch limit, no chunked "
                         "prefill); --engine-steps with the server's --max-batches, --prefill-interval and "
                         "--max-prefill-tokens follows LMDeploy's scheduler step by step and is the mode checked "
                         "against it (docs/planner.md, \"Validated against the engine\")")


def decode_growth_tokens(input_length: int, output_length: int, block_size: int, held_blocks: int):
    """The decode tokens ``i`` (1-based) at which a sequence holding ``held_blocks`` blocks crosses into each
    further block it needs: one per block, not per token (the first at token 1 or later, each next one
    ``block_size`` tokens on), up to the block of its last token."""
    first = max(held_blocks + 1, -(-(input_length + 1) // block_size))
    for need in range(first, -(-(input_length + output_length) // block_size) + 1):
        yield max(1, (need - 1) * block_size - input_length + 1)


@dataclass(frozen=True)
class Lifetimes:
    """How long a request runs (seconds of the trace's clock); both rates are assumptions."""

    decode_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    prefill_tokens_per_s: float = float("inf")

    def __post_init__(self) -> None:
        for name in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")

    def duration_s(self, recomputed_tokens: int, output_tokens: int) -> float:
        return recomputed_tokens / self.prefill_tokens_per_s + output_tokens / self.decode_tokens_per_s

    def describe(self) -> str:
        pre = "instant" if self.prefill_tokens_per_s == float("inf") else f"{self.prefill_tokens_per_s:,.0f} tokens/s"
        return (f"request lifetime = prefill ({pre}) + output tokens at {self.decode_tokens_per_s:g} tokens/s per "
                "request (assumed rates, not measurements)")

    def as_dict(self) -> dict:
        pre = None if self.prefill_tokens_per_s == float("inf") else self.prefill_tokens_per_s
        return {"decode_tokens_per_s": self.decode_tokens_per_s, "prefill_tokens_per_s": pre,
                "note": "assumed rates, not measurements"}


@dataclass
class ConcurrencyStats(ReplayStats):
    """``ReplayStats`` plus what the running requests held."""

    max_running: int = 0
    max_held_blocks: int = 0      # GPU blocks pinned or held by running requests at once (peak)
    held_short_blocks: int = 0    # held blocks a request could not get (every GPU block pinned)
    output_blocks: int = 0        # output blocks stored in the GPU tier at request ends (one already there: not counted)
    queued_requests: int = 0      # requests that waited for running ones to leave room
    queue_delay_s: float = 0.0    # their waits, summed


@dataclass
class _Running:
    pinned: tuple[int, ...]
    held: list[int]
    ghost_parent: int
    ghosts: int
    index: int
    ended: bool = False
    # the step model's (``engine_steps``): the request it serves, the decode steps run before its prefill
    # (or last chunk), and that step
    pr: object = None
    d0: int = 0
    prefilled: int = 0
    # a preempted request resumed with the blocks it kept: its output blocks extend ``base``'s prompt and
    # take their digests from ``ghost_id`` (the first run's index) (-1 / None: ``index`` / ``pr``)
    ghost_id: int = -1
    base: object = None
    # the output blocks' digests and token bytes, from ``ghost_parent`` on, where the trace names them
    # (``PreparedRequest.out_digests``); the blocks past them take ghost digests; ``rooted``: ``ghost_parent`` is
    # the namespace root (a prompt without a full block)
    out_digests: tuple = ()
    out_bytes: tuple = ()
    rooted: bool = False


class ConcurrentTwoTierCache(TwoTierCache):
    """``TwoTierCache`` whose requests run for a while; see the module docstring."""

    def __init__(self, gpu_blocks: int, host_blocks: int, host_policy: str = "lru", block_size: int = 1,
                 lifetimes: Lifetimes = Lifetimes(), verify_tokens: bool = True, host_write_s: float = 0.0,
                 min_restore_tokens: int = 0) -> None:
        super().__init__(gpu_blocks, host_blocks, host_policy, block_size, verify_tokens,
                         min_restore_tokens=min_restore_tokens)
        if isinstance(host_write_s, bool) or not isinstance(host_write_s, (int, float)) or not host_write_s >= 0:
            raise ValueError(f"host_write_s must be a number >= 0, got {host_write_s!r}")
        self.host_write_s = float(host_write_s)
        st = self.stats
        self.stats = ConcurrencyStats(st.block_size, st.gpu_blocks, st.host_blocks, st.host_policy)
        self.block_size = block_size
        self.lifetimes = lifetimes
        # heap of (time, kind, order, state): kind 0 = the request ends, 1 = it needs one more block
        self._running: list[tuple[float, int, int, _Running]] = []
        self._events = 0
        self._live = 0                     # running requests
        self._clock = float("-inf")        # time of the event or start being processed
        self._n = 0
        self._held_now = 0                 # slots in running requests' holds
        self._pins: dict[int, int] = {}    # digest -> running requests pinning it
        self._now = float("-inf")          # start of the latest request (starts never go back)
        self._writing: list[tuple[float, int]] = []   # (time started, digest): host copies in flight

    def _demote(self, block) -> None:
        """A GPU eviction: the host copy is in flight (WRITING, not loadable) until the clock
        moves more than ``host_write_s`` past the moment it started.  In the engine the copy is
        shipped with the step that evicted, and its completion reaches the scheduler only after
        the *next* step has scheduled (``update_connector_output`` runs after the schedule): a
        request admitted in the same step or the next one finds it WRITING and recomputes it
        (measured in the harness: a copy made while scheduling step t is loadable from step
        t+2).  ``host_write_s`` = 0 keeps only "not loadable at the same moment"."""
        host = self.host
        if host.prepare_store(block.digest, block.parent, block.tokens) is not None:
            self._writing.append((self._clock, block.digest))
            self.stats.demotions += 1
        elif block.digest not in host:
            host.drop_subtree(block.digest)
            self.stats.demotions_refused += 1

    def _settle_writes(self, now: float) -> None:
        """Host copies started before ``now`` have landed (in start order)."""
        writing = self._writing
        now -= self.host_write_s
        k = 0
        while k < len(writing) and writing[k][0] < now:
            self.host.complete_store(writing[k][1], True)
            k += 1
        if k:
            del writing[:k]

    def _push(self, t: float, kind: int, r: _Running) -> None:
        heapq.heappush(self._running, (t, kind, self._events, r))
        self._events += 1

    def _process_next(self) -> float:
        t, kind, _, r = heapq.heappop(self._running)
        self._clock = t
        if kind == 0:
            r.ended = True
            self._live -= 1
            self._end(r)
        elif not r.ended:  # decode crossed a block boundary: one more block, evicting by LRU for it
            got = self._hold(1)
            r.held.extend(got)
            self._held_now += len(got)
            self.stats.max_held_blocks = max(self.stats.max_held_blocks, self._occupied())
        return t

    def _end_until(self, t: float) -> None:
        running = self._running
        while running and running[0][0] <= t:
            self._process_next()

    def _occupied(self) -> int:
        """GPU blocks running requests hold now (a block pinned by several counts once)."""
        return len(self._pins) + self._held_now

    def _end(self, r: _Running) -> None:
        gpu, pins = self.gpu, self._pins
        if r.pinned:
            # LMDeploy stamps a sequence's blocks with the time it frees them (its LRU clock)
            gpu.touch(r.pinned)
            gpu.complete_load(r.pinned, False)  # read pins off; the blocks stay GPU-resident
            for d in r.pinned:
                n = pins[d] - 1
                if n:
                    pins[d] = n
                else:
                    del pins[d]
        for slot in r.held:
            gpu.allocator.free(slot)
        self._held_now -= len(r.held)
        parent = r.ghost_parent
        gid = r.index if r.ghost_id < 0 else r.ghost_id
        named, named_bytes = r.out_digests, r.out_bytes
        if named and not r.rooted and gpu.get(parent) is None:
            named = ()      # the prompt's blocks are not cached (a request longer than the tier): nothing to extend
        for k in range(r.ghosts):
            if k < len(named):      # the trace's id: a later prompt re-sending the reply matches it
                block, tokens = named[k], named_bytes[k]
            else:                   # a digest no request can produce: (1 << 128) + request index and position
                block, tokens = (1 << 128) + (gid << 20) + k, b""
            if gpu.prepare_store(block, parent, tokens) is not None:
                gpu.complete_store(block, True)
                self.stats.output_blocks += 1
            elif k >= len(named) or gpu.get(block) is None:   # no room (a named block already cached: shared)
                break
            parent = block

    def _hold(self, n: int) -> list[int]:
        gpu, held = self.gpu, []
        for _ in range(n):
            slot = gpu.allocator.allocate()
            if slot is None and gpu.evict(1):
                slot = gpu.allocator.allocate()
            if slot is None:
                self.stats.held_short_blocks += n - len(held)
                break
            held.append(slot)
        return held

    def _admit(self, pr: PreparedRequest, total: int) -> float:
        """Start time of a request needing ``total`` GPU blocks: its arrival, or later when the
        running requests leave too little room (first come, first served: never before the
        previous start); requests that end meanwhile finish in end order."""
        start = max(pr.request.timestamp, self._now)
        self._end_until(start)
        pins, cap = self._pins, self.stats.gpu_blocks
        shared = 0
        for d in pr.digests:
            if d not in pins:
                break
            shared += 1
        while self._running and self._occupied() + total - shared > cap:
            start = max(start, self._process_next())
        if start > pr.request.timestamp:
            self.stats.queued_requests += 1
            self.stats.queue_delay_s += start - pr.request.timestamp
        self._now = self._clock = start
        self._settle_writes(start)
        return start

    def serve_at(self, pr: PreparedRequest) -> tuple[int, int]:
        """Finish what ended by this request's start, then serve it and keep it running."""
        r = pr.request
        bs = self.block_size
        start = self._admit(pr, -(-r.input_length // bs))   # the prefill needs the prompt's blocks
        g, restored, stored = self.serve_blocks(pr)
        resident = self.gpu.is_resident
        pinned = tuple(d for d in pr.digests[:g + stored] if resident(d))
        if pinned:
            self.gpu.prepare_load(pinned)
            pins = self._pins
            for d in pinned:
                pins[d] = pins.get(d, 0) + 1
        held = self._hold(max(0, -(-r.input_length // bs) - len(pinned)))   # the partial prompt block
        ghosts = kept_output_blocks(r.input_length, r.output_length, bs)
        recomputed = max(0, r.input_length - (g + restored) * bs)
        lt = self.lifetimes
        t_prefill = start + lt.duration_s(recomputed, 0)
        end = start + lt.duration_s(recomputed, r.output_length)
        state = _Running(pinned, held, pr.digests[-1] if pr.digests else pr.root, ghosts, self._n,
                         out_digests=pr.out_digests, out_bytes=pr.out_bytes, rooted=not pr.digests)
        self._push(end, 0, state)
        # decode: a new block each time the sequence crosses a block boundary, at its i-th token
        for i in decode_growth_tokens(r.input_length, r.output_length, bs, -(-r.input_length // bs)):
            self._push(min(t_prefill + i / lt.decode_tokens_per_s, end), 1, state)
        self._n += 1
        self._live += 1
        self._held_now += len(held)
        st = self.stats
        st.max_running = max(st.max_running, self._live)
        st.max_held_blocks = max(st.max_held_blocks, self._occupied())
        return g, restored

    def finish(self) -> ConcurrencyStats:
        self._end_until(float("inf"))
        self._settle_writes(float("inf"))
        return super().finish()


def replay_concurrent(prepared: Sequence[PreparedRequest], gpu_blocks: int, host_blocks: int,
                      host_policy: str = "lru", block_size: int = 1, lifetimes: Lifetimes = Lifetimes(),
                      show_progress: bool | None = None, desc: str = "replay (concurrent)",
                      host_write_s: float = 0.0, min_restore_tokens: int = 0) -> ConcurrencyStats:
    """Replay prepared requests (in arrival order) through a fresh ``ConcurrentTwoTierCache``."""
    t0 = time.perf_counter()
    cache = ConcurrentTwoTierCache(gpu_blocks, host_blocks, host_policy, block_size, lifetimes,
                                   host_write_s=host_write_s, min_restore_tokens=min_restore_tokens)
    serve = cache.serve_at
    for pr in progress(prepared, desc, show_progress):
        serve(pr)
    st = cache.finish()
    st.elapsed_s = time.perf_counter() - t0
    return st
