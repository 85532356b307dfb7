"""Regenerate patches/*.diff: each is `diff -u` of a stock LMDeploy 0.18.0 file against a copy
with the change applied (the upstreamable form of what integration/activate.py does at run
time). Patches form a series: a file touched twice is diffed against the previous patch's output.

    .venv/bin/python patches/generate.py            # writes patches/00NN-*.diff
    .venv/bin/python patches/generate.py --check    # fails if a committed diff is stale

Every edit is an exact-text replacement that must match once, so a different LMDeploy
fails loudly here instead of producing a wrong diff.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _lmdeploy_root() -> Path:
    sys.path.insert(0, str(HERE.parent))
    from lmdeploy_hostcache.integration.guard import SUPPORTED_LMDEPLOY_VERSION, installed_lmdeploy_version, \
        lmdeploy_root

    root = lmdeploy_root()
    if root is None or installed_lmdeploy_version(root) != SUPPORTED_LMDEPLOY_VERSION:
        raise SystemExit(f"needs LMDeploy {SUPPORTED_LMDEPLOY_VERSION} installed")
    return root


# ----------------------------------------------------------------------------------------------
# the patch series: (file name, description, [(relative path, [(old, new), ...]), ...])

FACTORY = "pytorch/kv_connector/factory.py"

P1_FACTORY = [
    ("""import os
from typing import TYPE_CHECKING
""", """import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
"""),
    ("""if TYPE_CHECKING:
    from lmdeploy.pytorch.config import CacheConfig, DistConfig

""", """if TYPE_CHECKING:
    from lmdeploy.pytorch.config import CacheConfig, DistConfig

# Out-of-tree connectors register a provider module under this entry-point group; the entry
# point's name is the ``kv_connector`` value. A provider defines
# ``build_kv_connector(role, cache_config, **kwargs)`` and may define
# ``prepare_kv_connector_config(cache_config, **kwargs)`` (engine start, before the executor),
# ``validate_kv_connector_model(cache_config, model_config, misc_config)`` (executor init) and
# ``finalize_kv_connector_config(cache_config, rank_cache_block_bytes)`` (after GPU sizing, before
# the config is shipped to workers).
KV_CONNECTOR_ENTRY_POINT_GROUP = 'lmdeploy.kv_connectors'


def get_kv_connector_provider(name: str) -> Any | None:
    \"\"\"Return the registered provider of connector ``name``, or None.\"\"\"
    for entry_point in entry_points(group=KV_CONNECTOR_ENTRY_POINT_GROUP):
        if entry_point.name == name:
            return entry_point.load()
    return None


def _provider_hook(cache_config: CacheConfig, hook: str):
    transfer_config = cache_config.kv_transfer_config
    if transfer_config is None or not transfer_config.is_kv_transfer_instance:
        return None
    if transfer_config.kv_connector == 'MooncakeStoreConnector':
        return None
    provider = get_kv_connector_provider(transfer_config.kv_connector)
    return getattr(provider, hook, None)

"""),
    ("""    transfer_config = cache_config.kv_transfer_config
    if transfer_config is None or not transfer_config.is_kv_transfer_instance:
        return
    if transfer_config.kv_connector == 'MooncakeStoreConnector':
        if cache_config.num_cpu_blocks > 0:""", """    transfer_config = cache_config.kv_transfer_config
    if transfer_config is None or not transfer_config.is_kv_transfer_instance:
        return
    prepare = _provider_hook(cache_config, 'prepare_kv_connector_config')
    if prepare is not None:
        prepare(cache_config,
                model_path=model_path,
                dist_config=dist_config,
                distributed_executor_backend=distributed_executor_backend)
        return
    if transfer_config.kv_connector == 'MooncakeStoreConnector':
        if cache_config.num_cpu_blocks > 0:"""),
    ("""            kv_head_replica_num=kv_head_replica_num,
        )

    raise ValueError(f'Unsupported KV connector: {connector_name!r}')
""", """            kv_head_replica_num=kv_head_replica_num,
        )

    provider = get_kv_connector_provider(connector_name)
    if provider is not None:
        return provider.build_kv_connector(
            role,
            cache_config,
            global_rank=global_rank,
            tp_rank=tp_rank,
            tp_size=tp_size,
            kv_head_replica_num=kv_head_replica_num,
        )

    raise ValueError(f'Unsupported KV connector: {connector_name!r}')


