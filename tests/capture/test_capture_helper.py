"""Trace capture's helper process (``capture_offload``, issue 12 item 1): the same file as encoding on
the scheduler's thread, nothing of the encoding left on that thread, and a helper that dies, cannot
encode or falls behind stops or thins capture without ever raising into serving."""
import fcntl
import logging
import signal
import types

import numpy as np
import pytest

from lmdeploy_hostcache.capture import CaptureKey
from lmdeploy_hostcache.tier.digest import Namespace

BS = 16


def _capture(path, offload, **kw):
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model="m", block_size=BS)
    cap = TraceCapture(str(path), 1 << 20, BS, types.SimpleNamespace(for_adapter=lambda name: ns),
                       key=CaptureKey(b"\x07" * 16), clock=lambda: 1.0e9, offload=offload, **kw)
    cap.flush_seconds = 3600.0     # batches by count only: on a loaded machine an age flush would move their bounds
    return cap


def _seq(seq_id, tokens, *, start=0, prompt=None, salt=""):
    tokens = np.asarray(tokens, dtype=np.int64)
    end = len(tokens) if prompt is None else prompt
    s = types.SimpleNamespace(seq_id=seq_id, input_start_pos=start, input_end_pos=end, num_all_ids=len(tokens) + 2,
                              num_valid_ids=len(tokens) + 2,
                              all_ids=np.concatenate([tokens, [1, 1]]), adapter_name=None, arrive_time=0.0,
                              session=types.SimpleNamespace(session_id=seq_id), sampling_param=types.SimpleNamespace())
    if salt:
        s.cache_salt = salt
    return s


def _requests(n, seed=0):
    """Conversations whose turns continue each other, some salted, some sessions, some shorter than a block."""
    rng = np.random.default_rng(seed)
    history = {}
    out = []
    for i in range(n):
        conv = int(rng.integers(6))
        grown = np.concatenate([history.get(conv, np.arange(conv * 1000, conv * 1000 + 20)),
                                rng.integers(0, 50_000, int(rng.integers(1, 60)))])
        history[conv] = grown
        out.append(dict(seq_id=i, tokens=grown, start=(i % 5 == 4) * 3, salt="t" if conv == 5 else ""))
    out.append(dict(seq_id=n, tokens=np.arange(7)))      # no full block
    return out


def _run(cap, requests):
    for r in requests:
        s = _seq(r["seq_id"], r["tokens"], start=r.get("start", 0), salt=r.get("salt", ""))
        cap.on_new_request(s)
        cap.on_request_finished(s)


def test_the_helper_writes_the_file_the_scheduler_thread_writes(tmp_path):
    requests = _requests(150)
    inline = _capture(tmp_path / "inline.jsonl", offload=False)
    _run(inline, requests)
    inline.close()
    helper = _capture(tmp_path / "helper.jsonl", offload=True)
    assert helper.helper is not None and helper.helper.poll() is None     # started with the engine, waiting
    _run(helper, requests)
    helper.close()
    text = (tmp_path / "inline.jsonl").read_text()
    assert text.count("\n") == len(requests) and (tmp_path / "helper.jsonl").read_text() == text
    done = helper.encoder_counters()
    assert done["records"] == len(requests) and done["batches"] == helper.flushes == 3 and done["failed"] == ""
    assert done["blocks_hashed"] == inline.blocks_hashed and done["ids_keyed"] == inline.key.derived > 0
    assert helper.key.derived == 0 and helper.encoder.blocks_hashed == 0    # nothing encoded on this thread
    assert done["priority"] in ("SCHED_IDLE", "nice 19")
    assert helper.helper is None and not helper.failed


def test_a_helper_that_dies_stops_capture_once_and_never_raises(tmp_path, caplog):
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    cap.flush_records = 4
    requests = _requests(20)
    _run(cap, requests[:4])                     # one batch handed over
    process = cap.helper
    process.kill()
    process.wait()
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        _run(cap, requests[4:])                 # the next hand-over finds the pipe closed
        cap.close()
    assert "capture helper process exited" in cap.failed and not cap._queue and not cap._arrival
    assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1
    assert cap.flushes == 2                     # after the failure the hooks do no work


