"""Built-in workloads (no trace file needed): multi-turn chat, shared documents, agent sessions.

**Chat** (``ChatWorkload``, the planner's ``--chat``).  Each session is one token stream: a system
prompt (drawn from a small shared pool), then user turn 1, assistant reply 1, user turn 2, ...
Request ``k`` of a session is the stream up to the end of user turn ``k``, so every turn extends
the previous turn's prompt plus its reply.

Block ids follow the traces' chaining rule: a full block lying entirely inside a system prompt
gets that prompt's id (shared by every session using it); any other full block gets an id owned
by its session (the same in every later turn); a partial last block gets a fresh id (its content
differs from the full block a later turn completes).  Hence two requests share block ``i`` only
if they share every token up to the end of block ``i``.  Since the next turn's prompt holds the
reply, a request also names its output blocks (``Request.output_hash_ids``: the full blocks past
its prompt's whose KV it computed, ``capture.record.kept_output_blocks``) by the session's ids of
those positions, the ids the next turn's prompt gives them: the replays keep them cached at the
request's end, as LMDeploy's trie does, and the next turn hits them as it would in the engine.

**Shared documents** (``DocumentWorkload``): retrieval-style traffic.  Each request is one document
from a fixed library (its blocks are shared by every request for it) followed by a few blocks of its
own (a question; nobody else's prefix).  Documents are drawn by a Zipf law over a ranking that can be
reshuffled every ``drift`` requests (the popular documents change).

**Agent sessions** (``AgentWorkload``): a fixed set of sessions whose context only grows; each request
extends one session by a few blocks of its own and resends the whole context.  Sessions are visited in
turn (a cycle as large as all the sessions together), at random, or in bursts (one session for a
while, then another); a session sometimes starts over with a new context.

Every draw comes from ``random.Random(seed)``: the same parameters give the same trace.
``workload_from_params(family, {"field": "text"}, seed)`` builds any family from command-line text
(the planner's ``--generate FAMILY --workload-param FIELD=VALUE``), checking every field by name.
``random_workload(family, rng)`` draws a workload of one family with its parameters themselves
drawn at random (``bench eviction --set generated``: traffic shapes no eviction policy was tuned on).
"""
from __future__ import annotations

import heapq
import math
import random
import typing
from dataclasses import dataclass, fields, replace

from ..capture.record import kept_output_blocks
from .traces import Request, Trace


# Upper bound of each field (``--workload-param FIELD=VALUE``), far above any realistic workload: the
# generator allocates in proportion to them (a session, a document library) before ``limit`` applies, so
# a typo must be refused, not turn into gigabytes or a loop that never ends (mean_turns=1e300).
MAX_COUNT = 10_000_000          # sessions, requests, system prompts
MAX_LIBRARY = 1_000_000         # documents; agent sessions (each holds its own context)
MAX_BLOCKS = 100_000            # blocks of one document, one request's own blocks, one session's start or growth
MAX_TOKENS = 1 << 20            # tokens of a system prompt, a user turn, a reply or an output
MAX_BLOCK_SIZE = 1 << 20        # tokens per block
MAX_MEAN_TURNS = 1000.0
MAX_SECONDS = 1e9               # mean gaps and think times (about 30 years)
MAX_ZIPF = 100.0
MAX_UP_FRONT_BLOCKS = 10_000_000   # blocks made before the first request: a library, or every start context
MAX_SESSION_BLOCKS = 1 << 25    # block ids a chat session is expected to hold over all its turns

_MAXIMA = {
    "sessions": MAX_COUNT, "requests": MAX_COUNT, "system_prompts": MAX_COUNT, "drift": MAX_COUNT,
    "documents": MAX_LIBRARY, "document_blocks": MAX_BLOCKS, "own_blocks": MAX_BLOCKS, "start_blocks": MAX_BLOCKS,
    "growth_blocks": MAX_BLOCKS, "system_prompt_tokens": MAX_TOKENS, "user_tokens": MAX_TOKENS,
    "reply_tokens": MAX_TOKENS, "output_tokens": MAX_TOKENS, "block_size": MAX_BLOCK_SIZE,
    "mean_turns": MAX_MEAN_TURNS, "mean_think_s": MAX_SECONDS, "mean_session_gap_s": MAX_SECONDS,
    "mean_gap_s": MAX_SECONDS, "zipf": MAX_ZIPF,
}
_AGENT_SESSIONS = MAX_LIBRARY   # an agent workload's sessions are a library of contexts, not a stream