def validate_kv_connector_model(cache_config: CacheConfig, model_config: Any, misc_config: Any = None) -> None:
    \"\"\"Let the configured connector refuse a model it cannot serve (before weights load).\"\"\"
    validate = _provider_hook(cache_config, 'validate_kv_connector_model')
    if validate is not None:
        validate(cache_config, model_config, misc_config)


def finalize_kv_connector_config(cache_config: CacheConfig, rank_cache_block_bytes: list[int]) -> None:
    \"\"\"Let the configured connector size itself from per-rank block bytes (before workers get the config).\"\"\"
    finalize = _provider_hook(cache_config, 'finalize_kv_connector_config')
    if finalize is not None:
        finalize(cache_config, rank_cache_block_bytes)
"""),
]

P1_INIT = [
    ("""from .factory import build_kv_connector, prepare_kv_connector_config
""", """from .factory import (
    build_kv_connector,
    finalize_kv_connector_config,
    prepare_kv_connector_config,
    validate_kv_connector_model,
)
"""),
    ("""    'build_kv_connector',
    'prepare_kv_connector_config',
]""", """    'build_kv_connector',
    'finalize_kv_connector_config',
    'prepare_kv_connector_config',
    'validate_kv_connector_model',
]"""),
]

P2_LIFECYCLE = [
    ("""import heapq
from typing import TYPE_CHECKING
""", """import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING
"""),
    ("""        self.allocator = allocator
        self.state_checkpoints = state_checkpoints
        self.leaves: set[Node] = set()
""", """        self.allocator = allocator
        self.state_checkpoints = state_checkpoints
        self.leaves: set[Node] = set()
        # Called as observer(leaf, physical_block) for each leaf chosen for eviction, before it is
        # detached and its block freed (its prefix and GPU page are still valid). It cannot veto.
        self.eviction_observer: Callable[[Node, int], None] | None = None
"""),
    ("""        else:
            return False, None

        evicted_blocks.append(leaf.block_id)""", """        else:
            return False, None

        if self.eviction_observer is not None:
            self.eviction_observer(leaf, int(self.allocator.get_physical_blocks(leaf.block_id)))
        evicted_blocks.append(leaf.block_id)"""),
]

P2_TRIE = [
    ("""    def evict(self, max_num_blocks: int):
        \"\"\"Evict checkpoint-frozen and trie-owned KV blocks.
""", """    def set_eviction_observer(self, observer):
        \"\"\"Report each evicted KV leaf as ``observer(leaf, physical_block)`` before it is freed.\"\"\"
        self._kv_lifecycle.eviction_observer = observer

    def evict(self, max_num_blocks: int):
        \"\"\"Evict checkpoint-frozen and trie-owned KV blocks.
"""),
]

P2_SCHEDULER = [
    ("""                                   checkpoint_state_manager=checkpoint_state_manager)
""", """                                   checkpoint_state_manager=checkpoint_state_manager)
        # A connector that keeps evicted prefix blocks (e.g. a host-memory tier) sees each eviction.
        on_block_evicted = getattr(kv_connector, 'on_prefix_block_evicted', None)
        if on_block_evicted is not None and self.block_trie.enabled:
            self.block_trie.set_eviction_observer(on_block_evicted)
"""),
]

SERVE = "cli/serve.py"
UTILS = "cli/utils.py"

P3_UTILS = [
    ("""    @staticmethod
    def kv_transfer_config(parser):""", """    @staticmethod
    def host_cache_gb(parser):
        \"\"\"Add the host-memory prefix-cache tier size.\"\"\"
        return parser.add_argument(
            '--host-cache-gb',
            type=str,
            default=None,
            help='Host DRAM in GiB (summed over TP ranks) for a prefix-cache tier under the GPU prefix '
            "cache, or 'auto'. Requires --enable-prefix-caching. Default: off")

    @staticmethod
    def host_cache_config(parser):
        \"\"\"Add the host-memory prefix-cache tier settings file.\"\"\"
        return parser.add_argument('--host-cache-config',
                                   type=str,
                                   default=None,
                                   help='YAML file of host-memory prefix-cache tier settings; enables the '
                                   'tier. --host-cache-gb overrides its host_cache_gb')

    @staticmethod
    def kv_transfer_config(parser):"""),
]

P3_SERVE = [
    ("""        # kv transfer
        ArgumentHelper.kv_transfer_config(pt_group)
