"""Single-tier replay of block-id traces through ``HostIndex``: hit rate per eviction policy.

The model (one host tier, no GPU in front of it) is the one behind the Mooncake paper's
capacity-vs-hit-rate curve and the README's LRU/Belady figures:

* a request is a chain of block ids (``Request.hash_ids``); only its *full* blocks
  (``Request.full_blocks``) have a digest and can be stored;
* per request: ``lookup`` from the root; the hit blocks are ``touch``-ed (parent-first, so the
  deepest hit is the most recent); every missed full block is stored with ``prepare_store`` +
  ``complete_store`` parent-first; if a store is refused (nothing evictable) the rest of the
  chain is not stored, since it would have no parent;
* **hit rate = hit blocks / prompt blocks**, where prompt blocks counts every block of every
  prompt, the partial last block included (``Trace.total_prompt_blocks``): the share of prompt
  tokens, at block granularity, that would not be recomputed.

Block "tokens" are the block id itself encoded with ``digest.block_id_bytes(id)`` (8 bytes, as the
planner's replay does, so a capture's 63-bit keyed ids replay too) and chained
with ``digest.digests_of_blocks`` in one ``Namespace``, so the index's digest and token checks
run exactly as in serving.  ``Trace`` guarantees block ids are chained (an id names its whole
prefix), so every id has one digest.

Belady (offline optimal) needs each block's future: ``belady_for(chains)`` builds it from the
same chains the replay will see; ``replay`` advances its clock once per request.

**Queue lookahead** (``replay(..., lookahead=True)``, a model of the waiting queue, not a policy):
when request ``i`` is served, the requests ``j > i`` with ``arrivals[j] <= arrivals[i]`` have
already arrived and wait.  Before request ``i`` is looked up, every waiting request's
host-resident prefix is held (``HostIndex.hold``: pinned, so no eviction takes it), extended as
it grows, and released just before that request is served.  Only arrival times already
reached are read, never a later request; a store that finds every slot pinned is refused, as in
serving.  Belady is never run with holds: holds only restrict which victims may be chosen, so
plain Belady stays an upper bound for every policy with or without lookahead.

**Admission cap** (``replay(..., admit_share=s)``, a store rule, not a policy): one request
stores at most ``max(1, int(s * capacity))`` of its missed blocks, parent-first from its hit; the
rest of its chain is not stored this time (its next request may store the next part).  One long
prompt then cannot flush the tier.  Not storing a block is a bypass, which Belady here never
does, so a capped replay *can* exceed the Belady figure (its gap share can pass 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .tier.digest import Namespace, block_id_bytes, digests_of_blocks
from .tier.eviction import BeladyPolicy, EvictionPolicy, make_policy
from .tier.host_index import HostIndex

EVAL_NAMESPACE = Namespace(model="eviction-eval", block_size=1, kv_format="trace-ids")


@dataclass(frozen=True)
class BlockChains:
    """A trace reduced to what replay needs: per request, its full blocks' digests and bytes,
    plus the number of prompt blocks (the hit-rate denominator) and, when the trace has them,
    arrival times in seconds (non-decreasing; empty when unknown: no lookahead replay)."""

    name: str
    digests: list[tuple[int, ...]]
    tokens: list[tuple[bytes, ...]]
    prompt_blocks: list[int]
    arrivals: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def total_prompt_blocks(self) -> int:
        return sum(self.prompt_blocks)


def chains_from_ids(name: str, id_chains: Iterable[Sequence[int]],
                    prompt_blocks: Iterable[int] | None = None,
                    namespace: Namespace = EVAL_NAMESPACE,
                    arrivals: Iterable[float] | None = None) -> BlockChains:
    """Digest chains from chained block-id lists (``prompt_blocks`` defaults to chain length;
    ``arrivals``, optional, are the requests' arrival times in seconds).

    Raises ValueError when an id reappears under a different parent (the ids are not chained),
    when a prompt has fewer blocks than its chain, or when ``arrivals`` has the wrong length or
    goes back in time."""
    id_chains = [tuple(c) for c in id_chains]
    pbs = [len(c) for c in id_chains] if prompt_blocks is None else list(prompt_blocks)
    if len(pbs) != len(id_chains):
        raise ValueError(f"prompt_blocks has {len(pbs)} entries for {len(id_chains)} chains")
    arr = () if arrivals is None else tuple(float(t) for t in arrivals)
    if arrivals is not None:
        if len(arr) != len(id_chains):
            raise ValueError(f"arrivals has {len(arr)} entries for {len(id_chains)} chains")
        for r in range(1, len(arr)):
            if not arr[r] >= arr[r - 1]:
                raise ValueError(f"arrivals: request {r} arrives at {arr[r]}, before request {r - 1} "
                                 f"({arr[r - 1]}); requests must be in arrival order")
    enc: dict[int, bytes] = {}
    dig: dict[int, int] = {}
    parent_of: dict[int, int | None] = {}
    digests, tokens = [], []
    for r, chain in enumerate(id_chains):
        if pbs[r] < len(chain):
            raise ValueError(f"request {r}: prompt_blocks {pbs[r]} < {len(chain)} full blocks")
        # Longest already-digested prefix, then chain the rest from it.
        k = 0
        prev = None
        for h in chain:
            p = parent_of.get(h, ...)
            if p is ...:
                break
            if p != prev:
                raise ValueError(f"request {r}: block id {h} follows {prev}, earlier it followed {p}"
                                 " (ids are not chained prefixes)")
            prev = h
            k += 1
        new = chain[k:]
        if new:
            blocks = []
            for h in new:
                b = enc.get(h)
                if b is None:
                    b = enc[h] = block_id_bytes(h)
                blocks.append(b)
            parent = dig[chain[k - 1]] if k else None
            for h, d in zip(new, digests_of_blocks(namespace, blocks, parent)):
                if h in parent_of:  # known id under another parent, or repeated in this chain
                    raise ValueError(f"request {r}: block id {h} follows {prev}, earlier it followed "
                                     f"{parent_of[h]} (ids are not chained prefixes)")
                parent_of[h] = prev
                dig[h] = d
                prev = h
        digests.append(tuple(dig[h] for h in chain))
        tokens.append(tuple(enc[h] for h in chain))
    return BlockChains(name, digests, tokens, pbs, arr)


def chains_from_trace(trace) -> BlockChains:
    """``BlockChains`` of a ``planner.traces.Trace`` (full blocks stored, all prompt blocks
    counted, arrival times kept). Prompt blocks only: a request's ``output_hash_ids`` (the reply
    blocks a capture or the chat generator names) are not stored, so a turn that re-sends a reply
    misses them here, where ``plan`` (two tiers) hits them."""
    bs = trace.block_size
    reqs = trace.requests
    return chains_from_ids(trace.name, (r.hash_ids[:r.full_blocks(bs)] for r in reqs),
                           (r.prompt_blocks(bs) for r in reqs), arrivals=(r.timestamp for r in reqs))


def load_mooncake(path: str) -> BlockChains:
    """Mooncake JSONL through the planner's reader (512-token blocks, request order by time)."""
    from .planner.traces import read_mooncake  # noqa: PLC0415 (planner is optional here)
    return chains_from_trace(read_mooncake(path))


