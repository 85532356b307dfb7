"""``Engine.sleep`` while a forward step sent ahead of the sleep drain is still executing, through
LMDeploy 0.18.0's real ``Engine`` on CPU (in a process of its own, like ``engine_runner``).

The race: ``Engine.sleep`` drains the engine loop (it stops scheduling and drops the forward it had
sent ahead), then ``executor.sleep`` -> ``BaseModelAgent.sleep`` shuts the KV connector down. The
forward sent ahead may already be executing in the agent's background loop (``_async_step``, parked
at an ``await``); when it resumes, its ``start_kv_connector_save`` finds no connector (an
``AssertionError``: the engine loop dies, ``wakeup`` fails, the server refuses every request).
With the host tier every step carries connector metadata while copies are in flight.

It is made deterministic by instrumenting one engine instance (nothing is patched process-wide):

- two short requests fill the 8-block GPU cache; a long decode (request C) then makes the tier
  demote, so its steps carry connector metadata;
- in the postprocess of a step of C whose *next* forward, already queued in the agent, is a model
  step with connector metadata (the *trigger*), ``Engine.sleep`` is started and the trigger waits
  until the engine loop has seen the request and that forward is in the agent's input queue. The
  main loop then receives the trigger's output, drops the queued forward and acknowledges the
  drain, while the agent's background loop starts executing it (the *victim*);
- the victim is held in its postprocess until ``executor.sleep`` has been entered, then a few more
  event-loop turns: with stock ``BaseModelAgent.sleep`` (no ``await`` at DP 1) the connector is
  gone by then; with the fix (``activate._patch_model_agent``) the agent's sleep waits for it.

Then ``wakeup`` and probe requests (a tier-off run of the same spec gives the reference outputs).

    python -m lmdeploy_hostcache.testing.sleep_race SPEC.json OUT.json

SPEC: ``{"model": dir, "runs": [{"name", "host_cache": {...} | null, "race": bool,
"revert_sleep_fix": bool, "engine": {...}}], "threads": 1, "fake_sms": 2}``; runs share one
process (and its kernel warm-up) and run in order. ``revert_sleep_fix`` puts stock
``BaseModelAgent.sleep`` back for that run (the negative control: the crash must happen).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["PROBES", "run_in_subprocess", "run_spec"]

_RND = random.Random(0)
PROMPTS = {k: [_RND.randrange(32, 127) for _ in range(40)] for k in "ABC"}
# after wakeup: a prompt, another that evicts part of it from the 8-block GPU cache, the first again
PROBES = (("P0", PROMPTS["A"] + PROMPTS["B"], 2), ("P1", PROMPTS["C"] + PROMPTS["B"][:8], 2),
          ("P2", PROMPTS["A"] + PROMPTS["B"], 2))
ENGINE = dict(num_gpu_blocks=8)
DECODE_TOKENS = 24   # request C: long enough to cross blocks (evictions -> demotions in flight)
SLEEP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0


def _gen(n: int):
    from lmdeploy import GenerationConfig

    return GenerationConfig(max_new_tokens=n, do_sample=False, top_k=1, ignore_eos=True)


async def _infer(inst, session_id: int, ids: list[int], n: int) -> tuple[list[int], str]:
    tokens, status = [], None
    async for out in inst.async_stream_infer(session_id, ids, gen_config=_gen(n)):
        tokens += [int(t) for t in out.token_ids]   # stream outputs are deltas
        status = out.status
    name = getattr(status, "name", str(status))
    if name == "FINISH":   # a request the sleep cancelled has no session left (and a dead loop answers nothing)
        await inst.async_end(session_id)
    return tokens, name


class _Race:
    """The instrumentation of one engine instance (see the module docstring)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.agent = agent = engine.executor.model_agent
        self.armed = False
        self.step = 0                  # _async_step calls so far
        self.running_step = None       # the step executing now (None between steps)
        self.trigger_step = None
        self.victim_step = None
        self.victim_running_at_sleep = None
        self.connector_alive_at_resume = None
        self.victim_held = False
        self.executor_sleep_entered = False
        self.sleep_task = None
        orig_step, orig_post = agent._async_step, agent._step_postprocess_with_output
        orig_exec_sleep = engine.executor.sleep

        async def step(**kwargs):
            self.step += 1
            self.running_step = self.step
            try:
                return await orig_step(**kwargs)
            finally:
                self.running_step = None

        async def postprocess(*args, **kwargs):
            if self.armed and self.trigger_step is None and self._next_is_connector_model_step():
                await self._trigger()
            elif self.victim_step is not None and self.step == self.victim_step and not self.victim_held:
                self.victim_held = True
                while not self.executor_sleep_entered:
                    await asyncio.sleep(0.001)
                for _ in range(5):
                    await asyncio.sleep(0)
                self.connector_alive_at_resume = self.agent.kv_connector is not None
            return await orig_post(*args, **kwargs)

        async def executor_sleep(level: int = 1):
            self.executor_sleep_entered = True
            self.victim_running_at_sleep = self.victim_step is not None and self.running_step == self.victim_step
            return await orig_exec_sleep(level)

        agent._async_step = step
        agent._step_postprocess_with_output = postprocess
        engine.executor.sleep = executor_sleep

    def _queued(self, queue) -> list:
        return [item for item in list(getattr(queue, "_queue", ()) or ()) if isinstance(item, dict)]

    @staticmethod
    def _is_connector_model_step(item: Mapping) -> bool:
        return item.get("kv_connector_metadata") is not None and (item.get("inputs") is not None
                                                                  or item.get("delta") is not None)

    def _next_is_connector_model_step(self) -> bool:
        queued = self._queued(self.agent._in_que) + self._queued(self.agent._pre_in_que)
        return bool(queued) and self._is_connector_model_step(queued[0])

    async def _trigger(self) -> None:
        self.trigger_step = self.step
        self.victim_step = self.step + 1
        self.sleep_task = asyncio.ensure_future(self.engine.sleep(1))
        loop = self.engine._engine_loop
        deadline = time.monotonic() + 30
        while not (loop._sleep_requested and self._queued(self.agent._in_que)):
            if time.monotonic() > deadline:
                raise RuntimeError("sleep_race: the sleep request or the queued forward never showed up")
            await asyncio.sleep(0.001)


