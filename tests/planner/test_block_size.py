"""Planner input: --block-size for Mooncake-layout traces, files that state their own block size,
merging captures that share a key, and one-line errors for every mismatch (issue 12 item 2)."""
import json

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner.traces import read_mooncake, read_mooncake_files, trace_warnings


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _plan(capsys, argv):
    rc = main(["plan", "--quiet", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# Two conversations, prompts of 3 and 5 blocks of 64 tokens; the second turn extends the first.
RECORDS = [
    {"timestamp": 0, "input_length": 3 * 64 + 10, "output_length": 5, "hash_ids": [1, 2, 3, 4]},
    {"timestamp": 10, "input_length": 5 * 64 + 10, "output_length": 5, "hash_ids": [1, 2, 3, 4, 5, 6]},
]


def test_block_size_flag_reads_a_64_token_mooncake_trace(tmp_path, capsys):
    p = _write(tmp_path / "t.jsonl", RECORDS)
    # With Mooncake's default 512 the 6 ids cannot fit 330 tokens: a clear error, exit 2.
    rc, out, err = _plan(capsys, [str(p), "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 2 and "t.jsonl:1" in err and "blocks of 512" in err and "Traceback" not in err
    rc, out, err = _plan(capsys, [str(p), "--block-size", "64", "--json", "--gpu-blocks", "100",
                                  "--host-blocks", "0"])
    assert rc == 0, err
    o = json.loads(out)
    assert o["block_size"] == 64 and o["requests"] == 2
    # request 1 caches its 3 full blocks (its 4th is partial); request 2 reuses them: 3 of 4 + 6 prompt blocks
    assert o["gpu_hit_blocks"] == 3 and o["prompt_blocks"] == 10


def test_a_file_states_its_own_block_size(tmp_path):
    recs = [dict(r, block_size=64) for r in RECORDS]
    p = _write(tmp_path / "cap.jsonl", recs)
    assert read_mooncake(p).block_size == 64
    assert read_mooncake(p, block_size=64).block_size == 64
    with pytest.raises(ValueError, match=r"cap.jsonl:1: field 'block_size' is 64 but --block-size 128"):
        read_mooncake(p, block_size=128)
    recs[1]["block_size"] = 32
    _write(p, recs)
    with pytest.raises(ValueError, match=r"cap.jsonl:2: field 'block_size' is 32 but .*cap.jsonl:1 states 64"):
        read_mooncake(p)
    del recs[1]["block_size"]
    _write(p, recs)
    with pytest.raises(ValueError, match=r"cap.jsonl:2: field 'block_size' is absent"):
        read_mooncake(p)
    recs[1]["block_size"] = 0
    _write(p, recs)
    with pytest.raises(ValueError, match=r"cap.jsonl:2: field 'block_size' must be an int in \[1, 2\*\*40\]"):
        read_mooncake(p)


def test_cli_refuses_a_conflicting_block_size(tmp_path, capsys):
    p = _write(tmp_path / "cap.jsonl", [dict(r, block_size=64) for r in RECORDS])
    rc, _, err = _plan(capsys, [str(p), "--block-size", "512"])
    assert rc == 2 and err.startswith("error: ") and "field 'block_size' is 64" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = _plan(capsys, ["--chat", "--block-size", "64"])
    assert rc == 2 and "--chat-block-size" in err
    with pytest.raises(SystemExit) as exc:  # argparse: usage and one error line, exit 2
        main(["plan", str(p), "--block-size", "0"])
    assert exc.value.code == 2 and "--block-size: expected an int in [1, 2**48], got '0'" in capsys.readouterr().err


def test_weka_refuses_block_size(tmp_path, capsys):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"id": "s", "block_size": 64, "requests": [{"t": 0, "in": 130, "out": 1,
                                                                        "hash_ids": [0, 1]}]}))
    rc, _, err = _plan(capsys, [str(p), "--block-size", "64"])
    assert rc == 2 and "WEKA session file" in err


def test_session_field_and_capture_key(tmp_path):
    recs = [dict(r, block_size=64, session=f"s{i}", capture="k1") for i, r in enumerate(RECORDS)]
    recs[1]["hash_ids"] = [9, 7, 8, 3, 2, 1]  # keyed ids are not increasing: no warning for captures
    t = read_mooncake(_write(tmp_path / "a.jsonl", recs))
    assert [r.session for r in t.requests] == ["s0", "s1"] and t.capture_key == "k1"
    assert not any("out of order" in w for w in trace_warnings(t))
    recs[1]["session"] = [1]
    with pytest.raises(ValueError, match=r"a.jsonl:2: field 'session' must be a string or an int"):
        read_mooncake(_write(tmp_path / "a.jsonl", recs))
    recs[1]["session"] = 3
    recs[1]["capture"] = "k2"
    with pytest.raises(ValueError, match=r"a.jsonl:2: field 'capture' is 'k2' but .*a.jsonl:1 has 'k1'"):
        read_mooncake(_write(tmp_path / "a.jsonl", recs))


def test_merging_captures_needs_one_key(tmp_path, capsys):
    a = _write(tmp_path / "node0.jsonl", [dict(RECORDS[0], block_size=64, capture="k1")])
    b = _write(tmp_path / "node1.jsonl", [dict(RECORDS[1], block_size=64, capture="k1")])
    t = read_mooncake_files([b, a])
    assert len(t) == 2 and [r.timestamp for r in t.requests] == [0.0, 0.01] and t.block_size == 64
    c = _write(tmp_path / "other.jsonl", [dict(RECORDS[1], block_size=64, capture="k2")])
    with pytest.raises(ValueError, match=r"other.jsonl: field 'capture' is 'k2' but .*node0.jsonl has 'k1'"):
        read_mooncake_files([a, c])
    d = _write(tmp_path / "d.jsonl", [dict(RECORDS[1], block_size=32, capture="k1")])
    with pytest.raises(ValueError, match=r"d.jsonl: field 'block_size' is 32"):
        read_mooncake_files([a, d])
    plain = _write(tmp_path / "plain.jsonl", RECORDS)
    plain2 = _write(tmp_path / "plain2.jsonl", RECORDS)
    rc, _, err = _plan(capsys, [str(plain), str(plain2), "--block-size", "64"])
    assert rc == 2 and "plain.jsonl" in err and "give one trace at a time" in err
    rc, out, err = _plan(capsys, [str(a), str(b), "--json", "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 0, err
    o = json.loads(out)
    assert o["requests"] == 2 and o["gpu_hit_blocks"] == 3


def test_captures_of_two_nodes_merge_for_plan_cluster(tmp_path, capsys):
    """Nodes sharing the capture key: their files merge into one trace for --cluster."""
    from pathlib import Path

    cluster = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
    a = _write(tmp_path / "node0.jsonl", [dict(RECORDS[0], block_size=64, capture="k1")])
    b = _write(tmp_path / "node1.jsonl", [dict(RECORDS[1], block_size=64, capture="k1")])
    rc, out, err = _plan(capsys, ["--cluster", str(cluster), str(a), str(b), "--json"])
    assert rc == 0, err
    o = json.loads(out)
    assert o["requests"] == 2 and o["block_size"] == 64
    c = _write(tmp_path / "node2.jsonl", [dict(RECORDS[1], block_size=64, capture="k2")])
    rc, _, err = _plan(capsys, ["--cluster", str(cluster), str(a), str(c)])
    assert rc == 2 and "node2.jsonl: field 'capture' is 'k2'" in err


def test_an_unterminated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    """A capture cut by a crash (or read while a write is in progress) ends in a partial record without
    its newline: the whole records are replayed and the cut one is reported, not the file refused."""
    whole = [dict(r, block_size=64, capture="k1") for r in RECORDS]
    p = _write(tmp_path / "cap.jsonl", whole)
    p.write_text(p.read_text() + json.dumps(whole[1])[:25])
    t = read_mooncake(p)
    assert len(t) == 2 and any("cap.jsonl:3: the last line has no newline" in w for w in trace_warnings(t))
    rc, out, err = _plan(capsys, [str(p), "--json", "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 0 and json.loads(out)["requests"] == 2 and "cap.jsonl:3" in out
    # a bad line that ends in a newline is still refused: only a cut-off tail is skipped
    q = _write(tmp_path / "bad.jsonl", whole)
    q.write_text(q.read_text() + json.dumps(whole[1])[:25] + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        read_mooncake(q)


def test_a_capture_whose_only_record_was_cut_short_is_skipped_not_taken_for_another_format(tmp_path, capsys):
    """A writer killed during a file's first batch leaves one partial record and no newline: read as the
    Mooncake layout (the cut line skipped with a warning), never sniffed as a WEKA file, which made the
    whole folder "mix formats"; alone it has no requests, and the error says why."""
    whole = [dict(r, block_size=64, capture="k1") for r in RECORDS]
    _write(tmp_path / "cap.1.jsonl", whole)
    cut = tmp_path / "cap.jsonl"
    cut.write_text(json.dumps(whole[1])[:25])
    rc, out, err = _plan(capsys, [str(tmp_path), "--json", "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 0, err
    assert json.loads(out)["requests"] == 2 and "cap.jsonl:1: the last line has no newline" in out
    rc, _, err = _plan(capsys, [str(cut)])
    assert rc == 2 and "cap.jsonl has no requests (" in err and "the last line has no newline" in err


def test_a_mix_of_formats_names_a_file_of_each_and_explicit_empty_files_among_several_are_skipped(tmp_path, capsys):
    a = _write(tmp_path / "cap.1.jsonl", [dict(r, block_size=64, capture="k1") for r in RECORDS])
    empty = tmp_path / "cap.jsonl"
    empty.write_text("")          # the live file right after a rotation: a shell glob names it too
    rc, out, err = _plan(capsys, [str(a), str(empty), "--json", "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 0 and json.loads(out)["requests"] == 2, err
    weka = tmp_path / "w.json"
    weka.write_text(json.dumps({"block_size": 64, "requests": []}))
    rc, _, err = _plan(capsys, [str(a), str(weka)])
    assert rc == 2 and f"{a} is mooncake, {weka} is weka" in err


def test_a_folder_with_a_file_and_its_gzip_copy_is_refused(tmp_path, capsys):
    import gzip

    a = _write(tmp_path / "cap.jsonl", [dict(r, block_size=64, capture="k1") for r in RECORDS])
    (tmp_path / "cap.jsonl.gz").write_bytes(gzip.compress(a.read_bytes()))
    rc, _, err = _plan(capsys, [str(tmp_path)])
    assert rc == 2 and "cap.jsonl and cap.jsonl.gz, the same file plain and compressed" in err
    # an older capture compressed beside a newer one of the same name is no copy: both are read
    _write(tmp_path / "cap.jsonl", [dict(RECORDS[0], block_size=64, capture="k1")])
    rc, out, err = _plan(capsys, [str(tmp_path), "--json", "--gpu-blocks", "100", "--host-blocks", "0"])
    assert rc == 0 and json.loads(out)["requests"] == 3, err
