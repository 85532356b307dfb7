"""The capture's helper process: encodes batches of captured requests and writes them (pure).

``integration/trace_capture.py`` starts it with the engine when capture is on and
``capture_offload`` is true (``python -m lmdeploy_hostcache.capture.encoder_process``), so the
digests, keyed ids, JSON formatting and file writes run on another core instead of LMDeploy's
scheduler thread (a thread would not help: it holds the GIL while hashing).

Protocol, on its stdin: frames of a 16-byte header (two little-endian 8-byte lengths), a pickle and
raw bytes. The first frame's pickle is ``{"path", "max_bytes", "keep_files", "block_size", "key"}`` (the capture
key's 16 bytes: they travel through the pipe only, never the environment, argv or a file) and it
has no raw bytes; every later frame is one batch for ``BlockIdEncoder.encode``: the pickle holds
its records (without chains), the raw bytes its ``data`` (sent from the token ids' buffer, no
copy). Once it has read the first frame and opened the file it prints ``ready`` (or ``failed: <the
reason>``) on a line of stdout, so the engine starts serving only once the helper is up. At end of
input it closes the file and prints one JSON line of counters on stdout (``records``, ``batches``,
``writes``, ``written``, ``dropped``, ``failed``, the encoder's counters, ``cpu_seconds``,
``priority``), then exits 0. Once it has said ``ready`` it runs as background work (``lower_priority``:
Linux's ``SCHED_IDLE``, else nice 19; not before, or a busy machine could hold up the engine's start), so a
batch it is woken for never takes the core from the engine; on a machine with no idle core it falls
behind, and the engine then drops batches past ``MAX_PENDING_BYTES`` (logged once).

Invariants: it ignores the signals a service stop sends the engine's process group
(``outlive_group_signals``) and ends only at end of input, so what the engine hands over at close is
written; it writes only whole batches (``RotatingWriter``); a write failure is logged once (on
stderr, which it shares with the server) and it exits 3, a malformed batch exits 4: the engine sees
the pipe close and stops capture, serving goes on. The frames are pickles from the engine's own
process, over a pipe no other process holds.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time

FRAME_HEADER = 16
EXIT_WRITE_FAILED = 3
EXIT_BAD_BATCH = 4


def frame(obj, data=b"") -> list:
    """One frame of the protocol, as the buffers to write in order (``os.writev``): the header, the
    pickle of ``obj`` and ``data`` (any buffer: not copied)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = memoryview(data).cast("B")
    head = len(payload).to_bytes(8, "little") + len(data).to_bytes(8, "little")
    return [memoryview(head), memoryview(payload), data] if len(data) else [memoryview(head), memoryview(payload)]


def _read_exact(stream, size: int):
    out = stream.read(size) if size else b""
    return out if len(out) == size else None


def _read_frame(stream):
    """(object, raw bytes) of the next frame, or None at end of input."""
    head = _read_exact(stream, FRAME_HEADER)
    if head is None:
        return None
    payload = _read_exact(stream, int.from_bytes(head[:8], "little"))
    data = _read_exact(stream, int.from_bytes(head[8:], "little"))
    if payload is None or data is None:
        return None
    return pickle.loads(payload), data


def serve(stdin, stdout, lower=None) -> int:
    """The helper's work (see the module docstring). ``lower``: called once ``ready`` is printed, returns the
    priority it set (``lower_priority``): at idle priority before that, a busy machine could starve the
    helper's start, and with it the engine's, which waits for ``ready``."""
    from .encoder import BlockIdEncoder
    from .keys import CaptureKey
    from .writer import RotatingWriter

    first = _read_frame(stdin)
    if first is None:
        return EXIT_BAD_BATCH
    init = first[0]
    encoder = BlockIdEncoder(CaptureKey(init["key"]), init["block_size"])
    writer = RotatingWriter(init["path"], init["max_bytes"], init.get("keep_files", 0))
    ready = writer.open()
    stdout.write("ready\n" if ready else f"failed: {writer.failed}\n")
    stdout.flush()
    if not ready:
        return EXIT_WRITE_FAILED
    priority = lower() if lower is not None else "unchanged"
    records = batches = 0
    code = 0
    while True:
        batch = _read_frame(stdin)
        if batch is None:
            break
        recs, data = batch
        try:
            lines = encoder.encode(data, [(*r, None) for r in recs])
        except Exception as exc:  # noqa: BLE001 -- reported, then the engine stops capture
            logging.getLogger("lmdeploy_hostcache.capture").warning(
                "lmdeploy-hostcache: trace capture stopped: a batch could not be encoded (%s: %s); serving goes on",
                type(exc).__name__, exc)
            code = EXIT_BAD_BATCH
            break
        writer.write_lines(lines)
        records += len(recs)
        batches += 1
        if writer.failed:          # logged once by the writer
            code = EXIT_WRITE_FAILED
            break
    writer.close()
    counters = {"records": records, "batches": batches, "writes": writer.writes, "written": writer.written,
                "dropped": writer.dropped, "failed": writer.failed, "cpu_seconds": time.process_time(),
                "priority": priority,
                **encoder.counters()}
    try:   # the engine reads them at close; one that died without close has no pipe left to read them
        stdout.write(json.dumps(counters) + "\n")
        stdout.flush()
    except OSError:   # BrokenPipeError: the file is complete, nothing is lost; exit as usual
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())   # the interpreter's last flush too
        except (OSError, ValueError, AttributeError):
            pass
    return code


def lower_priority() -> str:
    """Make this process background work: Linux's ``SCHED_IDLE`` (it runs only on a core nothing else
    wants, and a batch it is woken for never preempts the engine), else the lowest nice level.
    Returns which one took."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
        return "nice 19"
    except OSError:
        return "unchanged"


def outlive_group_signals() -> None:
    """Ignore SIGTERM, SIGINT and SIGHUP. A service stop signals the engine's whole process group (systemd's
    default ``KillMode=control-group``, a terminal's Ctrl-C, the test server's ``killpg``): a helper that
    died with it would lose the batch the engine hands over at close. Its input's end is its only exit:
    the engine closes the pipe at close, or the kernel does when the engine dies; SIGKILL still stops it.
    (LMDeploy closes the engine on SIGTERM and SIGINT only: a SIGHUP kills the engine without its close,
    and the records it still queued are lost whatever the helper does.)"""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def main() -> int:
    outlive_group_signals()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    return serve(sys.stdin.buffer, sys.stdout, lower_priority)


if __name__ == "__main__":
    sys.exit(main())
