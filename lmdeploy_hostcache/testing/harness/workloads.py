"""Multi-turn workloads taken from the real traces in ``../shared/traces``, scaled down.

Scaling keeps the traces' prefix-sharing structure: trace blocks are chained prefix ids (two
requests share block i only if they share everything up to it), so a run of ``group``
consecutive trace blocks maps to one synthetic block of ``block_size`` tokens whose tokens are a
deterministic function of the whole tuple of ids; equal tuples give equal tokens, which makes
equal synthetic prefixes exactly where the trace had equal prefixes. A trailing partial group
becomes a proportionally shorter partial block, so prompts are not block aligned.

- WEKA coding-agent sessions (64-token blocks, ids local to a file): the top-level requests of a
  file are the turns of one conversation; each sub-agent entry (its own nested request list, same
  id scope, so it shares the file's system prefix) is another conversation.
- Mooncake conversation trace (512-token blocks, one global id space): requests are grouped into
  conversations by their first block after the shared system block; one trace block becomes one
  synthetic block.

``chat_conversations`` is not taken from a trace: chats whose later turns re-send the conversation as
an OpenAI chat client does (``TurnSpec.resend``: the previous turn's prompt, the tokens the engine
generated for it, then the new message), which the traces above never do (their next turn names its
own tokens where the reply was).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

TRACES_DIR = Path(__file__).resolve().parents[4] / 'shared' / 'traces'


def traces_dir() -> Path:
    """``../shared/traces`` relative to the project root (raises if it is missing)."""
    if not TRACES_DIR.is_dir():
        raise FileNotFoundError(f'trace folder not found: {TRACES_DIR}')
    return TRACES_DIR


@dataclass
class TurnSpec:
    """One request of a conversation."""

    conversation: str
    turn: int
    prompt: np.ndarray
    max_new_tokens: int
    think_steps: int = 0
    abort: str | None = None  # None | 'waiting' | 'loading' | 'decoding'
    # True: ``prompt`` is only this turn's new message; the driver sends the conversation's previous prompt,
    # the tokens the engine generated for it, then ``prompt`` (an OpenAI chat client re-sending the reply)
    resend: bool = False


def _block_tokens(source: str, ids: tuple[int, ...], length: int, vocab: int, seed: int) -> np.ndarray:
    key = xxhash.xxh3_64_intdigest(np.asarray(ids, dtype='<i8').tobytes(), seed=seed)
    key ^= xxhash.xxh3_64_intdigest(source.encode(), seed=seed)
    rng = np.random.default_rng(key)
    return rng.integers(10, vocab, size=length, dtype=np.int64)


def scale_hash_ids(hash_ids: list[int], *, source: str, group: int, block_size: int, max_blocks: int,
                   vocab: int = 32000, seed: int = 0) -> np.ndarray:
    """Synthetic prompt tokens for one trace request (see module docstring)."""
    if group <= 0 or block_size <= 0 or max_blocks <= 0:
        raise ValueError(f'group, block_size and max_blocks must be positive: {group}, {block_size}, {max_blocks}')
    parts = []
    for start in range(0, len(hash_ids), group):
        ids = tuple(hash_ids[:start + group])  # chained identity: the whole prefix of ids
        n_ids = min(group, len(hash_ids) - start)
        length = block_size if n_ids == group else max(1, round(block_size * n_ids / group))
        parts.append(_block_tokens(source, ids, length, vocab, seed))
        if len(parts) >= max_blocks:
            break
    return np.concatenate(parts)


def weka_conversations(*, files: list[str] | None = None, max_turns: int = 6, group: int = 32,
                       block_size: int = 16, max_blocks: int = 16, max_new_tokens: int = 6,
                       think_steps: int = 2, seed: int = 0) -> list[list[TurnSpec]]:
    """Conversations from WEKA session files (a file's main thread and each of its sub-agents)."""
    folder = traces_dir() / 'weka_sample'
    names = files or sorted(p.name for p in folder.glob('trace_*.json'))
    conversations = []
    for name in names:
        data = json.loads((folder / name).read_text())
        if data.get('block_size') != 64:
            raise ValueError(f'{name}: expected 64-token blocks, got {data.get("block_size")}')
        # Sub-agent entries nest their own request list (same id scope): each is a conversation.
        pending = [(f'weka/{name}', data['requests'])]
        while pending:
            key, requests = pending.pop(0)
            turns = []
            for req in requests:
                if 'hash_ids' not in req:
                    if isinstance(req.get('requests'), list):
                        pending.append((f"{key}/{req.get('agent_id', len(pending))}", req['requests']))
                    continue
                if len(turns) >= max_turns:
                    continue
                prompt = scale_hash_ids(req['hash_ids'], source=f'weka/{name}', group=group,
                                        block_size=block_size, max_blocks=max_blocks, seed=seed)
                out = int(max(1, min(max_new_tokens, req['out'] // 64)))
                turns.append(TurnSpec(key, len(turns), prompt, out, think_steps=think_steps))
            if turns:
                conversations.append(turns)
    return conversations


def mooncake_conversations(*, max_requests: int = 24, block_size: int = 16, max_blocks: int = 10,
                           max_new_tokens: int = 4, think_steps: int = 1, scan: int = 3000,
                           seed: int = 0, trace: str = 'conversation',
                           path: Path | None = None) -> list[list[TurnSpec]]:
    """Conversations of a Mooncake trace (``trace``: ``conversation`` or ``synthetic``, read from
    ``../shared/traces``, or the JSONL file ``path``, gzipped or not) that reuse a prefix beyond the
    first block.

    Requests are keyed by their second block id (the first is the shared system prompt); only
    keys with at least two requests in the first ``scan`` lines are kept, in trace order, until
    ``max_requests`` requests are taken.
    """
    if trace not in ('conversation', 'synthetic'):
        raise ValueError(f"trace must be 'conversation' or 'synthetic', got {trace!r}")
    if path is None:
        path = traces_dir() / 'mooncake' / f'{trace}_trace.jsonl'
    label = 'mooncake' if trace == 'conversation' else trace
    by_key: dict[int, list[dict]] = {}
    with (gzip.open(path, 'rt') if str(path).endswith('.gz') else open(path)) as fh:
        for i, line in enumerate(fh):
            if i >= scan:
                break
            req = json.loads(line)
            ids = req['hash_ids']
            if len(ids) >= 2:
                by_key.setdefault(ids[1], []).append(req)
    conversations, taken = [], 0
    for key, reqs in by_key.items():
        if len(reqs) < 2:
            continue
        turns = []
        for k, req in enumerate(reqs):
            if taken >= max_requests:
                break
            prompt = scale_hash_ids(req['hash_ids'], source=f'mooncake/{trace}', group=1,
                                    block_size=block_size, max_blocks=max_blocks, seed=seed)
            out = int(max(1, min(max_new_tokens, req['output_length'] // 64)))
            turns.append(TurnSpec(f'{label}/{key}', k, prompt, out, think_steps=think_steps))
            taken += 1
        if turns:
            conversations.append(turns)
        if taken >= max_requests:
            break
    return conversations


def chat_conversations(*, conversations: int = 6, turns: int = 5, system_prompts: int = 2, system_blocks: int = 2,
                       user_tokens: tuple[int, int] = (8, 40), max_new_tokens: int = 48, think_steps: int = 1,
                       block_size: int = 16, seed: int = 0, vocab: int = 32000) -> list[list[TurnSpec]]:
    """Chats whose turns after the first re-send the conversation (``TurnSpec.resend``): conversation ``c``
    opens with system prompt ``c % system_prompts`` (``system_blocks`` full blocks) and a user message of
    ``user_tokens`` tokens (a uniform range, the upper end excluded); each later turn adds one such message
    after the previous prompt and its reply (``max_new_tokens`` tokens: the harness model never stops
    early)."""
    if min(conversations, turns, system_prompts, block_size) <= 0 or system_blocks < 0 or \
            not 0 < user_tokens[0] < user_tokens[1]:
        raise ValueError('chat_conversations: counts and block_size must be positive, user_tokens a range (lo, hi) '
                         'with 0 < lo < hi')
    rng = np.random.default_rng(seed)
    systems = [rng.integers(10, vocab, size=system_blocks * block_size, dtype=np.int64)
               for _ in range(system_prompts)]
    chats = []
    for c in range(conversations):
        first = np.concatenate([systems[c % system_prompts],
                                rng.integers(10, vocab, size=int(rng.integers(*user_tokens)), dtype=np.int64)])
        spec = [TurnSpec(f'chat/{c}', 0, first, max_new_tokens, think_steps=think_steps)]
        for k in range(1, turns):
            message = rng.integers(10, vocab, size=int(rng.integers(*user_tokens)), dtype=np.int64)
            spec.append(TurnSpec(f'chat/{c}', k, message, max_new_tokens, think_steps=think_steps, resend=True))
        chats.append(spec)
    return chats


def assign_aborts(conversations: list[list[TurnSpec]], *, rate: float, kinds=('loading', 'decoding', 'waiting'),
                  seed: int = 0) -> int:
    """Mark a deterministic ``rate`` fraction of turns (never a conversation's first) for abort."""
    rng = np.random.default_rng(seed)
    marked = 0
    for turns in conversations:
        for turn in turns[1:]:
            if rng.random() < rate:
                turn.abort = kinds[int(rng.integers(len(kinds)))]
                marked += 1
    return marked
