"""CPU KV-cache storage laid out exactly as LMDeploy 0.18.0 lays it out on the GPU.

The cache is realised from LMDeploy's own ``build_block_cache_plan`` (the same call the model
agent makes), allocated on ``'cpu'`` with ``BlockCachePlan.allocate``. Connector rows are built
the way ``CacheEngine.connector_kv_caches`` builds them (``CacheEngine`` itself needs CUDA).

Invariants:
- scheduler block ``b`` is kernel pages ``[b*ppb, (b+1)*ppb)`` of every pool row;
- token position ``p`` of a sequence lives in page ``block_offsets[p // kernel_block_size]`` at
  in-page offset ``p % kernel_block_size`` (kernel-page block offsets, as ``fill_kv_cache`` uses);
- every view handed out aliases the single allocation (no copies).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from lmdeploy.messages import QuantPolicy
from lmdeploy.pytorch.config import CacheConfig, ModelConfig, SchedulerConfig
from lmdeploy.pytorch.engine.cache_engine.plan import BlockCachePlan, build_block_cache_plan


@dataclass(frozen=True)
class HarnessModel:
    """Tiny model geometry: only what LMDeploy's cache plan reads."""

    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float16
    vocab_size: int = 32000

    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden_size=self.num_kv_heads * self.head_dim * 2,
                           num_layers=self.num_layers,
                           num_attention_heads=self.num_kv_heads * 2,
                           num_key_value_heads=self.num_kv_heads,
                           bos_token_id=1,
                           eos_token_id=[2],
                           head_dim=self.head_dim,
                           dtype=self.dtype,
                           vocab_size=self.vocab_size)


@dataclass(frozen=True)
class HarnessCacheSpec:
    """Scheduler/cache sizing of one harness engine (capacities are small on purpose)."""

    block_size: int = 16
    kernel_block_size: int = 8
    num_gpu_blocks: int = 24          # includes the one reserved block, as in LMDeploy
    max_batches: int = 4
    max_prefill_token_num: int = 96
    quant_policy: int = 0
    prefill_interval: int = 4

    def cache_config(self, kv_transfer_config=None) -> CacheConfig:
        return CacheConfig(max_batches=self.max_batches,
                           block_size=self.block_size,
                           kernel_block_size=self.kernel_block_size,
                           num_cpu_blocks=0,
                           num_gpu_blocks=self.num_gpu_blocks,
                           max_prefill_token_num=self.max_prefill_token_num,
                           enable_prefix_caching=True,
                           quant_policy=QuantPolicy(self.quant_policy),
                           device_type='cuda',
                           num_reserved_gpu_blocks=1,
                           kv_transfer_config=kv_transfer_config)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_batches=self.max_batches,
                               max_session_len=None,
                               prefill_interval=self.prefill_interval)


class CpuKVCache:
    """Owns one CPU allocation realised from LMDeploy's block-cache plan."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, world_size: int = 1):
        self.model_config = model_config
        self.cache_config = cache_config
        self.plan: BlockCachePlan = build_block_cache_plan(model_config, cache_config, world_size)
        self.allocation = self.plan.allocate(cache_config.num_gpu_blocks, 'cpu')
        self.block_size = cache_config.block_size
        self.kernel_block_size = cache_config.kernel_block_size
        self.pages_per_block = self.plan.kernel_blocks_per_logical_block
        self.num_layers = model_config.num_layers
        self.views: dict[str, torch.Tensor] = {
            spec.name: view for spec, view in zip(self.plan.tensor_specs, self.allocation.tensor_views)}
        self.tensor_specs = self.plan.tensor_specs

    @property
    def quant_policy(self) -> QuantPolicy:
        return QuantPolicy(self.cache_config.quant_policy)

    @property
    def connector_kv_caches(self) -> Mapping[str, torch.Tensor]:
        """Rows exactly as ``CacheEngine.connector_kv_caches`` returns them (same keys, same order)."""
        rows: dict[str, torch.Tensor] = {}
        for pool_index, pool in enumerate(self.allocation.pools):
            if pool.nbytes == 0:
                continue
            if pool.entry_axis != 1:
                raise ValueError(f'cache pool {pool_index} uses entry_axis={pool.entry_axis}, connectors need 1')
            for row_index, row in enumerate(pool.tensor):
                rows[f'cache_pool.{pool_index}.row.{row_index}'] = row
        return MappingProxyType(rows)

    def block_pages(self, block_id: int) -> torch.Tensor:
        """Kernel pages of one physical scheduler block."""
        start = int(block_id) * self.pages_per_block
        return torch.arange(start, start + self.pages_per_block)

    def block_tokens(self, name: str, block_id: int) -> torch.Tensor:
        """Typed view ``[layers, block_size, *payload]`` of one scheduler block of tensor ``name``."""
        view = self.views[name]
        start = int(block_id) * self.pages_per_block
        pages = view[:, start:start + self.pages_per_block]
        return pages.reshape(view.shape[0], self.pages_per_block * view.shape[2], *view.shape[3:])

    def block_raw(self, block_id: int) -> list[torch.Tensor]:
        """Raw uint8 bytes of one scheduler block in every pool (padding included)."""
        start = int(block_id) * self.pages_per_block
        return [pool.tensor[:, start:start + self.pages_per_block].clone() for pool in self.allocation.pools]

    def scratch_block(self, num_blocks: int = 1) -> 'CpuKVCache':
        """A ``num_blocks``-block cache with the same plan (used to build expected bytes)."""
        return _ScratchCache(self, num_blocks)


class _ScratchCache(CpuKVCache):

    def __init__(self, parent: CpuKVCache, num_blocks: int = 1):  # noqa: D401 - same plan, few blocks
        self.model_config = parent.model_config
        self.cache_config = parent.cache_config
        self.plan = parent.plan
        self.num_blocks = int(num_blocks)
        self.allocation = self.plan.allocate(self.num_blocks, 'cpu')
        self.block_size = parent.block_size
        self.kernel_block_size = parent.kernel_block_size
        self.pages_per_block = parent.pages_per_block
        self.num_layers = parent.num_layers
        self.views = {spec.name: view for spec, view in zip(self.plan.tensor_specs, self.allocation.tensor_views)}
        self.tensor_specs = parent.tensor_specs
