"""`plan --min-restore-tokens auto` and a cluster file's `min_restore_tokens: auto`: the planner resolves
the threshold as the server does (restore_cost over the host bytes per token), from the same calibration."""
from __future__ import annotations

import json

import pytest

from lmdeploy_hostcache import restore_cost as rc
from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner.replay import resolve_min_restore
from lmdeploy_hostcache.planner.geometry import BlockSizing, CacheFormat, KVGeometry


@pytest.fixture(autouse=True)
def _no_env_calibration(monkeypatch):
    monkeypatch.delenv(rc.ENV_CALIBRATION, raising=False)


def _connector_threshold(slot_bytes: int, block_size: int, tp: int) -> int:
    """The threshold LMDeploy's scheduler-side connector resolves `auto` to, given the slot bytes the
    executor hook ships (``host_slot_bytes``, one TP rank's slot)."""
    pytest.importorskip("lmdeploy.pytorch.kv_connector")
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy.pytorch.config import CacheConfig

    from lmdeploy_hostcache.integration.connector import CONNECTOR_NAME, HostTierScheduler

    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"min_restore_tokens": "auto"}, "host_cache_blocks": 4,
        "host_slot_bytes": slot_bytes, "model_identity": "toy"})
    cc = CacheConfig(max_batches=4, block_size=block_size, num_cpu_blocks=0, num_gpu_blocks=8,
                     enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc)
    return HostTierScheduler(cc, tp_size=tp).min_restore_tokens


CASES = [  # (layers, kv_heads, head_dim, dtype, block_size, quant_policy, host_kv_format, tp)
    (32, 8, 128, "bfloat16", 64, 0, "same", 1),       # Llama-3-8B-like, LMDeploy's default block
    (32, 8, 128, "bfloat16", 512, 0, "int4", 2),      # lossy host format, two TP ranks
    (28, 4, 128, "bfloat16", 64, 4, "same", 1),       # the 4-bit GPU cache, moved as packed bytes
    (80, 8, 128, "bfloat16", 16, 8, "same", 4),
    (2, 1, 72, "float16", 4, 0, "int8", 1),           # padding of tiny specs to 256 bytes
]


@pytest.mark.parametrize("case", CASES)
def test_planner_resolves_auto_to_the_connectors_threshold(case):
    """The planner's bytes per token are the host slot bytes LMDeploy's own cache plan gives the executor
    hook (``plan_host_slots``), so both sides derive the same threshold from the same calibration."""
    from test_geometry import lmdeploy_cache_plan

    from lmdeploy_hostcache.integration.engine_config import plan_host_slots

    layers, kv_heads, head_dim, dtype, bs, qp, fmt, tp = case
    plan = lmdeploy_cache_plan(layers, kv_heads, head_dim, dtype, bs, bs, qp, tp)
    slot_bytes = plan_host_slots([plan.logical_block_nbytes], fmt, plan if fmt != "same" else None).slot_bytes[0]
    sizing = BlockSizing.build(KVGeometry("x", layers, kv_heads, head_dim, dtype), CacheFormat(qp, fmt, tp), bs)
    assert sizing.host_block_bytes == slot_bytes   # the planner sizes the host tier with the server's slot
    planned = resolve_min_restore("auto", sizing, rc.ASSUMED)
    assert planned == _connector_threshold(slot_bytes, bs, tp)
    assert 0 < planned < rc.NEVER
    assert resolve_min_restore(96, sizing, None) == 96


