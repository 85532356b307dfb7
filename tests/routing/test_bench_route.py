"""``lmdeploy-hostcache bench route`` prints measured figures (tiny sizes here)."""
from __future__ import annotations

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "bench", "route", *args],
                          capture_output=True, text=True, timeout=120)


def test_bench_route_json_has_measured_figures():
    p = _run("--nodes", "2", "5", "--blocks-per-node", "20000", "--requests", "50", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [r["nodes"] for r in res["runs"]] == [2, 5]
    for r in res["runs"]:
        assert r["cached_blocks"] == r["nodes"] * 20000 and r["table_entries"] == r["cached_blocks"]
        assert 0 < r["decision_ms_median"] <= r["decision_ms_p99"]
        assert 0 < r["table_bytes_per_cached_block"] < 64


def test_bench_route_bad_argument_is_one_line():
    p = _run("--nodes", "0")
    assert p.returncode == 2 and "--nodes" in p.stderr and "Traceback" not in p.stderr


def test_bench_route_compare_prints_every_policy(tmp_path):
    import json
    from pathlib import Path

    trace = tmp_path / "t.jsonl"
    lines = []
    for i in range(120):  # 12 sessions x 10 turns sharing a system block
        s = i % 12
        lines.append(json.dumps({"timestamp": i * 100, "input_length": 512 * (3 + i // 12), "output_length": 1,
                                 "hash_ids": [0, 1000 + s] + [100000 + 100 * s + k for k in range(1 + i // 12)]}))
    trace.write_text("\n".join(lines) + "\n")
    yaml = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
    p = _run("--compare", str(yaml), "--trace", str(trace), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [r["routing"] for r in res["rows"]] == ["session", "random", "prefix", "cache_aware", "pooled"]
    for r in res["rows"][:-1]:
        assert sum(r["requests"]) == 120 and 0 <= r["hit_rate"] <= 1
    bad = _run("--compare", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_route_compare_resolves_min_restore_tokens_auto(tmp_path):
    """A cluster file `plan --cluster` accepts (``min_restore_tokens: auto``) is resolved the same way here: the
    rows equal those of the number it resolves to."""
    import json
    from pathlib import Path

    from lmdeploy_hostcache.planner.cluster import load_cluster
    from lmdeploy_hostcache.planner.geometry import BlockSizing
    from lmdeploy_hostcache.planner.replay import resolve_min_restore
    from lmdeploy_hostcache.restore_cost import ASSUMED

    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 100, "input_length": 512 * (2 + i // 6),
                                           "output_length": 1, "hash_ids": [0, 1000 + i % 6] + list(range(10 * i, 10 * i + i // 6))})
                               for i in range(36)) + "\n")
    base = (Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml").read_text()
    auto = tmp_path / "auto.yaml"
    auto.write_text(base + "\nmin_restore_tokens: auto\n")
    spec = load_cluster(auto)
    n = resolve_min_restore("auto", BlockSizing.build(spec.geometry(), spec.cache_format, 512), ASSUMED)
    number = tmp_path / "number.yaml"
    number.write_text(base + f"\nmin_restore_tokens: {n}\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "LMDEPLOY_HOSTCACHE_CALIBRATION"}
    rows = []
    for path in (auto, number):
        p = subprocess.run([sys.executable, "-m", "lmdeploy_hostcache.cli", "bench", "route", "--compare", str(path),
                            "--trace", str(trace), "--json"], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        rows.append([(r["routing"], r["hit_rate"]) for r in json.loads(p.stdout)["rows"]])
    assert rows[0] == rows[1]


def test_bench_route_compare_replays_the_chat_generator(tmp_path):
    """``--chat-sessions N`` replays ``ChatWorkload(sessions=N)`` (the docs' chat routing figures) instead of a trace,
    and refuses a --trace beside it or a use without --compare."""
    from pathlib import Path

    from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat

    yaml = str(Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml")
    p = _run("--compare", yaml, "--chat-sessions", "12", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    n = len(generate_chat(ChatWorkload(sessions=12)).requests)
    assert res["requests"] == n and res["trace"].startswith("chat(")
    for r in res["rows"][:-1]:
        assert sum(r["requests"]) == n
    # the generator's re-sent replies hit: a chat workload is far above zero under every cache-using policy
    assert min(r["hit_rate"] for r in res["rows"] if r["routing"] != "random") > 0.3
    both = _run("--compare", yaml, "--chat-sessions", "12", "--trace", str(tmp_path / "t.jsonl"))
    assert both.returncode == 2 and "--trace" in both.stderr and "Traceback" not in both.stderr
    alone = _run("--chat-sessions", "12")
    assert alone.returncode == 2 and "--compare" in alone.stderr
    zero = _run("--compare", yaml, "--chat-sessions", "0")
    assert zero.returncode == 2 and "sessions" in zero.stderr and "Traceback" not in zero.stderr


def test_bench_route_compare_reads_traces_as_plan_does(tmp_path):
    """``--trace`` goes through the planner's reader: a WEKA session file replays its requests (it used to be read
    as one cut-short Mooncake line: 0 requests, every hit rate 0.0, exit 0), an empty file is refused, a skipped
    last line is warned about, and ``--trace`` without ``--compare`` is refused."""
    from pathlib import Path

    yaml = str(Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml")
    weka = tmp_path / "session.json"
    weka.write_text(json.dumps({"block_size": 64, "requests": [
        {"t": float(t), "type": "n", "in": 64 * (4 + t), "out": 8, "hash_ids": list(range(4 + t))}
        for t in range(6)]}))
    p = _run("--compare", yaml, "--trace", str(weka), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["requests"] == 6 and all(sum(r["requests"]) == 6 for r in res["rows"][:-1])
    assert max(r["hit_rate"] for r in res["rows"]) > 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = _run("--compare", yaml, "--trace", str(empty))
    assert p.returncode == 2 and "empty.jsonl" in p.stderr and "Traceback" not in p.stderr
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps({"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]})
                   + '\n{"timestamp": 1, "input_')
    p = _run("--compare", yaml, "--trace", str(cut), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["requests"] == 1
    assert "warning:" in p.stderr and "cut.jsonl" in p.stderr
    p = _run("--trace", str(cut))
    assert p.returncode == 2 and "--compare" in p.stderr


def test_bench_route_compare_without_session_keys_and_weka_stagger(tmp_path, monkeypatch):
    """``--without-session-keys`` replays every request as one whose client sent no key (the chat generator's
    requests carry one); a trace is read with plan's 60 s stagger (merged WEKA sessions), so the two read alike."""
    import contextlib
    import io
    from pathlib import Path

    from lmdeploy_hostcache.bench import route
    from lmdeploy_hostcache.planner import traces
    from lmdeploy_hostcache.planner.cli import DEFAULT_STAGGER_S

    yaml = str(Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml")
    p = _run("--compare", yaml, "--chat-sessions", "12", "--without-session-keys", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["session_keys"] is False
    p = _run("--compare", yaml, "--chat-sessions", "12")
    assert p.returncode == 0 and "no session keys" not in p.stdout
    p = _run("--without-session-keys")
    assert p.returncode == 2 and "--compare" in p.stderr
    folder = tmp_path / "weka"
    folder.mkdir()
    for k in range(2):
        (folder / f"s{k}.json").write_text(json.dumps({"block_size": 64, "requests": [
            {"t": float(t), "type": "n", "in": 64 * (3 + t), "out": 8, "hash_ids": list(range(3 + t))}
            for t in range(3)]}))
    staggers, real = [], traces.read_traces
    monkeypatch.setattr(traces, "read_traces", lambda *a, **k: staggers.append(k.get("stagger_s")) or real(*a, **k))
    with contextlib.redirect_stderr(io.StringIO()):
        res = route.compare(yaml, str(folder))
    assert res["requests"] == 6 and staggers == [DEFAULT_STAGGER_S]
