"""``BaseModelAgent.sleep`` waits for a forward step still executing before the KV connector closes
(``activate._patch_model_agent``, patches/0010), on a stand-in agent: the patched methods of the real
``BaseModelAgent`` class run against an object holding only what the stock ``sleep``/``wakeup`` bodies
touch. LMDeploy's real engine with the race made deterministic: ``tests/e2e/test_sleep_race.py``."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("lmdeploy")


class _OurConnector:
    """Looks like ours to ``activate._is_ours`` (the module name is what it checks)."""


_OurConnector.__module__ = "lmdeploy_hostcache.integration.connector"


class _Agent:
    def __init__(self, dp: int = 1, connector=None, host_tier: bool = True):
        from lmdeploy.pytorch.engine.model_agent.agent import SleepWakeupState

        self.events: list[str] = []
        self.kv_connector = _OurConnector() if connector is None else connector
        self.state = SleepWakeupState()
        self.dist_config = SimpleNamespace(dp=dp)
        self.memdecode_agent = None
        self.patched_model = SimpleNamespace(get_model=lambda: SimpleNamespace(to=lambda **kw: None))
        self.spec_agent = SimpleNamespace(get_model=lambda: None)
        name = "HostTierConnector" if host_tier else None
        self.cache_config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector=name))

    def _drain_queues(self):
        self.events.append("drain")

    def shutdown_kv_connector(self):
        self.events.append("shutdown")
        self.kv_connector = None

    def reset_graph_runner(self):
        pass

    def reset_runtime_state(self):
        self.events.append("reset")


@pytest.fixture
def agent_cls(active, monkeypatch):
    import torch
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    for name in ("_async_step", "sleep", "wakeup"):
        assert getattr(BaseModelAgent.__dict__[name], "__hostcache_wrapped__", False), name
    return BaseModelAgent


def test_sleep_waits_for_the_step_in_flight_then_shuts_the_connector_down(active, agent_cls):
    agent = _Agent()
    tracker = active._step_tracker(agent)

    async def scenario():
        tracker.enter()                      # a forward step of ours is executing (parked at an await)
        sleep = asyncio.ensure_future(agent_cls.sleep(agent, 1))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not sleep.done()
        assert agent.state.is_sleeping and agent.events == ["drain"], agent.events   # queued inputs dropped
        assert agent.kv_connector is not None       # what the resumed step's start_kv_connector_save needs
        agent.events.append("step ends")
        tracker.exit()
        await asyncio.wait_for(sleep, 5)

    asyncio.run(scenario())
    assert agent.events == ["drain", "step ends", "shutdown", "reset"]
    assert agent.kv_connector is None and agent.state.is_sleeping


def test_sleep_waits_for_every_step_that_starts_while_it_waits(active, agent_cls):
    agent = _Agent()
    tracker = active._step_tracker(agent)

    async def scenario():
        tracker.enter()
        sleep = asyncio.ensure_future(agent_cls.sleep(agent, 1))
        await asyncio.sleep(0)
        tracker.exit()
        tracker.enter()                      # the background loop picked up one more step at once
        for _ in range(10):
            await asyncio.sleep(0)
        assert not sleep.done() and "shutdown" not in agent.events
        tracker.exit()
        await asyncio.wait_for(sleep, 5)

    asyncio.run(scenario())
    assert agent.events[-2:] == ["shutdown", "reset"]


def test_sleep_with_no_step_in_flight_is_stock(active, agent_cls):
    for agent in (_Agent(), _Agent(connector=object(), host_tier=False)):
        if isinstance(agent.kv_connector, _OurConnector):
            active._step_tracker(agent)      # steps ran before, none is running now
        asyncio.run(asyncio.wait_for(agent_cls.sleep(agent, 1), 5))
        assert agent.events == ["shutdown", "reset"], agent.events   # no extra drain, no wait


def test_sleep_does_not_wait_for_a_step_parked_until_wakeup_with_data_parallel(active, agent_cls):
    """DP > 1: the step that saw every rank asleep finished its connector work, set to_sleep and waits
    on to_wakeup; stock sleep waits for to_sleep. Waiting for that step to end would never return."""
    agent = _Agent(dp=2)
    tracker = active._step_tracker(agent)

    async def scenario():
        tracker.enter()                      # parked on to_wakeup, never ends before wakeup
        agent.state.to_sleep.set()
        await asyncio.wait_for(agent_cls.sleep(agent, 1), 5)

    asyncio.run(scenario())
    assert agent.events == ["shutdown", "reset"]


def test_the_step_tracker_counts_until_the_step_ends_however_it_ends(active):
    tracker = active._StepTracker()

    async def step(fail):
        tracker.enter()
        try:
            await asyncio.sleep(0.01)
            if fail:
                raise RuntimeError("step failed")
        finally:
            tracker.exit()

    async def scenario():
        ok = asyncio.ensure_future(step(False))
        bad = asyncio.ensure_future(step(True))
        cancelled = asyncio.ensure_future(step(False))
        await asyncio.sleep(0)
        assert tracker.running == 3
        cancelled.cancel()
        await asyncio.wait_for(tracker.wait_idle(), 5)
        assert tracker.running == 0 and ok.done() and bad.done() and cancelled.cancelled()
        await asyncio.wait_for(tracker.wait_idle(), 1)   # idle: returns at once

    asyncio.run(scenario())


def test_wakeup_of_a_released_agent_says_so(active, agent_cls):
    agent = _Agent()
    agent.patched_model = None               # BaseModelAgent.release after the engine loop failed
    with pytest.raises(RuntimeError, match="model agent was released .* restart the server"):
        agent_cls.wakeup(agent, None)
    stock = _Agent(connector=object(), host_tier=False)
    stock.patched_model = None
    with pytest.raises(AttributeError):      # no host tier: LMDeploy's own error, unchanged
        agent_cls.wakeup(stock, None)


def test_two_sleeps_at_once_both_return_when_the_step_ends(active, agent_cls):
    """``Engine.sleep`` takes no lock: two overlapping ``/sleep`` calls both reach the agent while a step
    runs. Both waits end with the step (each used to make its own event, and only the newest was set)."""
    agent = _Agent()
    tracker = active._step_tracker(agent)

    async def scenario():
        tracker.enter()
        first = asyncio.ensure_future(agent_cls.sleep(agent, 1))
        for _ in range(5):
            await asyncio.sleep(0)
        second = asyncio.ensure_future(agent_cls.sleep(agent, 1))
        for _ in range(5):
            await asyncio.sleep(0)
        tracker.exit()
        await asyncio.wait({first, second}, timeout=3)
        return first.done(), second.done()

    assert asyncio.run(scenario()) == (True, True)


def test_a_sleep_waiting_for_a_slow_step_says_so_and_still_waits(active, monkeypatch, caplog):
    monkeypatch.setattr(active._StepTracker, "SLOW_STEP_WARN_S", 0.05)
    tracker = active._StepTracker()

    async def scenario():
        tracker.enter()                      # a forward that takes longer than the warning interval
        waiter = asyncio.ensure_future(tracker.wait_idle())
        await asyncio.sleep(0.18)
        assert not waiter.done()             # no deadline: the connector must not close under the step
        tracker.exit()
        await asyncio.wait_for(waiter, 5)

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "sleep has waited" in r.getMessage()]
    assert len(warnings) >= 2 and "0 s for the forward step still executing" in warnings[0], warnings
