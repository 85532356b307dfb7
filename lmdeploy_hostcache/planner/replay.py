"""Two-tier replay: a trace through the engine's own index and eviction code.

Both tiers are ``HostIndex`` instances (``tier/host_index.py``, imported, never copied):

* the **GPU tier** uses policy ``lru`` with leaf-first eviction, which is what LMDeploy's
  BlockTrie does (LRU over leaves with ref_count 1);
* the **host tier** uses the configured policy; the tiers are exclusive in capacity: a restored
  block's host copy is kept (``keep_restored``, the server's ``keep_restored_blocks`` default) only
  until its slot is needed, before any eviction, so the host holds what an exclusive pair's would,
  and a re-eviction of a kept block copies nothing (docs/planner.md "The replay model").

Per request (block ``i`` has digest ``d[i]``, chained from the namespace root over the block's id
bytes, so digest and token-verification paths run exactly as in the engine):

1. GPU match: ``g = gpu.lookup(d[:m])`` over the ``m`` matchable blocks (LMDeploy recomputes the
   last prompt token, so a block ending exactly at the prompt's end never matches);
2. host continuation: ``h = host.lookup(d[g:m])`` from where the GPU match ended, at most half
   the host slots (the connector holds a reported hit from its lookup until its load starts and
   holds at most half the slots, so it reports no more than that); a hit of fewer than
   ``min_restore_tokens`` tokens is not restored (``h = 0``: the request recomputes those
   blocks and their host copies are not touched), as the connector decides;
3. the GPU hits are touched (LMDeploy's match refreshes their access time); the host hits are
   pinned for reading (``prepare_load``);
4. every full block from ``g`` on is inserted into the GPU tier (``prepare_store``: WRITING and
   pinned until the request is done).  The request never evicts its own blocks: new blocks are
   pinned, and its GPU hits are ancestors of the first new block, which ``prepare_store`` takes
   out of the candidates before it picks a victim (leaf-first eviction); a GPU eviction
   calls ``on_evict`` which demotes the victim into the host tier (``prepare_store`` +
   ``complete_store``) or, if the host cannot take it, reclaims its host orphans with
   ``drop_subtree``;
5. the restored blocks become kept restores (``complete_load(success=True)``), the new GPU blocks
   become resident (``complete_store``) and the GPU hits are unpinned.  A model whose loads take
   time (``engine_steps``) passes ``defer_host_release`` and ends the host reads itself, with
   ``release_host_copies(host_release)``, when the load completes;
6. (``serve`` only) the request's output blocks, when its trace names them, are stored after its
   prompt's last full block (below).

Only full blocks are cached; the partial last block of a prompt is always computed and counts
as a prompt block that missed.  Hit rates are fractions of prompt blocks.  **Output blocks**: a
request whose trace names them (``Request.output_hash_ids``, a capture's ``output_hash_ids``: the
full blocks past the prompt's whose KV it computed, chained after its prompt's full blocks) leaves
them in the GPU tier right after it is served (``serve``: step 6, ``_store_output``), as LMDeploy's
trie holds a finished sequence's full blocks at its end; like the prompt's blocks here, all of them
and at once (the concurrency replays decide when and how many, ``concurrency.py``,
``engine_steps.py``).  A later prompt that re-sends the reply (an OpenAI chat client sends the
previous prompt, the reply and a new message) names the same ids, so it hits them, on the GPU or,
after a demotion, on the host.  A request without them leaves no output block here (the next turn's
prompt carries its reply with its own block ids, which nothing cached holds).  Requests are replayed
one at a time in arrival order and finish at once: concurrency (blocks held by running sequences) is
not modelled here; ``concurrency.py`` replays the same cache with request lifetimes.

If the GPU tier cannot take a block (everything pinned: the request is longer than the GPU
budget), the rest of the request is computed uncached and the request is counted in
``gpu_overflow_requests``; host hits past that point are left on the host.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from ..config import HostCacheConfig
from ..tier.digest import Namespace, block_id_bytes, digests_of_blocks
from ..tier.host_index import HostBlock, HostIndex
from .traces import Request, Trace


# the server's default ``min_restore_tokens`` (``plan`` replays it unless told otherwise)
SERVER_MIN_RESTORE_TOKENS: int = HostCacheConfig().min_restore_tokens


def resolve_min_restore(setting, sizing, calibration=None) -> int:
    """``min_restore_tokens`` as the server resolves it (``restore_cost.resolve_min_restore_tokens``): a number
    as is; ``auto`` -> the threshold for the planned host slot's bytes per token (the connector's
    ``host_slot_bytes * tp / block_size``; a draft model's bytes, which the server adds, are not modelled), from
    ``calibration`` or, without one, the server's own source (``$LMDEPLOY_HOSTCACHE_CALIBRATION``, else the
    assumed figures)."""
    from ..restore_cost import resolve_min_restore_tokens

    return resolve_min_restore_tokens(setting, sizing.host_block_bytes * sizing.cache_format.tp / sizing.block_size,
                                      calibration)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request with its digests computed once (reused across sweep points and nodes)."""

    request: Request
    digests: tuple[int, ...]      # one per full block
    block_bytes: tuple[bytes, ...]
    matchable: int
    prompt_blocks: int
    root: int                     # namespace root: the parent of the first block
    # the request's output blocks (``Request.output_hash_ids``), chained after ``digests``: their digests and
    # token bytes (empty when the trace does not name them)
    out_digests: tuple[int, ...] = ()
    out_bytes: tuple[bytes, ...] = ()


