"""Issue 9, items 5, 7, 9, 10 (planner side): bad input and first use of `lmdeploy-hostcache plan`.

Every bad input gives exit 2 and one ``error:`` line naming the file or option (no traceback);
suspicious traces are replayed with counted warnings; memory follows the trace, not the
configured capacity; finished results are printed before the plot is tried.
"""
import gzip
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner import traces
from lmdeploy_hostcache.tier.slot_allocator import SlotAllocator

REPO = Path(__file__).resolve().parents[2]
CHAT = ["--chat", "--chat-sessions", "20", "--quiet"]


def _run(capsys, argv):
    rc = main(["plan", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _mooncake(tmp_path, rows, name="t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _row(ts, ids, inp=None):
    return {"timestamp": ts, "input_length": inp if inp is not None else 512 * len(ids), "output_length": 1,
            "hash_ids": ids}


# -- item 5: memory follows the trace's distinct blocks --------------------------------------


def test_huge_capacities_cost_no_memory_and_are_called_unbounded(capsys):
    # 5,000,000 slots per tier: the old allocator built per-slot lists (~100 bytes a slot, ~1 GB here;
    # --host-gb 1e7 took 7.7 GB). Now only the slots the trace fills cost memory.
    out = []
    peak = _peak_bytes(lambda: out.append(_run(capsys, [*CHAT, "--gpu-blocks", "5000000",
                                                        "--host-blocks", "5000000"])))
    rc, text, _ = out[0]
    assert rc == 0
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB for a 20-session trace"
    assert "effectively unbounded" in text and "host tier: 5,000,000 blocks" in text


def test_slot_allocator_memory_follows_slots_handed_out():
    a = []
    peak = _peak_bytes(lambda: a.append(SlotAllocator(10**12)))
    assert peak < 2**20
    alloc = a[0]
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2] and alloc.num_free == 10**12 - 3
    alloc.free(1)
    assert alloc.allocate() == 1 and alloc.allocate() == 3
    alloc.check_invariants()


def test_cluster_host_gb_1e9_is_a_number_and_bounded(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("routing: session\nnodes:\n  - {name: a, gpu_kv_gb: 1, host_gb: 1.0e9}\n"
                 "  - {name: b, gpu_kv_gb: 1, host_gb: 1e8}\n")
    out = []
    peak = _peak_bytes(lambda: out.append(_run(capsys, [*CHAT, "--cluster", str(f)])))
    rc, text, err = out[0]
    assert rc == 0, err
    assert peak < 40 * 2**20
    assert "node a: host tier" in text and "effectively unbounded" in text


# -- item 9: silent wrong answers ------------------------------------------------------------


def test_out_of_order_and_unchained_ids_are_warned_with_counts(capsys, tmp_path):
    p = _mooncake(tmp_path, [_row(0, [0, 1, 2]), _row(1, [0, 2, 1]), _row(2, [5, 4]), _row(3, [0, 1, 2])])
    rc, _, err = _run(capsys, [str(p), "--quiet"])
    assert rc == 0
    assert "warning: trace t.jsonl: 2 of 4 requests list block ids out of order" in err
    assert "not prefix-chained" in err
    assert traces.trace_warnings(traces.read_mooncake(REPO / "lmdeploy_hostcache" / "data" / "conversation_trace.jsonl.gz")) == []


def test_absurd_input_length_is_warned_with_counts(capsys, tmp_path):
    p = _mooncake(tmp_path, [_row(0, [0, 1]), _row(1, [0, 1], inp=10**12), _row(2, [0, 1], inp=512 * 40)])
    rc, _, err = _run(capsys, [str(p), "--quiet", "--json"])
    assert rc == 0
    assert "1 of 3 requests have an input_length above 10,000,000 tokens" in err
    assert "1 of 3 requests have an input_length their hash_ids do not cover" in err


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_non_finite_timestamps_are_refused_with_a_count(capsys, tmp_path, bad):
    p = tmp_path / "nan.jsonl"
    p.write_text("".join(json.dumps(_row(t, [0, 1])) + "\n" for t in (0, 1))
                 + f'{{"timestamp": {bad}, "input_length": 1024, "hash_ids": [0, 1]}}\n' * 2)
    rc, _, err = _run(capsys, [str(p), "--quiet"])
    assert rc == 2
    assert f"{p}: 2 request(s) have a non-finite 'timestamp'" in err and f"first at {p}:3" in err


@pytest.mark.parametrize("extra", [["--sweep"], ["--plot", "x.png"], ["--model", "Llama-3-8B"], ["--policy", "lru"],
                                   ["--host-gb", "10"], ["--quant-policy", "0"]])
def test_cluster_refuses_options_it_would_ignore(capsys, extra):
    rc, _, err = _run(capsys, [*CHAT, "--cluster", str(REPO / "examples" / "cluster.yaml"), *extra])
    assert rc == 2
    assert err.startswith("error: --cluster") and f"drop {extra[0]}" in err


def test_duplicate_keys_in_the_cluster_file_are_refused(capsys, tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("routing: session\nnodes:\n  - {name: a, gpu_kv_gb: 1, host_gb: 1}\n"
                 "nodes:\n  - {name: b, gpu_kv_gb: 1, host_gb: 1}\n")
    rc, _, err = _run(capsys, [*CHAT, "--cluster", str(f)])
    assert rc == 2
    assert f"{f}:4: duplicate key 'nodes'" in err


# -- item 7: unusable files name the file ----------------------------------------------------


def test_unusable_trace_files_are_one_line_errors(capsys, tmp_path):
    good = [json.dumps(_row(0, [0, 1])) + "\n"]
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress("".join(good * 50).encode())[:40])
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_text("".join(good))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"{\xff\xfe\x00garbage")
    for path, match in ((corrupt, "corrupt or truncated gzip data"), (fake, "named .gz but not gzip-compressed"),
                        (binary, "not UTF-8")):
        rc, _, err = _run(capsys, [str(path), "--quiet"])
        assert rc == 2 and str(path) in err and match in err, err
        assert err.count("\n") == 1
    # gzip data under a name without .gz is read by its content
    mislabelled = tmp_path / "gz-inside.jsonl"
    mislabelled.write_bytes(gzip.compress("".join(good).encode()))
    assert _run(capsys, [str(mislabelled), "--quiet"])[0] == 0


@pytest.mark.parametrize("content, match", [(None, "is a folder"), (b"\x00\x01\x02binary", "binary data"),
                                            (b"routing: \xff\xfe\n", "not UTF-8"), (b"nodes: [\n", "not valid YAML"),
                                            # keys of mixed types (an int, a null and a string) could not be sorted
                                            (b"routing: session\n1: x\nfoo: y\n~: z\nnodes: []\n", "unknown field(s)"),
                                            (b"routing: session\nnodes: [{name: a, 5: x, x: y}]\n", "unknown field(s)")])
def test_unusable_cluster_files_are_one_line_errors(capsys, tmp_path, content, match):
    f = tmp_path / "cluster.yaml"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    rc, _, err = _run(capsys, [*CHAT, "--cluster", str(f)])
    assert rc == 2 and str(f) in err and match in err and err.count("\n") == 1, err


# -- item 10: finished work is printed before the plot ---------------------------------------


SWEEP = [*CHAT, "--sweep", "--gpu-blocks", "40", "--sweep-values", "0,50,400", "--host-blocks", "200"]


def test_unwritable_plot_path_keeps_the_table(capsys, tmp_path):
    rc, out, err = _run(capsys, [*SWEEP, "--plot", str(tmp_path / "no" / "such" / "dir" / "s.png")])
    assert rc == 2
    assert "hit rate" in out and "recommended host size" in out  # the table came first
    assert err.startswith("error: --plot") and "the results above are complete" in err


def test_missing_matplotlib_keeps_the_table(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = _run(capsys, [*SWEEP, "--plot", str(tmp_path / "s.png")])
    assert rc == 2 and "recommended host size" in out
    assert "needs matplotlib" in err and "lmdeploy-hostcache[plot]" in err
    rc, out, err = _run(capsys, [*SWEEP, "--plot", str(tmp_path / "s.png"), "--json"])
    assert rc == 2 and json.loads(out)["sweep"][2]["value"] == 400


def test_a_sweep_that_has_not_flattened_recommends_nothing(capsys, tmp_path):
    rc, out, _ = _run(capsys, [*CHAT, "--sweep", "--gpu-blocks", "10", "--host-blocks", "200",
                               "--sweep-values", "0,5,10", "--plot", str(tmp_path / "s.png")])
    assert rc == 0
    assert "not saturated" in out and "recommended host size: 10 blocks" not in out



def test_a_gpu_sweep_never_recommends_a_size_with_requests_longer_than_the_gpu_tier(capsys, tmp_path):
    """A request longer than the GPU tier is never cached in the replay (LMDeploy would refuse it), which kept a
    later request's host hit alive at 1 GPU block and lost it at 2: the curve fell as the GPU grew, and the sweep
    recommended the 1-block size without a word. Those points are now shown, named and never recommended."""
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i, "input_length": 512 * len(ids) + 1, "output_length": 1,
                                         "hash_ids": ids}) + "\n"
                             for i, ids in enumerate(([1], [2, 3], [4, 5], [1]))))
    argv = [str(trace), "--sweep", "--sweep-tier", "gpu", "--gpu-blocks", "1", "--host-blocks", "2",
            "--plot", str(tmp_path / "s.png")]
    rc, out, _ = _run(capsys, [*argv, "--sweep-values", "1,2,3", "--json"])
    res = json.loads(out)
    assert rc == 0 and [p["gpu_overflow_requests"] for p in res["sweep"]] == [2, 0, 0]
    assert [p["hit_rate"] for p in res["sweep"]] == [0.1, 0.0, 0.1], "the shape this test is about"
    assert res["recommended"]["not_recommendable"] == [1] and res["recommended"]["value"] is None
    rc, out, _ = _run(capsys, [*argv, "--sweep-values", "1,2,3,4"])
    assert rc == 0 and "longer than GPU" in out and "at 1 blocks some requests are longer than the GPU tier" in out
    assert "recommended gpu size: 3 blocks" in out
    rc, out, _ = _run(capsys, [*argv, "--sweep-values", "1"])
    assert "recommended gpu size: none: every swept point has requests longer than the GPU tier" in out
    rc, out, _ = _run(capsys, [*argv, "--sweep-values", "1,2"])   # the curve falls: no "still grows" claim
    assert "none: only the largest size swept (2 blocks) has no request longer than the GPU tier" in out
    assert "still grows" not in out
    # a host sweep keeps its fixed GPU tier at every point: it still recommends, and says what the GPU size does
    rc, out, _ = _run(capsys, [str(trace), "--sweep", "--gpu-blocks", "1", "--host-blocks", "2",
                               "--sweep-values", "0,1,2,4", "--plot", str(tmp_path / "s.png")])
    assert rc == 0 and "2 requests are longer than the fixed GPU tier" in out and "recommended host size: " in out

