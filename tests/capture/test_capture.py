"""Trace capture, pure part (issue 12 item 1): keyed ids, the record layout, the rotating writer."""
import errno
import json
import logging
import os

import pytest

from lmdeploy_hostcache.capture import CAPTURE_KEY_ENV, CaptureKey, RotatingWriter, capture_record
from lmdeploy_hostcache.planner.traces import read_mooncake, read_mooncake_files


def test_block_ids_are_keyed_and_stable_within_a_key():
    k1, k2 = CaptureKey(b"\x01" * 16), CaptureKey(b"\x02" * 16)
    digests = [(1 << 127) + 5, 7, 12345678901234567890]
    assert k1.block_ids(digests) == [k1.block_id(d) for d in digests] == CaptureKey(b"\x01" * 16).block_ids(digests)
    assert all(0 <= x < 2**63 for x in k1.block_ids(digests))
    assert set(k1.block_ids(digests)).isdisjoint(k2.block_ids(digests))   # no link across keys
    assert k1.fingerprint != k2.fingerprint and len(k1.fingerprint) == 8
    assert k1.session_id(3) == k1.session_id("3") != k2.session_id(3)
    assert "01010101" not in repr(k1) and k1.fingerprint in repr(k1)     # the key never shows


def test_keys_from_the_environment():
    assert CaptureKey.from_env({}).fingerprint != CaptureKey.from_env({}).fingerprint   # random per capture
    hexkey = "00112233445566778899aabbccddeeff"
    a, b = CaptureKey.from_env({CAPTURE_KEY_ENV: hexkey}), CaptureKey.from_env({CAPTURE_KEY_ENV: hexkey.upper()})
    assert a.fingerprint == b.fingerprint and a.block_id(99) == b.block_id(99)
    with pytest.raises(ValueError, match=CAPTURE_KEY_ENV + r": expected 32 hex digits"):
        CaptureKey.from_env({CAPTURE_KEY_ENV: "xyz"})


def test_record_layout_is_what_plan_reads(tmp_path):
    line = capture_record(arrival_s=1.5, input_length=130, output_length=7, block_ids=[5, 9], block_size=64,
                          fingerprint="abcd0123", session="s1")
    rec = json.loads(line)
    assert line.endswith("\n") and set(rec) == {"timestamp", "input_length", "output_length", "hash_ids",
                                                 "block_size", "capture", "session"}
    assert rec["timestamp"] == 1500.0 and rec["hash_ids"] == [5, 9]
    (tmp_path / "c.jsonl").write_text(line)
    t = read_mooncake(tmp_path / "c.jsonl")
    assert t.block_size == 64 and t.capture_key == "abcd0123" and t.requests[0].session == "s1"
    assert t.requests[0].timestamp == 1.5 and t.requests[0].output_length == 7
    with pytest.raises(ValueError, match="2 block ids for 200 tokens"):
        capture_record(arrival_s=0, input_length=200, output_length=0, block_ids=[1, 2], block_size=64,
                       fingerprint="x")


def _line(i, n=1):
    return capture_record(arrival_s=i, input_length=64 * n, output_length=1, block_ids=list(range(n)),
                          block_size=64, fingerprint="k")


def test_writer_rotates_at_the_size_limit_and_keeps_whole_records(tmp_path):
    path = tmp_path / "cap.jsonl"
    size = max(len(_line(i).encode()) for i in range(10))
    w = RotatingWriter(path, max_bytes=3 * size)
    for i in range(10):
        assert w.write(_line(i))
    w.close()
    files = sorted(tmp_path.glob("cap*.jsonl"))
    assert w.rotations >= 3 and w.written == 10
    assert sorted(f.name for f in files) == sorted(["cap.jsonl"] + [f"cap.{n}.jsonl" for n in
                                                                    range(1, w.rotations + 1)])
    assert all(f.stat().st_size <= 3 * size for f in files)
    t = read_mooncake_files(files)        # rotated files of one capture merge back into one trace
    assert [r.timestamp for r in t.requests] == [float(i) for i in range(10)]


def test_unwritable_path_is_logged_once_and_never_raises(tmp_path, caplog):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    os.chmod(blocked, 0o500)
    try:
        if os.access(blocked, os.W_OK):
            pytest.skip("running as a user who can write a read-only folder (root)")
        w = RotatingWriter(blocked / "cap.jsonl")
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
            assert not w.write(_line(0)) and not w.write(_line(1))
        warnings = [r for r in caplog.records if "trace capture stopped" in r.getMessage()]
        assert len(warnings) == 1 and "cap.jsonl" in warnings[0].getMessage()
        assert w.dropped == 2 and w.failed
    finally:
        os.chmod(blocked, 0o700)