def test_a_batch_the_helper_cannot_encode_stops_capture(tmp_path, caplog):
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    short = _seq(1, np.arange(40), prompt=40)
    short.all_ids = np.arange(20)               # holds fewer ids than its prompt's full blocks
    cap.on_new_request(short)
    cap.on_request_finished(short)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        cap.close()
    assert cap.failed == "the capture helper process exited with code 4"
    assert (tmp_path / "c.jsonl").read_text() == ""     # nothing of the batch written
    assert cap.encoder_counters()["records"] == 0


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until ``/proc/PID/stat`` says the process is stopped (state T)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def test_a_helper_that_falls_behind_gets_its_batches_late_then_dropped(tmp_path, caplog, monkeypatch):
    from lmdeploy_hostcache.integration import trace_capture

    cap = _capture(tmp_path / "c.jsonl", offload=True)
    cap.flush_records = 10
    fcntl.fcntl(cap._pipe, 1031, 4096)          # F_SETPIPE_SZ: a one-page pipe
    cap.helper.send_signal(signal.SIGSTOP)      # the helper takes nothing
    _wait_stopped(cap.helper.pid)               # SIGSTOP lands asynchronously: a busy machine let it drain the pipe
    requests = [dict(seq_id=i, tokens=np.arange(i * 7, i * 7 + 160)) for i in range(40)]
    try:
        _run(cap, requests[:10])                # a batch of ~6 KB: the pipe takes a page, the rest waits
        assert cap._pending and cap._pending_bytes > 0 and not cap.failed
        monkeypatch.setattr(trace_capture, "MAX_PENDING_BYTES", 1)
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
            _run(cap, requests[10:30])          # two batches past the bound: dropped, logged once
        assert cap.dropped_records == 20 and not cap.failed
        assert sum("is behind" in r.getMessage() for r in caplog.records) == 1
    finally:
        cap.helper.send_signal(signal.SIGCONT)
    cap.close()                                 # what waited reaches the helper, whole
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 10 == cap.encoder_counters()["records"] and not cap.failed


@pytest.mark.parametrize("offload", [False, True])
def test_capture_offload_is_a_setting(tmp_path, offload):
    from lmdeploy_hostcache.config import HostCacheConfig
    from lmdeploy_hostcache.integration.trace_capture import capture_from_config

    cfg = HostCacheConfig(capture=str(tmp_path / "c.jsonl"), capture_offload=offload)
    cap = capture_from_config(cfg, BS, types.SimpleNamespace(for_adapter=lambda name: Namespace(model="m",
                                                                                                block_size=BS)))
    assert cap.offload == offload and (cap.helper is not None) == offload
    cap.close()


@pytest.mark.parametrize("offload", [False, True])
def test_capture_keep_files_reaches_the_writer_that_rotates(tmp_path, offload):
    """The setting goes through capture_from_config, and through the helper's first frame when it writes."""
    from lmdeploy_hostcache.config import HostCacheConfig
    from lmdeploy_hostcache.integration.trace_capture import TraceCapture, capture_from_config

    cfg = HostCacheConfig(capture=str(tmp_path / "c.jsonl"), capture_offload=offload, capture_keep_files=3)
    ns = types.SimpleNamespace(for_adapter=lambda name: Namespace(model="m", block_size=BS))
    cap = capture_from_config(cfg, BS, ns)
    assert cap.writer.keep_files == 3
    cap.close()
    cap = TraceCapture(str(tmp_path / "small.jsonl"), 4000, BS, ns, key=CaptureKey(b"\x07" * 16),
                       clock=lambda: 1.0e9, offload=offload, keep_files=1)
    _run(cap, _requests(150))
    cap.close()
    rotated = list(tmp_path.glob("small.*.jsonl"))
    assert len(rotated) == 1 and int(rotated[0].name.split(".")[1]) > 5    # many rotations, one file kept


