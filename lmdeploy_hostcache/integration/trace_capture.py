"""LMDeploy glue of trace capture: one record per finished request, from the scheduler role.

``HostTierScheduler`` calls ``on_new_request(seq)`` (LMDeploy registered a sequence) and
``on_request_finished(seq)`` (LMDeploy ended it, finished or aborted) when ``capture`` is set.
At the end the record is built from what the sequence holds: the prompt is
``seq.all_ids[:seq.input_end_pos]``, the output length ``seq.num_all_ids - seq.input_end_pos``,
the block ids the capture key's ids of the prompt's full-block digests (the same chained digests
the host tier uses, in the request's namespace: model, block size, KV format, tenant salt,
adapter, rooted at the request's cache salt when it has one).  The arrival is the capture clock's reading at ``on_new_request`` (wall-clock seconds
by default; a test may pass another clock).

The record is built and written on the scheduler's thread, inside LMDeploy's ``end_session``
(``seconds`` sums that time): a capture thread was tried and measured worse, because its hashing
competes for the GIL with the scheduler (docs/planner.md "Capturing your own traffic").

Invariants: neither hook ever raises into LMDeploy (any error turns capture off for the engine,
logged once: ``capture/writer.py`` for file errors, here for everything else); a sequence seen
only at its end gets an arrival from LMDeploy's ``arrive_time`` (``perf_counter`` based, mapped
to the capture clock); multimodal prompts are captured with their token ids' digests like any
other (the host tier never stores their blocks, which the planner cannot know).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..capture import CaptureKey, RotatingWriter, capture_record
from ..digest import ChainHasher, salted_root
from .request_salt import sequence_salt

logger = logging.getLogger("lmdeploy_hostcache.capture")


class TraceCapture:
    """Per-engine capture: key, writer and the arrival of every live sequence."""

    def __init__(self, path: str, max_bytes: int, block_size: int, namespaces, *, key: CaptureKey | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key or CaptureKey.from_env()
        self.writer = RotatingWriter(path, max_bytes)
        self.block_size = int(block_size)
        self.namespaces = namespaces
        self.clock = clock
        self._arrival: dict[int, tuple[int, float]] = {}   # seq_id -> (input_start_pos, arrival)
        self.failed = ""
        self.seconds = 0.0          # time spent in the hooks, inside LMDeploy's scheduler step
        self.first_seconds = 0.0    # of which the first record's (opens the file)
        self.records = 0
        logger.info("lmdeploy-hostcache: capturing request traces to %s (key fingerprint %s)", path,
                    self.key.fingerprint)

    def on_new_request(self, seq) -> None:
        if self.failed:
            return
        try:
            self._arrival[int(seq.seq_id)] = (int(seq.input_start_pos), self.clock())
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            self._fail(exc)

    def on_request_finished(self, seq) -> None:
        if self.failed or self.writer.failed:
            self._arrival.pop(int(getattr(seq, "seq_id", -1)), None)
            return
        t0 = time.perf_counter()
        try:
            self.writer.write(self.encode(self.snapshot(seq)))
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            self._fail(exc)
        dt = time.perf_counter() - t0
        self.seconds += dt
        if not self.records:
            self.first_seconds = dt
        self.records += 1

    def record(self, seq) -> str:
        """The JSON line of a sequence LMDeploy is ending."""
        return self.encode(self.snapshot(seq))

    def snapshot(self, seq) -> tuple:
        """What the record needs, copied out of the sequence (cheap: no hashing)."""
        req = int(seq.seq_id)
        start = int(seq.input_start_pos)
        noted = self._arrival.pop(req, None)
        if noted is not None and noted[0] == start:
            arrival = noted[1]
        else:  # a later turn of a session, or registered before capture began
            arrival = self.clock() - max(0.0, time.perf_counter() - float(seq.arrive_time))
        prompt_len = int(seq.input_end_pos)
        output_len = max(0, int(seq.num_all_ids) - prompt_len)
        full = prompt_len // self.block_size
        tokens = seq.all_ids[:full * self.block_size].copy() if full else None
        session = seq.session.session_id if start > 0 else None
        namespace = self.namespaces.for_adapter(seq.adapter_name)
        # a salted request's chain starts at its salted root, as in the host tier: requests of two
        # salts never share blocks in the engine, so their captured ids differ too
        root = salted_root(namespace, sequence_salt(seq))
        return (arrival, prompt_len, output_len, tokens, namespace, root, session)

    def encode(self, snap: tuple) -> str:
        """The JSON line of a snapshot: chained digests, keyed ids, the record."""
        arrival, prompt_len, output_len, tokens, namespace, root, session = snap
        hasher = ChainHasher(namespace, parent=root)
        if tokens is not None:
            hasher.extend(tokens)
        return capture_record(arrival_s=arrival, input_length=prompt_len, output_length=output_len,
                              block_ids=self.key.block_ids(hasher.digests), block_size=self.block_size,
                              fingerprint=self.key.fingerprint,
                              session=None if session is None else self.key.session_id(session))

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        self._arrival.clear()
        logger.warning("lmdeploy-hostcache: trace capture stopped after an unexpected error (%s); serving goes on "
                       "without capture", self.failed)

    def close(self) -> None:
        self.writer.close()


def capture_from_config(hostcache, block_size: int, namespaces) -> TraceCapture | None:
    """A ``TraceCapture`` when the ``capture`` setting names a file, else None.  A bad shared key
    (``LMDEPLOY_HOSTCACHE_CAPTURE_KEY``) is logged and capture stays off: serving never stops."""
    path = getattr(hostcache, "capture", "") or ""
    if not path:
        return None
    try:
        return TraceCapture(path, int(float(getattr(hostcache, "capture_max_mb", 256)) * 2**20), block_size,
                            namespaces)
    except Exception as exc:  # noqa: BLE001
        logger.warning("lmdeploy-hostcache: trace capture to %s is off: %s", path, exc)
        return None
