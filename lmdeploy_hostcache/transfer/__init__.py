"""Worker-side transfer path: host pool, gather/scatter kernels, copy engines.

Only moves bytes; the scheduler side decides what to copy.  Typical use inside the
connector's ``register_kv_caches``::

    layout = KVRowLayout.from_connector_caches(kv_caches, pages_per_block,
                                               tensor_specs=plan.tensor_specs)   # specs optional
    pool = HostPool(layout, num_slots, host_kv_format="same")   # or "int8" / "int4"
    engine = make_copy_engine(layout, pool, kv_caches)           # CUDA or CPU engine
    engine.submit(op_id, demotions=[(gpu_block, slot)], loads=[(slot, gpu_block)])
    for r in engine.poll(): ...                                  # CopyResult(op_id, ok, error, ...)
    engine.close()                                               # frees staging and the pool

Host formats (``docs/formats.md``): ``same`` = the block's raw row bytes (lossless for
every LMDeploy cache, packed int4/int8 included); ``int8``/``int4`` = fp16/bf16 K/V
stored as LMDeploy's own quant_policy 8/4 page format, everything else raw.
"""
from .copy_engine import CopyEngine, CopyResult, CopyStats, CpuCopyEngine, CudaCopyEngine, make_copy_engine
from .host_pool import HostPool, memlock_limit
from .layout import HOST_KV_FORMATS, HostFormat, KVRowLayout, PageField, QuantField, Segment, TensorSpec
from .ops import BACKENDS, gather_blocks, resolve_backend, scatter_blocks
from .quant import dequantize, quantize

__all__ = [
    "BACKENDS", "HOST_KV_FORMATS", "CopyEngine", "CopyResult", "CopyStats", "CpuCopyEngine", "CudaCopyEngine",
    "HostFormat", "HostPool", "KVRowLayout", "PageField", "QuantField", "Segment", "TensorSpec", "dequantize",
    "gather_blocks", "make_copy_engine", "memlock_limit", "quantize", "resolve_backend", "scatter_blocks",
]
