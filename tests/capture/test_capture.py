"""Trace capture, pure part (issue 12 item 1): keyed ids, the record layout, the rotating writer."""
import errno
import json
import logging
import os

import pytest

from lmdeploy_hostcache.capture import CAPTURE_KEY_ENV, CaptureKey, RotatingWriter, capture_line, capture_record
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
                                                 "output_hash_ids", "block_size", "capture", "session"}
    assert rec["timestamp"] == 1500.0 and rec["hash_ids"] == [5, 9] and rec["output_hash_ids"] == []
    (tmp_path / "c.jsonl").write_text(line)
    t = read_mooncake(tmp_path / "c.jsonl")
    assert t.block_size == 64 and t.capture_key == "abcd0123" and t.requests[0].session == "s1"
    assert t.requests[0].timestamp == 1.5 and t.requests[0].output_length == 7
    with pytest.raises(ValueError, match="2 block ids for 200 tokens"):
        capture_record(arrival_s=0, input_length=200, output_length=0, block_ids=[1, 2], block_size=64,
                       fingerprint="x")
    # 130 prompt tokens + 70 output: the KV of 199 tokens exists, 3 full blocks, 2 of them the prompt's
    line = capture_record(arrival_s=1.5, input_length=130, output_length=70, block_ids=[5, 9], block_size=64,
                          fingerprint="abcd0123", output_block_ids=[11])
    assert json.loads(line)["output_hash_ids"] == [11]
    (tmp_path / "c.jsonl").write_text(line)
    assert read_mooncake(tmp_path / "c.jsonl").requests[0].output_hash_ids == (11,)
    with pytest.raises(ValueError, match="0 output block ids for 130 \\+ 70 tokens"):
        capture_record(arrival_s=0, input_length=130, output_length=70, block_ids=[5, 9], block_size=64,
                       fingerprint="x")