""", """        # kv transfer
        ArgumentHelper.kv_transfer_config(pt_group)
        ArgumentHelper.host_cache_gb(pt_group)
        ArgumentHelper.host_cache_config(pt_group)
"""),
    ("""        kv_transfer_config = getattr(args, 'kv_transfer_config', None)
        if kv_transfer_config is not None and backend != 'pytorch':""", """        kv_transfer_config = getattr(args, 'kv_transfer_config', None)
        if args.host_cache_gb is not None or args.host_cache_config is not None:
            if kv_transfer_config is not None:
                raise ValueError('--host-cache-gb/--host-cache-config configure the HostTierConnector; '
                                 'they cannot be combined with --kv-transfer-config')
            from lmdeploy.messages import host_cache_transfer_config
            kv_transfer_config = host_cache_transfer_config(args.host_cache_gb, args.host_cache_config)
        if kv_transfer_config is not None and backend != 'pytorch':"""),
]

EXECUTOR = "pytorch/engine/executor/base.py"
P4_EXECUTOR = [
    ("""from lmdeploy.pytorch.disagg.messages import MigrationExecutionBatch
""", """from lmdeploy.pytorch.disagg.messages import MigrationExecutionBatch
from lmdeploy.pytorch.kv_connector import finalize_kv_connector_config, validate_kv_connector_model
"""),
    ("""        self.specdecode_config = specdecode_config
        self._maybe_disable_unsupported_prefix_caching(check_window=not self._has_cache_update_hook())
""", """        self.specdecode_config = specdecode_config
        self._maybe_disable_unsupported_prefix_caching(check_window=not self._has_cache_update_hook())
        validate_kv_connector_model(cache_config, model_config, misc_config)
"""),
    ("""        if self.cache_config.num_gpu_blocks != 0:
            # User supplied an explicit block count. Do not resize it from the
            # current free-memory snapshot.
            if spec_cache_config is not None:
                spec_cache_config.num_gpu_blocks = self.cache_config.num_gpu_blocks
            return
""", """        rank_block_bytes = [size.target + size.spec for size in cache_block_sizes]
        if self.cache_config.num_gpu_blocks != 0:
            # User supplied an explicit block count. Do not resize it from the
            # current free-memory snapshot.
            if spec_cache_config is not None:
                spec_cache_config.num_gpu_blocks = self.cache_config.num_gpu_blocks
            finalize_kv_connector_config(self.cache_config, rank_block_bytes)
            return
"""),
    ("""        if self.cache_config.num_gpu_blocks <= 2:
            raise RuntimeError('No enough gpu memory for kv cache.')
        if spec_cache_config is not None:
            spec_cache_config.num_gpu_blocks = self.cache_config.num_gpu_blocks
""", """        if self.cache_config.num_gpu_blocks <= 2:
            raise RuntimeError('No enough gpu memory for kv cache.')
        if spec_cache_config is not None:
            spec_cache_config.num_gpu_blocks = self.cache_config.num_gpu_blocks
        finalize_kv_connector_config(self.cache_config, rank_block_bytes)
"""),
]

MESSAGES = "messages.py"
P5_MESSAGES = [
    ("""LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
""", """def host_cache_transfer_config(host_cache_gb: float | str | None = None,
                               host_cache_config: str | None = None) -> KVTransferConfig:
    \"\"\"KVTransferConfig of the host-memory prefix-cache tier (HostTierConnector).

    ``host_cache_config`` is a YAML file of its settings; ``host_cache_gb`` (GiB or 'auto')
    overrides the size. The connector validates the settings when the engine starts.
    \"\"\"
    settings: dict[str, Any] = {}
    if host_cache_config is not None:
        import yaml
        with open(host_cache_config, encoding='utf-8') as f:
            settings = dict(yaml.safe_load(f) or {})
    if host_cache_gb is not None:
        settings['host_cache_gb'] = host_cache_gb
    return KVTransferConfig(kv_connector='HostTierConnector',
                            kv_role='kv_both',
                            kv_connector_extra_config={'hostcache_config': settings})


LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""),
    ("""    kv_transfer_config: KVTransferConfig | dict[str, Any] | None = None
    piecewise_cudagraph_max_tokens: int | None = None
""", """    kv_transfer_config: KVTransferConfig | dict[str, Any] | None = None
    piecewise_cudagraph_max_tokens: int | None = None
    # Host-memory prefix-cache tier: GiB or 'auto', and/or a YAML settings file. Either one
    # sets kv_transfer_config to the HostTierConnector (see host_cache_transfer_config).
    host_cache_gb: float | str | None = None
    host_cache_config: str | None = None
"""),
    ("""        if isinstance(self.kv_transfer_config, dict):
            self.kv_transfer_config = KVTransferConfig(**self.kv_transfer_config)
        elif self.kv_transfer_config is not None and not isinstance(self.kv_transfer_config, KVTransferConfig):
            raise TypeError('kv_transfer_config must be a KVTransferConfig, dict, or None')
""", """        if isinstance(self.kv_transfer_config, dict):
            self.kv_transfer_config = KVTransferConfig(**self.kv_transfer_config)
        elif self.kv_transfer_config is not None and not isinstance(self.kv_transfer_config, KVTransferConfig):
            raise TypeError('kv_transfer_config must be a KVTransferConfig, dict, or None')
        if self.host_cache_gb is not None or self.host_cache_config is not None:
            if self.kv_transfer_config is not None:
                raise ValueError('host_cache_gb/host_cache_config configure the HostTierConnector; '
                                 'kv_transfer_config is already set')
            self.kv_transfer_config = host_cache_transfer_config(self.host_cache_gb, self.host_cache_config)
"""),
]

ENGINE = "pytorch/engine/engine.py"
STATS = "metrics/stats.py"
LOGGERS = "metrics/loggers.py"
P6_MESSAGES = [
    ("""    prefix_cache_hit_rate: float = 0
    scheduler_tick: int = 0
""", """    prefix_cache_hit_rate: float = 0
    scheduler_tick: int = 0
    # Counters of the configured KV connector (KVConnectorBase.get_stats()), None without one.
    kv_connector_stats: dict[str, float] | None = None
"""),
]
P6_ENGINE = [
    ("""    def get_schedule_metrics(self):
        return self.scheduler.schedule_metrics
""", """    def get_schedule_metrics(self):
        metrics = self.scheduler.schedule_metrics
        get_stats = getattr(self.scheduler.kv_connector, 'get_stats', None)
        if get_stats is not None:
            metrics.kv_connector_stats = get_stats()
        return metrics
"""),
]
P6_STATS = [
    ("""        self.gpu_cache_usage = scheduled_metrics.cache_usage
        self.prefix_cache_hit_rate = scheduled_metrics.prefix_cache_hit_rate
""", """        self.gpu_cache_usage = scheduled_metrics.cache_usage
        self.prefix_cache_hit_rate = scheduled_metrics.prefix_cache_hit_rate
        self.kv_connector_stats = scheduled_metrics.kv_connector_stats
"""),
    ("""    gpu_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
""", """    gpu_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    kv_connector_stats: dict[str, float] | None = None
"""),
]
P6_LOGGERS = [
    ("""        if spec_msg is not None:
            log_msg += spec_msg

        print(log_msg, flush=True)
""", """        if spec_msg is not None:
            log_msg += spec_msg

        print(log_msg, flush=True)
        if scheduler_stats.kv_connector_stats:
            stats = ', '.join(f'{k}={v}' for k, v in scheduler_stats.kv_connector_stats.items())
            print(f'[DP{self.dp_rank}] KV connector: {stats}', flush=True)
"""),
    ("""        self.gauge_prefix_cache_hit_rate = prometheus_client.Gauge(
            name='lmdeploy:prefix_cache_hit_rate',
            documentation='Prefix-cache hit rate. 1 means 100 percent of queried prefix tokens hit.',
            labelnames=labelnames).labels(*labelvalues)
""", """        self.gauge_prefix_cache_hit_rate = prometheus_client.Gauge(
            name='lmdeploy:prefix_cache_hit_rate',
            documentation='Prefix-cache hit rate. 1 means 100 percent of queried prefix tokens hit.',
            labelnames=labelnames).labels(*labelvalues)

        # KV connector counters, one labelled gauge family (the connector defines the keys).
        self.gauge_kv_connector_stats = prometheus_client.Gauge(
            name='lmdeploy:kv_connector_stat',
            documentation='Counters reported by the configured KV connector.',
            labelnames=labelnames + ['stat'])
        self.kv_connector_labelvalues = labelvalues
"""),
    ("""        self.gauge_gpu_cache_usage.set(stats.gpu_cache_usage)
        self.gauge_prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)
""", """        self.gauge_gpu_cache_usage.set(stats.gpu_cache_usage)
        self.gauge_prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)
        for key, value in (stats.kv_connector_stats or {}).items():
            self.gauge_kv_connector_stats.labels(*self.kv_connector_labelvalues, key).set(value)
"""),
]

