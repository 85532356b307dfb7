"""Drives a :class:`CpuEngine` through multi-turn conversations, with aborts, checking every step.

Turn ``k+1`` of a conversation arrives ``think_steps`` engine iterations after turn ``k`` ended
(finished or aborted); conversation ``c`` starts at iteration ``c * stagger``; at most
``max_active`` conversations have a request in flight. Request handlers (add, abort) run between
engine iterations, which is where LMDeploy's ``preprocess_loop`` runs them.

A turn marked ``resend`` (``TurnSpec.resend``) is sent as the conversation's previous prompt, the tokens the
engine generated for it and the turn's own ``prompt`` (an OpenAI chat client re-sending the conversation); the
handle's ``prompt`` is what was sent.

Abort kinds: ``'waiting'`` -- on the first iteration after arrival; ``'loading'`` -- as soon as the
sequence is seen in ``WAITING_FOR_REMOTE_KVS`` (if it never loads: when its first token is out);
``'decoding'`` -- after its first generated token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from lmdeploy.pytorch.messages import MessageStatus

from .checker import KVChecker
from .cpu_engine import CpuEngine, HarnessError, RequestHandle
from .workloads import TurnSpec


@dataclass
class RunReport:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    aborted_while_loading: int = 0
    iterations: int = 0
    idle_iterations: int = 0
    forwards: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0          # LMDeploy's per-request cached_tokens (GPU trie + external loads)
    seen_remote_loading: int = 0    # iterations on which some sequence was WAITING_FOR_REMOTE_KVS
    handles: list[RequestHandle] = field(default_factory=list)


class WorkloadDriver:

    def __init__(self, engine: CpuEngine, conversations: list[list[TurnSpec]], *,
                 checker: KVChecker | list[KVChecker] | None = None,
                 max_active: int = 3, stagger: int = 3, max_iterations: int = 20000, max_idle: int = 200,
                 on_iteration: Callable[['WorkloadDriver'], None] | None = None):
        self.engine = engine
        self.conversations = [list(turns) for turns in conversations]
        self.checkers = [] if checker is None else (list(checker) if isinstance(checker, list) else [checker])
        self.max_active = max_active
        self.stagger = stagger
        self.max_iterations = max_iterations
        self.max_idle = max_idle
        self.on_iteration = on_iteration
        self.iteration = 0
        self.report = RunReport()
        self._next_turn = [0] * len(self.conversations)
        self._ready_at = [c * stagger for c in range(len(self.conversations))]
        self._active: dict[int, tuple[int, TurnSpec, RequestHandle]] = {}  # conv -> (session, turn, handle)
        self._last: dict[int, RequestHandle] = {}    # conv -> its latest request (a resent turn extends it)
        self._loading_seen: set[int] = set()

    # -- arrivals and aborts ---------------------------------------------------------------
    def _launch(self) -> None:
        for c, turns in enumerate(self.conversations):
            if len(self._active) >= self.max_active:
                return
            if c in self._active or self._next_turn[c] >= len(turns) or self._ready_at[c] > self.iteration:
                continue
            turn = turns[self._next_turn[c]]
            prompt = turn.prompt
            if turn.resend and c in self._last:
                prev = self._last[c]
                prompt = np.concatenate([np.asarray(prev.prompt, dtype=np.int64),
                                         np.asarray(prev.output_tokens, dtype=np.int64),
                                         np.asarray(prompt, dtype=np.int64)])
            handle = self.engine.add_request(prompt, turn.max_new_tokens)
            self._last[c] = handle
            self._active[c] = (handle.session_id, turn, handle)
            self._next_turn[c] += 1
            self.report.requests += 1
            self.report.prompt_tokens += len(prompt)
            self.report.handles.append(handle)

    def _should_abort(self, turn: TurnSpec, handle: RequestHandle, launched_now: bool) -> bool:
        if turn.abort is None or handle.finished:
            return False
        seq = self.engine.sequence_of(handle.session_id)
        if seq is None:
            return False
        if turn.abort == 'waiting':
            return not launched_now
        generated = int(seq.num_new_tokens) > 0 or len(handle.output_tokens) > 0
        if turn.abort == 'loading':
            if seq.status == MessageStatus.WAITING_FOR_REMOTE_KVS:
                self._loading_seen.add(handle.session_id)
                return True
            return generated
        if turn.abort == 'decoding':
            return generated
        raise ValueError(f'unknown abort kind {turn.abort!r}')

    def _retire(self) -> None:
        for c, (session_id, turn, handle) in list(self._active.items()):
            if not (handle.finished or handle.aborted) and self._should_abort(turn, handle, launched_now=False):
                if self.engine.sequence_of(session_id).status == MessageStatus.WAITING_FOR_REMOTE_KVS:
                    self.report.aborted_while_loading += 1
                self.engine.abort(session_id)
                self.report.aborted += 1
            ended = handle.finished or (handle.aborted and self.engine.scheduler.get_session(session_id) is None)
            if ended:
                del self._active[c]
                self._ready_at[c] = self.iteration + turn.think_steps
                if handle.finished:
                    self.report.finished += 1
                    self.report.cached_tokens += handle.cached_tokens

    def pending(self) -> bool:
        return bool(self._active) or any(n < len(t) for n, t in zip(self._next_turn, self.conversations))

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> RunReport:
        idle = 0
        while self.pending() or self.engine.has_unfinished():
            if self.iteration >= self.max_iterations:
                raise HarnessError(f'workload did not finish within {self.max_iterations} iterations; '
                                   f'statuses {self.engine.statuses()}')
            self._retire()
            self._launch()
            progressed = self.engine.step()
            if self.engine.scheduler.has_remote_loading():
                self.report.seen_remote_loading += 1
            for rank, checker in enumerate(self.checkers):
                checker.check(f'iteration {self.iteration}' + (f' rank {rank}' if len(self.checkers) > 1 else ''))
            if self.on_iteration is not None:
                self.on_iteration(self)
            idle = 0 if progressed else idle + 1
            if idle > self.max_idle:
                raise HarnessError(f'engine made no progress for {idle} iterations; statuses '
                                   f'{self.engine.statuses()}')
            self.iteration += 1
            self._retire()
        self.report.iterations = self.iteration
        self.report.idle_iterations = self.engine.idle_iterations
        for record in self.engine.executor.records:
            self.report.forwards[record.kind] = self.report.forwards.get(record.kind, 0) + 1
        return self.report