def test_missing_folder_and_full_disk_stop_capture_quietly(tmp_path, monkeypatch, caplog):
    w = RotatingWriter(tmp_path / "no" / "such" / "cap.jsonl")
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not w.write(_line(0))
    assert "No such file" in w.failed
    path = tmp_path / "cap.jsonl"
    w = RotatingWriter(path)
    assert w.write(_line(0))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        for i in range(5):
            assert not w.write(_line(i + 1))
    assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1
    assert w.written == 1 and w.dropped == 5 and "No space left" in w.failed
    monkeypatch.undo()
    assert len(read_mooncake(path)) == 1   # the file keeps its whole records


def test_short_write_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "cap.jsonl"
    w = RotatingWriter(path)
    assert w.write(_line(0))
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:5]))
    assert not w.write(_line(1))
    monkeypatch.undo()
    w.close()
    assert len(read_mooncake(path)) == 1 and path.read_text().count("\n") == 1


def test_an_earlier_capture_is_set_aside_not_appended_to(tmp_path):
    path = tmp_path / "cap.jsonl"
    path.write_text(capture_record(arrival_s=0, input_length=64, output_length=1, block_ids=[1], block_size=64,
                                   fingerprint="old"))
    w = RotatingWriter(path)
    assert w.write(_line(5))
    w.close()
    assert read_mooncake(path).capture_key == "k" and len(read_mooncake(path)) == 1
    assert read_mooncake(tmp_path / "cap.1.jsonl").capture_key == "old"


def test_block_ids_are_the_documented_keyed_hash_and_each_digest_is_keyed_once(monkeypatch):
    import hashlib

    from lmdeploy_hostcache.capture import keys

    raw = bytes(range(16))
    k = CaptureKey(raw)
    digests = [(1 << 127) + 5, 7, 12345678901234567890, 7, 0]
    formula = [int.from_bytes(hashlib.blake2b(d.to_bytes(16, "little"), key=raw, digest_size=8).digest(),
                              "little") & ((1 << 63) - 1) for d in digests]
    assert k.block_ids(digests) == formula and k.derived == 4          # the repeated 7 is keyed once
    assert k.block_ids(digests[::-1]) == formula[::-1] and k.derived == 4
    monkeypatch.setattr(keys, "MEMO_ENTRIES", 3)                       # a full memo is emptied, ids unchanged
    k2 = CaptureKey(raw)
    assert k2.block_ids(digests[:3]) == formula[:3] and k2.block_ids(digests[3:]) == formula[3:]
    assert len(k2._memo) <= 3


def test_record_line_is_what_json_dumps_writes():
    def dumped(session):
        rec = {"timestamp": round(1764700000.1234567 * 1000.0, 3), "input_length": 130, "output_length": 0,
               "hash_ids": [2**63 - 1, 0], "block_size": 64, "capture": "3f9c0a1e"}
        if session is not None:
            rec["session"] = session
        return json.dumps(rec, separators=(",", ":")) + "\n"

    for session in (None, "00ff", 'a "quoted" \\ one'):
        assert capture_record(arrival_s=1764700000.1234567, input_length=130, output_length=0,
                              block_ids=[2**63 - 1, 0], block_size=64, fingerprint="3f9c0a1e",
                              session=session) == dumped(session)
    with pytest.raises(ValueError, match="arrival"):
        capture_record(arrival_s=float("nan"), input_length=0, output_length=0, block_ids=[], block_size=64,
                       fingerprint="k")


def test_write_lines_makes_one_write_per_file_and_rotates_between_lines(tmp_path):
    path = tmp_path / "cap.jsonl"
    lines = [_line(i) for i in range(10)]
    size = max(len(x.encode()) for x in lines)
    w = RotatingWriter(path, max_bytes=4 * size)
    assert w.write_lines(lines[:3]) == 3 and w.writes == 1                 # one os.write for the batch
    assert w.write_lines(lines[3:]) == 7 and w.rotations >= 1
    w.close()
    files = sorted(tmp_path.glob("cap*.jsonl"))
    assert w.writes == len(files) + 1 and all(f.stat().st_size <= 4 * size for f in files)
    assert sorted(r.timestamp for r in read_mooncake_files(files).requests) == [float(i) for i in range(10)]


def test_open_reports_a_bad_path_once_and_a_short_batch_write_is_taken_back(tmp_path, monkeypatch, caplog):
    w = RotatingWriter(tmp_path / "no" / "cap.jsonl")
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not w.open() and not w.open() and w.write_lines([_line(0), _line(1)]) == 0
    assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1 and w.dropped == 2
    path = tmp_path / "cap.jsonl"
    w = RotatingWriter(path)
    assert w.open() and w.write_lines([_line(0)]) == 1
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:-3]))
    assert w.write_lines([_line(1), _line(2)]) == 0 and w.dropped == 2
    monkeypatch.undo()
    assert len(read_mooncake(path)) == 1 and path.read_text().count("\n") == 1
