"""A deterministic stand-in for LMDeploy's ``Engine`` (tests of the kit's driver on CPU only).

Never used on a GPU run: ``e2e_worker.py --fake-engine`` selects it. ``create_instance()`` gives
instances whose ``async_stream_infer`` yields LMDeploy-shaped outputs (``status.name`` SUCCESS per
token, then FINISH), greedy tokens being a hash of the prompt, so equal prompts give equal outputs
in every run and process. ``scheduler.block_trie.stats.num_hit_tokens`` counts block-aligned prefix
reuse (no eviction); with ``tier`` the connector's ``scheduler_side.stats()`` counters exist, and its
``min_restore_tokens`` is resolved from the run's setting as the real connector does.
``GPU_KIT_FAKE_DIVERGE=run_name:k`` changes the last token of that run's k-th request (0-based), so
a test can prove a difference is caught.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from types import SimpleNamespace


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    do_sample: bool = False
    top_k: int = 1
    ignore_eos: bool = False


_SUCCESS, _FINISH = SimpleNamespace(name="SUCCESS"), SimpleNamespace(name="FINISH")


def _token(ids, vocab=256) -> int:
    return int.from_bytes(hashlib.blake2b(bytes(str(ids), "ascii"), digest_size=4).digest(), "little") % vocab


class FakeEngine:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.block_size = int(cfg.get("block_size", 16))
        self.prefixes: set[tuple] = set()
        self.stats = SimpleNamespace(num_hit_tokens=0)
        self.scheduler = SimpleNamespace(block_trie=SimpleNamespace(stats=self.stats), kv_connector=None)
        if cfg.get("tier"):
            counters = {"lookups": 0, "hit_blocks": 0, "restored_tokens": 0, "bytes_to_gpu": 0, "host_slots": 8,
                        "host_slots_used": 0, "restore_latency_mean_s": 0.0, "restore_latency_max_s": 0.0,
                        "restore_latency_count": 0}
            # the connector's threshold, resolved as HostTierScheduler does (restore_cost, 64 KiB per token)
            from lmdeploy_hostcache.restore_cost import resolve_min_restore_tokens

            mrt = cfg.get("min_restore_tokens", 0)
            block_bytes = 65536 * self.block_size
            side = SimpleNamespace(stats=lambda: dict(counters), hostcache=SimpleNamespace(min_restore_tokens=mrt),
                                   block_size=self.block_size, block_transfer_bytes=block_bytes,
                                   min_restore_tokens=resolve_min_restore_tokens(mrt, block_bytes / self.block_size))
            self.scheduler.kv_connector = SimpleNamespace(scheduler_side=side)
        self.count = 0
        diverge = os.environ.get("GPU_KIT_FAKE_DIVERGE", "")
        name, _, k = diverge.partition(":")
        self.diverge_at = int(k) if name and name == cfg.get("name") else None

    def create_instance(self):
        delay = float(os.environ.get("GPU_KIT_FAKE_SLEEP_S", "0") or 0)  # tests: a run that hangs
        if delay:
            import time

            time.sleep(delay)
        return FakeInstance(self)

    def close(self):
        pass


class FakeInstance:
    def __init__(self, engine: FakeEngine):
        self.engine = engine

    async def async_stream_infer(self, session_id, input_ids, gen_config=None, **kwargs):
        e = self.engine
        bs = e.block_size
        hit = 0
        for end in range(bs, len(input_ids), bs):
            if tuple(input_ids[:end]) in e.prefixes:
                hit = end
        for end in range(bs, len(input_ids) + 1, bs):
            e.prefixes.add(tuple(input_ids[:end]))
        e.stats.num_hit_tokens += hit
        ids = list(input_ids)
        out = []
        for _ in range(gen_config.max_new_tokens):
            out.append(_token(ids))
            ids.append(out[-1])
        if e.diverge_at is not None and e.count == e.diverge_at:
            out[-1] = (out[-1] + 1) % 256
        e.count += 1
        for t in out:
            await asyncio.sleep(0)
            yield SimpleNamespace(status=_SUCCESS, token_ids=[t])
        yield SimpleNamespace(status=_FINISH, token_ids=[])


def build(cfg: dict) -> FakeEngine:
    return FakeEngine(cfg)
