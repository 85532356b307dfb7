"""A CPU engine loop around LMDeploy 0.18.0's real scheduling code.

Real LMDeploy objects used unchanged: ``Scheduler`` (paging, BlockTrie, KVLoadCoordinator,
KVSaveCoordinator), ``InputsMakerAsync`` and its ``_ForwardInputsTask`` (prefill/decode/long-chunk
selection, ``build_connector_meta``), ``EngineLoop._finish_forward_output`` /
``_make_infer_outputs`` (connector output, token update, finish), the AR strategies, and the
model-agent connector hooks ``start_kv_connector_step`` / ``start_kv_connector_save`` /
``finish_kv_connector_step``.

Replicated here (no CUDA, no asyncio): ``EngineLoop.main_loop`` / ``_main_loop_get_outputs``
(including the prefetch of step N+1 before step N's output is applied),
``InputsMakerAsync._send_next_inputs_impl`` and the request handlers of ``Engine``
(``_add_message``, stop/end session). ``REPLICATED_SOURCES`` pins their upstream source so a
LMDeploy change is noticed by the harness tests.

The executor runs each forward when it is dispatched, in dispatch order, which is the order the
GPU worker executes them in: connector ``start_load_kv`` -> oracle forward (writes KV of every
scheduled token at its kernel page) -> ``start_save_kv`` -> ``get_finished``; the output is
collected one loop iteration later, exactly like the real pipelined loop.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lmdeploy.pytorch.adapter.adapter import AdapterManager
from lmdeploy.pytorch.config import MiscConfig
from lmdeploy.pytorch.disagg.config import EngineRole
from lmdeploy.pytorch.engine import engine as _engine_mod
from lmdeploy.pytorch.engine import engine_loop as _engine_loop_mod
from lmdeploy.pytorch.engine import inputs_maker as _inputs_maker_mod
from lmdeploy.pytorch.engine.engine_loop import EngineLoop, EngineLoopConfig
from lmdeploy.pytorch.engine.inputs_maker import InputsMakerAsync, InputsMakerConfig
from lmdeploy.pytorch.engine.model_agent import BatchedOutputs
from lmdeploy.pytorch.engine.model_agent.kv_connector import (
    finish_kv_connector_step,
    start_kv_connector_save,
    start_kv_connector_step,
)
from lmdeploy.pytorch.engine.request import Response, ResponseType
from lmdeploy.pytorch.kv_connector import KVConnectorOutputAggregator, KVConnectorRole
from lmdeploy.pytorch.messages import MessageStatus, SamplingParam, SequenceMeta
from lmdeploy.pytorch.paging import Scheduler
from lmdeploy.pytorch.strategies import build_strategy_factory

from .kv_layout import CpuKVCache, HarnessCacheSpec, HarnessModel
from .oracle import PrefixOracle

# Upstream functions whose behaviour this module replicates; a changed source means the
# replica must be re-read against the new LMDeploy (see tests/integration/test_harness_stock.py).
REPLICATED_SOURCES = {
    'EngineLoop.main_loop': (_engine_loop_mod.EngineLoop.main_loop, '9c70d1d9742a'),
    'EngineLoop._main_loop_get_outputs': (_engine_loop_mod.EngineLoop._main_loop_get_outputs, 'fa28c86c4547'),
    'InputsMakerAsync._send_next_inputs_impl': (_inputs_maker_mod.InputsMakerAsync._send_next_inputs_impl,
                                                '2647e52b82a3'),
    'Engine._add_message': (_engine_mod.Engine._add_message, '144bcff87da7'),
    'Engine.end_session': (_engine_mod.Engine.end_session, 'ccfc632845b1'),
    'Engine._on_stop_session': (_engine_mod.Engine._on_stop_session, '79a4fca2d601'),
}


def source_digest(func) -> str:
    """Short sha256 of a function's source (whitespace-exact)."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:12]


class HarnessError(AssertionError):
    """The harness observed a broken engine invariant (not a KV byte mismatch)."""


@dataclass
class _AgentSeqState:
    """What the model agent (GPU side) knows of one sequence: its tokens and stop budget."""

    tokens: list[int]
    remaining: int


