"""Helpers for the transfer tests: real LMDeploy cache layouts built on CPU with LMDeploy's own plan."""
from __future__ import annotations

import torch


def build_caches(quant_policy: int = 0, dtype=torch.float16, num_layers: int = 2, kv_heads: int = 2,
                 head_dim: int = 16, block_size: int = 8, kernel_block_size: int = 4, num_blocks: int = 7,
                 seed: int = 0, randomize: bool = True, device: str = "cpu"):
    """(kv_caches dict as CacheEngine.connector_kv_caches builds it, plan, allocation), random bytes."""
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.config import CacheConfig, ModelConfig
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan

    mc = ModelConfig(hidden_size=kv_heads * head_dim * 2, num_layers=num_layers, num_attention_heads=kv_heads * 2,
                     num_key_value_heads=kv_heads, bos_token_id=1, eos_token_id=[2], head_dim=head_dim, dtype=dtype)
    cc = CacheConfig(max_batches=1, block_size=block_size, num_cpu_blocks=0, num_gpu_blocks=num_blocks,
                     kernel_block_size=kernel_block_size, quant_policy=QuantPolicy(quant_policy))
    plan = build_block_cache_plan(mc, cc, world_size=1)
    alloc = plan.allocate(num_blocks, device)
    g = torch.Generator().manual_seed(seed)
    for spec, view in zip(plan.tensor_specs, alloc.tensor_views if randomize else ()):
        if view.dtype.is_floating_point:
            view.copy_(torch.randn(view.shape, generator=g).to(view.dtype).to(device))
        else:
            view.copy_(torch.randint(0, 256, view.shape, generator=g, dtype=torch.uint8).to(device))
    caches = {}
    for pool_index, pool in enumerate(alloc.pools):
        for row_index, row in enumerate(pool.tensor):
            caches[f"cache_pool.{pool_index}.row.{row_index}"] = row
    return caches, plan, alloc


def naive_slot(caches: dict, pages_per_block: int, block: int) -> torch.Tensor:
    """Expected raw slot bytes, spelled out: every row's pages of ``block`` in row order."""
    parts = [row[block * pages_per_block:(block + 1) * pages_per_block].contiguous().view(-1).view(torch.uint8)
             for row in caches.values()]
    return torch.cat(parts)


def snapshot(caches: dict) -> dict:
    return {k: v.clone() for k, v in caches.items()}


def same_bytes(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a)