EVICTION_HELPER = "pytorch/paging/eviction_helper/recompute_eviction_helper.py"
P7_EVICTION_HELPER = [
    ("""        # Completed remote KV is already transferred and awaits consumption.
        if self.load_coordinator.is_remote_ready(seq):
            return False
""", """        # Completed remote KV is already transferred and awaits consumption.
        # With the prefix cache on, the load was published into the trie, so
        # reclaiming drops only this request's references: it re-matches the
        # trie when admitted again. Holding it instead can deadlock a chunked
        # long prefill that needs its blocks.
        if self.load_coordinator.is_remote_ready(seq) and not self.block_trie.enabled:
            return False
"""),
]

P9_SCHEDULER = [
    ("""        for seq in seqs:
            if seq.status == MessageStatus.RUNNING:
                seq.state.deactivate()
            self.kv_load_coordinator.release_tracking(seq)
            seq.state.evict()
""", """        for seq in seqs:
            if seq.status == MessageStatus.WAITING_FOR_REMOTE_KVS:
                # A stale running entry (a session kept open) whose next turn is
                # loading external KV: the load coordinator owns it until the
                # load's result, and its state cannot be evicted.
                continue
            if seq.status == MessageStatus.RUNNING:
                seq.state.deactivate()
            self.kv_load_coordinator.release_tracking(seq)
            seq.state.evict()
"""),
]

P10_AGENT = [
    ("""        self._background_task = None
        self._preprocess_task = None
        self._pending_h2d_transfers = deque()
        self.tasks = set()
""", """        self._background_task = None
        self._preprocess_task = None
        self._pending_h2d_transfers = deque()
        self.tasks = set()
        # Set while the background loop is between forward steps (see sleep).
        self._forward_idle: asyncio.Event | None = None
"""),
    ("""                    _record_forward_input_stream(forward_inputs, self.stream)

                await self._async_step(**forward_inputs, )
""", """                    _record_forward_input_stream(forward_inputs, self.stream)

                self._forward_idle.clear()
                try:
                    await self._async_step(**forward_inputs, )
                finally:
                    self._forward_idle.set()
"""),
    ("""        self._pre_in_que = asyncio.Queue()
        self._in_que = asyncio.Queue()
        self._out_que = asyncio.Queue()
""", """        self._pre_in_que = asyncio.Queue()
        self._in_que = asyncio.Queue()
        self._out_que = asyncio.Queue()
        self._forward_idle = asyncio.Event()
        self._forward_idle.set()
"""),
    ("""    def set_forward_inputs(self, inputs):
        \"\"\"Set forward inputs.\"\"\"
""", """    async def _wait_forward_idle(self):
        \"\"\"Wait until the background loop is between forward steps.\"\"\"
        while self._forward_idle is not None and not self._forward_idle.is_set():
            await self._forward_idle.wait()

    def set_forward_inputs(self, inputs):
        \"\"\"Set forward inputs.\"\"\"
"""),
    ("""        self.state.is_sleeping = True
        if self.dist_config.dp > 1:
            await self.state.to_sleep.wait()
        device = 'cpu' if level == 1 else 'meta'
""", """        self.state.is_sleeping = True
        if self.dist_config.dp > 1:
            await self.state.to_sleep.wait()
        else:
            # The engine loop drained before sleeping, but the forward it sent ahead may still be
            # executing in the background loop (parked at an await): drop what is queued, then let
            # that step finish (its connector save and poll included) before the connector and the
            # caches go away; shutdown_kv_connector drains the output it pushed.
            self._drain_queues()
            await self._wait_forward_idle()
        device = 'cpu' if level == 1 else 'meta'
"""),
    ("""        if tags is None:
            tags = ['weights', 'kv_cache']

        if 'weights' in tags:
            device = next(self.patched_model.get_model().parameters()).device
""", """        if tags is None:
            tags = ['weights', 'kv_cache']
        if self.patched_model is None:
            raise RuntimeError('The model agent was released (the engine loop stopped); it cannot wake up.')

        if 'weights' in tags:
            device = next(self.patched_model.get_model().parameters()).device
"""),
]

