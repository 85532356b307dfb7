"""Exercise each upstream diff once against a patched copy of LMDeploy.

    PYTHONPATH=<dir holding the patched lmdeploy/> LMDEPLOY_HOSTCACHE_DISABLE=1 \
        python patches/smoke_upstream.py <that dir>

Run by tests/integration/test_guard_patches.py on a symlink copy of the installed 0.18.0
whose touched files are real copies with the series applied. Prints UPSTREAM-OK.
"""
import sys
from types import SimpleNamespace

import numpy as np

import lmdeploy

root = sys.argv[1]
assert lmdeploy.__file__.startswith(root), lmdeploy.__file__

# 0003: engine-config fields
from lmdeploy.messages import PytorchEngineConfig, ScheduleMetrics  # noqa: E402

cfg = PytorchEngineConfig(enable_prefix_caching=True, host_cache_gb=4)
tc = cfg.kv_transfer_config
assert (tc.kv_connector, tc.kv_role, tc.kv_connector_extra_config) == (
    "HostTierConnector", "kv_both", {"hostcache_config": {"host_cache_gb": 4}}), tc

# 0001 + 0005: registry and executor hooks import without cycles; no provider -> stock errors
from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig  # noqa: E402
from lmdeploy.pytorch.engine.executor.base import ExecutorBase, _WorkerCachePlanSizes  # noqa: E402
from lmdeploy.pytorch.kv_connector import KVConnectorRole, build_kv_connector, factory  # noqa: E402

assert factory.get_kv_connector_provider("HostTierConnector") is None
cc = CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=0, enable_prefix_caching=True,
                 device_type="cpu", kv_transfer_config=tc)
try:
    build_kv_connector(KVConnectorRole.SCHEDULER, cc)
    raise AssertionError("expected ValueError")
except ValueError as exc:
    assert "Unsupported KV connector" in str(exc)
ex = ExecutorBase("/m", SimpleNamespace(sliding_window=-1, states_shapes=[]), cc, SimpleNamespace(),
                  SimpleNamespace(dp=1, world_size=1), SimpleNamespace(memdecode_config=None))
ex._update_num_gpu_blocks([1 << 30], [_WorkerCachePlanSizes(target=1 << 20)], None)
assert cc.num_gpu_blocks > 2

# 0002: eviction observer sees every evicted trie page, in eviction order
from lmdeploy.pytorch.messages import SequenceMeta, UpdateTokenMode  # noqa: E402
from lmdeploy.pytorch.paging.scheduler import Scheduler  # noqa: E402
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy  # noqa: E402

cc = CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=40, enable_prefix_caching=True,
                 device_type="cpu")
s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=4096), cc,
              seq_meta=SequenceMeta(16, strategy=ARSequenceStrategy()))
seen = []
s.block_trie.set_eviction_observer(lambda leaf, page: seen.append(page))
rng = np.random.default_rng(0)
for sid in range(6):
    toks = list(rng.integers(1, 50, size=int(rng.integers(40, 90))))
    s.add_session(sid).add_sequence(np.asarray(toks, dtype=np.int64))
    out = s.schedule(is_prefill=True)
    s.activate_seqs(out.running)
    for q in out.running:
        q.update_token_ids(np.array([1]), mode=UpdateTokenMode.PREFILL)
        q.state.finish()
    s.end_session(sid)
evicted = 0
while (n := s.block_trie.evict(2)) > 0:
    evicted += n
assert evicted > 0 and len(seen) == evicted, (evicted, len(seen))

# 0006: connector stats through the stats path
from lmdeploy.metrics.loggers import LoggingStatLogger  # noqa: E402
from lmdeploy.metrics.stats import SchedulerStats  # noqa: E402

st = SchedulerStats()
st.update_from_schedule_metrics(ScheduleMetrics(kv_connector_stats={"hit_blocks": 3}))
lg = LoggingStatLogger()
lg.record_schedule(st)
lg.total_prompt_tokens = 1
lg.log()

