"""`lmdeploy-hostcache plan` end to end (through the real dispatcher)."""
import json
from pathlib import Path

import pytest

from lmdeploy_hostcache.cli import main

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"hit_rate", "gpu_hit_rate", "host_hit_rate", "requests", "restored_tokens"}


def _json(capsys, argv):
    assert main(["plan", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_run_replays_the_bundled_trace(capsys):
    """The README main-job command: no arguments, the bundled trace, a readable table."""
    assert main(["plan", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "12,031 requests" in out and "GPU only" in out and "GPU + host" in out
    assert "model inputs, not measurements" in out and "measured on this machine" in out


def test_json_object_and_gb_to_blocks(capsys):
    o = _json(capsys, ["--json", "--limit", "1500", "--gpu-kv-gb", "8", "--host-gb", "64"])
    assert REQUIRED <= o.keys()
    assert o["requests"] == 1500 and o["block_size"] == 512
    assert o["gpu_blocks"] == 8 * 2**30 // o["gpu_block_bytes"] == 128  # Llama-3-8B: 64 MiB per 512-token block
    assert o["host_blocks"] == 64 * 2**30 // o["host_block_bytes_per_rank"]
    assert o["hit_rate"] == pytest.approx(o["gpu_hit_rate"] + o["host_hit_rate"])
    assert o["restored_tokens"] == o["host_hit_blocks"] * 512
    assert o["gpu_only"]["hit_rate"] == o["gpu_hit_rate"]
    assert o["cost_model"]["prefill_assumed"] and o["ttft"]["estimate"]


def test_blocks_override_and_int4_host_format(capsys):
    a = _json(capsys, ["--json", "--limit", "1500", "--gpu-blocks", "100", "--host-blocks", "400"])
    assert (a["gpu_blocks"], a["host_blocks"]) == (100, 400)
    b = _json(capsys, ["--json", "--limit", "1500", "--host-kv-format", "int4"])
    assert b["host_block_bytes_per_rank"] < b["gpu_block_bytes"] / 3
    c = _json(capsys, ["--json", "--limit", "1500"])
    assert b["host_blocks"] > 3 * c["host_blocks"] and b["host_hit_rate"] >= c["host_hit_rate"]


def test_replicated_kv_heads_and_kernel_pages_price_blocks_as_lmdeploy_does(capsys):
    """--tp a multiple of kv_heads (LMDeploy replicates the heads: one per rank) and --kernel-block-size
    (smaller pages round more tensors up to 256 bytes); the bytes themselves are cross-checked against
    LMDeploy's cache plan in test_geometry."""
    base = ["--json", "--limit", "50", "--model", "Qwen2.5-7B", "--quant-policy", "4"]
    tp8 = _json(capsys, [*base, "--tp", "8"])
    tp4 = _json(capsys, [*base, "--tp", "4"])
    assert tp8["gpu_block_bytes"] == tp4["gpu_block_bytes"]   # 4 KV heads: one per rank either way
    assert tp8["host_blocks"] * 2 == pytest.approx(tp4["host_blocks"], abs=1)   # every rank holds its copy
    paged = _json(capsys, [*base, "--tp", "4", "--kernel-block-size", "16"])
    assert (tp4["kernel_block_size"], paged["kernel_block_size"]) == (512, 16)
    assert paged["gpu_block_bytes"] > tp4["gpu_block_bytes"] and paged["gpu_blocks"] < tp4["gpu_blocks"]
    assert main(["plan", "--limit", "50", "--kernel-block-size", "16", "--cluster",
                 str(REPO / "examples" / "cluster.yaml")]) == 2
    assert "--kernel-block-size" in capsys.readouterr().err


def test_sweep_writes_plot_and_table(capsys, tmp_path):
    png = tmp_path / "s.png"
    assert main(["plan", "--chat", "--chat-sessions", "80", "--sweep", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--plot", str(png), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out and "recommended host size" in out
    o = _json(capsys, ["--chat", "--chat-sessions", "80", "--sweep", "--sweep-values", "0,50,400", "--gpu-blocks",
                       "40", "--host-blocks", "200", "--plot", str(png), "--json"])
    assert [p["host_blocks"] for p in o["sweep"]] == [0, 50, 400]
    assert o["sweep"][0]["host_hit_rate"] == 0 and o["sweep"][2]["host_hit_rate"] > 0
    assert REQUIRED <= o.keys()


def test_weka_folder_and_cluster(capsys, shared_traces):
    o = _json(capsys, ["--json", str(shared_traces / "weka_sample"), "--stagger", "30", "--gpu-kv-gb", "4"])
    assert o["block_size"] == 64 and o["requests"] > 100
    o = _json(capsys, ["--json", "--chat", "--chat-sessions", "60", "--cluster", str(REPO / "examples" / "cluster.yaml")])
    assert REQUIRED <= o.keys() and len(o["nodes"]) == 3
    assert sum(n["requests"] for n in o["nodes"]) == o["requests"]
    for n in o["nodes"]:
        assert 0 <= n["recommended_host_cache_gb"] <= n["host_gb"]


def test_generated_families_replay_and_chat_stays_short_for_generate_chat(capsys):
    docs = _json(capsys, ["--json", "--quiet", "--generate", "documents", "--workload-param", "requests=300",
                          "--workload-param", "documents=20", "--gpu-blocks", "100", "--host-blocks", "2000"])
    assert docs["requests"] == 300 and docs["block_size"] == 64
    # 20 documents of at most 120 blocks fit the host tier, so nearly every document block hits after its
    # first request; the requests' own blocks never do
    assert 0.5 < docs["hit_rate"] < 1 and docs["host_hit_rate"] > docs["gpu_hit_rate"]
    cyc = ["--json", "--quiet", "--generate", "agents", "--workload-param", "order=cycle",
           "--workload-param", "sessions=30", "--workload-param", "requests=300", "--workload-param", "block_size=128",
           "--gpu-blocks", "50"]
    small, big = _json(capsys, [*cyc, "--host-blocks", "100"]), _json(capsys, [*cyc, "--host-blocks", "20000"])
    assert small["block_size"] == 128 and small["gpu_hit_rate"] == 0      # a 30-session cycle flushes 50 blocks
    assert big["host_hit_rate"] > small["host_hit_rate"] + 0.3
    short = _json(capsys, ["--json", "--quiet", "--chat", "--chat-sessions", "30"])
    long = _json(capsys, ["--json", "--quiet", "--generate", "chat", "--workload-param", "sessions=30"])
    same = ("trace", "requests", "block_size", "hit_rate", "gpu_hit_rate", "host_hit_rate", "restored_tokens")
    assert [short[k] for k in same] == [long[k] for k in same] and short["requests"] > 30


@pytest.mark.parametrize("argv, match", [
    (["--generate", "agents", "--workload-param", "foo=1"], "agent workload has no parameter 'foo'"),
    (["--generate", "agents", "--workload-param", "order"], "--workload-param 'order': expected FIELD=VALUE"),
    (["--chat", "--generate", "documents"], "contradicts --generate documents"),
    (["--chat-sessions", "5"], "--chat-sessions set the chat generator"),
    (["--workload-param", "zipf=1"], "add --generate FAMILY"),
    (["--generate", "documents", "--block-size", "64"], "--workload-param block_size=N"),
    (["--generate", "chat", "--workload-param", "sessions=4", "--chat-sessions", "5"], "sets sessions twice"),
    (["--generate", "documents", "x.jsonl"], "do not also give trace files"),
    (["--model", "gpt-17"], "neither a preset"),
    (["--quant-policy", "8", "--host-kv-format", "int4"], "host_kv_format=int4"),
    (["--policy", "mru"], "--policy 'mru'"),
    (["/no/such/trace.jsonl"], "does not exist"),
    (["--tp", "3"], "tp=3 does not divide"),
    (["--tp", "12"], "tp=12 is neither a divisor nor a multiple of num_kv_heads=8"),
    (["--kernel-block-size", "24"], "kernel_block_size must be a power of 2 >= 16"),
    (["--kernel-block-size", "1024"], "kernel_block_size 1024 must divide block_size 512"),
])
def test_bad_arguments_exit_2_with_a_named_error(capsys, argv, match):
    assert main(["plan", "--limit", "10", *argv]) == 2
    assert match in capsys.readouterr().err