def _tier_state(engine) -> dict[str, Any] | None:
    connector = getattr(engine.scheduler, "kv_connector", None)
    side = getattr(connector, "scheduler_side", None)
    if side is None:
        return None
    state = dict(host_blocks=len(side.index), has_inflight=side.has_inflight(), balanced=True)
    try:
        side.check_balanced()
    except AssertionError as exc:
        state["balanced"] = str(exc)
    return state


def _loop_error(engine) -> str | None:
    task = getattr(engine.req_manager, "_loop_task", None)
    if task is None or not task.done() or task.cancelled():
        return None
    exc = task.exception()
    return None if exc is None else f"{type(exc).__name__}: {exc}"


async def _run_async(model: str, run: Mapping[str, Any]) -> dict[str, Any]:
    from lmdeploy.pytorch.engine import Engine

    from ..integration.metrics_export import host_tier_snapshot
    from .engine_runner import _engine_config

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model, engine_config=_engine_config(
        dict(engine=dict(ENGINE, **(run.get("engine") or {})), host_cache=run.get("host_cache"))))
    out: dict[str, Any] = dict(name=run["name"], build_s=round(time.perf_counter() - t0, 2))
    try:
        inst = engine.create_instance()
        session = iter(range(1, 1000))
        if run.get("race"):
            race = _Race(engine)
            for rid in ("A", "B"):
                await asyncio.wait_for(_infer(inst, next(session), PROMPTS[rid], 2), REQUEST_TIMEOUT_S)
            race.armed = True
            c_prompt = PROMPTS["C"] + PROMPTS["A"][:8]
            out["C"] = await asyncio.wait_for(_infer(inst, next(session), c_prompt, DECODE_TOKENS), REQUEST_TIMEOUT_S)
            race.armed = False
            out.update(trigger_step=race.trigger_step, victim_step=race.victim_step,
                       victim_held=race.victim_held, victim_running_at_sleep=race.victim_running_at_sleep)
            if race.sleep_task is None:
                out["error"] = "the race never triggered: no queued connector model step during request C"
                return out
            try:
                await asyncio.wait_for(race.sleep_task, SLEEP_TIMEOUT_S)
                out["sleep_error"] = None
            except Exception as exc:   # noqa: BLE001 - reported, the test decides
                out["sleep_error"] = f"{type(exc).__name__}: {exc}"
            out["connector_alive_at_resume"] = race.connector_alive_at_resume
            out["tier_after_sleep"] = _tier_state(engine)
            for _ in range(20):   # let a failed background step reach the engine's main loop
                await asyncio.sleep(0.01)
            out["loop_error"] = _loop_error(engine)
            try:
                engine.wakeup()
                out["wakeup_error"] = None
            except Exception as exc:   # noqa: BLE001
                out["wakeup_error"] = f"{type(exc).__name__}: {exc}"
            if out["wakeup_error"] is not None or out["loop_error"] is not None:
                return out
        probes, status = {}, {}
        for rid, ids, n in PROBES:
            probes[rid], status[rid] = await asyncio.wait_for(_infer(inst, next(session), ids, n), REQUEST_TIMEOUT_S)
        out.update(probes=probes, probe_status=status,
                   host_tier=host_tier_snapshot(getattr(engine.scheduler, "kv_connector", None)))
        return out
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        engine.close()