# -- hardening found by an audit (stop 33): every absurd value is one named error, never a traceback or a hang --

def _line(**kw) -> str:
    rec = {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]}
    rec.update(kw)
    return json.dumps(rec)


@pytest.mark.parametrize("text, match", [
    ('{"timestamp": 1' + "0" * 400 + ', "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]}',
     ":1: field 'timestamp' is out of range"),
    (_line(hash_ids=[1, 2**64]), ":1: field 'hash_ids' holds an id of 65 bits"),
    ('{"timestamp": 0, "input_length": 1024, "hash_ids": ' + "[" * 100_000 + "]" * 100_000 + "}",
     ":1: JSON nested too deeply"),
    ('{"timestamp": 0, "input_length": 1024, "output_length": ' + "9" * 5000 + ', "hash_ids": [1, 2]}',
     ":1: not usable JSON (an integer of more than 4300 digits; block ids, lengths and timestamps are below "
     "2**64)"),
    (_line(output_length=10**35), ":1: field 'output_length' is 100,000,000,000,000,000,000,000,000,000,000,000 "
                                  "tokens; no model generates more than 10,000,000"),
    ('{"timestamp": 0, "output_length": 1, "hash_ids": [1, 2]}', ":1: missing field 'input_length'"),
])
def test_absurd_mooncake_values_are_one_named_error(capsys, tmp_path, text, match):
    p = tmp_path / "t.jsonl"
    p.write_text(_line() + "\n" + text + "\n" if "input_length'" not in match else text + "\n")
    rc, _, err = _run(capsys, [str(p), "--quiet", "--gpu-blocks", "10", "--host-blocks", "10"])
    line = 1 if "input_length'" in match else 2
    assert rc == 2 and err.startswith(f"error: {p}:") and match.replace(":1:", f":{line}:") in err, err
    assert err.count("\n") == 1


