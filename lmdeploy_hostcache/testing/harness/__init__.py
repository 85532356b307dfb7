"""Engine-in-the-loop CPU harness for the host tier.

LMDeploy's real scheduler, inputs maker and engine-loop output path run on CPU tensors laid out
by LMDeploy's own cache plan; a prefix-oracle forward writes every token's KV bytes as a function
of its whole prefix, and :class:`KVChecker` verifies after every step that every block LMDeploy
considers valid holds exactly those bytes.

Typical use::

    engine = CpuEngine(HarnessModel(), HarnessCacheSpec(num_gpu_blocks=24, quant_policy=8))
    checker = KVChecker(engine.kv, engine.oracle, engine.scheduler)
    report = WorkloadDriver(engine, weka_conversations(max_turns=5), checker=checker).run()
    check_gpu_refcounts_balanced(engine.scheduler)

The host tier (both ``HostTierConnector`` roles + the transfer copy engine) is plugged in by
``harness.host_tier.build_host_tier_engine``; that submodule is the only one importing
``lmdeploy_hostcache``, so stage 1 runs against stock LMDeploy alone.
"""
from .checker import CheckStats, KVChecker, KVMismatch, check_gpu_refcounts_balanced
from .cpu_engine import REPLICATED_SOURCES, CpuEngine, CpuExecutor, CpuModelAgent, HarnessError, source_digest
from .driver import RunReport, WorkloadDriver
from .kv_layout import CpuKVCache, HarnessCacheSpec, HarnessModel
from .oracle import PrefixOracle
from .workloads import (TurnSpec, assign_aborts, chat_conversations, mooncake_conversations, scale_hash_ids,
                        weka_conversations)

__all__ = [
    'CheckStats', 'CpuEngine', 'CpuExecutor', 'CpuKVCache', 'CpuModelAgent', 'HarnessCacheSpec', 'HarnessError',
    'HarnessModel', 'KVChecker', 'KVMismatch', 'PrefixOracle', 'REPLICATED_SOURCES', 'RunReport', 'TurnSpec',
    'WorkloadDriver', 'assign_aborts', 'chat_conversations', 'check_gpu_refcounts_balanced', 'mooncake_conversations',
    'scale_hash_ids',
    'source_digest', 'weka_conversations',
]
