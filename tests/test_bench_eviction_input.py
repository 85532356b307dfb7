"""Issue 9 items 7 and 10 for `lmdeploy-hostcache bench eviction`: every bad trace is one line
naming the file and exit 2; without ../shared the bundled trace is replayed."""
from __future__ import annotations

import gzip
import json

import pytest

from lmdeploy_hostcache import cli
from lmdeploy_hostcache.bench import eviction as bench


def _run(capsys, *argv):
    rc = cli.main(["bench", "eviction", "--no-progress", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def test_falls_back_to_the_bundled_trace_without_shared(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_SHARED_MOONCAKE", tmp_path / "no-shared")
    rc, out, err = _run(capsys, "--limit", "200", "--capacities", "100", "--policies", "lru", "--json")
    assert rc == 0, err
    assert "replaying the bundled trace conversation_trace.jsonl.gz" in err
    rows = json.loads(out)["results"]
    assert {r["trace"] for r in rows} == {"conversation_trace.jsonl.gz"} and rows[0]["requests"] == 200


def _row(ts, ids):
    return json.dumps({"timestamp": ts, "input_length": 512 * len(ids), "output_length": 1, "hash_ids": ids}) + "\n"


@pytest.mark.parametrize("kind, match", [
    ("not-json", "not JSON"),
    ("nan", "non-finite 'timestamp'"),
    ("corrupt-gz", "corrupt or truncated gzip data"),
    ("plain-named-gz", "named .gz but not gzip-compressed"),
    ("binary", "not UTF-8"),
    ("folder", "holds no *.json / *.jsonl files"),
    ("unchained", "not chained"),
    ("weka", "'in'"),
    ("mooncake-64", "at most 1 blocks of 512"),
])
def test_every_bad_trace_is_one_line_and_exit_2(tmp_path, capsys, kind, match):
    p = tmp_path / ("t.jsonl.gz" if kind in ("corrupt-gz", "plain-named-gz") else "t.jsonl")
    if kind == "not-json":
        p.write_text(_row(0, [0, 1]) + "{oops\n")
    elif kind == "nan":
        p.write_text(_row(0, [0, 1]) + '{"timestamp": NaN, "input_length": 1024, "hash_ids": [0, 1]}\n')
    elif kind == "corrupt-gz":
        p.write_bytes(gzip.compress((_row(0, [0, 1]) * 100).encode())[:30])
    elif kind == "plain-named-gz":
        p.write_text(_row(0, [0, 1]))
    elif kind == "binary":
        p.write_bytes(b"\xff\xfe\x00\x01")
    elif kind == "folder":
        p.mkdir()
    elif kind == "unchained":
        p.write_text(_row(0, [0, 1]) + _row(1, [2, 1]))
    elif kind == "weka":
        p.write_text(json.dumps({"id": "s", "block_size": 64, "requests": [{"t": 0, "in": -64, "hash_ids": [1]}]}))
    elif kind == "mooncake-64":   # 64-token blocks without a block_size field: read as 512 unless told
        p.write_text(json.dumps({"timestamp": 0, "input_length": 128, "output_length": 1, "hash_ids": [0, 1]}) + "\n")
    rc, _, err = _run(capsys, "--trace", str(p), "--capacities", "10", "--policies", "lru")
    assert rc == 2
    assert err.startswith("error: ") and str(p) in err and match in err and err.count("\n") == 1, err


def test_trace_reads_every_layout_plan_reads(tmp_path, capsys):
    """--trace takes WEKA folders, captured and Mooncake-layout files of any block size (--block-size),
    each --trace one trace; the set options are refused with it and the trace options without it."""
    p = tmp_path / "docs64.jsonl"
    rows = [{"timestamp": t, "input_length": 64 * 3 + 5, "output_length": 1, "hash_ids": [7, 8, 9, 100 + t]}
            for t in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(capsys, "--trace", str(p), "--block-size", "64", "--capacities", "3", "--policies", "lru",
                        "--json")
    assert rc == 0, err
    (row,) = [r for r in json.loads(out)["results"] if r["policy"] == "lru"]
    # 4 prompt blocks each; the 3 shared full blocks hit in every request after the first
    assert (row["requests"], row["prompt_blocks"], row["hit_blocks"]) == (6, 24, 15)
    weka = bench._SHARED_WEKA
    if not weka.is_dir():
        pytest.skip(f"{weka} is absent (CI keeps a copy of shared/ beside the clone)")
    rc, out, err = _run(capsys, "--trace", str(weka), "--trace", str(p), "--block-size", "64", "--fractions", "0.5",
                        "--policies", "lru", "--json")
    assert rc == 2 and "--block-size applies to Mooncake-layout traces" in err
    rc, out, err = _run(capsys, "--trace", str(weka), "--stagger", "0", "--fractions", "0.5", "--policies", "lru",
                        "--json")
    assert rc == 0, err
    rows = json.loads(out)["results"]
    assert {r["trace"] for r in rows} == {"weka_sample"} and rows[0]["requests"] == 178   # 6 sessions merged
    rc, _, err = _run(capsys, "--block-size", "64", "--policies", "lru")
    assert rc == 2 and "--block-size applies to --trace files" in err


def test_a_trace_naming_output_blocks_is_told_they_are_not_replayed(tmp_path, capsys):
    """bench eviction stores prompt blocks only; a trace whose records name output blocks (captures, the
    chat generator) gets one note saying so, and the same hit rates as without them."""
    rows = [{"timestamp": t, "input_length": 64 * 2, "output_length": 65, "hash_ids": [7, 8],
             "output_hash_ids": [50 + t], "block_size": 64} for t in range(4)]
    named, bare = tmp_path / "named.jsonl", tmp_path / "bare.jsonl"
    named.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "output_hash_ids"}) + "\n" for r in rows))
    results = {}
    for p in (named, bare):
        rc, out, err = _run(capsys, "--trace", str(p), "--capacities", "3", "--policies", "lru", "--json")
        assert rc == 0, err
        assert ("name output blocks" in err) == (p is named)
        results[p] = [(r["hit_blocks"], r["prompt_blocks"]) for r in json.loads(out)["results"] if r["policy"] == "lru"]
    assert results[named] == results[bare]


def test_a_closed_stdout_ends_the_command_quietly(monkeypatch, capsys):
    """`lmdeploy-hostcache ... | head` closes the pipe early: exit 141 without a traceback."""
    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(bench, "run", closed_pipe)
    assert cli.main(["bench", "eviction", "--no-progress"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_captured_files_with_keyed_63_bit_ids_replay(tmp_path, capsys):
    """A capture's ids are 63-bit keyed hashes: the replay encodes ids in 8 bytes (it once refused every
    id above 2**32 - 1, so no capture could be replayed); a folder of one capture's files is one trace."""
    from lmdeploy_hostcache.capture import capture_record

    big = 2**62
    recs = [capture_record(arrival_s=t, input_length=64 * 3, output_length=1, block_ids=[big + 1, big + 2, big + 3 + t],
                           block_size=64, fingerprint="k") for t in range(6)]
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "cap.1.jsonl").write_text("".join(recs[:3]))
    (folder / "cap.jsonl").write_text("".join(recs[3:]))
    rc, out, err = _run(capsys, "--trace", str(folder), "--capacities", "4", "--policies", "lru", "--json")
    assert rc == 0, err
    (row,) = [r for r in json.loads(out)["results"] if r["policy"] == "lru"]
    assert (row["requests"], row["prompt_blocks"], row["hit_blocks"]) == (6, 18, 10)   # 2 shared blocks hit 5 times