def test_a_bad_byte_is_named_by_its_line(capsys, tmp_path):
    p = tmp_path / "late.jsonl"
    p.write_bytes((_line() + "\n").encode() * 1000 + b'{"timestamp": 0, "x": "\xff"}\n')
    rc, _, err = _run(capsys, [str(p), "--quiet", "--format", "mooncake"])
    assert rc == 2 and f"{p}:1001: not UTF-8 text (byte 24)" in err


def test_sniffing_reads_the_first_record_whole(capsys, tmp_path):
    """A record whose hash_ids come first (or run past 4 KB) is still a Mooncake record."""
    p = tmp_path / "order.jsonl"
    ids = list(range(400))
    p.write_text(json.dumps({"hash_ids": ids, "timestamp": 0, "input_length": 512 * 400, "output_length": 1}) + "\n"
                 + json.dumps({"hash_ids": ids, "timestamp": 5, "input_length": 512 * 400, "output_length": 1}) + "\n")
    rc, out, err = _run(capsys, [str(p), "--quiet", "--json", "--gpu-blocks", "1000", "--host-blocks", "0"])
    assert rc == 0, err
    # the second prompt matches its first 399 blocks (the last token is always computed)
    assert json.loads(out)["requests"] == 2 and json.loads(out)["gpu_hit_blocks"] == 399