def load_weka(paths: Sequence[str], stagger_s: float = 0.0) -> BlockChains:
    """WEKA session files merged into one trace (64-token blocks, ids offset per file)."""
    from .planner.traces import read_weka  # noqa: PLC0415
    return chains_from_trace(read_weka(paths, stagger_s=stagger_s))


def chat_chains(workload=None) -> BlockChains:
    """The planner's built-in multi-turn chat generator (``planner.generator``), default workload."""
    from .planner.generator import ChatWorkload, generate_chat  # noqa: PLC0415
    return chains_from_trace(generate_chat(workload or ChatWorkload()))


def footprint(chains: BlockChains) -> int:
    """Distinct full blocks of the trace: the capacity at which nothing is ever evicted."""
    return len({d for ds in chains.digests for d in ds})


def head(chains: BlockChains, n: int) -> BlockChains:
    """The first ``n`` requests."""
    return BlockChains(chains.name, chains.digests[:n], chains.tokens[:n], chains.prompt_blocks[:n],
                       chains.arrivals[:n])


def belady_for(chains: BlockChains) -> BeladyPolicy:
    """The offline-optimal policy for ``chains`` (uses: the request indices that list a block)."""
    uses: dict[int, list[int]] = {}
    for r, ds in enumerate(chains.digests):
        for d in ds:
            lst = uses.get(d)
            if lst is None:
                uses[d] = [r]
            else:
                lst.append(r)
    return BeladyPolicy(uses)


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    requests: int
    prompt_blocks: int
    hit_blocks: int
    stored_blocks: int
    evictions: int
    seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "capacity": self.capacity, "requests": self.requests,
                "prompt_blocks": self.prompt_blocks, "hit_blocks": self.hit_blocks,
                "hit_rate": round(self.hit_rate, 6), "stored_blocks": self.stored_blocks,
                "evictions": self.evictions, "seconds": round(self.seconds, 3)}