def _plan_json(capsys, *argv) -> dict:
    assert main(["plan", "--json", "--quiet", "--chat", "--chat-sessions", "40", "--gpu-blocks", "60",
                 "--host-blocks", "400", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_auto_replays_the_threshold_it_resolves(tmp_path, capsys, monkeypatch):
    """`auto` replays exactly what the number it resolves to replays; a calibration file (flag or the
    server's environment variable) moves it; a calibration where restoring never wins recomputes every
    host hit."""
    auto = _plan_json(capsys, "--min-restore-tokens", "auto")
    n = auto["min_restore_tokens"]
    assert isinstance(n, int) and auto["restore_calibration"]["source"] == rc.ASSUMED.source
    as_number = _plan_json(capsys, "--min-restore-tokens", str(n))
    assert as_number["restore_calibration"] is None
    for key in ("hit_rate", "host_hit_rate", "short_host_hit_blocks"):
        assert auto[key] == as_number[key], key
        assert auto["with_concurrency"][key] == as_number["with_concurrency"][key], key

    slow_prefill = tmp_path / "calibration.json"   # recomputing is dear: every hit of a block is restored
    slow_prefill.write_text('{"restore_gbps": 50, "prefill_tokens_per_s": 100, "restore_overhead_ms": 1}')
    cheap = _plan_json(capsys, "--min-restore-tokens", "auto", "--calibration", str(slow_prefill))
    assert cheap["min_restore_tokens"] == 1 and cheap["restore_calibration"]["source"] == str(slow_prefill)
    assert cheap["short_host_hit_blocks"] == 0
    monkeypatch.setenv(rc.ENV_CALIBRATION, str(slow_prefill))
    assert _plan_json(capsys, "--min-restore-tokens", "auto")["min_restore_tokens"] == 1
    monkeypatch.delenv(rc.ENV_CALIBRATION)

    never = tmp_path / "never.json"   # moving a token's KV costs more than computing it
    never.write_text('{"restore_gbps": 0.001, "prefill_tokens_per_s": 1e9, "restore_overhead_ms": 1}')
    o = _plan_json(capsys, "--min-restore-tokens", "auto", "--calibration", str(never))
    assert o["min_restore_tokens"] == rc.NEVER
    assert o["host_hit_blocks"] == 0 and o["short_host_hit_blocks"] > 0
    assert main(["plan", "--quiet", "--chat", "--chat-sessions", "40", "--gpu-blocks", "60", "--host-blocks", "400",
                 "--min-restore-tokens", "auto", "--calibration", str(never)]) == 0
    assert "every host hit is recomputed (min_restore_tokens auto" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--calibration", "{cal}"], r"--calibration .* sets the restore threshold of min_restore_tokens auto; "
                                 r"the threshold here is the number 256"),
    (["--min-restore-tokens", "auto", "--calibration", "{missing}"], r"missing\.json: cannot read the restore"),
    (["--min-restore-tokens", "auto", "--calibration", "{bad}"], r"bad\.json: prefill_tokens_per_s: got 0"),
    (["--min-restore-tokens", "autox"], r"--min-restore-tokens: expected auto or an int in \[0, 2\*\*48\], got 'autox'"),
])
def test_plan_calibration_errors_are_one_line(tmp_path, capsys, argv, match):
    import re

    (tmp_path / "cal.json").write_text('{"restore_gbps": 20, "prefill_tokens_per_s": 1e4, "restore_overhead_ms": 20}')
    (tmp_path / "bad.json").write_text('{"restore_gbps": 20, "prefill_tokens_per_s": 0, "restore_overhead_ms": 20}')
    paths = {k: str(tmp_path / f"{k}.json") for k in ("cal", "missing", "bad")}
    argv = [a.format(**paths) for a in argv]
    try:
        rc_ = main(["plan", "--quiet", "--chat", "--chat-sessions", "5", *argv])
    except SystemExit as exc:   # argparse: usage and one error line
        rc_ = exc.code
    assert rc_ == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_cluster_auto_is_resolved_for_the_clusters_model(tmp_path, capsys):
    """A cluster file's `min_restore_tokens: auto` replays what the number it resolves to replays."""
    def cluster(value) -> str:
        p = tmp_path / f"cluster_{value}.yaml"
        p.write_text(f"routing: session\nmodel: Qwen2.5-7B\nmin_restore_tokens: {value}\n"
                     "nodes:\n  - {name: a, gpu_kv_gb: 0.3, host_gb: 2}\n  - {name: b, gpu_kv_gb: 0.2, host_gb: 0.5}\n")
        return str(p)

    def run(path, *argv) -> dict:
        assert main(["plan", "--json", "--quiet", "--chat", "--chat-sessions", "60", "--cluster", path, *argv]) == 0
        return json.loads(capsys.readouterr().out)

    auto = run(cluster("auto"))
    n = auto["min_restore_tokens"]
    assert isinstance(n, int) and 0 < n < rc.NEVER and auto["restore_calibration"] is not None
    number = run(cluster(n))
    assert number["restore_calibration"] is None
    assert [x["hit_rate"] for x in auto["nodes"]] == [x["hit_rate"] for x in number["nodes"]]
    assert auto["short_host_hit_blocks"] == number["short_host_hit_blocks"]
    cal = tmp_path / "cal.json"
    cal.write_text('{"restore_gbps": 50, "prefill_tokens_per_s": 100, "restore_overhead_ms": 1}')
    assert run(cluster("auto"), "--calibration", str(cal))["min_restore_tokens"] == 1
    assert main(["plan", "--quiet", "--chat", "--chat-sessions", "5", "--cluster", cluster(n),
                 "--calibration", str(cal)]) == 2
    assert "min_restore_tokens auto" in capsys.readouterr().err
