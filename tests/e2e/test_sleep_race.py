"""``Engine.sleep`` while the forward step sent ahead of the sleep drain is still executing in the
agent's background loop, with the host tier on: LMDeploy 0.18.0's real engine on CPU, the race made
deterministic (``lmdeploy_hostcache.testing.sleep_race``; one child process, three engines).

Before the fix (``BaseModelAgent.sleep`` shut the connector down under that step) the step's
``start_kv_connector_save`` asserted, the engine loop died and ``wakeup`` failed (reproduced against
``lmdeploy serve api_server`` by an audit; here the negative control runs stock ``sleep``). With it
(``activate._patch_model_agent``, patches/0010) the agent's sleep waits for the step, wakeup works,
and the next requests' greedy outputs equal a tier-off engine's."""
import time

import pytest

from lmdeploy_hostcache.testing.compare import compare_token_outputs
from lmdeploy_hostcache.testing.models import write_tiny_model
from lmdeploy_hostcache.testing.sleep_race import PROBES, run_in_subprocess

pytestmark = pytest.mark.e2e

HOST = dict(host_cache_gb=0.01, config=dict(min_restore_tokens=0, pin_memory=False))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "tinylm-llama", "llama", seed=0))
    t0 = time.perf_counter()
    out = run_in_subprocess(dict(model=model, threads=1, fake_sms=2, runs=[
        dict(name="reference", host_cache=None),                       # tier off
        dict(name="fixed", host_cache=HOST, race=True),
        dict(name="unfixed", host_cache=HOST, race=True, revert_sleep_fix=True),   # negative control
    ]), timeout=600)
    for name, r in out["runs"].items():
        print(f"[e2e timing] {name}: engine build {r['build_s']} s, run {r['seconds']} s")
    print(f"[e2e timing] child process wall {time.perf_counter() - t0:.1f} s")
    assert out["extension_hooked"]
    return out["runs"]


def _raced(run):
    assert "error" not in run, run["error"]
    assert run["trigger_step"] is not None and run["victim_step"] == run["trigger_step"] + 1, run
    # the precondition of the crash: the forward sent ahead was executing when executor.sleep began
    assert run["victim_running_at_sleep"] and run["victim_held"], run
    assert run["C"][1] == "CANCEL", run["C"]   # the sleep cancelled the request it interrupted


def test_sleep_waits_for_the_step_in_flight_and_the_engine_wakes_up_equal_to_tier_off(runs):
    ref, fixed = runs["reference"], runs["fixed"]
    _raced(fixed)
    assert fixed["connector_alive_at_resume"] is True, "the step resumed after its connector was shut down"
    assert fixed["sleep_error"] is None and fixed["loop_error"] is None and fixed["wakeup_error"] is None, fixed
    # the scheduler side settled everything at the sleep: nothing in flight, nothing pinned, index empty
    assert fixed["tier_after_sleep"] == dict(host_blocks=0, has_inflight=False, balanced=True)
    assert set(fixed["probe_status"].values()) == {"FINISH"}, fixed["probe_status"]
    cmp = compare_token_outputs(ref["probes"], fixed["probes"])
    print(f"[e2e] after sleep during a connector step + wakeup vs tier off: {cmp.summary()}; "
          f"host tier {fixed['host_tier']}")
    assert cmp.total_requests == len(PROBES) and cmp.identical, cmp.summary()
    assert fixed["host_tier"]["demotions"] > 0 and fixed["host_tier"]["restore_failures"] == 0


def test_negative_control_stock_sleep_kills_the_engine_loop(runs):
    """The same race with stock ``BaseModelAgent.sleep`` reproduces the defect (so the test above can
    fail), and the wakeup that follows gets one clear message, not an AttributeError."""
    bad = runs["unfixed"]
    _raced(bad)
    assert bad["connector_alive_at_resume"] is False
    assert bad["loop_error"] is not None and bad["loop_error"].startswith("AssertionError"), bad["loop_error"]
    assert bad["wakeup_error"] is not None and "model agent was released" in bad["wakeup_error"], bad