def _weka(path, requests, block_size=64):
    path.write_text(json.dumps({"id": path.stem, "block_size": block_size, "requests": requests}))
    return path


def test_weka_errors_name_the_file_and_request(capsys, tmp_path):
    p = _weka(tmp_path / "a.json", [{"t": 0, "in": 64, "hash_ids": [0]}, {"t": 1, "in": 10, "hash_ids": [0, 1]}])
    rc, _, err = _run(capsys, [str(p), "--quiet"])
    assert rc == 2 and f"{p} requests[1]: 2 hash_ids for in=10 (at most 1 blocks of 64)" in err
    big = _weka(tmp_path / "b.json", [{"t": 0, "in": 64, "hash_ids": [2**64 - 1]}])
    other = _weka(tmp_path / "c.json", [{"t": 0, "in": 64, "hash_ids": [5]}])
    rc, _, err = _run(capsys, [str(big), str(other), "--quiet"])
    assert rc == 2 and f"{other} requests[0]: block id 5 is too large to be offset" in err
    deep = {"t": 0, "in": 64, "hash_ids": [0]}
    for _ in range(200):
        deep = {"t": 0, "requests": [deep]}
    d = _weka(tmp_path / "d.json", [deep])
    rc, _, err = _run(capsys, [str(d), "--quiet"])
    assert rc == 2 and str(d) in err and ("nested more than 64 deep" in err or "nested too deeply" in err)


def test_huge_lengths_neither_hang_nor_grow_memory(capsys, tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(_line() + "\n" + _line(timestamp=1, output_length=9_000_000) + "\n")
    rc, out, err = _run(capsys, [str(p), "--quiet", "--json", "--gpu-blocks", "10", "--host-blocks", "10"])
    assert rc == 0, err          # one growth per 512-token block, not per token: 17,578 steps, not 9 million
    assert json.loads(out)["requests"] == 2
    q = tmp_path / "absurd.jsonl"
    q.write_text(_line() + "\n" + _line(timestamp=1, input_length=10**12) + "\n")
    rc, _, err = _run(capsys, [str(q), "--quiet", "--engine-steps"])
    assert rc == 2 and "--engine-steps: request 1 of absurd.jsonl has input_length 1,000,000,000,000" in err


def test_folders_skip_empty_files_and_files_are_read_once(capsys, tmp_path):
    cap = tmp_path / "cap"
    cap.mkdir()
    rec = dict(block_size=512, capture="k")
    (cap / "capture.1.jsonl").write_text("\n".join(json.dumps(dict(json.loads(_line(timestamp=t)), **rec))
                                                   for t in range(3)) + "\n")
    (cap / "capture.jsonl").write_text("")      # the live file of a node that has served nothing since
    args = ["--quiet", "--json", "--gpu-blocks", "10", "--host-blocks", "10"]
    rc, out, err = _run(capsys, [str(cap), *args])
    assert rc == 0, err
    once = json.loads(out)
    rc, out, err = _run(capsys, [str(cap), str(cap / "capture.1.jsonl"), str(cap / "capture.1.jsonl"), *args])
    assert rc == 0, err
    twice = json.loads(out)
    assert once["requests"] == twice["requests"] == 3 and once["hit_rate"] == twice["hit_rate"]
    rc, _, err = _run(capsys, [str(cap / "capture.jsonl"), "--quiet"])
    assert rc == 2 and "empty trace file" in err           # an empty file given by name is still refused


def _alias_bomb(levels: int = 9) -> str:
    """A YAML flow list of 10**levels leaves in a few hundred bytes (anchors re-used ten times per level)."""
    text = "&l0 [x,x,x,x,x,x,x,x,x,x]"
    for i in range(1, levels):
        text = f"&l{i} [{text}" + f",*l{i - 1}" * 9 + "]"
    return text


@pytest.mark.parametrize("field", ["name", "host_gb", "routing", "min_restore_tokens"])
def test_cluster_file_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys, field):
    bomb = _alias_bomb()
    node = {"name": "a", "gpu_kv_gb": "1", "host_gb": "1"}
    top = {"routing": "session"}
    (node if field in node else top)[field] = bomb
    nodes = ", ".join(f"{k}: {v}" for k, v in node.items())
    extra = "".join(f"{k}: {v}\n" for k, v in top.items())
    p = tmp_path / "c.yaml"
    p.write_text(f"{extra}nodes:\n  - {{{nodes}}}\n")
    peak = _peak_bytes(lambda: _run(capsys, ["--cluster", str(p), "--limit", "1", "--quiet"]))
    rc, _, err = _run(capsys, ["--cluster", str(p), "--limit", "1", "--quiet"])
    assert rc == 2 and err.startswith(f"error: {p}") and field in err and len(err) < 4000, err
    assert peak < 64 * 2**20, peak         # the error never builds the expanded value's text