def prepare_trace(trace: Trace, namespace: Namespace | None = None) -> list[PreparedRequest]:
    """Digest every full block of every request (the same chain the engine computes)."""
    bs = trace.block_size
    # a file name that is not UTF-8 (surrogate escapes) still names a namespace
    name = trace.name.encode("utf-8", "backslashreplace").decode("utf-8")
    ns = namespace or Namespace(model=f"planner:{name}", block_size=bs)
    if ns.block_size != bs:
        raise ValueError(f"namespace block_size {ns.block_size} != trace block_size {bs}")
    out = []
    for r in trace.requests:
        full = r.full_blocks(bs)
        blocks = [block_id_bytes(h) for h in r.hash_ids[:full]]
        digests = digests_of_blocks(ns, blocks)
        if r.output_hash_ids:
            out_bytes = tuple(block_id_bytes(h) for h in r.output_hash_ids)
            out_digests = tuple(digests_of_blocks(ns, out_bytes, digests[-1] if digests else ns.root))
        else:
            out_bytes = out_digests = ()
        out.append(PreparedRequest(r, tuple(digests), tuple(blocks), r.matchable_blocks(bs), r.prompt_blocks(bs),
                                   ns.root, out_digests, out_bytes))
    return out


@dataclass
class ReplayStats:
    """Counters of one replay.  Block counts are prompt blocks of the trace's block size."""

    block_size: int
    gpu_blocks: int
    host_blocks: int
    host_policy: str
    requests: int = 0
    prompt_tokens: int = 0
    prompt_blocks: int = 0
    gpu_hit_blocks: int = 0
    host_hit_blocks: int = 0
    requests_with_host_hits: int = 0
    short_host_hit_blocks: int = 0  # host hits shorter than min_restore_tokens: recomputed, not restored
    gpu_overflow_requests: int = 0
    demotions: int = 0            # GPU evictions stored on the host
    demotions_refused: int = 0    # GPU evictions the host could not take (block lost)
    host_evictions: int = 0
    host_orphans_dropped: int = 0
    # the most slots each tier held at once (its allocator's high-water mark): the memory the tier used,
    # never above its capacity; one request at a time, never above the trace's distinct blocks either (the
    # concurrency replays add the slots running requests hold and second copies in flight)
    gpu_peak_blocks: int = 0
    host_peak_blocks: int = 0
    elapsed_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return (self.gpu_hit_blocks + self.host_hit_blocks) / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def gpu_hit_rate(self) -> float:
        return self.gpu_hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def host_hit_rate(self) -> float:
        return self.host_hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def gpu_hit_tokens(self) -> int:
        return self.gpu_hit_blocks * self.block_size

    @property
    def restored_tokens(self) -> int:
        return self.host_hit_blocks * self.block_size

    @property
    def recomputed_tokens(self) -> int:
        """Prompt tokens prefilled with the host tier (GPU-only prefill = this + restored)."""
        return self.prompt_tokens - self.gpu_hit_tokens - self.restored_tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, gpu_hit_rate=self.gpu_hit_rate, host_hit_rate=self.host_hit_rate,
                 gpu_hit_tokens=self.gpu_hit_tokens, restored_tokens=self.restored_tokens,
                 recomputed_tokens=self.recomputed_tokens)
        return d


