"""One harness "node" (LMDeploy's real scheduler + both connector roles + the prefix-oracle
checker) with the shared store tier, run as its own process by tests/l3/test_l3_engine.py.

    python l3_engine_node.py MASTER_ADDRESS ROLE [FAULT ITERATION MASTER_PGID]

ROLE A computes the conversations, then serves other traffic that pushes them out of its GPU
and host tiers into the store, prints its result and keeps running (its client holds the
segment the objects live in) until its stdin closes. ROLE B serves the same conversations.
FAULT ``kill`` / ``pause`` sends SIGKILL / SIGSTOP to the master at that iteration.
``L3_READ_ONLY=1`` in the environment: the node writes nothing to the store.

Prints one JSON line: the run's checks, the store counters and the slot accounting.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

import torch  # noqa: E402
import numpy as np  # noqa: E402
from lmdeploy_hostcache.testing.harness import (HarnessCacheSpec, HarnessModel, TurnSpec, WorkloadDriver,  # noqa: E402
                     check_gpu_refcounts_balanced)
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine,  # noqa: E402
                               check_host_tier_balanced, rank_checkers, scheduler_side)

from lmdeploy_hostcache.l3.chain import WorkerChain  # noqa: E402

VOCAB = HarnessModel().vocab_size

# which store blocks this node wrote and which it restored that it never wrote (they came from another
# node): the worker chain's write-back and stage, counted as they run
OWN_PUTS: set[int] = set()
RESTORED = {"own": 0, "others": 0}
_write_back, _stage = WorkerChain.write_back, WorkerChain.stage


def _counting_write_back(self, items):
    OWN_PUTS.update(w.digest for w in items)
    return _write_back(self, items)


def _counting_stage(self, digests, block_bytes, slots):
    ok = _stage(self, digests, block_bytes, slots)
    if ok:
        others = sum(d not in OWN_PUTS for d in digests)
        RESTORED["others"] += others
        RESTORED["own"] += len(digests) - others
    return ok


WorkerChain.write_back, WorkerChain.stage = _counting_write_back, _counting_stage
if os.environ.get("L3_READ_ONLY") == "1":
    # this node puts nothing in the store: every block it restores from there another node wrote
    WorkerChain.write_back = lambda self, items: 0


def conversations_of(seed: int, n: int = 6, turns: int = 4) -> list[list[TurnSpec]]:
    """Multi-turn chats (no trace files needed): a shared 32-token system prompt, then each
    turn's prompt extends the previous one by 40 tokens (at most 240 tokens)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(10, VOCAB, 32)
    out = []
    for c in range(n):
        ctx = np.concatenate([system, rng.integers(10, VOCAB, 48)])
        conv = []
        for t in range(turns):
            ctx = np.concatenate([ctx, rng.integers(10, VOCAB, 40)])
            conv.append(TurnSpec(f"chat{seed}/{c}", t, ctx.copy(), max_new_tokens=4))
        out.append(conv)
    return out


def main() -> None:
    address, role = sys.argv[1], sys.argv[2]
    fault = sys.argv[3] if len(sys.argv) > 3 else ""
    fault_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    master_pgid = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    l3 = None if address == "none" else {"master_address": address, "global_segment_gb": 64 / 1024, "local_buffer_gb": 32 / 1024,
                                         "timeout_ms": 1500, "write_policy": os.environ.get("L3_WRITE_POLICY", "write_back")}
    # tight tiers: the GPU evicts, the small host tier evicts too, so blocks are written back
    engine = build_host_tier_engine(HarnessModel(dtype=torch.float16),
                                    HarnessCacheSpec(num_gpu_blocks=24, quant_policy=0, max_prefill_token_num=512),
                                    HostTierSpec(host_slots=int(os.environ.get("L3_HOST_SLOTS", "16")), min_restore_tokens=16, l3=l3))
    checkers = rank_checkers(engine, "same")
    slots = HostSlotChecker(engine)
    conversations = conversations_of(1)
    if role == "A":   # node A computes them, then other traffic evicts them GPU -> host -> store
        conversations += conversations_of(2)

    def on_iteration(driver) -> None:
        if driver.iteration == fault_at and master_pgid:
            os.killpg(master_pgid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)

    driver = WorkloadDriver(engine, conversations, checker=checkers + [slots], max_active=3,
                            on_iteration=on_iteration)
    report = driver.run()
    slots.verify("end of run")
    out = {"role": role, "iterations": report.iterations, "requests": report.requests,
           "finished": report.finished, "aborted": report.aborted,
           "wrong_blocks": sum(c.stats.wrong_blocks for c in checkers) + slots.stats.wrong_blocks,
           "checks": checkers[0].stats.checks, "first_error": str(checkers[0].stats.first_error)}
    check_gpu_refcounts_balanced(engine.scheduler)
    out["balanced"] = check_host_tier_balanced(engine)
    stats = scheduler_side(engine).stats()
    out.update({k: v for k, v in stats.items() if k.startswith("l3_") and not k.endswith(("_s", "_count"))})
    out["host_hit_blocks"] = stats["hit_blocks"]
    out["restored_tokens"] = stats["restored_tokens"]
    out["restore_failures"] = stats["restore_failures"]
    out["l3_restored_own"], out["l3_restored_from_others"] = RESTORED["own"], RESTORED["others"]
    print("RESULT " + json.dumps(out), flush=True)
    if role == "A":   # keep serving: the objects live in this node's contributed segment
        sys.stdin.readline()
    # no graceful close: against a dead or paused master Mooncake's close retries for many
    # seconds; the OS reclaims everything this process holds
    os._exit(0)


if __name__ == "__main__":
    main()