# -- hardening found by an audit (stop 35): huge numbers, options that would be ignored, step-model work --

@pytest.mark.parametrize("argv, needle", [
    (["--gpu-blocks", "9" * 400], "argument --gpu-blocks: expected an int in [0, 2**48]"),
    (["--host-blocks", str(2**49)], "argument --host-blocks: expected an int in [0, 2**48]"),
    (["--chat-block-size", "9" * 50], "argument --chat-block-size: expected an int in [1, 2**48]"),
    (["--prefill-tokens-per-s", "1e-320"], "argument --prefill-tokens-per-s: expected a number in [1e-09, 1e+18]"),
    (["--h2d-gbps", "1e300"], "argument --h2d-gbps: expected a number in [1e-09, 1e+18]"),
    (["--tp", "0"], "argument --tp: expected an int in [1, 2**48]"),
])
def test_numbers_beyond_any_node_are_refused_by_the_option(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(["plan", *CHAT, *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--engine-steps"], "--cluster replays each request at once, without request lifetimes: drop --engine-steps"),
    (["--decode-tokens-per-s", "10", "--host-write-s", "2"], "drop --decode-tokens-per-s, --host-write-s"),
    (["--no-concurrency"], "drop --no-concurrency"),
])
def test_cluster_refuses_the_single_node_concurrency_options(capsys, argv, needle):
    rc, _, err = _run(capsys, [*CHAT, "--cluster", str(REPO / "examples" / "cluster.yaml"), *argv])
    assert rc == 2 and needle in err, err


def test_sweep_options_without_sweep_are_refused(capsys):
    rc, _, err = _run(capsys, [*CHAT, "--sweep-values", "1,2", "--plot", "x.png"])
    assert rc == 2 and "--sweep-values, --plot set the capacity sweep: add --sweep" in err, err


@pytest.mark.parametrize("field, value", [("input_length", 2**41), ("block_size", 10**30)])
def test_trace_lengths_beyond_any_request_are_one_named_error(capsys, tmp_path, field, value):
    p = tmp_path / "t.jsonl"
    p.write_text(_line() + "\n" + _line(**{field: value}) + "\n")
    rc, _, err = _run(capsys, [str(p), "--quiet", "--gpu-blocks", "10", "--host-blocks", "10"])
    assert rc == 2 and f"t.jsonl:2: field '{field}' must be an int in [" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("rec, extra, needle", [
    ({"output_length": 2_000_000}, [], "has output_length 2,000,000, above 1,000,000"),
    ({"input_length": 200_000, "hash_ids": [1, 2]}, ["--max-prefill-tokens", "1"],
     "has input_length 200,000: 200,000 prefill chunks of --max-prefill-tokens 1 (at most 100,000"),
])
def test_step_model_refuses_requests_it_would_take_ages_on(capsys, tmp_path, rec, extra, needle):
    p = tmp_path / "t.jsonl"
    p.write_text(_line(**rec) + "\n")
    rc, _, err = _run(capsys, [str(p), "--quiet", "--gpu-blocks", "10", "--host-blocks", "10", "--engine-steps",
                               *extra])
    assert rc == 2 and needle in err, err


def test_a_symlink_loop_in_a_trace_folder_is_one_named_error(capsys, tmp_path):
    folder = tmp_path / "caps"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_line(timestamp=0) + "\n")
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    rc, _, err = _run(capsys, [str(folder), "--quiet"])
    assert rc == 2 and "loop.jsonl: cannot read it" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_a_byte_order_mark_at_a_trace_s_start_is_not_content(capsys, tmp_path):
    """An editor's UTF-8 byte-order mark used to make a Mooncake file 'neither Mooncake JSONL nor WEKA'."""
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (_line(timestamp=0) + "\n" + _line(timestamp=1) + "\n").encode())
    rc, out, err = _run(capsys, [str(p), "--quiet", "--json"])
    assert rc == 0 and json.loads(out)["requests"] == 2, err