def test_a_helper_that_cannot_start_leaves_the_encoding_on_the_thread(tmp_path, monkeypatch, caplog):
    import subprocess

    def no_process(*args, **kwargs):
        raise OSError("no interpreter here")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        cap = _capture(tmp_path / "c.jsonl", offload=True)
    assert not cap.offload and cap.helper is None and not cap.failed
    assert sum("helper process is not running" in r.getMessage() for r in caplog.records) == 1
    requests = _requests(30)
    _run(cap, requests)
    cap.close()
    assert (tmp_path / "c.jsonl").read_text().count("\n") == len(requests) and cap.blocks_hashed > 0


def test_a_helper_that_dies_while_batches_wait_is_noticed_at_the_next_hook(tmp_path, caplog):
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    cap.flush_records = 10
    fcntl.fcntl(cap._pipe, 1031, 4096)
    cap.helper.send_signal(signal.SIGSTOP)
    _wait_stopped(cap.helper.pid)
    requests = [dict(seq_id=i, tokens=np.arange(i * 7, i * 7 + 160)) for i in range(20)]
    _run(cap, requests[:10])                    # the batch waits: the pipe took one page
    assert cap._pending
    cap.helper.kill()
    cap.helper.wait()
    cap.flush_records = 1                       # the failing hook must not go on to a flush of its own
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        _run(cap, requests[10:])                # the first hook finds the pipe closed: capture stops there
        cap.close()
    assert "capture helper process exited" in cap.failed and not cap._pending and cap.flushes == 1
    assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs a POSIX file size limit")
def test_a_full_disk_under_the_helper_is_logged_once(tmp_path, caplog, monkeypatch):
    """The helper's writer logs a failed write (naming the file) and exits with EXIT_WRITE_FAILED; the
    engine side then stops capture without a second, mislabelled warning.  The disk fills up as the helper's
    file size limit (1 byte: a short write, then EFBIG) makes it: /dev/full is not a regular file, which
    capture refuses at engine start (tests/capture/test_capture.py)."""
    import resource
    import subprocess

    real_popen = subprocess.Popen

    def limited(*args, **kw):   # the helper only: its file writes past 1 byte fail (Python ignores SIGXFSZ);
        # its stderr a pipe (the limit would cut a captured stderr file short)
        return real_popen(*args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1)),
                          stderr=subprocess.PIPE, **kw)

    monkeypatch.setattr(subprocess, "Popen", limited)
    path = tmp_path / "cap.jsonl"
    cap = _capture(path, offload=True)
    monkeypatch.undo()
    helper = cap.helper
    cap.flush_records = 4
    requests = _requests(40)
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        _run(cap, requests[:4])                 # the helper's first write fails: it logs and exits 3
        cap.helper.wait(timeout=30)
        _run(cap, requests[4:])                 # the next hand-over finds the pipe closed
        cap.close()
    child = helper.stderr.read().decode()
    helper.stderr.close()
    here = [r.getMessage() for r in caplog.records if "trace capture" in r.getMessage()]
    assert cap.failed and not here, here
    assert child.count("trace capture stopped") == 1 and str(path) in child and "short write" in child
    assert path.stat().st_size == 0             # the partial line was taken back


def test_a_shared_key_reaches_the_helper_through_its_pipe_only(tmp_path, monkeypatch):
    """docs/planner.md: the key never travels in the helper's environment or command line."""
    from lmdeploy_hostcache.capture import CAPTURE_KEY_ENV

    monkeypatch.setenv(CAPTURE_KEY_ENV, "ab" * 16)
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    try:
        environ = open(f"/proc/{cap.helper.pid}/environ", "rb").read().split(b"\0")
        assert not any(e.startswith(CAPTURE_KEY_ENV.encode() + b"=") for e in environ)
        cmdline = open(f"/proc/{cap.helper.pid}/cmdline", "rb").read()
        assert b"ab" * 16 not in cmdline
    finally:
        cap.close()


def test_close_waits_for_a_stuck_helper_no_longer_than_its_limit(tmp_path, monkeypatch, caplog):
    import os
    import time

    import lmdeploy_hostcache.integration.trace_capture as tc

    monkeypatch.setattr(tc, "HELPER_EXIT_SECONDS", 1.0)
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    pid = cap.helper.pid
    os.kill(pid, signal.SIGSTOP)         # a helper starved at idle priority, or wedged
    _wait_stopped(pid)
    try:
        _run(cap, _requests(40))
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
            cap.close()
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert took < 5.0, took
    assert "did not finish within 1 s" in cap.failed and cap.helper is None
    assert any("did not finish" in r.getMessage() for r in caplog.records)