P8_SEQ_MESSAGES = [
    ("""    adapter_name: str = None
    arrive_time: float = 0.0
""", """    adapter_name: str = None
    # Requests reuse cached KV only when both prefix and cache salt match (None: unsalted).
    cache_salt: str | None = None
    arrive_time: float = 0.0
"""),
]

P8_TRIE = [
    ("""    def _get_or_create_root(self, adapter_name: str):
        \"\"\"Return the adapter-partitioned root, creating it on first use.\"\"\"
        if adapter_name not in self._roots:
            self._roots[adapter_name] = Node(-1, -1, None, adapter_name=adapter_name)
        return self._roots[adapter_name]
""", """    @staticmethod
    def _root_key(adapter_name: str, cache_salt: str | None):
        \"\"\"Roots are partitioned by adapter and, for salted requests, by cache salt.\"\"\"
        return (adapter_name, cache_salt) if cache_salt else adapter_name

    def _get_or_create_root(self, adapter_name: str, cache_salt: str | None = None):
        \"\"\"Return the adapter- and salt-partitioned root, creating it on first use.\"\"\"
        key = self._root_key(adapter_name, cache_salt)
        if key not in self._roots:
            root = Node(-1, -1, None, adapter_name=adapter_name)
            root.cache_salt = cache_salt
            self._roots[key] = root
        return self._roots[key]
"""),
    ("""            return node.block_id < 0 and self._roots.get(node.adapter_name) is node
""", """            key = self._root_key(node.adapter_name, getattr(node, 'cache_salt', None))
            return node.block_id < 0 and self._roots.get(key) is node
"""),
    ("""        initial_cursor = seq.prefix_cache.trie_cursor
        if initial_cursor is None:
            initial_cursor = self._get_or_create_root(seq.adapter_name)
        initial_step = initial_cursor.prefix_len

        recompute_blocks""", """        initial_cursor = seq.prefix_cache.trie_cursor
        if initial_cursor is None:
            initial_cursor = self._get_or_create_root(seq.adapter_name, seq.cache_salt)
        initial_step = initial_cursor.prefix_len

        # Checkpoints are indexed by adapter only: a salted request never reuses one.
        candidate_steps = () if seq.cache_salt else None
        recompute_blocks"""),
    ("""        candidate_steps = self._checkpoint_index.candidate_steps(seq.adapter_name, initial_step, max_step)
""", """        if candidate_steps is None:
            candidate_steps = self._checkpoint_index.candidate_steps(seq.adapter_name, initial_step, max_step)
"""),
    ("""        initial_cursor = seq.prefix_cache.trie_cursor
        if initial_cursor is None:
            initial_cursor = self._get_or_create_root(seq.adapter_name)
        initial_step = initial_cursor.prefix_len

        node = initial_cursor""", """        initial_cursor = seq.prefix_cache.trie_cursor
        if initial_cursor is None:
            initial_cursor = self._get_or_create_root(seq.adapter_name, seq.cache_salt)
        initial_step = initial_cursor.prefix_len

        node = initial_cursor"""),
    ("""        if node is None:
            node = self._get_or_create_root(seq.adapter_name)
        elif""", """        if node is None:
            node = self._get_or_create_root(seq.adapter_name, seq.cache_salt)
        elif"""),
    ("""                         'cursor_step=%s', seq.session_id, seq.seq_id, seq.adapter_name, node.prefix_len)
            node = self._get_or_create_root(seq.adapter_name)
""", """                         'cursor_step=%s', seq.session_id, seq.seq_id, seq.adapter_name, node.prefix_len)
            node = self._get_or_create_root(seq.adapter_name, seq.cache_salt)
"""),
]