@dataclass
class ForwardRecord:
    """What one dispatched forward did (for tests and statistics)."""

    kind: str                      # 'prefill' | 'chunk' | 'decode' | 'connector'
    num_tokens: int
    had_connector_meta: bool


class CpuModelAgent:
    """Worker side: connector hooks around an oracle forward over the CPU cache.

    Mirrors ``BaseModelAgent._async_step`` for TP=1: ``start_kv_connector_step`` (bind + start
    loads) first, then the forward, then ``start_kv_connector_save`` and
    ``finish_kv_connector_step`` (poll ``get_finished``).
    """

    def __init__(self, cache: CpuKVCache, oracle: PrefixOracle, kv_connector=None):
        self.cache = cache
        self.oracle = oracle
        self.kv_connector = kv_connector
        self._seqs: dict[int, _AgentSeqState] = {}
        self.written_tokens = 0

    # The real agent keeps this state in StepInputs; prefill re-creates it from the sequence.
    def _prefill_rows(self, forward_inputs: dict, running: list):
        inputs = forward_inputs['inputs']
        seq_lens = inputs.seq_length.tolist()
        hist = inputs.history_lengths.tolist()
        ids = inputs.input_ids[0].numpy()
        offs = inputs.block_offsets
        crit = forward_inputs.get('stopping_criteria')
        appendable = crit.num_appendable_ids.tolist() if crit is not None else [1] * len(running)
        is_partial_chunk = bool(inputs.is_chunk and not inputs.is_last_chunk)
        pages, in_page, digests, next_tokens, stopped = [], [], [], [], []
        start = 0
        kbs = self.cache.kernel_block_size
        for row, seq in enumerate(running):
            n, h = seq_lens[row], hist[row]
            chunk = ids[start:start + n]
            start += n
            all_ids = seq.all_ids
            if not np.array_equal(all_ids[h:h + n], chunk):
                raise HarnessError(f'prefill row {row} (seq {seq.seq_id}) input ids differ from the sequence tokens')
            tokens = list(map(int, all_ids[:h + n]))
            d = self.oracle.prefix_digests(tokens, h, h + n)
            pos = np.arange(h, h + n)
            pages.append(offs[row, pos // kbs])
            in_page.append(torch.from_numpy(pos % kbs))
            digests.append(d)
            if is_partial_chunk:
                next_tokens.append(0)
                stopped.append(False)
                continue
            tok = self.oracle.next_token(d[-1])
            remaining = int(appendable[row]) - 1
            self._seqs[int(seq.seq_id)] = _AgentSeqState(tokens=tokens + [tok], remaining=remaining)
            next_tokens.append(tok)
            stopped.append(remaining <= 0)
        return pages, in_page, digests, next_tokens, stopped

    def _decode_rows(self, forward_inputs: dict, running: list):
        delta = forward_inputs['delta']
        offs = delta.block_offsets
        kbs = self.cache.kernel_block_size
        pages, in_page, digests, next_tokens, stopped = [], [], [], [], []
        for row, seq in enumerate(running):
            state = self._seqs.get(int(seq.seq_id))
            if state is None:
                raise HarnessError(f'decode of seq {seq.seq_id} that the agent never prefilled')
            pos = len(state.tokens) - 1
            d = self.oracle.prefix_digests(state.tokens, pos, pos + 1)
            pages.append(offs[row, pos // kbs].reshape(1))
            in_page.append(torch.tensor([pos % kbs]))
            digests.append(d)
            tok = self.oracle.next_token(d[-1])
            state.tokens.append(tok)
            state.remaining -= 1
            next_tokens.append(tok)
            stopped.append(state.remaining <= 0)
        return pages, in_page, digests, next_tokens, stopped

    def shutdown_kv_connector(self) -> None:
        """``BaseModelAgent._shutdown_kv_connector`` (sleep, ``build_cache_engine``, ``release``):
        ``kv_connector.shutdown()`` then forget it; the agent's request-local state goes too
        (``reset_runtime_state``)."""
        if self.kv_connector is not None:
            self.kv_connector.shutdown()
            self.kv_connector = None
        self._seqs.clear()

    def step(self, forward_inputs: dict, running: list) -> tuple[BatchedOutputs, ForwardRecord]:
        meta = forward_inputs.get('kv_connector_metadata')
        connector_step = start_kv_connector_step(self.kv_connector, meta)
        inputs, delta = forward_inputs['inputs'], forward_inputs['delta']
        if inputs is None and delta is None:
            output = finish_kv_connector_step(self.kv_connector, connector_step)
            if output is None:
                raise HarnessError('connector-only step without connector output')
            return BatchedOutputs.connector_only(output), ForwardRecord('connector', 0, True)
        if inputs is not None:
            rows = self._prefill_rows(forward_inputs, running)
            kind = 'chunk' if (inputs.is_chunk and not inputs.is_last_chunk) else 'prefill'
        else:
            rows = self._decode_rows(forward_inputs, running)
            kind = 'decode'
        pages, in_page, digests, next_tokens, stopped = rows
        if digests:
            all_digests = np.concatenate(digests)
            self.oracle.write(torch.cat([torch.as_tensor(p, dtype=torch.long) for p in pages]),
                              torch.cat([torch.as_tensor(o, dtype=torch.long) for o in in_page]), all_digests)
            self.written_tokens += len(all_digests)
        start_kv_connector_save(self.kv_connector, connector_step)
        connector_output = finish_kv_connector_step(self.kv_connector, connector_step)
        out = BatchedOutputs(next_token_ids=torch.tensor(next_tokens, dtype=torch.long),
                             stopped=torch.tensor(stopped, dtype=torch.bool),
                             stop_pos=torch.zeros(len(next_tokens), dtype=torch.long),
                             kv_connector_output=connector_output)
        return out, ForwardRecord(kind, int(sum(len(d) for d in digests)), meta is not None)


class CpuExecutor:
    """In-order executor: runs a forward when dispatched, hands outputs back FIFO.

    With several TP ranks it behaves like LMDeploy's ``RayExecutor``: every rank runs the step;
    for a connector step the ranks' ``kv_connector_output`` are merged by LMDeploy's
    ``KVConnectorOutputAggregator`` and the leader's model output carries the aggregate.
    """

    device_type = 'cpu'

    def __init__(self, agents: list[CpuModelAgent]):
        self.agents = list(agents)
        self.agent = self.agents[0]
        self.aggregator = KVConnectorOutputAggregator(len(self.agents)) if len(self.agents) > 1 else None
        self._outputs: deque[BatchedOutputs] = deque()
        self._held: deque[tuple[dict, list]] = deque()
        self.records: list[ForwardRecord] = []
        # True: a dispatched forward waits in the agent's input queue until its output is
        # requested (``drain`` then discards it unexecuted, as ``BaseModelAgent._drain_queues`` does).
        self.hold = False

    def forward(self, forward_inputs: dict, running: list) -> None:
        if self.hold:
            self._held.append((forward_inputs, running))
            return
        self._run(forward_inputs, running)

    def drain(self) -> int:
        """``BaseModelAgent._drain_queues`` on every rank (engine sleep): queued forwards are
        discarded unexecuted, finished outputs are dropped. Returns how many were discarded."""
        n = len(self._held) + len(self._outputs)
        self._held.clear()
        self._outputs.clear()
        if self.aggregator is not None:   # RayExecutor.sleep clears partial completions too
            self.aggregator.clear()
        return n

    def _run(self, forward_inputs: dict, running: list) -> None:
        results = [agent.step(forward_inputs, running) for agent in self.agents]
        out, record = results[0]
        if self.aggregator is not None and forward_inputs.get('kv_connector_metadata') is not None:
            out.kv_connector_output = self.aggregator.aggregate([o.kv_connector_output for o, _ in results])
        self._outputs.append(out)
        self.records.append(record)

    def get_output(self) -> BatchedOutputs:
        if not self._outputs and self._held:   # a held forward runs when its output is due
            self._run(*self._held.popleft())
        if not self._outputs:
            raise HarnessError('output requested with no forward in flight')
        return self._outputs.popleft()

    @property
    def num_in_flight(self) -> int:
        return len(self._outputs) + len(self._held)


@dataclass
class RequestHandle:
    """One request (one LMDeploy session, api_server style: ended when it finishes; ``interactive``: the
    session stays open for its next turn, ``CpuEngine.continue_session``)."""

    session_id: int
    prompt: np.ndarray
    max_new_tokens: int
    resp: Response
    finished: bool = False
    aborted: bool = False
    output_tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    interactive: bool = False


class CpuEngine:
    """LMDeploy's scheduler + inputs maker + engine-loop order on CPU with an oracle forward.

    ``connector_builder`` has the signature of LMDeploy's ``build_kv_connector`` and builds both
    connector roles (None with ``kv_transfer_config=None``: stock LMDeploy); the worker role gets
    the connector rows of :class:`CpuKVCache`. ``after_scheduler_built(scheduler)`` runs right after
    ``Scheduler.__init__`` (where the activation patch calls ``install_scheduler_hook``).
    """

    def __init__(self,
                 model: HarnessModel = HarnessModel(),
                 spec: HarnessCacheSpec = HarnessCacheSpec(),
                 *,
                 kv_transfer_config=None,
                 connector_builder: Callable[..., object] | None = None,
                 after_scheduler_built: Callable[[Scheduler], None] | None = None,
                 configure_worker_connector: Callable[[object], None] | None = None,
                 enable_chunked_prefill: bool = False,
                 tp: int = 1):
        self.model = model
        self.spec = spec
        self.tp = int(tp)
        self.model_config = model.model_config()
        self.cache_config = spec.cache_config(kv_transfer_config)
        self.scheduler_config = spec.scheduler_config()
        if self.tp < 1 or model.num_kv_heads % self.tp:
            raise ValueError(f'tp={tp} must divide num_kv_heads={model.num_kv_heads}')
        # one cache (this rank's KV-head shard) and one oracle per TP rank
        self.kvs = [CpuKVCache(self.model_config, self.cache_config, world_size=self.tp) for _ in range(self.tp)]
        self.oracles = [PrefixOracle(kv, tp_rank=rank) for rank, kv in enumerate(self.kvs)]
        self.kv, self.oracle = self.kvs[0], self.oracles[0]
        if (kv_transfer_config is None) != (connector_builder is None):
            raise ValueError('kv_transfer_config and connector_builder go together (both or neither)')
        # Worker roles first, as BaseModelAgent.build_cache_engine runs before the Engine builds
        # the scheduler role; both through the factory signature of LMDeploy's build_kv_connector.
        # BaseModelAgent keeps its plan as ``block_cache_plan``; connectors may read it from the caller.
        self.block_cache_plan = self.kv.plan
        self.connector_builder = connector_builder
        self.configure_worker_connector = configure_worker_connector
        self.worker_connectors = [None] * self.tp
        scheduler_connector = None
        if connector_builder is not None:
            for rank in range(self.tp):
                self.worker_connectors[rank] = self._build_worker_connector(rank)
            scheduler_connector = connector_builder(KVConnectorRole.SCHEDULER, self.cache_config, tp_size=self.tp,
                                                    kv_head_replica_num=1)
        self.worker_connector = self.worker_connectors[0]
        self.scheduler_connector = scheduler_connector
        self.agents = [CpuModelAgent(kv, oracle, conn)
                       for kv, oracle, conn in zip(self.kvs, self.oracles, self.worker_connectors)]
        self.agent = self.agents[0]
        self.executor = CpuExecutor(self.agents)

        misc = MiscConfig(prefill_interval=spec.prefill_interval, enable_chunked_prefill=enable_chunked_prefill)
        factory = build_strategy_factory(self.model_config, misc)
        self.sampling_strategy = factory.build_sampling_strategy()
        self.model_agent_strategy = factory.build_model_agent_strategy()
        self.engine_strategy = factory.build_engine_strategy(cache_config=self.cache_config,
                                                             scheduler_config=self.scheduler_config)
        self.seq_strategy = factory.build_sequence_strategy()
        seq_meta = SequenceMeta(self.cache_config.block_size,
                                strategy=self.seq_strategy,
                                sampling_strategy=self.sampling_strategy,
                                use_mrope=False)
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config, seq_meta=seq_meta,
                                   kv_connector=scheduler_connector)
        if after_scheduler_built is not None:
            after_scheduler_built(self.scheduler)
        self.trie_evicted_blocks = 0
        self._count_trie_evictions()
        maker_config = InputsMakerConfig(max_batches=self.cache_config.max_batches,
                                         max_prefill_token_num=self.cache_config.max_prefill_token_num,
                                         role=EngineRole.Hybrid,
                                         block_size=self.cache_config.block_size,
                                         kernel_block_size=self.cache_config.kernel_block_size,
                                         window_size=self.cache_config.window_size,
                                         enable_prefix_caching=True,
                                         prefix_cache_decode_state_interval=0,
                                         is_ssm=False,
                                         dp=1,
                                         enable_chunked_prefill=enable_chunked_prefill,
                                         use_mrope=False,
                                         prefill_interval=spec.prefill_interval)
        self.inputs_maker = InputsMakerAsync(self.executor, self.scheduler, self.scheduler.state_checkpoints,
                                             AdapterManager(None), self.engine_strategy, self.sampling_strategy,
                                             self.model_agent_strategy, maker_config)
        self.engine_loop = EngineLoop(None, self.scheduler, self.scheduler.state_checkpoints, self.executor,
                                      self.seq_strategy, self.inputs_maker, EngineLoopConfig(role=EngineRole.Hybrid))
        self.max_session_len = self._max_session_len()
        self._next_session_id = 1
        self.requests: dict[int, RequestHandle] = {}
        self._forward_inputs = None
        self._next_running = None
        self.loop_iterations = 0
        self.idle_iterations = 0
        self.finished_order: list[int] = []
        self.sleeping = False
        self.closed = False

    def _build_worker_connector(self, rank: int):
        """``BaseModelAgent.build_cache_engine``'s connector part: build the worker role through the
        ``build_kv_connector`` signature and register this rank's connector rows."""
        conn = self.connector_builder(KVConnectorRole.WORKER, self.cache_config, global_rank=rank, tp_rank=rank,
                                      tp_size=self.tp, kv_head_replica_num=1)
        if self.configure_worker_connector is not None:
            self.configure_worker_connector(conn)
        conn.register_kv_caches(self.kvs[rank].connector_kv_caches)
        return conn

    def _count_trie_evictions(self) -> None:
        """Count GPU trie evictions (wraps this trie instance's ``evict``; LMDeploy code untouched)."""
        trie = self.scheduler.block_trie
        evict = trie.evict

        def counting_evict(max_num_blocks: int):
            evicted = evict(max_num_blocks)
            self.trie_evicted_blocks += int(evicted)
            return evicted

        trie.evict = counting_evict

    # -- request side (Engine._on_add_session/_add_message/_on_stop_session/end_session) -------
    def _max_session_len(self) -> int:
        usable = self.cache_config.num_gpu_blocks - self.cache_config.num_reserved_gpu_blocks
        return usable * self.cache_config.block_size - self.cache_config.block_size

    def add_request(self, prompt, max_new_tokens: int, interactive: bool = False) -> RequestHandle:
        """Open a session and add one message, as ``Engine._on_add_session`` + ``_add_message``
        (``interactive``: the session is not ended when the message finishes)."""
        prompt = np.asarray(prompt, dtype=np.int64)
        if prompt.size == 0:
            raise ValueError('prompt must not be empty')
        session_id = self._next_session_id
        self._next_session_id += 1
        session = self.scheduler.add_session(session_id)
        sampling = SamplingParam(top_k=1, max_new_tokens=int(max_new_tokens))
        session.add_sequence(prompt, sampling_param=sampling, adapter_name=None, multimodals=None,
                             input_embeddings=None, migration_request=None, resp_cache=False,
                             preserve_cache=False)
        msg = next(iter(session.sequences.values()))
        if sampling.max_new_tokens + msg.num_valid_ids > self.max_session_len:
            sampling.max_new_tokens = max(0, self.max_session_len - msg.num_valid_ids)
        resp = Response(type=ResponseType.SUCCESS, sender_id=0, event=None)
        msg.resp = resp
        handle = RequestHandle(session_id, prompt, sampling.max_new_tokens, resp, interactive=interactive)
        self.requests[session_id] = handle
        return handle

    def continue_session(self, handle: RequestHandle, prompt, max_new_tokens: int) -> None:
        """The next turn of an interactive session, as ``Engine._on_add_message`` adds a message to a
        session that has a sequence: its tokens are appended to that sequence, which is activated."""
        from lmdeploy.pytorch.messages import UpdateTokenMode

        msg = next(iter(self.scheduler.get_session(handle.session_id).sequences.values()))
        msg.update_token_ids(np.asarray(prompt, dtype=np.int64), multimodals=None, embeddings=None,
                             mode=UpdateTokenMode.INPUTS)
        msg.sampling_param = SamplingParam(top_k=1, max_new_tokens=int(max_new_tokens))
        msg.activate()
        msg.resp = handle.resp
        handle.finished = False
        handle.output_tokens = []

    def abort(self, session_id: int) -> None:
        """Client abort: STOP_SESSION then END_SESSION, as the API server does."""
        handle = self.requests[session_id]
        if self.scheduler.get_session(session_id) is None:
            return
        self.scheduler.stop_session(session_id)
        self.scheduler.end_session(session_id)
        handle.aborted = True

    def end_session(self, session_id: int) -> None:
        if self.scheduler.get_session(session_id) is not None:
            self.scheduler.end_session(session_id)

    # -- engine lifecycle: Engine.sleep / wakeup / update_params / close --------------------
    # LMDeploy 0.18.0's order, engine side (engine.py) and model-agent side (model_agent/agent.py).
    def sleep(self, level: int = 1) -> int:
        """``Engine.sleep(level)``. Returns how many dispatched forwards the drain discarded.

        ``EngineLoop.drain_for_sleep`` (the prefetched batch is dropped, its output never
        collected) -> ``_cancel_and_end_all_sessions`` -> ``executor.sleep``: every agent drains
        its queues (queued forwards discarded, outputs dropped) and shuts its KV connector down
        (``BaseModelAgent.sleep`` -> ``shutdown_kv_connector``; level 1 and 2 differ only in where
        the weights go) and releases the cache engine -> ``scheduler.
        finish_kv_transfers_after_worker_drain()`` -> ``EngineLoop.reset_runtime_state``.
        """
        if level not in (1, 2):
            raise ValueError(f'sleep level must be 1 or 2, got {level}')
        if self.sleeping:
            return 0
        self._forward_inputs, self._next_running = None, None
        for session in list(self.scheduler.get_sessions()):
            handle = self.requests.get(session.session_id)
            if handle is not None and not handle.finished:
                handle.aborted = True          # req_manager.reject_request(resp, reason='engine sleep')
            self.end_session(session.session_id)
        discarded = self.executor.drain()
        for agent in self.agents:
            agent.shutdown_kv_connector()
        self.worker_connectors = [None] * self.tp
        self.worker_connector = None
        self.scheduler.finish_kv_transfers_after_worker_drain()
        self.inputs_maker.reset_runtime_state()
        self.sleeping = True
        self.sleep_level = level
        return discarded

    def wakeup(self, tags: list[str] | None = None, *, host_fill: int | None = 0xA5,
               gpu_fill: int | None = None) -> None:
        """``Engine.wakeup(tags)``: with ``'kv_cache'`` every agent runs ``build_cache_engine``
        (old connector shut down if any, a new cache engine, a new worker connector registering
        the new rows). On an engine that is not asleep this is a cache rebuild the scheduler
        never hears about (LMDeploy does not stop it).

        A new allocation holds undefined bytes: ``host_fill`` fills every new host pool with that
        byte, ``gpu_fill`` the KV cache (None: the bytes are left as they were).
        """
        tags = ['weights', 'kv_cache'] if tags is None else list(tags)
        if 'kv_cache' in tags:
            for rank, agent in enumerate(self.agents):
                agent.shutdown_kv_connector()
                if gpu_fill is not None:
                    for pool in self.kvs[rank].allocation.pools:
                        pool.tensor.fill_(gpu_fill)
                conn = None
                if self.connector_builder is not None:
                    conn = self._build_worker_connector(rank)
                    pool = getattr(getattr(conn, 'worker_side', None), 'pool', None)
                    if host_fill is not None and pool is not None:
                        for chunk in pool.chunks:
                            chunk.fill_(host_fill)
                agent.kv_connector = conn
                self.worker_connectors[rank] = conn
            self.worker_connector = self.worker_connectors[0]
            self.sleeping = False

    def update_params(self) -> None:
        """``Engine.update_params``: ``executor.update_params`` -> ``BaseModelAgent.update_params``
        loads weights only; it touches neither the cache engine nor the KV connector (pinned by
        ``tests/integration/test_lifecycle_teardown.py``). The harness has no weights: no-op."""

    def close(self) -> None:
        """``Engine.close`` -> ``_loop_finally``: ``scheduler.shutdown()`` (scheduler connector
        shut down, load/save coordinators cleared) then ``executor.release()`` (every agent:
        ``_shutdown_kv_connector``)."""
        self.scheduler.shutdown()
        self.executor.drain()
        for agent in self.agents:
            agent.shutdown_kv_connector()
        self.worker_connectors = [None] * self.tp
        self.worker_connector = None
        self.closed = True

    def sequence_of(self, session_id: int):
        session = self.scheduler.get_session(session_id)
        if session is None or not session.sequences:
            return None
        return next(iter(session.sequences.values()))

    # -- engine loop -----------------------------------------------------------------------
    def _send_next_inputs(self, enable_empty: bool = False):
        """``InputsMakerAsync._send_next_inputs_impl`` without asyncio; the executor sees ``running``."""
        maker = self.inputs_maker
        self.scheduler.resume_completed_migrations()
        prefill = maker.do_prefill()
        forward_inputs = maker._make_forward_inputs(prefill, enable_empty)
        if forward_inputs is None:
            return None, None
        next_running = forward_inputs.pop('running')
        self.executor.forward(forward_inputs, next_running)
        maker._last_forward_kind = maker._forward_kind(forward_inputs['inputs'], forward_inputs['delta'])
        self.scheduler.tick()
        maker.forward_inputs = forward_inputs
        return forward_inputs, next_running

    def has_unfinished(self) -> bool:
        return self.engine_loop.has_runable_event.has_unfinished() or self._next_running is not None

    def step(self) -> bool:
        """One iteration of ``EngineLoop.main_loop``. Returns False when nothing could be dispatched."""
        self.loop_iterations += 1
        if self._next_running is None:
            if not self.engine_loop.has_runable_event.has_unfinished():
                self.idle_iterations += 1
                return False
            self._forward_inputs, self._next_running = self._send_next_inputs()
            if self._next_running is None:
                self.idle_iterations += 1
                return False
        running, forward_inputs = self._next_running, self._forward_inputs
        self.scheduler.activate_seqs(running)
        # EngineLoop._main_loop_get_outputs
        model_inputs = forward_inputs['inputs']
        delta = forward_inputs['delta']
        cache_inputs = forward_inputs['cache_inputs']
        has_model_work = model_inputs is not None or delta is not None
        if has_model_work:
            self.inputs_maker.update_running_seqs(running, model_inputs)
        has_save = cache_inputs is not None and cache_inputs.state_save_plan is not None
        if has_model_work:
            self.scheduler.state_checkpoints.finish_forward_dispatch(running, has_save_plan=has_save)
        self._forward_inputs, self._next_running = self._send_next_inputs(enable_empty=True)
        out = self.executor.get_output()
        if has_model_work:
            self.scheduler.state_checkpoints.unpin_saves(running)
        self.engine_loop._finish_forward_output(out, running, model_inputs, delta)
        del out
        self.inputs_maker.preempt_invalid_decode_seqs()
        self._drain_responses()
        return True

    def _drain_responses(self) -> None:
        queue = self.engine_loop.resp_queue
        while not queue.empty():
            outputs = queue.get_nowait()
            for session_id, out in outputs.items():
                handle = self.requests.get(session_id)
                if handle is None or handle.finished:
                    continue
                handle.output_tokens = [int(t) for t in np.asarray(out.token_ids).reshape(-1)]
                if out.req_metrics is not None and out.req_metrics.cached_tokens is not None:
                    handle.cached_tokens = max(handle.cached_tokens, int(out.req_metrics.cached_tokens))
                if out.finish:
                    handle.finished = True
                    self.finished_order.append(session_id)
                    # AsyncEngine ends a non-interactive session once its generation finished.
                    if not handle.interactive:
                        self.end_session(session_id)

    def live_sessions(self) -> list[int]:
        return [s.session_id for s in self.scheduler.get_sessions()]

    def statuses(self) -> dict[MessageStatus, int]:
        counts: dict[MessageStatus, int] = {}
        for seq in self.scheduler.seq_manager.get_all_sequences():
            counts[seq.status] = counts.get(seq.status, 0) + 1
        return counts
