"""``bench step``: the tier's cost on the scheduler's side of LMDeploy's engine steps (CPU harness)."""
from __future__ import annotations

import json

import pytest

from lmdeploy_hostcache.testing import step_bench as sb
from lmdeploy_hostcache.testing.capture_bench import workload


def test_each_configuration_serves_the_workload_and_only_the_squeezed_tier_moves_blocks():
    conv = workload("mooncake", 24)
    costs = {c: sb.measure(c, conv) for c in sb.CONFIGS}
    for c in costs.values():
        assert c.requests == 24 and c.forwards > 0 and c.scheduler_seconds > 0
        assert c.step_seconds > c.scheduler_seconds       # the fake forward is taken out
    # a cache that fits: the tier changes no schedule and moves nothing
    assert costs["on_fits"].forwards == costs["off_fits"].forwards
    assert costs["on_fits"].demotions == costs["on_fits"].restored_tokens == 0
    # a squeezed cache: the tier demotes and restores
    assert costs["on_small"].demotions > 0 and costs["on_small"].restored_tokens > 0
    med = sb.summarize([list(costs.values())])
    assert med["on_over_off_fits"] == pytest.approx(costs["on_fits"].us_per_step / costs["off_fits"].us_per_step)


def test_summarize_refuses_a_run_where_the_tier_changed_a_schedule_that_fits():
    def cost(config, forwards, restored=0):
        return sb.StepCost(config, 4, forwards, 1.0, 0.5, restored, 0)

    run = [cost("off_fits", 10), cost("on_fits", 11), cost("off_small", 12), cost("on_small", 13, 64)]
    with pytest.raises(RuntimeError, match="changed the schedule"):
        sb.summarize([run])
    run[1] = cost("on_fits", 10, restored=16)
    with pytest.raises(RuntimeError, match="16 restored tokens"):
        sb.summarize([run])


def test_cli_prints_json_and_refuses_bad_arguments(capsys):
    from lmdeploy_hostcache import cli

    assert cli.main(["bench", "step", "--runs", "0"]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "step", "--runs", "1", "--warmup", "0", "--requests", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["config"] for c in out["runs"][0]] == list(sb.CONFIGS)
    assert set(out["median"]) >= {"on_over_off_fits", "on_over_off_small", *sb.CONFIGS}