def _one_run(model: str, run: Mapping[str, Any]) -> dict[str, Any]:
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent

    current = BaseModelAgent.__dict__["sleep"]
    revert = bool(run.get("revert_sleep_fix")) and getattr(current, "__hostcache_wrapped__", False)
    if run.get("revert_sleep_fix") and not revert:
        raise RuntimeError("sleep_race: revert_sleep_fix asked, but BaseModelAgent.sleep is not patched")
    if revert:
        BaseModelAgent.sleep = current.__wrapped__
    try:
        return asyncio.run(_run_async(model, run))
    finally:
        if revert:
            BaseModelAgent.sleep = current


def run_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every run of ``spec`` in this process (the CPU shim must already be installed without a GPU)."""
    t0 = time.perf_counter()
    runs = {run["name"]: _one_run(run.get("model", spec["model"]), run) for run in spec["runs"]}
    return dict(runs=runs, seconds=round(time.perf_counter() - t0, 2),
                extension_hooked="lmdeploy_hostcache.integration.autoload" in sys.modules)


def run_in_subprocess(spec: Mapping[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run ``spec`` in a child interpreter with the CPU shim; its JSON result."""
    from .server import die_with_parent

    with tempfile.TemporaryDirectory(prefix="hostcache-sleep-race-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as fh:
            json.dump(dict(spec), fh)
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.pop("LMDEPLOY_HOSTCACHE_DISABLE", None)
        proc = subprocess.run([sys.executable, "-m", __name__, spec_path, out_path], capture_output=True, text=True,
                              timeout=timeout, env=env, preexec_fn=die_with_parent)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"sleep race runner exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
        with open(out_path) as fh:
            result = json.load(fh)
        result["log_tail"] = (proc.stdout + proc.stderr)[-6000:]
        return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lmdeploy_hostcache.testing.sleep_race SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        spec = json.load(fh)
    from . import cpu_shim

    cpu_shim.install(fake_sms=int(spec.get("fake_sms", 2)))
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    result = run_spec(spec)
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # LMDeploy's engine threads are not joined at interpreter shutdown