def test_hooks_after_close_do_nothing(tmp_path):
    import os

    cap = _capture(tmp_path / "c.jsonl", offload=True)
    pipe = cap._pipe
    cap.close()
    fds = []
    while pipe not in fds and len(fds) < 256:   # open files until one gets the pipe's descriptor number
        fds.append(os.open(tmp_path / f"other{len(fds)}", os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        assert pipe in fds                # the helper pipe's descriptor number now names another file
        cap.flush_records = 1
        _run(cap, _requests(3))
        cap.flush()
    finally:
        for fd in fds:
            os.close(fd)
    assert all(os.path.getsize(tmp_path / f"other{i}") == 0 for i in range(len(fds)))
    assert cap.records == 0 and not cap._queue


@pytest.mark.parametrize("offload", [False, True])
def test_a_batch_is_written_in_arrival_order_not_in_the_order_requests_ended(tmp_path, offload):
    """The order requests end in is their latency rank, which a capture does not reveal (docs/planner.md)."""
    import itertools
    import json

    from lmdeploy_hostcache.integration.trace_capture import TraceCapture

    ns = Namespace(model="m", block_size=BS)
    clock = itertools.count(1000)
    cap = TraceCapture(str(tmp_path / "c.jsonl"), 1 << 20, BS, types.SimpleNamespace(for_adapter=lambda name: ns),
                       key=CaptureKey(b"\x07" * 16), clock=lambda: float(next(clock)), offload=offload)
    seqs = [_seq(i, np.arange(i * 100, i * 100 + 40)) for i in range(4)]
    for s in seqs:
        cap.on_new_request(s)
    for i in (2, 0, 3, 1):
        cap.on_request_finished(seqs[i])
    cap.close()
    stamps = [json.loads(line)["timestamp"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert stamps == sorted(stamps) and len(stamps) == 4


def _seq_with_output(seq_id, prompt, output, *, start=0, salt=""):
    """An ended sequence of ``prompt`` then the ``output`` it generated (LMDeploy's ``num_valid_ids`` counts
    both; its token store holds both)."""
    tokens = np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)])
    s = types.SimpleNamespace(seq_id=seq_id, input_start_pos=start, input_end_pos=len(prompt),
                              num_all_ids=len(tokens), num_valid_ids=len(tokens), all_ids=tokens, adapter_name=None,
                              arrive_time=0.0, session=types.SimpleNamespace(session_id=seq_id),
                              sampling_param=types.SimpleNamespace())
    if salt:
        s.cache_salt = salt
    return s


def _chats(n, seed=3):
    """Chats whose next turn re-sends the previous prompt and its output with a new message (an OpenAI chat
    client), or sends the previous prompt again (a regenerated reply: same prompt, another output, or the same
    output: greedy decoding); some
    salted, some engine sessions, some outputs empty (aborted before a token) or longer than several blocks,
    one prompt shorter than a block whose output fills blocks. Returns the requests and, for each, the request
    it continues and how (``resend``, ``again``, ``repeat``) or None."""
    rng = np.random.default_rng(seed)
    last = {}
    out = []
    for i in range(n):
        conv = int(rng.integers(5))
        kind = None
        if conv not in last:
            prompt = np.concatenate([np.arange(conv * 1000, conv * 1000 + (5 if conv == 4 else 20)),
                                     rng.integers(0, 50_000, int(rng.integers(0, 30)))])
        elif rng.random() < 0.2:
            prompt, kind = last[conv]["prompt"], "again"
        elif rng.random() < 0.15:
            prompt, kind = last[conv]["prompt"], "repeat"     # and the same output (greedy decoding)
        else:
            prev = last[conv]
            prompt = np.concatenate([prev["prompt"], prev["output"], rng.integers(0, 50_000, int(rng.integers(1, 40)))])
            kind = "resend"
        output = last[conv]["output"] if kind == "repeat" else rng.integers(0, 50_000, int(rng.choice([0, 1, 2, 17, 40, 70])))
        r = dict(seq_id=i, prompt=prompt, output=output, start=(i % 7 == 6) * 3, salt="t" if conv == 3 else "",
                 after=(last[conv]["seq_id"], kind) if kind else None)
        last[conv] = r
        out.append(r)
    return out


def test_output_block_ids_continue_the_prompts_chain_and_the_helper_writes_the_same(tmp_path):
    """``output_hash_ids`` are the ids of the documented formula for the blocks past the prompt's full blocks
    whose KV the request computed (the chain continued through its output); a next turn that re-sends the
    reply names the same ids for those blocks; the helper process writes the file the scheduler's thread
    writes; each block is hashed at most once per request, and a request that continues a remembered one
    (its prompt and output, or its prompt alone) takes that one's digests."""
    from lmdeploy_hostcache.capture import capture_record
    from lmdeploy_hostcache.capture.record import kept_tokens
    from lmdeploy_hostcache.tier.digest import ChainHasher, salted_root

    requests = _chats(80)
    files = {}
    for offload in (False, True):
        cap = _capture(tmp_path / f"{offload}.jsonl", offload=offload)
        for r in requests:
            s = _seq_with_output(r["seq_id"], r["prompt"], r["output"], start=r["start"], salt=r["salt"])
            cap.on_new_request(s)
            cap.on_request_finished(s)
        cap.close()
        files[offload] = (tmp_path / f"{offload}.jsonl").read_text()
        if not offload:
            inline = cap
    assert files[True] == files[False]
    ns = Namespace(model="m", block_size=BS)
    expected, ids = [], {}
    reused = 0
    for r in requests:
        p, o = len(r["prompt"]), len(r["output"])
        h = ChainHasher(ns, parent=salted_root(ns, r["salt"]))
        h.extend(np.concatenate([r["prompt"], r["output"]])[:kept_tokens(p, o, BS)])
        block_ids = [inline.key.block_id(d) for d in h.digests]
        ids[r["seq_id"]] = (block_ids[:p // BS], block_ids[p // BS:])
        expected.append(capture_record(arrival_s=1.0e9, input_length=p, output_length=o, block_ids=block_ids[:p // BS],
                                       block_size=BS, fingerprint=inline.key.fingerprint,
                                       session=inline.key.session_id(r["seq_id"]) if r["start"] else None,
                                       output_block_ids=block_ids[p // BS:]))
        if r["after"] is not None:
            before, kind = r["after"]
            prompt_ids, output_ids = ids[before]
            shared = prompt_ids + output_ids if kind in ("resend", "repeat") else prompt_ids
            assert block_ids[:len(shared)] == shared          # the re-sent reply's blocks: the ids it was named by
            reused += max(0, len(shared) - 1)                 # (the first block is hashed to find the one continued)
    assert files[False] == "".join(expected)
    for kind in ("resend", "again", "repeat"):      # each kind continues a request that has output blocks
        assert any(ids[r["after"][0]][1] for r in requests if r["after"] and r["after"][1] == kind), kind
    total = sum(len(a) + len(b) for a, b in ids.values())
    assert inline.blocks_hashed + inline.blocks_reused == total and inline.blocks_reused == reused


def test_a_stop_signal_to_the_process_group_loses_no_record(tmp_path):
    """A service stop signals the engine's whole process group (systemd's default, Ctrl-C, killpg): the
    helper outlives the signal and writes what the engine hands over at close, so no record is lost."""
    requests = _requests(40)
    cap = _capture(tmp_path / "c.jsonl", offload=True)
    helper = cap.helper
    _run(cap, requests[:20])
    cap.flush()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):    # as killpg delivers them to the helper
        helper.send_signal(sig)
    _run(cap, requests[20:])
    cap.close()
    assert not cap.failed and helper.returncode == 0
    assert (tmp_path / "c.jsonl").read_text().count("\n") == len(requests)


def test_a_helper_whose_engine_died_without_close_exits_0_with_its_file_complete(tmp_path):
    """The engine died (SIGKILL, the OOM killer): the helper's input ends and no one reads its counters; it
    finishes the file and exits 0, with no BrokenPipeError traceback in the server's log."""
    import os
    import subprocess
    import sys

    from lmdeploy_hostcache.capture.encoder_process import frame

    path = tmp_path / "c.jsonl"
    helper = subprocess.Popen([sys.executable, "-m", "lmdeploy_hostcache.capture.encoder_process"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for chunk in frame({"path": str(path), "max_bytes": 1 << 20, "block_size": BS, "key": b"\x07" * 16}):
        helper.stdin.write(chunk)
    helper.stdin.flush()
    assert helper.stdout.readline().strip() == b"ready"
    helper.stdout.close()                     # the engine is gone: nobody reads the counters
    helper.stdin.close()
    assert helper.wait(30) == 0
    err = helper.stderr.read().decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert os.path.exists(path)


def test_the_helper_lowers_its_priority_only_after_it_said_ready(tmp_path):
    """At idle priority before ``ready``, a busy machine starved the helper's start, and the engine's start
    waited on it without bound (a review's loaded run hung there); now it lowers itself after, and the
    engine waits at most HELPER_START_SECONDS."""
    import io

    from lmdeploy_hostcache.capture.encoder_process import frame, serve
    from lmdeploy_hostcache.integration.trace_capture import HELPER_START_SECONDS

    init = b"".join(bytes(c) for c in frame({"path": str(tmp_path / "c.jsonl"), "max_bytes": 1 << 20,
                                             "block_size": 16, "key": b"\x07" * 16}))
    out = io.StringIO()
    seen = []

    def lower():
        seen.append(out.getvalue())
        return "lowered"

    assert serve(io.BytesIO(init), out, lower) == 0
    assert seen == ["ready\n"] and '"priority": "lowered"' in out.getvalue()
    assert 0 < HELPER_START_SECONDS <= 120


def test_a_helper_that_never_says_ready_is_given_up_after_the_start_limit(tmp_path, monkeypatch, caplog):
    import subprocess
    import sys
    import time

    from lmdeploy_hostcache.integration import trace_capture

    real = subprocess.Popen

    def silent(argv, **kw):          # a helper that starts and never answers (starved, wedged)
        return real([sys.executable, "-c", "import time; time.sleep(60)"], **kw)

    monkeypatch.setattr(trace_capture, "HELPER_START_SECONDS", 1.0)
    monkeypatch.setattr(trace_capture.subprocess, "Popen", silent)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
        cap = _capture(tmp_path / "c.jsonl", offload=True)
    assert time.monotonic() - t0 < 10 and not cap.offload and cap.helper is None and not cap.failed
    assert "did not answer within 1 s" in caplog.text
    _run(cap, [dict(seq_id=1, tokens=np.arange(40))])
    cap.close()
    assert (tmp_path / "c.jsonl").read_text().count("\n") == 1      # encoded on the engine's thread instead


def test_a_helper_that_cannot_take_the_file_stops_capture_once(tmp_path, monkeypatch, caplog):
    """Another writer takes the file between the engine's check and the helper's open: the helper answers
    'failed' (it cannot lock the file), and capture stops with one warning instead of falling back to the
    engine's thread, which could not write the file either."""
    import fcntl as fcntl_mod
    import os

    from lmdeploy_hostcache.capture.writer import RotatingWriter

    path = tmp_path / "c.jsonl"
    taken = []
    real_close = RotatingWriter.close

    def close_then_lose_the_file(self):
        real_close(self)
        if not taken:                              # the engine's writer hands the file over: another takes it
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            fcntl_mod.flock(fd, fcntl_mod.LOCK_EX | fcntl_mod.LOCK_NB)
            taken.append(fd)

    monkeypatch.setattr(RotatingWriter, "close", close_then_lose_the_file)
    try:
        with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache.capture"):
            cap = _capture(path, offload=True)
        assert cap.failed and "another process is writing it" in cap.failed and cap.helper is None
        assert sum("trace capture stopped" in r.getMessage() for r in caplog.records) == 1
        assert "encoded on the scheduler's thread" not in caplog.text
        _run(cap, [dict(seq_id=1, tokens=np.arange(40))])      # no work, no more warnings
        cap.close()
        assert sum("trace capture" in r.getMessage() for r in caplog.records) == 1
    finally:
        for fd in taken:
            os.close(fd)