SERIES = [
    ("0001-kv-connector-registry.diff",
     "Connector registry: build/prepare/validate/finalize out-of-tree connectors named by an entry point.",
     [(FACTORY, P1_FACTORY), ("pytorch/kv_connector/__init__.py", P1_INIT)]),
    ("0002-prefix-cache-eviction-observer.diff",
     "Eviction hook: the trie reports each evicted leaf (prefix + GPU page) to the connector.",
     [("pytorch/paging/block_trie/kv_lifecycle.py", P2_LIFECYCLE), ("pytorch/paging/block_trie/trie.py", P2_TRIE),
      ("pytorch/paging/scheduler.py", P2_SCHEDULER)]),
    ("0003-engine-config-host-cache-fields.diff",
     "Python: PytorchEngineConfig(host_cache_gb=..., host_cache_config=...) and host_cache_transfer_config().",
     [(MESSAGES, P5_MESSAGES)]),
    ("0004-serve-host-cache-flags.diff",
     "CLI: --host-cache-gb / --host-cache-config on `lmdeploy serve api_server`.",
     [(UTILS, P3_UTILS), (SERVE, P3_SERVE)]),
    ("0005-executor-connector-sizing-and-validation.diff",
     "Executor: the connector validates the model and sizes itself from per-rank block bytes.",
     [(EXECUTOR, P4_EXECUTOR)]),
    ("0006-kv-connector-stats-in-metrics.diff",
     "Metrics: connector counters in ScheduleMetrics, the periodic log and Prometheus.",
     [(MESSAGES, P6_MESSAGES), (ENGINE, P6_ENGINE), (STATS, P6_STATS), (LOGGERS, P6_LOGGERS)]),
    ("0007-reclaim-remote-ready-with-prefix-cache.diff",
     "Scheduler: a loaded request waiting for admission is reclaimable when its blocks are in the prefix trie.",
     [(EVICTION_HELPER, P7_EVICTION_HELPER)]),
    ("0008-prefix-cache-salt.diff",
     "Prefix cache: per-request cache salt; the trie's roots are keyed (adapter, salt), so a match never crosses salts.",
     [("pytorch/messages.py", P8_SEQ_MESSAGES), ("pytorch/paging/block_trie/trie.py", P8_TRIE)]),
    ("0009-preempt-skips-loading-sequences.diff",
     "Scheduler: preempting a decode batch's invalid entries leaves a sequence whose external load is in flight alone.",
     [("pytorch/paging/scheduler.py", P9_SCHEDULER)]),
    ("0010-sleep-waits-for-the-forward-in-flight.diff",
     "Model agent: sleep waits for a forward step still executing before the connector and caches go away.",
     [("pytorch/engine/model_agent/agent.py", P10_AGENT)]),
]


def build_series(root: Path) -> dict[str, str]:
    """{diff file name: unified diff text}; raises on any edit that does not match exactly once."""
    current: dict[str, str] = {}
    out: dict[str, str] = {}
    for name, description, files in SERIES:
        parts = [f"# {description}\n# Against LMDeploy 0.18.0 (apply the series in order: patch -p1 < {name}).\n"]
        for rel, edits in files:
            before = current.get(rel) or (root / rel).read_text(encoding="utf-8")
            after = before
            for old, new in edits:
                count = after.count(old)
                if count != 1:
                    raise SystemExit(f"{name}: {rel}: an edit matches {count} times (expected 1):\n{old[:200]}")
                after = after.replace(old, new)
            current[rel] = after
            diff = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"a/lmdeploy/{rel}", tofile=f"b/lmdeploy/{rel}", n=3)
            parts.append("".join(diff))
        out[name] = "".join(parts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail when a committed diff differs from a fresh one")
    args = ap.parse_args(argv)
    series = build_series(_lmdeploy_root())
    stale = []
    for name, text in series.items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)} ({text.count(chr(10))} lines)")
    if stale:
        print("stale: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