def test_kept_output_blocks_are_the_full_blocks_whose_kv_the_request_computed():
    from lmdeploy_hostcache.capture.record import kept_output_blocks, kept_tokens

    # (input, output, block size) -> output blocks: the last generated token's KV is never computed
    for (i, o, bs), n in {(40, 48, 16): 3, (32, 1, 16): 0, (32, 17, 16): 1, (31, 1, 16): 0, (31, 2, 16): 1,
                          (32, 0, 16): 0, (0, 0, 16): 0, (0, 17, 16): 1, (10, 6, 16): 0, (10, 7, 16): 1}.items():
        assert kept_output_blocks(i, o, bs) == n, (i, o, bs)
        assert kept_tokens(i, o, bs) == (i // bs + n) * bs


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


def test_keep_files_bounds_the_rotated_files_to_the_newest_ones(tmp_path):
    """capture_max_mb bounds each file; keep_files bounds how many rotated ones stay (an earlier capture's
    included), deleting the oldest at each rotation, and touches nothing else beside them."""
    path = tmp_path / "cap.jsonl"
    (tmp_path / "cap.1.jsonl").write_text(_line(100) + "\n")      # an earlier capture's rotated file
    (tmp_path / "cap.dp0.3.jsonl").write_text("other\n")           # another rank's file, and unrelated names
    (tmp_path / "cap.x.jsonl").write_text("other\n")
    os.mkdir(tmp_path / "cap.0.jsonl")                               # not a regular file: never deleted
    size = max(len(_line(i).encode()) for i in range(20))
    w = RotatingWriter(path, max_bytes=2 * size, keep_files=2)
    for i in range(20):
        assert w.write(_line(i))
    w.close()
    rotated = sorted(int(f.name.split(".")[1]) for f in tmp_path.glob("cap.[0-9]*.jsonl") if f.is_file())
    assert w.rotations >= 8 and rotated == [w.rotations, w.rotations + 1]   # number 1 was taken: from 2 on
    assert w.deleted == w.rotations - 1        # the earlier capture's file and this one's older files
    assert (tmp_path / "cap.dp0.3.jsonl").exists() and (tmp_path / "cap.x.jsonl").exists()
    assert (tmp_path / "cap.0.jsonl").is_dir()
    kept = read_mooncake_files([tmp_path / f"cap.{n}.jsonl" for n in rotated] + [path])
    assert [r.timestamp for r in kept.requests] == [float(i) for i in range(20 - len(kept.requests), 20)]
    # 0 keeps every rotated file
    w = RotatingWriter(tmp_path / "all.jsonl", max_bytes=2 * size)
    for i in range(20):
        assert w.write(_line(i))
    w.close()
    assert w.deleted == 0 and len(list(tmp_path.glob("all.*.jsonl"))) == w.rotations


def test_keep_files_across_restarts_keeps_the_newest_files_and_its_bound(tmp_path):
    """Rotated numbers grow with age across engine restarts (a restart's rotations take numbers past the ones
    there), so the files kept are the newest; a restart that sets aside the earlier live file trims too."""
    path = tmp_path / "cap.jsonl"
    size = max(len(_line(i).encode()) for i in range(100))
    w = RotatingWriter(path, max_bytes=size, keep_files=1)          # run A: a rotation per record
    for i in range(30):
        assert w.write(_line(i))
    w.close()
    w = RotatingWriter(path, max_bytes=size, keep_files=1)          # run B (a restart): sets A's live file aside
    for i in range(30, 35):
        assert w.write(_line(i))
    w.close()
    files = sorted(tmp_path.glob("cap*.jsonl"))
    assert len(files) == 2                                            # one rotated file and the live one
    assert [r.timestamp for r in read_mooncake_files(files).requests] == [33.0, 34.0]
    for run in range(6):                                              # restarts that never reach the size limit
        w = RotatingWriter(path, max_bytes=10 * size, keep_files=1)
        assert w.write(_line(50 + run))
        w.close()
    files = sorted(tmp_path.glob("cap*.jsonl"))
    assert len(files) == 2 and [r.timestamp for r in read_mooncake_files(files).requests] == [54.0, 55.0]


def test_keep_files_never_deletes_a_file_another_writer_holds_nor_other_names(tmp_path):
    size = max(len(_line(i).encode()) for i in range(100))
    other = RotatingWriter(tmp_path / "cap.3.jsonl")                  # another engine's live capture, that name
    assert other.write(_line(0))
    (tmp_path / "cap.007.jsonl").write_text("not a name this writer makes\n")
    w = RotatingWriter(tmp_path / "cap.jsonl", max_bytes=size, keep_files=1)
    for i in range(10):
        assert w.write(_line(i))
    w.close()
    assert (tmp_path / "cap.007.jsonl").exists()
    assert other.write(_line(1)) and other.reopened == 0               # its file is still the one it holds
    other.close()
    assert len((tmp_path / "cap.3.jsonl").read_text().splitlines()) == 2


def test_keep_files_holds_past_rotated_numbers_of_any_length(tmp_path):
    """Numbers start past the highest one there, however long: the names taken then are still recognised."""
    (tmp_path / "cap.999999999999999995.jsonl").write_text(_line(0) + "\n")
    size = max(len(_line(i).encode()) for i in range(20))
    w = RotatingWriter(tmp_path / "cap.jsonl", max_bytes=size, keep_files=2)
    for i in range(13):
        assert w.write(_line(i))
    w.close()
    assert sorted(f.name for f in tmp_path.glob("cap.*.jsonl")) == [f"cap.{10**18 + w.rotations - 6}.jsonl",
                                                                     f"cap.{10**18 + w.rotations - 5}.jsonl"]


def test_a_rotated_file_that_cannot_be_deleted_is_logged_once_and_capture_goes_on(tmp_path, caplog, monkeypatch):
    path = tmp_path / "cap.jsonl"
    size = max(len(_line(i).encode()) for i in range(10))
    w = RotatingWriter(path, max_bytes=size, keep_files=1)

    unlink = os.unlink

    def refuse_one(p, *a, **k):       # one rotated file cannot be deleted; the others can
        if str(p).endswith("cap.2.jsonl"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return unlink(p, *a, **k)
    monkeypatch.setattr(os, "unlink", refuse_one)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        for i in range(10):
            assert w.write(_line(i))
    w.close()
    assert w.written == 10 and not w.failed and w.deleted == w.rotations - 2
    assert sorted(f.name for f in tmp_path.glob("cap.*.jsonl")) == ["cap.2.jsonl", f"cap.{w.rotations}.jsonl"]
    assert sum("could not delete an old rotated capture file" in r.getMessage() for r in caplog.records) == 1


def test_unwritable_path_is_logged_once_and_never_raises(tmp_path, caplog, monkeypatch):
    """A folder the server may not write to. The permission error is raised for that folder's files whoever runs
    the test (root writes a read-only folder, and CI runs as root: a chmod alone made this test skip there)."""
    import errno

    blocked = tmp_path / "ro"
    blocked.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(blocked)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    w = RotatingWriter(blocked / "cap.jsonl")
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not w.write(_line(0)) and not w.write(_line(1))
    warnings = [r for r in caplog.records if "trace capture stopped" in r.getMessage()]
    assert len(warnings) == 1 and "cap.jsonl" in warnings[0].getMessage()
    assert "Permission denied" in warnings[0].getMessage()
    assert w.dropped == 2 and w.failed


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


@pytest.mark.parametrize("what", ["moved", "deleted", "recreated", "truncated"])
def test_a_capture_file_moved_deleted_or_replaced_while_capturing_is_followed_by_a_new_one(tmp_path, caplog, what):
    """Log rotation or an operator takes the file away mid-capture: the next batch starts a new file at the
    path (before, records went on into the unreachable file and the next rotation stopped capture)."""
    path = tmp_path / "cap.jsonl"
    size = max(len(_line(i).encode()) for i in range(12))
    w = RotatingWriter(path, max_bytes=4 * size)
    assert w.write_lines([_line(0), _line(1)]) == 2
    if what == "moved":
        os.replace(path, tmp_path / "elsewhere.jsonl")
    elif what == "deleted":
        path.unlink()
    elif what == "recreated":    # logrotate's create: an empty file in its place is taken
        os.replace(path, tmp_path / "cap.jsonl.old")
        path.write_text("")
    else:                        # copytruncate: the same file, emptied; its size is followed
        os.truncate(path, 0)
    with caplog.at_level(logging.INFO, logger="lmdeploy_hostcache.capture"):
        for i in range(2, 12):
            assert w.write(_line(i))
    w.close()
    assert not w.failed and w.written == 12 and w.reopened == (0 if what == "truncated" else 1)
    here = read_mooncake_files(sorted(f for f in tmp_path.glob("cap*.jsonl") if f.stat().st_size
                                      and read_mooncake(f).capture_key == "k"))
    assert [r.timestamp for r in here.requests] == [float(i) for i in range(2, 12)]   # none lost, whole lines
    assert all(f.stat().st_size <= 4 * size for f in tmp_path.glob("cap*.jsonl"))
    if what == "moved":
        assert len(read_mooncake(tmp_path / "elsewhere.jsonl")) == 2
    if what == "recreated":
        assert len(read_mooncake(tmp_path / "cap.jsonl.old")) == 2
    assert ("moved or deleted" in caplog.text) == (what in ("moved", "deleted"))


def test_a_second_writer_of_one_path_stops_before_it_writes_or_renames_anything(tmp_path, caplog):
    """Two engines given one capture path: each writer holds an exclusive flock on its file, so the second
    stops, logged once, whether it comes when the file is still empty (both engines starting together: their
    records used to mix in one file that plan refuses) or once it holds records (it used to set the other's
    file aside); the first writer's records are all in one file."""
    path = tmp_path / "cap.jsonl"
    a, b, c = RotatingWriter(path), RotatingWriter(path), RotatingWriter(path)
    assert a.open()
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not b.open()                   # the file is empty and a holds it
        assert a.write(_line(0))
        assert not c.write(_line(1))          # non-empty and held: not set aside
        for i in range(2, 5):
            assert a.write(_line(i)) and not b.write(_line(i)) and not c.write(_line(i))
    assert b.failed and c.failed and not a.failed
    assert caplog.text.count("another process is writing it") == 2
    assert [f.name for f in tmp_path.glob("cap*.jsonl")] == ["cap.jsonl"] and len(read_mooncake(path)) == 4
    a.close()
    d = RotatingWriter(path)                  # a's capture has ended: its file is set aside as before
    assert d.write(_line(9)) and (tmp_path / "cap.1.jsonl").exists()
    d.close()


def test_a_file_that_is_not_regular_taking_the_path_stops_capture_naming_it(tmp_path, caplog):
    path = tmp_path / "cap.jsonl"
    w = RotatingWriter(path)
    assert w.write(_line(0))
    os.replace(path, tmp_path / "old.jsonl")
    path.mkdir()
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not w.write(_line(1))
    assert "is a folder, not a regular file" in w.failed and "replaced" not in caplog.text

def test_rotation_numbers_continue_past_the_last_one_taken(tmp_path, monkeypatch):
    """Each rotation looks for a free number from the last one this writer took, not from 1 (with
    thousands of rotated files each search stat-ed them all)."""
    path = tmp_path / "cap.jsonl"
    w = RotatingWriter(path, max_bytes=1)
    tried = []
    real_open = os.open

    def counting_open(target, *a, **kw):
        if str(target).startswith(str(tmp_path / "cap.")) and target != path:
            tried.append(os.path.basename(target))
        return real_open(target, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    for i in range(6):
        assert w.write(_line(i))
    w.close()
    assert tried == [f"cap.{n}.jsonl" for n in range(1, 6)]     # one name tried per rotation
    assert w.rotations == 5 and len(list(tmp_path.glob("cap*.jsonl"))) == 6


def test_setting_aside_never_replaces_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """Another writer of the same stem (an engine restarting beside a running one) may take a rotated name
    between a check and a rename: the name is claimed atomically, so no file is ever replaced."""
    from pathlib import Path

    (tmp_path / "c.1.jsonl").write_text("theirs\n")
    (tmp_path / "c.jsonl").write_text("mine\n")
    monkeypatch.setattr(Path, "exists", lambda self: False)   # every check races with the other writer
    # and the other writer took c.1 after this one looked for the highest number there
    monkeypatch.setattr(RotatingWriter, "_rotated_numbers", lambda self: [])
    w = RotatingWriter(tmp_path / "c.jsonl", 1 << 20)
    assert w.write("new\n")
    w.close()
    assert (tmp_path / "c.1.jsonl").read_text() == "theirs\n"
    assert (tmp_path / "c.2.jsonl").read_text() == "mine\n"
    assert (tmp_path / "c.jsonl").read_text() == "new\n"


def test_a_folder_at_the_capture_path_is_never_renamed(tmp_path, caplog):
    folder = tmp_path / "cap.jsonl"
    folder.mkdir()
    (folder / "data.txt").write_text("user data")
    w = RotatingWriter(folder)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert not w.open() and not w.write(_line(5))
    assert (folder / "data.txt").read_text() == "user data" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cap.jsonl"]
    assert w.failed and sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no os.mkfifo on this platform")


def _in_thread(fn, timeout=10.0):
    """``fn()``'s result (or exception) in a thread, or a failure when it has not returned in ``timeout`` s."""
    import threading

    got = {}

    def run():
        try:
            got["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            got["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    if "error" in got:
        raise got["error"]
    return got["value"]


@needs_fifo
def test_a_fifo_at_the_capture_path_is_refused_at_once_never_waited_on(tmp_path, caplog):
    """Opening a FIFO for writing blocks until a reader comes: capture refuses it (logged once) and returns."""
    fifo = tmp_path / "cap.jsonl"
    os.mkfifo(fifo)
    w = RotatingWriter(fifo)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        assert _in_thread(w.open) is False
        assert _in_thread(lambda: w.write_lines([_line(0), _line(1)])) == 0
    assert "FIFO" in w.failed and w.dropped == 2 and w._fd is None
    assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap.jsonl"]   # never renamed
    import stat
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@needs_fifo
@pytest.mark.parametrize("reader", [False, True])
def test_a_fifo_that_appears_after_the_check_is_refused_on_the_descriptor(tmp_path, monkeypatch, caplog, reader):
    """The path is checked, then a FIFO takes its place before the open: the non-blocking open fails at once
    (no reader) or the check on the descriptor refuses it (a reader): nothing is written to it, nothing waits."""
    fifo = tmp_path / "cap.jsonl"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    real_stat, calls = os.stat, []

    def stat_before_the_fifo(path, *a, **kw):   # the writer's first check sees nothing there yet
        if os.fspath(path) == str(fifo) and not calls:
            calls.append(path)
            raise FileNotFoundError(errno.ENOENT, "not yet", str(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "stat", stat_before_the_fifo)
    try:
        w = RotatingWriter(fifo)
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
            assert _in_thread(w.open) is False
        assert calls and "FIFO" in w.failed and w._fd is None
        assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1
        if reader:
            assert os.read(rfd, 100) == b""   # end of file: nothing was written, the writer's end closed again
    finally:
        if rfd is not None:
            os.close(rfd)


def test_a_symlink_to_an_empty_regular_file_is_written_through(tmp_path):
    """A symlink counts as what it points to: a regular file is written, as before the FIFO check."""
    real = tmp_path / "real.jsonl"
    real.touch()
    link = tmp_path / "cap.jsonl"
    link.symlink_to(real)
    w = RotatingWriter(link)
    assert w.open() and w.write(_line(0))
    w.close()
    assert link.is_symlink() and len(read_mooncake(real)) == 1


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
               "hash_ids": [2**63 - 1, 0], "output_hash_ids": [], "block_size": 64, "capture": "3f9c0a1e"}
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


def test_id_texts_and_capture_line_are_the_ids_and_the_record():
    k = CaptureKey(bytes(range(16)))
    digests = [(1 << 127) + 5, 7, 12345678901234567890, 7]
    assert k.block_id_texts(digests) == [str(k.block_id(d)) for d in digests] and k.derived == 3
    fresh = CaptureKey(bytes(range(16)))
    assert fresh.block_ids_text(digests) == ",".join(str(k.block_id(d)) for d in digests) and fresh.derived == 3
    assert CaptureKey(bytes(range(16))).block_ids(digests) == [k.block_id(d) for d in digests]
    ids = k.block_ids(digests)
    for session in (None, "00ff"):
        assert capture_line(12.5, 256, 3, ",".join(k.block_id_texts(digests)), 4, 64, "abcd0123", session) == \
            capture_record(arrival_s=12.5, input_length=256, output_length=3, block_ids=ids, block_size=64,
                           fingerprint="abcd0123", session=session)
    with pytest.raises(ValueError, match="3 block ids for 256 tokens"):
        capture_line(0.0, 256, 0, "1,2,3", 3, 64, "k")


BS = 16


def _capture(tmp_path):
    import types

    from lmdeploy_hostcache.tier.digest import Namespace
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model="m", block_size=BS)
    factory = types.SimpleNamespace(for_adapter=lambda name: ns)
    return TraceCapture(str(tmp_path / "c.jsonl"), 1 << 20, BS, factory, key=CaptureKey(b"\x07" * 16)), ns


def _seq(seq_id, tokens, salt=""):
    import types

    import numpy as np

    s = types.SimpleNamespace(seq_id=seq_id, input_start_pos=0, input_end_pos=len(tokens), num_all_ids=len(tokens) + 1,
                              num_valid_ids=len(tokens) + 1,
                              all_ids=np.concatenate([tokens, [1]]), adapter_name=None, arrive_time=0.0,
                              session=types.SimpleNamespace(session_id=seq_id), sampling_param=types.SimpleNamespace())
    if salt:
        s.cache_salt = salt
    return s


def _finish_one(cap, ns, seq_id, tokens, chain, salt=""):
    """Capture one request that ends with the host tier's ``chain``, encoded at once; returns how many
    blocks the capture took from the chain and the line the documented formula gives for it."""
    from lmdeploy_hostcache.tier.digest import ChainHasher, salted_root

    seq = _seq(seq_id, tokens, salt)
    cap.on_new_request(seq)
    arrival = cap._arrival[seq_id][1]
    before = cap.blocks_from_chain
    cap.flush_records = 1                            # encode each one now: its own count of chain blocks
    cap.on_request_finished(seq, chain)
    h = ChainHasher(ns, parent=salted_root(ns, salt))
    h.extend(tokens[:len(tokens) // BS * BS])
    return cap.blocks_from_chain - before, capture_record(
        arrival_s=arrival, input_length=len(tokens), output_length=1,
        block_ids=[cap.key.block_id(x) for x in h.digests], block_size=BS, fingerprint=cap.key.fingerprint)


def _chain(ns, tokens, start_block, end_block, salt=""):
    """What the host tier's lookup holds (connector._RequestChain): the digests of blocks
    [start_block, end_block) of ``tokens`` chained from the digest of the blocks before."""
    import types

    from lmdeploy_hostcache.tier.digest import ChainHasher, salted_root

    before = ChainHasher(ns, parent=salted_root(ns, salt))
    before.extend(tokens[:start_block * BS])
    h = ChainHasher(ns, parent=before.last_digest)
    h.extend(tokens[start_block * BS:end_block * BS])
    return types.SimpleNamespace(start_block=start_block, hasher=h, salt=salt)


def test_capture_takes_the_host_tier_chain_only_where_it_checks_out(tmp_path):
    """The lines are those of the formula (ChainHasher digests from the salted root, keyed ids) whatever
    chain the host tier passes; its digests are taken where its parent digest, seed and block bytes check
    out, and computed otherwise."""
    import types

    import numpy as np

    from lmdeploy_hostcache.tier.digest import ChainHasher, Namespace

    cap, ns = _capture(tmp_path)
    cap.chain_min_blocks = 1        # read every chain, however short: the checks themselves are tested here
    rng = np.random.default_rng(5)
    a, b, c, d, e, f = (rng.integers(0, 50000, n * BS + 5) for n in (9, 9, 9, 6, 6, 6))
    a2 = np.concatenate([a, rng.integers(0, 50000, 4 * BS)])   # continues `a`: its next turn
    rewound = a.copy()
    rewound[2 * BS] += 1                                  # a block of `a` that the chain below does not hold
    ours = ChainHasher(ns)
    ours.extend(e[:2 * BS])      # our digest of e's block 1, then blocks 2.. hashed with another namespace's seed
    other_seed = types.SimpleNamespace(start_block=2, hasher=ChainHasher(Namespace(model="other", block_size=BS),
                                                                         parent=ours.last_digest))
    other_seed.hasher.extend(e[2 * BS:6 * BS])
    cases = [  # (tokens, chain, salt, blocks taken from the chain)
        (a, _chain(ns, a, 3, 8), "", 5),                  # GPU-matched prefix of 3 blocks, lookup to block 8
        (a2, _chain(ns, a2, 5, 11), "", 2),               # `a`'s 9 blocks remembered: blocks 9 and 10 taken
        (b, _chain(ns, b, 0, 12), "", 8),                 # from the root; a chain longer than the prompt
        (c, _chain(ns, a, 3, 8), "", 0),                  # another prompt's chain: parent digest differs
        (rewound, _chain(ns, a, 1, 9), "", 0),            # same parent, other block bytes (rewound session)
        (d, _chain(ns, d, 2, 6, salt="t"), "", 0),        # a chain rooted at another salt
        (d, _chain(ns, d, 2, 6, salt="t"), "t", 4),       # ... taken for that salt
        (e, other_seed, "", 0),                           # our parent digest, another namespace's seed
        (d, _chain(ns, d, 6, 6), "", 0),                  # nothing to take: empty chain at the prompt's end
        (f, _chain(ns, a, 7, 9), "", 0),                  # a chain past the prompt's end
    ]
    expected, taken = [], []
    for i, (tokens, chain, salt, n) in enumerate(cases):
        n_taken, line = _finish_one(cap, ns, i, tokens, chain, salt)
        taken.append(n_taken)
        expected.append(line)
    cap.close()
    assert (tmp_path / "c.jsonl").read_text() == "".join(expected)
    assert taken == [n for _, _, _, n in cases]
    total = sum(len(t) // BS for t, _, _, _ in cases)
    assert cap.blocks_hashed + cap.blocks_reused == total and cap.blocks_from_chain == sum(taken)


def test_a_chain_is_read_only_where_it_saves_enough_hashing(tmp_path):
    """A chain holding fewer than ``chain_min_blocks`` of the blocks still to digest is not read (they are
    hashed); a longer one is taken; the lines are the formula's either way."""
    import numpy as np

    from lmdeploy_hostcache.integration.trace_capture import CHAIN_MIN_BLOCKS

    cap, ns = _capture(tmp_path)
    assert cap.chain_min_blocks == CHAIN_MIN_BLOCKS > 1
    rng = np.random.default_rng(11)
    n = CHAIN_MIN_BLOCKS
    short, long_ = (rng.integers(0, 50000, k * BS + 3) for k in (n, n + 2))
    cases = [(short, _chain(ns, short, 1, n), 0),             # n - 1 blocks to take: hashed instead
             (long_, _chain(ns, long_, 2, n + 2), n)]         # n blocks to take: taken
    expected = []
    for i, (tokens, chain, n_taken) in enumerate(cases):
        taken, line = _finish_one(cap, ns, i, tokens, chain)
        assert taken == n_taken
        expected.append(line)
    cap.close()
    assert (tmp_path / "c.jsonl").read_text() == "".join(expected)


def test_timestamp_text_is_repr_of_the_rounded_milliseconds():
    """The fast form (``'%.3f'`` less trailing zeros) equals ``repr(round(ms, 3))`` wherever it is used,
    exact ties included; NaN and infinities are refused."""
    import random
    import struct

    from lmdeploy_hostcache.capture.record import _FAST_MS, timestamp_text

    rng = random.Random(7)
    values = [0.0, -0.0, 1e-9, 5e-7, 0.0005, 0.0625e-3, 1.5, 1764700000.1234567, _FAST_MS / 1000 * (1 - 1e-12),
              _FAST_MS / 1000, 1e300]
    for _ in range(20000):
        values += [rng.uniform(1.6e9, 2.1e9), rng.uniform(-1e4, 1e4), rng.randint(0, 10**7) / 1e6,
                   rng.randint(0, 2**40) / 2**rng.randint(0, 30) / 1000,          # binary fractions: exact ties
                   struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]]
    for x in values:
        expected = repr(round(x * 1000.0, 3))
        if expected in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError, match="arrival"):
                timestamp_text(x)
        else:
            assert timestamp_text(x) == expected, x


def test_the_end_hook_queues_what_snapshot_returns(tmp_path):
    """``on_request_finished`` inlines ``snapshot`` (one call less in a cold hook): the tuple it queues is
    the one ``snapshot`` returns, for every kind of sequence (LMDeploy's token store or ``all_ids``, salted
    through the sequence or its sampling parameters, a later turn of a session, a prompt shorter than a
    block, a sequence registered before capture began)."""
    import time
    import types

    import numpy as np

    cap, _ = _capture(tmp_path)
    cap.clock = lambda: 42.0
    cap.flush_records = 1000

    class Store:                        # LMDeploy's HistoryTokenIds, as far as capture reads it
        def __init__(self, ids):
            self.ids = ids

        def get_real(self):
            return self.ids

    def seq(seq_id, n, *, store=True, salt="", param_salt="", start=0):
        s = _seq(seq_id, np.arange(n, dtype=np.int64) + 3, salt)
        s.input_start_pos = start
        if store:
            s.history_cache = Store(s.all_ids)
        if param_salt:
            s.sampling_param.cache_salt = param_salt
        return s

    chain = object()
    cases = [(seq(1, 40), True), (seq(2, 40, store=False), True), (seq(3, 40, salt="t"), True),
             (seq(4, 40, param_salt="p"), True), (seq(5, 40, start=20), True), (seq(6, 9), True),
             (seq(7, 40), False)]
    cases[-1][0].arrive_time = time.perf_counter() + 1e6    # not registered: arrival = the clock's reading now
    for s, registered in cases:
        if registered:
            cap.on_new_request(s)
        expected = cap.snapshot(s, chain)
        if registered:
            cap.on_new_request(s)
        cap.on_request_finished(s, chain)
        got = cap._queue[-1]
        assert _without_tokens(got) == _without_tokens(expected) and len(got) == len(expected) == 9
        assert (got[3] is None) == (expected[3] is None) and (got[3] is None or got[3].get_real() is s.all_ids)
    assert [q[6] for q in cap._queue] == ["", "", "t", "p", "", "", ""]
    assert [q[7] for q in cap._queue] == [None, None, None, None, 5, None, None]
    assert cap._queue[5][3] is None and not cap._arrival
    cap._queue.clear()
    cap.close()


def _without_tokens(snap):
    """A snapshot less its token store (compared by what it reads)."""
    return snap[:3] + snap[4:]


@pytest.mark.parametrize("same_value", [True, False])
def test_token_bytes_are_encode_tokens_of_the_batch_and_refuse_ids_out_of_range(monkeypatch, same_value):
    """The batch's token bytes (one checked cast on NumPy 2.4 on, a range check and a cast before) are
    ``encode_tokens`` of the prompts laid end to end; an id outside [0, 2**32) stops the batch."""
    import numpy as np

    from lmdeploy_hostcache.tier.digest import encode_tokens
    from lmdeploy_hostcache.integration import trace_capture

    if same_value and not trace_capture._SAME_VALUE:
        pytest.skip("this NumPy has no casting='same_value'")
    monkeypatch.setattr(trace_capture, "_SAME_VALUE", same_value)
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 2**32, n, dtype=np.int64) for n in (16, 48, 32)]
    arrays[1][5] = 2**32 - 1
    assert trace_capture._token_bytes(arrays) == encode_tokens(np.concatenate(arrays))
    small = np.arange(40, 72, dtype=np.int32)          # another dtype: encode_tokens itself
    assert trace_capture._token_bytes([small]) == encode_tokens(small.astype(np.int64))
    arrays[0][0] = 151630                                # a real-looking prompt token
    for bad in (-1, 2**32):
        arrays[2][7] = bad
        with pytest.raises(ValueError, match=r"token id out of range \[0, 4294967295\]: 1 of 96 ids") as ei:
            trace_capture._token_bytes(arrays)
        # the message is logged when capture stops: counts only, never a token id (prompt content)
        assert "151630" not in str(ei.value) and str(bad) not in str(ei.value).split(":")[1]


def test_rotation_renames_the_file_while_its_lock_is_held(tmp_path, monkeypatch):
    """Between releasing the file and renaming it, a second writer could take it (and set it aside among the
    first writer's rotated files): the file is renamed first, while its writer still holds it."""
    from lmdeploy_hostcache.capture import writer as writer_mod

    path = tmp_path / "cap.jsonl"
    size = len(_line(0).encode())
    a, b = RotatingWriter(path, max_bytes=size), RotatingWriter(path)
    seen = []
    real = writer_mod.RotatingWriter._set_aside

    def set_aside_then_try_b(self):
        seen.append(b.open() if self is a else None)     # at the rename a still holds its file
        b.failed = ""                                     # b may try again later
        return real(self)

    monkeypatch.setattr(writer_mod.RotatingWriter, "_set_aside", set_aside_then_try_b)
    assert a.write(_line(0)) and a.write(_line(1))
    assert seen == [False] and a.rotations == 1 and not a.failed


def test_a_file_that_cannot_be_probed_for_a_writer_is_set_aside_as_before(tmp_path, monkeypatch):
    """An earlier capture's file this process may rename but not read (another user's 0600 file), or a
    filesystem without flock: the probe is skipped and the file set aside, as before locks were taken."""
    from lmdeploy_hostcache.capture import writer as writer_mod

    path = tmp_path / "cap.jsonl"
    path.write_text(_line(0))
    real_open = os.open

    def no_read(target, flags, *a, **k):
        if os.fspath(target) == os.fspath(path) and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied")
        return real_open(target, flags, *a, **k)

    monkeypatch.setattr(writer_mod.os, "open", no_read)
    monkeypatch.setattr(writer_mod.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(37, "No locks")))
    w = RotatingWriter(path)
    assert w.write(_line(1)) and not w.failed
    assert (tmp_path / "cap.1.jsonl").read_text() == _line(0) and path.read_text() == _line(1)