def _at_most(kind: str, w, maxima: dict | None = None) -> None:
    """Refuse any field of ``w`` above its upper bound (a range: its ``hi``), naming the field and the bound."""
    for name, high in (maxima or _MAXIMA).items():
        if not hasattr(w, name):
            continue
        v = getattr(w, name)
        top = v[1] if isinstance(v, tuple) else v
        if not top <= high:
            raise ValueError(f"{kind} workload: {name} must be at most {int(high)} (the upper bound of "
                             f"--workload-param {name}), got {v!r}")


def _up_front(kind: str, count_field: str, count: int, blocks_field: str, blocks_hi: int) -> None:
    """Refuse a workload whose blocks made before the first request (``count`` x ``blocks_hi``) pass the bound."""
    if count * blocks_hi > MAX_UP_FRONT_BLOCKS:
        raise ValueError(f"{kind} workload: {count_field} x {blocks_field} hi = {count * blocks_hi} blocks are made "
                         f"up front, over {MAX_UP_FRONT_BLOCKS}: lower --workload-param {count_field} or "
                         f"{blocks_field}")


def _session_blocks(w) -> None:
    """Refuse a chat workload whose sessions are expected to hold too many block ids (every turn resends the
    whole conversation, so a session holds about mean_turns x its last prompt's blocks)."""
    last = w.system_prompt_tokens + w.mean_turns * (w.user_tokens[1] + w.reply_tokens[1])
    blocks = w.mean_turns * last / w.block_size
    if blocks > MAX_SESSION_BLOCKS:
        raise ValueError(f"chat workload: a session is expected to hold mean_turns x (system_prompt_tokens + "
                         f"mean_turns x (user_tokens hi + reply_tokens hi)) / block_size = {blocks:.0f} block ids, "
                         f"over {MAX_SESSION_BLOCKS}: lower those --workload-param fields")