class TwoTierCache:
    """A GPU tier over a host tier, both ``HostIndex``; see the module docstring."""

    def __init__(self, gpu_blocks: int, host_blocks: int, host_policy: str = "lru",
                 block_size: int = 1, verify_tokens: bool = True, keep_restored: bool = True,
                 min_restore_tokens: int = 0) -> None:
        for name, v in (("gpu_blocks", gpu_blocks), ("host_blocks", host_blocks),
                        ("min_restore_tokens", min_restore_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        # the connector restores a hit of h blocks when h * block_size >= min_restore_tokens
        self.min_restore_blocks = -(-min_restore_tokens // max(1, block_size))
        self.host = HostIndex(host_blocks, policy=host_policy, verify_tokens=verify_tokens,
                              keep_restored=keep_restored)
        self.gpu = HostIndex(gpu_blocks, policy="lru", verify_tokens=verify_tokens, on_evict=self._demote)
        self.stats = ReplayStats(block_size, gpu_blocks, host_blocks, host_policy)
        self._overflowed: set[int] = set()   # ``_overflow_key`` of the requests counted in gpu_overflow_requests
        self.short_hit = 0                    # the last ``restorable`` call's hit left unrestored
        self.served_short = 0                 # the last ``serve_blocks``' (counted in short_host_hit_blocks)
        self.restored_with_host = 0           # blocks restored with the host hit (a shared store's, l3.py)

    def _demote(self, block: HostBlock) -> None:
        host = self.host
        if host.prepare_store(block.digest, block.parent, block.tokens) is not None:
            host.complete_store(block.digest, True)
            self.stats.demotions += 1
        elif block.digest not in host:  # neither stored nor present (WRITING counts as present)
            host.drop_subtree(block.digest)
            self.stats.demotions_refused += 1

    def probe_found(self, pr: PreparedRequest) -> tuple[int, int]:
        """(GPU hits, host blocks found after them), before the connector's hold budget (half the
        host slots per request) cuts the host hit; no side effects."""
        m = pr.matchable
        g = self.gpu.lookup(pr.digests[:m], pr.block_bytes[:m])
        h = self.host.lookup(pr.digests[g:m], pr.block_bytes[g:m]) if g < m and self.host.num_slots else 0
        return g, h

    def probe(self, pr: PreparedRequest) -> tuple[int, int]:
        """(GPU hits, host hits) the request would get now; no side effects on the tiers."""
        g, h = self.probe_found(pr)
        return g, self.restorable(min(h, self.host.num_slots // 2))

    def restorable(self, h: int) -> int:
        """The host hit the connector restores: all ``h`` blocks, or none when they and the blocks restored
        with them (``restored_with_host``) are fewer than ``min_restore_tokens`` tokens (the request
        recomputes them; ``short_hit`` keeps how many, for the caller that serves the request to count)."""
        self.short_hit = h if h + self.restored_with_host < self.min_restore_blocks else 0
        return h - self.short_hit

    def serve(self, pr: PreparedRequest) -> tuple[int, int]:
        """Replay one request; returns (GPU-hit blocks, host-restored blocks).  Its output blocks, when the
        trace names them, stay in the GPU tier after it (``_store_output``)."""
        g, restored, _ = self.serve_blocks(pr)
        if pr.out_digests:
            self._store_output(pr)
        return g, restored

    def _store_output(self, pr: PreparedRequest) -> None:
        """The request's output blocks join the GPU tier after its prompt's last full block, as LMDeploy's
        trie keeps a finished sequence's full blocks: one already there is refreshed (the trie's block is
        shared, and stamped when the sequence frees it); the first that finds no room ends the run, and none
        is stored when the prompt's last full block is not in the GPU tier (a request longer than the tier:
        ``gpu_overflow_requests``), so no block is cached under a parent no tier holds."""
        gpu = self.gpu
        parent = pr.digests[-1] if pr.digests else pr.root
        if pr.digests and not gpu.is_resident(parent):
            return
        for d, b in zip(pr.out_digests, pr.out_bytes):
            if gpu.prepare_store(d, parent, b) is not None:
                gpu.complete_store(d, True)
            elif gpu.get(d) is None:    # no room (everything pinned)
                break
            parent = d

    def serve_blocks(self, pr: PreparedRequest, defer_host_release: bool = False,
                     load_only: bool = False) -> tuple[int, int, int]:
        """``serve`` that also returns how many blocks past its GPU match the request holds on the
        GPU: the ones it stored and the ones already there that it did not match (the block ending
        at the prompt's end, which LMDeploy never matches but shares with the trie).  The request's
        GPU blocks afterwards are ``digests[:g + covered]`` (all resident).  ``load_only``: store
        only the host hit's blocks (a load's destinations); ``store_blocks`` stores the rest later."""
        gpu, host, st = self.gpu, self.host, self.stats
        d = pr.digests
        g, h = self.probe(pr)
        self.served_short = self.short_hit   # this serve's count (a probe after it changes short_hit)
        st.short_host_hit_blocks += self.served_short
        if g:
            gpu.touch(d[:g])  # LMDeploy's match refreshes access times of the matched blocks
        if h:
            host.prepare_load(d[g:g + h])
        new, covered, overflow = self._store_run(pr, g, g + h if load_only else len(d))
        restored = min(h, len(new))
        self.host_release = (d[g:g + restored], d[g + restored:g + h]) if h else None
        if h and not defer_host_release:
            self.release_host_copies(self.host_release)
        for x in new:
            gpu.complete_store(x, True)
        r = pr.request
        st.requests += 1
        st.prompt_tokens += r.input_length
        st.prompt_blocks += pr.prompt_blocks
        st.gpu_hit_blocks += g
        st.host_hit_blocks += restored
        st.requests_with_host_hits += restored > 0
        self._count_overflow(pr, overflow)
        return g, restored, covered

    def _overflow_key(self, pr: PreparedRequest) -> int:
        """What identifies ``pr``'s trace request in ``gpu_overflow_requests`` (a model that serves a request
        again under another ``PreparedRequest``, as ``engine_steps`` does a preempted one's continuation,
        gives both the same key)."""
        return id(pr.request)

    def _count_overflow(self, pr: PreparedRequest, overflow: bool) -> None:
        """A request counts once in ``gpu_overflow_requests``, however many stores (chunks, a load's
        tail, a preempted request served again) ran out of GPU room."""
        if overflow:
            key = self._overflow_key(pr)
            if key not in self._overflowed:
                self._overflowed.add(key)
                self.stats.gpu_overflow_requests += 1

    def _store_run(self, pr: PreparedRequest, first: int, last: int) -> tuple[list[int], int, bool]:
        """Store ``digests[first:last]`` in the GPU tier (not completed yet): (the new ones, how many
        the request holds: new or already resident, whether the budget ran out: all pinned)."""
        gpu, d, b = self.gpu, pr.digests, pr.block_bytes
        new: list[int] = []
        covered = 0
        for i in range(first, last):
            parent = d[i - 1] if i else pr.root
            if gpu.prepare_store(d[i], parent, b[i]) is not None:
                new.append(d[i])
            elif gpu.get(d[i]) is None:  # nothing evictable: the GPU budget is all pinned
                return new, covered, True
            covered += 1
        return new, covered, False

    def store_blocks(self, pr: PreparedRequest, first: int, last: int | None = None) -> int:
        """Store the prompt's blocks from ``first`` on (the tail a load left to its prefill), up to
        ``last`` (default: all; a chunk's end); returns how many the request holds (``serve_blocks``'
        ``covered``, counted from ``first``)."""
        new, covered, overflow = self._store_run(pr, first, len(pr.digests) if last is None else last)
        for x in new:
            self.gpu.complete_store(x, True)
        self._count_overflow(pr, overflow)
        return covered

    def release_host_copies(self, release) -> None:
        """End a restore's read pins: the restored blocks become kept restores (or leave the host
        tier with ``keep_restored=False``), the ones the GPU had no room for stay as they were."""
        restored, refused = release
        if restored:
            self.host.complete_load(restored, True)
        if refused:
            self.host.complete_load(refused, False)

    def finish(self) -> ReplayStats:
        st = self.stats
        st.host_evictions = self.host.stats.evictions
        st.host_orphans_dropped = self.host.stats.dropped
        st.gpu_peak_blocks = self.gpu.allocator.high_water
        st.host_peak_blocks = self.host.allocator.high_water
        return st


def progress(items: Sequence, desc: str, enabled: bool | None):
    """tqdm on stderr when enabled (None: only on a terminal and for long inputs)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and len(items) >= 2000
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="req", file=sys.stderr, leave=False, mininterval=0.5)


def replay(prepared: Sequence[PreparedRequest], gpu_blocks: int, host_blocks: int, host_policy: str = "lru",
           block_size: int = 1, show_progress: bool | None = None, desc: str = "replay",
           keep_restored: bool = True, min_restore_tokens: int = 0) -> ReplayStats:
    """Replay prepared requests through a fresh two-tier cache (``min_restore_tokens``: the server's
    setting of that name; 0, the default here, restores every host hit)."""
    t0 = time.perf_counter()
    cache = TwoTierCache(gpu_blocks, host_blocks, host_policy, block_size, keep_restored=keep_restored,
                         min_restore_tokens=min_restore_tokens)
    serve = cache.serve
    for pr in progress(prepared, desc, show_progress):
        serve(pr)
    st = cache.finish()
    st.elapsed_s = time.perf_counter() - t0
    return st


def replay_trace(trace: Trace, gpu_blocks: int, host_blocks: int, host_policy: str = "lru",
                 show_progress: bool | None = None) -> ReplayStats:
    """Prepare and replay a trace (timing covers both)."""
    t0 = time.perf_counter()
    prepared = prepare_trace(trace)
    st = replay(prepared, gpu_blocks, host_blocks, host_policy, trace.block_size, show_progress)
    st.elapsed_s = time.perf_counter() - t0
    return st


def distinct_blocks(prepared: Sequence[PreparedRequest]) -> int:
    """Distinct full blocks (digests) in the prepared trace, output blocks the trace names included: no tier
    ever holds more than this, so a capacity at or above it behaves as unbounded."""
    seen: set[int] = set()
    for pr in prepared:
        seen.update(pr.digests)
        seen.update(pr.out_digests)
    return len(seen)