def make_eval_policy(name: str, chains: BlockChains) -> EvictionPolicy:
    """A policy by name; ``belady`` is built from ``chains`` (offline only)."""
    if name == "belady":
        return belady_for(chains)
    return make_policy(name)


def replay(chains: BlockChains, capacity: int, policy: str | EvictionPolicy = "lru",
           check_every: int = 0, progress: Callable[[int], None] | None = None,
           lookahead: bool = False, admit_share: float | None = None,
           hits_out: list[int] | None = None) -> ReplayResult:
    """Replay ``chains`` through a ``HostIndex`` of ``capacity`` slots; see the module docstring.

    ``check_every`` > 0 runs ``check_invariants`` every that many requests (slow; for tests).
    ``lookahead`` holds the waiting requests' host prefixes (module docstring; needs
    ``chains.arrivals``); ``stats['held_max']`` is then the most blocks held at once, and the
    index's lookup counters in ``stats`` include the lookahead's own lookups.  ``admit_share``
    in (0, 1] caps the blocks one request stores (module docstring).  ``hits_out``, when given, gets
    each request's hit blocks appended in order (its hits are always its leading blocks), for
    metrics that weigh a block by its position (``scripts/eviction_round8/position_cost.py``)."""
    if not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0 blocks, got {capacity!r}")
    if lookahead and len(chains.arrivals) != len(chains):
        raise ValueError(f"lookahead needs arrivals: {chains.name} has {len(chains.arrivals)} arrival "
                         f"times for {len(chains)} requests")
    if admit_share is not None and not 0 < admit_share <= 1:
        raise ValueError(f"admit_share must be in (0, 1], got {admit_share!r}")
    store_limit = None if admit_share is None else max(1, int(admit_share * capacity))
    if lookahead and isinstance(policy, str) and policy == "belady":
        raise ValueError("lookahead with belady: holds only restrict the optimum; replay belady without them")
    if isinstance(policy, str):
        pol = make_eval_policy(policy, chains)
    else:
        pol = policy
    idx = HostIndex(capacity, pol)
    root = EVAL_NAMESPACE.root
    lookup, touch = idx.lookup, idx.touch
    prepare, complete = idx.prepare_store, idx.complete_store
    clock = getattr(pol, "advance", None)
    hits = 0
    all_ds, all_bs, arrivals = chains.digests, chains.tokens, chains.arrivals
    n_req = len(all_ds)
    held: dict[int, int] = {}   # waiting request -> how many of its leading blocks are held
    arrived = 0                 # requests [0, arrived) have arrived
    held_max = 0
    t0 = time.perf_counter()
    for r, (ds, bs) in enumerate(zip(all_ds, all_bs)):
        if clock is not None:
            clock(r)
        if lookahead:
            k = held.pop(r, 0)
            if k:
                idx.release(ds[:k])
            arrived = max(arrived, r + 1)
            now = arrivals[r]
            while arrived < n_req and arrivals[arrived] <= now:
                held[arrived] = 0
                arrived += 1
            for j, k in held.items():  # hold each waiting request's resident prefix, as it grows
                m = lookup(all_ds[j], all_bs[j])
                if m > k:
                    idx.hold(all_ds[j][k:m])
                    held[j] = m
            held_max = max(held_max, sum(held.values()))
        n = lookup(ds, bs)
        if n:
            hits += n
            touch(ds[:n])
        if hits_out is not None:
            hits_out.append(n)
        parent = ds[n - 1] if n else root
        end = len(ds) if store_limit is None else min(len(ds), n + store_limit)
        for i in range(n, end):
            d = ds[i]
            if prepare(d, parent, bs[i]) is None:
                break
            complete(d, True)
            parent = d
        if progress is not None:
            progress(1)
        if check_every and r % check_every == 0:
            idx.check_invariants()
    secs = time.perf_counter() - t0
    st = idx.stats
    stats = st.as_dict()
    if lookahead:
        stats["held_max"] = held_max
    return ReplayResult(getattr(pol, "name", type(pol).__name__), capacity, len(chains),
                        chains.total_prompt_blocks, hits, st.inserts, st.evictions, secs, stats)


def belady_share(lru: float, policy: float, belady: float) -> float | None:
    """Share of the LRU -> Belady gap a policy wins (negative: worse than LRU)."""
    gap = belady - lru
    return (policy - lru) / gap if gap > 1e-12 else None