def _positive_ints(kind: str, w, names: tuple[str, ...]) -> None:
    for f in names:
        v = getattr(w, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{kind} workload: {f} must be a positive int, got {v!r}")


def _int_range(kind: str, w, name: str, low: int) -> None:
    lo, hi = getattr(w, name)
    if not (isinstance(lo, int) and isinstance(hi, int) and low <= lo <= hi):
        raise ValueError(f"{kind} workload: {name} must be a range {low} <= lo <= hi of ints, got {(lo, hi)!r}")


@dataclass(frozen=True)
class ChatWorkload:
    sessions: int = 300
    mean_turns: float = 6.0           # turns per session: 1 + geometric
    system_prompts: int = 4
    system_prompt_tokens: int = 1500
    user_tokens: tuple[int, int] = (30, 600)      # uniform range per user turn
    reply_tokens: tuple[int, int] = (80, 700)     # uniform range per assistant reply
    mean_think_s: float = 40.0        # gap between a reply and the next user turn (exponential)
    mean_session_gap_s: float = 6.0   # gap between session starts (exponential)
    block_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_ints("chat", self, ("sessions", "system_prompts", "block_size"))
        if self.system_prompt_tokens < 0:
            raise ValueError("chat workload: system_prompt_tokens must be >= 0")
        if not self.mean_turns >= 1:
            raise ValueError(f"chat workload: mean_turns must be >= 1, got {self.mean_turns!r}")
        for f in ("user_tokens", "reply_tokens"):
            lo, hi = getattr(self, f)
            if not 0 < lo <= hi:
                raise ValueError(f"chat workload: {f} must be a range 0 < lo <= hi, got {(lo, hi)!r}")
        for f in ("mean_think_s", "mean_session_gap_s"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"chat workload: {f} must be >= 0")
        _at_most("chat", self)
        _session_blocks(self)


def generate_chat(w: ChatWorkload = ChatWorkload(), limit: int | None = None) -> Trace:
    """A multi-turn chat trace; see the module docstring for the id rule.

    With ``limit``, the trace is exactly the first ``limit`` requests of the full trace, and
    generation stops at the first session that starts no earlier than the ``limit``-th earliest
    request so far: every later session's requests would sort after those (sessions start in
    order, the sort is stable), so a huge ``sessions`` with a small ``limit`` stays cheap."""
    rng = random.Random(w.seed)
    earliest: list[float] = []   # max-heap (negated) of the ``limit`` earliest timestamps so far
    bs = w.block_size
    ids: dict[tuple, int] = {}
    next_id = 0

    def block_id(key: tuple) -> int:
        nonlocal next_id
        v = ids.get(key)
        if v is None:
            v = ids[key] = next_id
            next_id += 1
        return v

    reqs: list[Request] = []
    start = 0.0
    p_continue = 1.0 - 1.0 / w.mean_turns
    for s in range(w.sessions):
        if s:
            start += rng.expovariate(1.0 / w.mean_session_gap_s) if w.mean_session_gap_s else 0.0
        if limit is not None and len(earliest) >= limit and (limit == 0 or start >= -earliest[0]):
            break
        sys_prompt = rng.randrange(w.system_prompts)
        sys_full = w.system_prompt_tokens // bs   # blocks wholly inside the system prompt
        length = w.system_prompt_tokens
        t = start
        turn = 0
        while True:
            length += rng.randint(*w.user_tokens)
            full = length // bs
            hash_ids = [block_id(("sys", sys_prompt, j)) if j < sys_full else block_id(("sess", s, j))
                        for j in range(full)]
            if length % bs:
                hash_ids.append(block_id(("partial", s, turn)))
            reply = rng.randint(*w.reply_tokens)
            # the output blocks whose KV the request computed: the next turn (prompt + reply + user turn) holds
            # them as full blocks past the system prompt, under the session's ids of their positions
            out_ids = tuple(block_id(("sess", s, j)) for j in range(full, full + kept_output_blocks(length, reply, bs)))
            reqs.append(Request(timestamp=t, input_length=length, output_length=reply,
                                hash_ids=tuple(hash_ids), session=s, output_hash_ids=out_ids))
            if limit:
                heapq.heappush(earliest, -t)
                if len(earliest) > limit:
                    heapq.heappop(earliest)
            turn += 1
            if rng.random() >= p_continue:
                break
            length += reply
            t += rng.expovariate(1.0 / w.mean_think_s) if w.mean_think_s else 0.0
    reqs.sort(key=lambda r: r.timestamp)
    if limit is not None:
        del reqs[limit:]
    return Trace(f"chat(sessions={w.sessions}, seed={w.seed})", bs, reqs, source="built-in generator")


class _FreshIds:
    """Block ids never handed out before: ``fresh(n)`` is the next ``n`` of them."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def _request(rng: random.Random, w, t: float, full_ids: list[int], fresh: _FreshIds, session: int) -> Request:
    """A prompt of the full blocks ``full_ids`` plus a partial last block of its own (so its last
    full block is reusable; none with one-token blocks), with an output length drawn from
    ``w.output_tokens``."""
    bs = w.block_size
    tail = rng.randint(1, bs - 1) if bs > 1 else 0
    return Request(timestamp=t, input_length=len(full_ids) * bs + tail, output_length=rng.randint(*w.output_tokens),
                   hash_ids=tuple(full_ids + (fresh(1) if tail else [])), session=session)


@dataclass(frozen=True)
class DocumentWorkload:
    documents: int = 200
    document_blocks: tuple[int, int] = (4, 120)   # uniform range of a document's full blocks
    own_blocks: tuple[int, int] = (0, 3)          # uniform range of a request's own full blocks
    zipf: float = 0.8                  # popularity of the document of rank k: 1 / (k + 1) ** zipf
    drift: int = 0                     # reshuffle the ranking every this many requests (0: never)
    requests: int = 3000
    mean_gap_s: float = 0.5            # exponential gap between arrivals
    output_tokens: tuple[int, int] = (20, 400)
    block_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_ints("document", self, ("documents", "requests", "block_size"))
        _int_range("document", self, "document_blocks", 1)
        _int_range("document", self, "own_blocks", 0)
        _int_range("document", self, "output_tokens", 1)
        if not self.zipf >= 0:
            raise ValueError(f"document workload: zipf must be >= 0, got {self.zipf!r}")
        if isinstance(self.drift, bool) or not isinstance(self.drift, int) or self.drift < 0:
            raise ValueError(f"document workload: drift must be an int >= 0, got {self.drift!r}")
        if not self.mean_gap_s >= 0:
            raise ValueError("document workload: mean_gap_s must be >= 0")
        _at_most("document", self)
        _up_front("document", "documents", self.documents, "document_blocks", self.document_blocks[1])


def generate_documents(w: DocumentWorkload = DocumentWorkload(), limit: int | None = None) -> Trace:
    """Shared-document traffic; see the module docstring.  Each prompt also ends in a partial block
    of its own, so its last full block is reusable.  Requests are made in time order, so ``limit``
    stops after the first ``limit`` (the head of the full trace)."""
    rng = random.Random(w.seed)
    fresh = _FreshIds()
    docs = [fresh(rng.randint(*w.document_blocks)) for _ in range(w.documents)]
    weights = [1.0 / (k + 1) ** w.zipf for k in range(w.documents)]
    ranking = list(range(w.documents))
    ranks = range(w.documents)
    reqs, t = [], 0.0
    for r in range(_count(w.requests, limit)):
        if w.drift and r and r % w.drift == 0:
            rng.shuffle(ranking)
        doc = docs[ranking[rng.choices(ranks, weights)[0]]]
        reqs.append(_request(rng, w, t, doc + fresh(rng.randint(*w.own_blocks)), fresh, session=r))
        t += rng.expovariate(1.0 / w.mean_gap_s) if w.mean_gap_s else 0.0
    return Trace(f"documents(documents={w.documents}, zipf={w.zipf:.2f}, seed={w.seed})", w.block_size, reqs,
                 source="built-in generator")


AGENT_ORDERS = ("cycle", "random", "bursts")


@dataclass(frozen=True)
class AgentWorkload:
    sessions: int = 16
    start_blocks: tuple[int, int] = (2, 30)   # a (re)started session's first context, full blocks
    growth_blocks: int = 4                    # full blocks each request adds to its session
    order: str = "bursts"                     # one of AGENT_ORDERS
    switch: float = 0.3                       # bursts: chance each request moves to another session
    restart: float = 0.02                     # chance a session starts over before a request
    requests: int = 2000
    mean_gap_s: float = 2.0
    output_tokens: tuple[int, int] = (20, 400)
    block_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_ints("agent", self, ("sessions", "growth_blocks", "requests", "block_size"))
        _int_range("agent", self, "start_blocks", 1)
        _int_range("agent", self, "output_tokens", 1)
        if self.order not in AGENT_ORDERS:
            raise ValueError(f"agent workload: order must be one of {AGENT_ORDERS}, got {self.order!r}")
        for f in ("switch", "restart"):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"agent workload: {f} must be in [0, 1], got {getattr(self, f)!r}")
        if not self.mean_gap_s >= 0:
            raise ValueError("agent workload: mean_gap_s must be >= 0")
        _at_most("agent", self, {**_MAXIMA, "sessions": _AGENT_SESSIONS})
        _up_front("agent", "sessions", self.sessions, "start_blocks", self.start_blocks[1])


def generate_agents(w: AgentWorkload = AgentWorkload(), limit: int | None = None) -> Trace:
    """Growing agent sessions; see the module docstring.  Requests are made in time order, so
    ``limit`` stops after the first ``limit`` (the head of the full trace)."""
    rng = random.Random(w.seed)
    fresh = _FreshIds()
    contexts = [fresh(rng.randint(*w.start_blocks)) for _ in range(w.sessions)]
    reqs, t, current = [], 0.0, 0
    for r in range(_count(w.requests, limit)):
        if w.order == "cycle":
            k = r % w.sessions
        elif w.order == "random":
            k = rng.randrange(w.sessions)
        else:
            if r and rng.random() < w.switch:
                current = rng.randrange(w.sessions)
            k = current
        if rng.random() < w.restart:
            contexts[k] = fresh(rng.randint(*w.start_blocks))
        contexts[k] = contexts[k] + fresh(w.growth_blocks)
        reqs.append(_request(rng, w, t, contexts[k], fresh, session=k))
        t += rng.expovariate(1.0 / w.mean_gap_s) if w.mean_gap_s else 0.0
    return Trace(f"agents(sessions={w.sessions}, order={w.order}, seed={w.seed})", w.block_size, reqs,
                 source="built-in generator")


WORKLOAD_FAMILIES = ("chat", "documents", "agents")


def random_workload(family: str, rng: random.Random):
    """A workload of ``family`` (one of ``WORKLOAD_FAMILIES``) whose parameters are drawn from
    ``rng`` over wide ranges: session counts, turn counts, prompt and reply lengths, think times,
    block sizes, library sizes, popularity skew and drift, session orders.  Returns the workload
    (a ``ChatWorkload``, ``DocumentWorkload`` or ``AgentWorkload``); ``generate(workload)`` makes
    its trace."""
    seed = rng.randrange(1 << 30)
    if family == "chat":
        lo_user, lo_reply = rng.randint(10, 500), rng.randint(10, 500)
        return ChatWorkload(sessions=rng.randint(80, 400), mean_turns=rng.uniform(1.2, 15.0),
                            system_prompts=rng.randint(1, 40), system_prompt_tokens=rng.choice((0, 300, 1500, 4000)),
                            user_tokens=(lo_user, lo_user + rng.randint(0, 1500)),
                            reply_tokens=(lo_reply, lo_reply + rng.randint(0, 1200)),
                            mean_think_s=rng.uniform(2.0, 600.0), mean_session_gap_s=rng.uniform(0.2, 30.0),
                            block_size=rng.choice((32, 64, 128, 512)), seed=seed)
    if family == "documents":
        return DocumentWorkload(documents=rng.randint(30, 800), zipf=rng.uniform(0.0, 1.5),
                                drift=rng.choice((0, 0, 500, 2000)), requests=rng.randint(1500, 5000), seed=seed)
    if family == "agents":
        return AgentWorkload(sessions=rng.randint(4, 60), growth_blocks=rng.randint(1, 12),
                             order=rng.choice(AGENT_ORDERS), requests=rng.randint(800, 3000), seed=seed)
    raise ValueError(f"unknown workload family {family!r}; choose from {WORKLOAD_FAMILIES}")


def _count(requests: int, limit: int | None) -> int:
    return requests if limit is None else min(requests, limit)


def generate(w, limit: int | None = None) -> Trace:
    """The trace of any built-in workload; with ``limit``, only its first ``limit`` requests
    (the same as ``generate(w).head(limit)``, without making the rest)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if isinstance(w, ChatWorkload):
        return generate_chat(w, limit)
    if isinstance(w, DocumentWorkload):
        return generate_documents(w, limit)
    if isinstance(w, AgentWorkload):
        return generate_agents(w, limit)
    raise TypeError(f"not a built-in workload: {w!r}")


WORKLOADS = {"chat": ChatWorkload, "documents": DocumentWorkload, "agents": AgentWorkload}
_KIND = {"chat": "chat", "documents": "document", "agents": "agent"}   # as the workloads' own errors say


def _parse_field(kind: str, name: str, hint, text: str):
    """``text`` as a value of the field type ``hint`` (int, float, str or a ``lo,hi`` int pair)."""
    try:
        if hint is int:
            return int(text)
        if hint is float:
            v = float(text)
            if not math.isfinite(v):
                raise ValueError
            return v
        if hint is str:
            return text
        lo, hi = text.split(",")
        return (int(lo), int(hi))
    except ValueError:
        want = {int: "an int", float: "a finite number", str: "text"}.get(hint, "a range LO,HI of ints")
        shown = repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text):,} characters)"
        raise ValueError(f"{kind} workload: {name} must be {want}, got {shown}") from None


def workload_params(family: str) -> tuple[str, ...]:
    """The fields ``workload_from_params`` accepts for ``family`` (every field but the seed)."""
    if family not in WORKLOADS:
        raise ValueError(f"unknown workload family {family!r}; choose from {WORKLOAD_FAMILIES}")
    return tuple(f.name for f in fields(WORKLOADS[family]) if f.name != "seed")


def workload_from_params(family: str, params: dict[str, str], seed: int = 0):
    """The ``family`` workload with its defaults, ``seed``, and each ``params`` field set from its text
    (an unknown field, a value of the wrong type or out of range is a ``ValueError`` naming it)."""
    names = workload_params(family)
    cls = WORKLOADS[family]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"{_KIND[family]} workload has no parameter {unknown[0]!r}; it has: {', '.join(names)}")
    values = {k: _parse_field(_KIND[family], k, hints[k], v) for k, v in params.items()}
    return replace(cls(seed=seed), **values)