# 0004: CLI flags
from lmdeploy.cli.cli import CLI  # noqa: E402
from lmdeploy.cli.serve import SubCliServe  # noqa: E402

CLI.add_parsers()
SubCliServe.add_parsers()
args = CLI.parser.parse_args(["serve", "api_server", "m", "--host-cache-gb", "4"])
assert args.host_cache_gb == "4" and args.host_cache_config is None
# 0007: a remote-ready request is reclaimable when the prefix cache holds its loaded blocks
from lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper import RecomputeEvictionHelper  # noqa: E402


class _ReadySeq:
    num_blocks, logical_state, released = 2, -1, 0

    def __init__(self):
        self.prefix_cache = SimpleNamespace(suppress_match_stats=False)
        self.state = SimpleNamespace(release_paging_resources=self._release)

    def _release(self):
        self.released += 1


reclaimed = {}
for trie_on in (True, False):
    helper = RecomputeEvictionHelper(block_manager=None, block_trie=SimpleNamespace(enabled=trie_on),
                                     state_manager=None, is_ssm=False,
                                     load_coordinator=SimpleNamespace(is_remote_ready=lambda seq: True,
                                                                      release_tracking=lambda seq: None))
    seq = _ReadySeq()
    reclaimed[trie_on] = (helper._reclaim_candidate(seq), seq.released)
assert reclaimed == {True: (True, 1), False: (False, 0)}, reclaimed

# 0008: a trie match never crosses cache salts; the same salt (or none) matches as before
s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=4096), cc,
              seq_meta=SequenceMeta(16, strategy=ARSequenceStrategy()))
toks = np.arange(1, 81, dtype=np.int64)
matched = []
for sid, salt in enumerate(["a", "b", None, "a", None]):
    q = s.add_session(100 + sid).add_sequence(toks)
    q.cache_salt = salt
    out = s.schedule(is_prefill=True)
    matched.append(out.running[0].num_history_ids)
    s.activate_seqs(out.running)
    for q in out.running:
        q.update_token_ids(np.array([1]), mode=UpdateTokenMode.PREFILL)
        q.state.finish()
    s.end_session(100 + sid)
assert matched[:3] == [0, 0, 0] and matched[3] > 0 and matched[4] > 0, matched

# 0010: the agent's sleep waits for the forward step in flight before the connector goes away (a
# stand-in agent holding what sleep/wakeup touch; no GPU work happens)
import asyncio  # noqa: E402

import torch  # noqa: E402
from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent, SleepWakeupState  # noqa: E402

torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
events = []
agent = SimpleNamespace(
    memdecode_agent=None, state=SleepWakeupState(), dist_config=SimpleNamespace(dp=1), kv_connector=object(),
    patched_model=SimpleNamespace(get_model=lambda: SimpleNamespace(to=lambda **kw: None)),
    spec_agent=SimpleNamespace(get_model=lambda: None), reset_graph_runner=lambda: None,
    reset_runtime_state=lambda: events.append("reset"), _drain_queues=lambda: events.append("drain"),
    shutdown_kv_connector=lambda: events.append("shutdown"))
agent._wait_forward_idle = lambda: BaseModelAgent._wait_forward_idle(agent)


async def _sleep_during_a_step():
    agent._forward_idle = asyncio.Event()            # clear: a forward step is executing
    task = asyncio.ensure_future(BaseModelAgent.sleep(agent, 1))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done() and events == ["drain"], events
    events.append("step ends")
    agent._forward_idle.set()
    await asyncio.wait_for(task, 5)


asyncio.run(_sleep_during_a_step())
assert events == ["drain", "step ends", "shutdown", "reset"], events
agent.patched_model = None
try:
    BaseModelAgent.wakeup(agent, None)
    raise AssertionError("expected RuntimeError")
except RuntimeError as exc:
    assert "released" in str(exc)

print(f"UPSTREAM-OK evicted={evicted}")
