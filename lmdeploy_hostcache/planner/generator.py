"""Built-in multi-turn chat workload (no trace file needed).

Each session is one token stream: a system prompt (drawn from a small shared pool), then user
turn 1, assistant reply 1, user turn 2, ...  Request ``k`` of a session is the stream up to the
end of user turn ``k``, so every turn extends the previous turn's prompt plus its reply.

Block ids follow the traces' chaining rule: a full block lying entirely inside a system prompt
gets that prompt's id (shared by every session using it); any other full block gets an id owned
by its session (the same in every later turn); a partial last block gets a fresh id (its content
differs from the full block a later turn completes).  Hence two requests share block ``i`` only
if they share every token up to the end of block ``i``.

Every draw comes from ``random.Random(seed)``: the same parameters give the same trace.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .traces import Request, Trace


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
        for f in ("sessions", "system_prompts", "block_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"chat workload: {f} must be a positive int, got {v!r}")
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


def generate_chat(w: ChatWorkload = ChatWorkload()) -> Trace:
    """A multi-turn chat trace; see the module docstring for the id rule."""
    rng = random.Random(w.seed)
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
            reqs.append(Request(timestamp=t, input_length=length, output_length=reply,
                                hash_ids=tuple(hash_ids), session=s))
            turn += 1
            if rng.random() >= p_continue:
                break
            length += reply
            t += rng.expovariate(1.0 / w.mean_think_s) if w.mean_think_s else 0.0
    reqs.sort(key=lambda r: r.timestamp)
    return Trace(f"chat(sessions={w.sessions}, seed={w.seed})", bs, reqs, source="built-in generator")
