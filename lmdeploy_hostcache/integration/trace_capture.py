"""LMDeploy glue of trace capture: one record per finished request, from the scheduler role.

``HostTierScheduler`` calls ``on_new_request(seq)`` (LMDeploy registered a sequence),
``on_lookup(seq)`` (its lookup of a waiting sequence: a sequence whose ``input_start_pos`` moved past the
noted turn is an engine session kept open that LMDeploy extended with its next turn, so the noted turn
ended and its record is queued then) and ``on_request_finished(seq, chain)`` (LMDeploy ended it,
finished or aborted; ``chain``: the host tier's digest chain of the request, or None; a turn not looked
up after the one before it ended is queued there first) when ``capture`` is set.  At the end the record is
built from what the sequence holds: the prompt is ``seq.all_ids[:seq.input_end_pos]`` (read as
``seq.history_cache.get_real()[:full]``, the prompt's ``full`` full-block ids: ``all_ids`` is
``history_cache[:num_all_ids]``, ``history_cache[...]`` is ``get_real()[...]``, and
``full <= input_end_pos <= num_all_ids``; a sequence without a ``history_cache``, as in tests, is read
through ``all_ids``), the output length
``seq.num_all_ids - seq.input_end_pos``, the block ids the capture key's ids of the prompt's full-block
digests (the same chained digests the host tier uses, in the request's namespace: model, block size, KV format,
tenant salt, adapter, rooted at the request's cache salt when it has one) and the output block ids those of
the full blocks past them whose KV the request computed (``capture/record.py``: its first
``(input + output - 1) // block_size`` blocks, the chain continued through the generated tokens, read from the
same token store: ``num_valid_ids - 1 < num_all_ids``), which LMDeploy's trie may keep for a next turn that
re-sends the reply.  The arrival is the capture clock's
reading at ``on_new_request`` (wall-clock seconds by default; a test may pass another clock).

The hooks run on the scheduler's thread, when LMDeploy registers a sequence (``on_new_request``) and inside
its ``end_session`` (``seconds`` sums both hooks' time, flushes included).  The file is opened and the base
model's chain root computed when the engine starts (``open_seconds``; an unwritable path shows then).  The
end hook only takes what the record needs from the sequence (``snapshot``: no hashing, no copy, no numpy
call: a reference to the sequence's token store and the length its ids cover, the prompt's full blocks and the
kept output blocks; LMDeploy never
writes an ended sequence's tokens again, it drops them) and the host tier's digest chain of the request
(``connector._RequestChain``, a reference the connector drops right after) and queues them
(``on_request_finished`` runs ``snapshot``'s code inline, one call less in a hook that runs cold;
``tests/capture`` checks that both give the same tuple).  Every ``FLUSH_RECORDS`` queued requests, or at
the first request end ``FLUSH_SECONDS`` after the oldest queued one, or at ``close``/interpreter exit, the
queue is flushed as one batch; on a server with no request ending, the idle flusher thread does it once the
oldest is ``FLUSH_SECONDS`` old (it looks every ``IDLE_FLUSH_SECONDS``; ``flushes_idle``, not in
``seconds``: they run outside the hooks, though a hook may wait for one), and sends the frames the pipe
did not take: the token ids of the prompts' full blocks and kept output blocks sliced, laid
end to end and encoded by one
value-checked cast here, then

* with ``offload`` (the ``capture_offload`` setting, on by default) handed to the capture's helper process
  (``capture/encoder_process.py``, started and waited for at engine start, running at idle priority),
  which computes the digests, keyed ids and lines and writes them: the batch leaves as one ``writev`` of its
  records' pickle and the ids' own buffer on a non-blocking pipe; what the pipe does not take waits for the
  next hook or flush, and past ``MAX_PENDING_BYTES`` a batch is dropped (``dropped_records``, logged once).
  ``close`` hands over what waits and waits for the helper (``HELPER_EXIT_SECONDS``); its counters are then
  in ``encoder_counters()``.  A helper that cannot start is logged once and the encoding stays here.
  A thread was tried before and measured worse: its hashing holds the GIL the scheduler needs
  (docs/planner.md "Capturing your own traffic");
* without it, encoded here (``encode_many``, ``capture/encoder.py``'s ``BlockIdEncoder``: chained digests
  taken from a remembered prompt the request continues or from the host tier's chain where they check out,
  keyed ids, JSON lines) and written with one ``os.write``.

Both give the same file (``tests/capture/test_capture_helper.py``).  A process killed without ``close``
loses the records still queued: those of requests that ended in its last ``FLUSH_SECONDS +
IDLE_FLUSH_SECONDS`` (at most ``FLUSH_RECORDS - 1``; with the helper, also what it had not written).  A batch whose sequences hold fewer ids than their records cover is not written (an
error: capture stops).  Counters: ``records`` (hook calls), ``flushes`` (``flushes_by_age`` of them by
``FLUSH_SECONDS``); ``blocks_hashed``, ``blocks_reused`` and ``blocks_from_chain`` (the encoder's; with
the helper, its figures once it exited).  The remembered prompts and the key's id memo live in process
memory only (digests, ids and an xxh3 of tokens; never written), in the helper's when it encodes.

Invariants: neither hook ever raises into LMDeploy nor blocks on the helper (a hook may wait for the lock
while the idle flusher flushes, as long as a flush of its own would take; any error turns capture off
for the engine, logged once: ``capture/writer.py`` for file errors, here for everything else, a helper that
exited included; after either, the hooks do no work); the key reaches the helper through its pipe only; a
sequence seen
only at its end gets an arrival from LMDeploy's ``arrive_time`` (``perf_counter`` based, mapped
to the capture clock); multimodal prompts are captured with their token ids' digests like any
other (the host tier never stores their blocks, which the planner cannot know).
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from time import perf_counter
from typing import Callable

import numpy as np

from ..capture import CAPTURE_KEY_ENV, CaptureKey, RotatingWriter
from ..capture.encoder import CHAIN_MIN_BLOCKS, RECENT_PER_BLOCK, RECENT_PROMPTS, BlockIdEncoder
from ..capture.encoder_process import EXIT_WRITE_FAILED, frame
from ..capture.record import kept_tokens
from ..tier.digest import TOKEN_DTYPE, encode_tokens, salted_root
from .request_salt import sequence_salt

logger = logging.getLogger("lmdeploy_hostcache.capture")

FLUSH_RECORDS = 64      # queued requests encoded and written together
FLUSH_SECONDS = 1.0     # ... or sooner, at the first request end this long after the oldest queued one
IDLE_FLUSH_SECONDS = 1.0   # the idle flusher thread looks this often for records no request end flushed
# with the helper process: batches not yet taken by it (the pipe full) are kept up to this many bytes;
# beyond, a batch is dropped (counted in dropped_records, logged once)
MAX_PENDING_BYTES = 256 * 2**20
HELPER_EXIT_SECONDS = 60.0   # close() waits this long for the helper to write what it was sent
HELPER_START_SECONDS = 60.0  # the engine's start waits this long for the helper's "ready" (else: no helper)
PIPE_BYTES = 2**20           # the pipe to the helper is enlarged to this (Linux F_SETPIPE_SZ) where allowed
__all__ = ["FLUSH_RECORDS", "FLUSH_SECONDS", "CHAIN_MIN_BLOCKS", "RECENT_PROMPTS", "RECENT_PER_BLOCK",
           "TraceCapture", "capture_from_config"]


class TraceCapture:
    """Per-engine capture: key, writer and the arrival of every live sequence."""

    def __init__(self, path: str, max_bytes: int, block_size: int, namespaces, *, key: CaptureKey | None = None,
                 clock: Callable[[], float] = time.time, offload: bool = False, idle_flush: bool = True,
                 keep_files: int = 0) -> None:
        self.key = key or CaptureKey.from_env()
        self.writer = RotatingWriter(path, max_bytes, keep_files)
        self.block_size = int(block_size)
        self.namespaces = namespaces
        self.clock = clock
        # seq_id -> the turn noted (input_start_pos, arrival, input_end_pos)
        self._arrival: dict[int, tuple[int, float, int]] = {}
        self._queue: list[tuple] = []     # snapshots not yet written
        self._queued_at = 0.0             # perf_counter when the oldest queued snapshot was taken
        self._roots: dict[tuple, tuple[int, int, bytes]] = {}    # (adapter, salt) -> (chain root, seed, root bytes)
        self.encoder = BlockIdEncoder(self.key, self.block_size)  # on this thread (offload: in the helper)
        self.flush_records = FLUSH_RECORDS
        self.flush_seconds = FLUSH_SECONDS
        self.failed = ""
        self.seconds = 0.0          # time spent in the hooks and flushes, inside LMDeploy's scheduler step
        self.records = 0
        self.flushes = 0
        self.flushes_by_age = 0     # of which: the oldest queued record waited FLUSH_SECONDS
        self.offload = bool(offload)
        self.helper: subprocess.Popen | None = None   # the helper process (offload)
        self.helper_counters: dict = {}   # what the helper reported when it exited
        self.dropped_records = 0          # offload: batches dropped because the helper fell behind
        self._pending: list = []          # offload: frames not yet in the pipe (memoryviews)
        self._pending_bytes = 0
        self._pipe = -1
        self.closed = False       # close() ran: the hooks do no more work
        self.flushes_idle = 0     # of flushes_by_age: by the idle flusher thread
        # the hooks, flush, close and the idle flusher take it: the queue, the pending frames and the
        # helper are changed under it only
        self._lock = threading.Lock()
        self._idle_stop = threading.Event()
        self._idle_flusher: threading.Thread | None = None
        # a capture nobody closed writes its queue at interpreter exit (it lives until then); close unregisters it
        atexit.register(self.close)
        logger.info("lmdeploy-hostcache: capturing request traces to %s (key fingerprint %s)", path,
                    self.key.fingerprint)
        self._root(None, "")        # the base model's unsalted root, computed at engine start
        t0 = time.perf_counter()
        if not self.writer.open():  # at engine start, not in a request's step: a bad path shows now
            self.failed = self.writer.failed     # (logged by the writer)
        elif self.offload:
            self._start_helper()
        self.open_seconds = time.perf_counter() - t0
        if idle_flush and not self.failed:   # the thread holds it weakly (a closed capture is freed)
            self._idle_flusher = threading.Thread(target=_flush_when_idle, args=(weakref.ref(self), self._idle_stop),
                                                  name="hostcache-capture-flush", daemon=True)
            self._idle_flusher.start()

    def _flush_idle_once(self) -> bool:
        """One look of the idle flusher thread (``_flush_when_idle``): queued records at least ``flush_seconds``
        old are flushed, and frames the pipe did not take are sent, which otherwise wait for the next request
        end (an idle server would keep them in memory, lost if the process is killed).  False once the
        capture is closed or failed: the thread ends."""
        with self._lock:
            if self.failed or self.closed:
                return False
            try:
                if self._queue and self._flush_if_old(perf_counter()):
                    self.flushes_idle += 1
                elif self._pending:
                    self._send()
            except Exception as exc:  # noqa: BLE001 -- capture stops, serving goes on
                self._fail(exc)
            return not self.failed

    # the encoder's counters (the helper's, reported when it exits, with offload)
    def _counter(self, name: str) -> int:
        if self.offload:
            return int(self.helper_counters.get(name, 0))
        return getattr(self.encoder, name)

    blocks_hashed = property(lambda self: self._counter("blocks_hashed"))
    blocks_reused = property(lambda self: self._counter("blocks_reused"))
    blocks_from_chain = property(lambda self: self._counter("blocks_from_chain"))   # of blocks_reused

    @property
    def chain_min_blocks(self) -> int:
        return self.encoder.chain_min_blocks

    @chain_min_blocks.setter
    def chain_min_blocks(self, value: int) -> None:
        self.encoder.chain_min_blocks = value

    def encoder_counters(self) -> dict:
        """What encoding did: ``blocks_hashed``, ``blocks_reused``, ``blocks_from_chain``, ``ids_keyed`` and
        the file's ``writes`` (with offload, the helper's figures once it exited, plus its ``cpu_seconds``)."""
        if self.offload:
            return dict(self.helper_counters)
        return {**self.encoder.counters(), "writes": self.writer.writes}

    def _start_helper(self) -> None:
        """Start the helper process (at engine start): it appends to the file opened and checked here, and
        gets the key through its pipe.  A helper that cannot start is logged once and the encoding stays
        on this thread (``offload`` turns false): capture goes on."""
        helper = None
        self.writer.close()         # its lock on the file (one writer per file) passes to the helper
        try:
            env = dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1")    # no LMDeploy hooks in the helper
            env.pop(CAPTURE_KEY_ENV, None)    # the key reaches the helper through its pipe only
            helper = subprocess.Popen([sys.executable, "-m", "lmdeploy_hostcache.capture.encoder_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
            pipe = helper.stdin.fileno()
            try:
                fcntl.fcntl(pipe, 1031, PIPE_BYTES)     # F_SETPIPE_SZ: fewer, larger writes
            except OSError:
                pass
            for chunk in frame({"path": str(self.writer.path), "max_bytes": self.writer.max_bytes,
                                "keep_files": self.writer.keep_files, "block_size": self.block_size,
                                "key": self.key._key}):
                os.write(pipe, chunk)
            # at engine start: serve only once the helper is up (it has opened the file), waiting a bounded time
            answer = select.poll()
            answer.register(helper.stdout.fileno(), select.POLLIN)
            if not answer.poll(HELPER_START_SECONDS * 1000):
                raise RuntimeError(f"it did not answer within {HELPER_START_SECONDS:g} s")
            ready = helper.stdout.readline().decode(errors="replace").strip()
            if ready.startswith("failed:"):   # it could not open the file (its writer logged why): capture stops
                helper.wait()
                self.failed = ready.removeprefix("failed:").strip()
                self.offload = False
                logger.warning("lmdeploy-hostcache: trace capture stopped: the capture helper cannot write %s (%s); "
                               "serving goes on without capture", self.writer.path, self.failed)
                return
            if ready != "ready":
                raise RuntimeError(f"it did not start ({ready or 'no answer'})")
            os.set_blocking(pipe, False)
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            if helper is not None:
                helper.kill()
                helper.wait()
            self.offload = False
            logger.warning("lmdeploy-hostcache: the trace capture helper process is not running (%s: %s); "
                           "captured requests are encoded on the scheduler's thread", type(exc).__name__, exc)
            return
        self.helper, self._pipe = helper, pipe   # the helper writes the file from now on

    def on_new_request(self, seq) -> None:
        if self.failed or self.closed:
            return
        t0 = perf_counter()
        try:
            self._arrival[seq.seq_id] = (seq.input_start_pos, self.clock(), seq.input_end_pos)
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            with self._lock:
                self._fail(exc)
        self.seconds += perf_counter() - t0

    def on_lookup(self, seq) -> None:
        """LMDeploy asks the connector about a waiting sequence.  In an engine session kept open across
        turns LMDeploy appends the next turn to the same sequence (``input_start_pos`` moves to its end):
        the turn noted before has ended, and its record is queued now (the session's last turn is written
        by ``on_request_finished``)."""
        noted = self._arrival.get(seq.seq_id)
        if noted is None or noted[0] == seq.input_start_pos or self.failed or self.closed:
            return
        t0 = perf_counter()
        with self._lock:
            try:
                self._queue_record(t0, self._turn_before(seq, noted))
            except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
                self._fail(exc)
            self.records += 1
        self.seconds += perf_counter() - t0

    def _turn_before(self, seq, noted) -> tuple:
        """The record of the turn ``noted`` (start, arrival, prompt end) of a sequence that has moved on to
        its next turn, and the next turn noted in its place: its output ran to where the next turn starts;
        its tokens are the sequence's (LMDeploy only appends to them; the turn's chain is not taken: the
        connector goes on extending it)."""
        _, arrival, prompt_len = noted
        new_start = seq.input_start_pos
        self._arrival[seq.seq_id] = (new_start, self._clock_of(seq.arrive_time), seq.input_end_pos)
        output_len = max(0, new_start - prompt_len)
        end = kept_tokens(prompt_len, output_len, self.block_size)
        # the session moved on to a next turn: every turn of it carries the session, its first one included
        return (arrival, prompt_len, output_len, _token_store(seq, end), end, seq.adapter_name,
                sequence_salt(seq), seq.session.session_id, None)

    def _clock_of(self, perf_time: float) -> float:
        """A ``perf_counter`` reading (LMDeploy's ``arrive_time``) on the capture clock."""
        return self.clock() - max(0.0, time.perf_counter() - float(perf_time))

    def _queue_record(self, t0: float, record: tuple) -> None:
        queue = self._queue
        if not queue:
            self._queued_at = t0
        queue.append(record)
        if len(queue) >= self.flush_records:
            self._flush()
        else:
            self._flush_if_old(t0)

    def _flush_if_old(self, now: float) -> bool:
        """Flush the queue when its oldest record was queued ``flush_seconds`` before ``now`` (a
        ``perf_counter`` reading; counted in ``flushes_by_age``); whether it did."""
        if now - self._queued_at < self.flush_seconds:
            return False
        self.flushes_by_age += 1
        self._flush()
        return True

    def on_request_finished(self, seq, chain=None) -> None:
        """``chain``: the host tier's digest chain of this request (``connector._RequestChain``), when
        its lookup computed one; its digests are taken where they check out (``encode_many``)."""
        if self.failed or self.closed:
            self._arrival.pop(getattr(seq, "seq_id", None), None)
            return
        t0 = perf_counter()
        with self._lock:
            try:
                if self._pending:         # offload: what the pipe could not take at the last flush
                    self._send()
                    if self.failed:       # the helper is gone (logged): no more work
                        self.seconds += perf_counter() - t0
                        return
                # snapshot(seq, chain), inlined: the same tuple (tests/capture), one call less in a cold hook
                noted = self._arrival.pop(seq.seq_id, None)
                start = seq.input_start_pos
                if noted is not None and noted[0] != start:   # an earlier turn, not looked up after it ended
                    self._queue_record(t0, self._turn_before(seq, noted))
                    self.records += 1
                    noted = self._arrival.pop(seq.seq_id)
                if noted is not None and noted[0] == start:
                    arrival = noted[1]
                else:  # registered before capture began
                    arrival = self._clock_of(seq.arrive_time)
                prompt_len = seq.input_end_pos
                output_len = seq.num_valid_ids - prompt_len
                # the prompt's full blocks and the output blocks whose KV it computed (kept_tokens, inlined)
                if output_len > 0:
                    end = prompt_len + output_len - 1
                else:
                    output_len = 0
                    end = prompt_len
                end -= end % self.block_size
                if end:
                    try:
                        tokens = seq.history_cache
                    except AttributeError:
                        tokens = _AllIds(seq.all_ids)
                else:
                    tokens = None
                self._queue_record(t0, (arrival, prompt_len, output_len, tokens, end,
                                        seq.adapter_name, sequence_salt(seq),
                                        seq.session.session_id if start > 0 else None, chain))
            except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
                self._fail(exc)
            self.records += 1
        self.seconds += perf_counter() - t0

    def flush(self) -> None:
        """Encode and write the queued records now (never raises)."""
        with self._lock:
            self._flush_logged()

    def _flush_logged(self) -> None:
        if not self._queue or self.failed:
            return
        t0 = time.perf_counter()
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            self._fail(exc)
        self.seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        queue.sort(key=_arrival_of)     # a batch's lines in arrival order, not in the order requests ended
        self.flushes += 1
        if self.offload:
            self._offload(queue)
            return
        self.writer.write_lines(self.encode_many(queue))
        if self.writer.failed:      # a file error (logged by the writer): the hooks do no more work
            self.failed = self.writer.failed
            self._arrival.clear()

    def _offload(self, snaps) -> None:
        """Hand a batch to the helper: the prompts' token ids gathered and checked here (the token
        stores are this process's) and sent from their buffer, the rest (digests, keyed ids, lines,
        the write) done there."""
        if self._pending_bytes > MAX_PENDING_BYTES:
            if not self.dropped_records:
                logger.warning("lmdeploy-hostcache: the trace capture helper is behind (%d MiB queued); "
                               "records are dropped until it catches up", self._pending_bytes >> 20)
            self.dropped_records += len(snaps)
            return
        data = _token_array([snap[3].get_real()[:snap[4]] for snap in snaps if snap[3] is not None])
        chunks = frame(self._records(snaps, False), data)
        self._pending += chunks
        self._pending_bytes += sum(len(c) for c in chunks)
        self._send()

    def _send(self) -> None:
        """Write what the pipe takes now (never blocks; one ``writev`` per try); the rest waits for
        the next hook or flush."""
        pending = self._pending
        try:
            while pending:
                n = os.writev(self._pipe, pending[:64])
                self._pending_bytes -= n
                while n:
                    size = len(pending[0])
                    if n >= size:
                        pending.pop(0)
                        n -= size
                    else:
                        pending[0] = pending[0][n:]
                        n = 0
        except BlockingIOError:
            pass
        except OSError as exc:      # the helper is gone: capture stops, serving goes on
            code = None
            if self.helper is not None:
                try:   # it closed its input on exit: its code follows at once (a bounded wait, failure path only)
                    code = self.helper.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            # EXIT_WRITE_FAILED: the helper's writer already logged why (the file), once: say nothing more
            self._fail(RuntimeError(f"the capture helper process exited (code {code}): {exc}"),
                       logged=code == EXIT_WRITE_FAILED)

    def record(self, seq, chain=None) -> str:
        """The JSON line of a sequence LMDeploy is ending."""
        return self.encode(self.snapshot(seq, chain))

    def snapshot(self, seq, chain=None) -> tuple:
        """What the record needs from the sequence (cheap: no hashing, no copy, no numpy call: LMDeploy's
        token store of the sequence, ``seq.history_cache``, and the length its ids cover: the prompt's full
        blocks and the kept output blocks, ``kept_tokens``; ``encode_many`` slices it, LMDeploy never writes an ended sequence's tokens again) and the host
        tier's chain (a reference: the connector drops it right after, nothing changes it any more)."""
        noted = self._arrival.pop(seq.seq_id, None)
        start = seq.input_start_pos
        if noted is not None and noted[0] == start:
            arrival = noted[1]
        else:  # registered before capture began, or a later turn (the hook queues the turn before it too)
            arrival = self._clock_of(seq.arrive_time)
        prompt_len = seq.input_end_pos
        output_len = max(0, seq.num_valid_ids - prompt_len)
        end = kept_tokens(prompt_len, output_len, self.block_size)
        return (arrival, prompt_len, output_len, _token_store(seq, end), end,
                seq.adapter_name, sequence_salt(seq), seq.session.session_id if start > 0 else None, chain)

    def encode(self, snap: tuple) -> str:
        """The JSON line of a snapshot: chained digests, keyed ids, the record."""
        return self.encode_many((snap,))[0]

    def encode_many(self, snaps) -> list[str]:
        """The JSON lines of snapshots (``capture/encoder.py``: chained digests from the request's salted
        root, taken from a remembered prompt it continues or the host tier's chain where they check out,
        keyed ids, ``capture_line``'s layout): the prompts' full-block ids of the whole batch are sliced,
        laid end to end and encoded by one value-checked cast (``_token_bytes``)."""
        return self.encoder.encode(*self._batch(snaps))

    def _batch(self, snaps) -> tuple[bytes, list[tuple]]:
        """A batch for ``BlockIdEncoder.encode``: the prompts' token bytes and one record per snapshot."""
        data = _token_bytes([snap[3].get_real()[:snap[4]] for snap in snaps if snap[3] is not None])
        return data, self._records(snaps, True)

    def _records(self, snaps, chains: bool) -> list[tuple]:
        """``BlockIdEncoder`` records of snapshots: the request's root (None without full blocks) in
        place of its adapter and salt; its chain last when ``chains`` (the helper gets none)."""
        roots = self._roots
        base = roots.get((None, "")) or self._root(None, "")
        bs = self.block_size
        records = []
        append = records.append
        for arrival, prompt_len, output_len, tokens, end, adapter_name, salt, session, chain in snaps:
            if tokens is None:
                root = None
            elif adapter_name is None and not salt:
                root = base
            else:
                root = roots.get((adapter_name, salt)) or self._root(adapter_name, salt)
            full = prompt_len - prompt_len % bs
            append((arrival, prompt_len, output_len, full, end - full, root, session, chain) if chains else
                   (arrival, prompt_len, output_len, full, end - full, root, session))
        return records

    def _root(self, adapter_name, salt) -> tuple[int, int, bytes]:
        """(chain root, seed, the root's 16 little-endian bytes) of a request's namespace and cache salt,
        remembered."""
        if len(self._roots) >= 1024:   # many salts: keep the map small
            self._roots.clear()
        namespace = self.namespaces.for_adapter(adapter_name)
        # a salted request's chain starts at its salted root, as in the host tier: requests of two salts
        # never share blocks in the engine, so their captured ids differ too
        parent = salted_root(namespace, salt)
        root = self._roots[(adapter_name, salt)] = (parent, namespace.seed, parent.to_bytes(16, "little"))
        return root

    def _fail(self, exc: BaseException, logged: bool = False) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        self._idle_stop.set()
        self._arrival.clear()
        self._queue.clear()
        self._pending.clear()
        if not logged:
            logger.warning("lmdeploy-hostcache: trace capture stopped after an unexpected error (%s); serving "
                           "goes on without capture", self.failed)
        self._stop_helper(wait=False)     # on the scheduler's thread: end its input, never wait for it

    def close(self) -> None:
        """Write what is queued and stop: later hooks do nothing (the helper's pipe is closed, and its
        descriptor number may belong to another file by then)."""
        if self.closed:
            return
        atexit.unregister(self.close)   # a closed capture is freed as any object
        self._idle_stop.set()
        with self._lock:
            if self.closed:
                return
            self._flush_logged()
            self.writer.close()
            self._stop_helper()
            self.closed = True
            self._pipe = -1
        if self._idle_flusher is not None:   # it sees the stop, or closed once it has the lock
            self._idle_flusher.join(timeout=5.0)

    def _stop_helper(self, wait: bool = True) -> None:
        """Hand the helper what is still pending, end its input and wait for it (at engine close or
        interpreter exit; ``wait=False``, after a failure: only end its input)."""
        helper, self.helper = self.helper, None
        if helper is None:
            return
        if not wait:
            try:
                helper.stdin.close()
            except OSError:
                pass
            return
        deadline = time.monotonic() + HELPER_EXIT_SECONDS
        try:
            writable = select.poll()          # poll, not select: the pipe's descriptor may be above 1023
            writable.register(self._pipe, select.POLLOUT)
            while self._pending and not self.failed:   # what waits, as the pipe takes it, until the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired("capture helper", HELPER_EXIT_SECONDS)
                writable.poll(min(left, 1.0) * 1000)
                self._send()
            self._pending.clear()
            helper.stdin.close()
            helper.stdin = None               # closed here: communicate() must not flush it
            out, _ = helper.communicate(timeout=max(0.0, deadline - time.monotonic()))
            if out and out.strip():
                self.helper_counters = json.loads(out.decode().strip().splitlines()[-1])
            if helper.returncode and not self.failed:
                self.failed = f"the capture helper process exited with code {helper.returncode}"
                logger.warning("lmdeploy-hostcache: %s; serving goes on without capture", self.failed)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
            self.failed = self.failed or (f"the capture helper process did not finish within {HELPER_EXIT_SECONDS:g} s "
                                          "at close; it was stopped and what it had not written is lost")
            logger.warning("lmdeploy-hostcache: %s", self.failed)
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            helper.kill()
            if not self.failed:
                self.failed = f"{type(exc).__name__}: {exc}"
                logger.warning("lmdeploy-hostcache: the capture helper did not finish (%s)", self.failed)


class _AllIds:
    """``seq.all_ids`` of a sequence without LMDeploy's ``history_cache`` (tests), read the same way."""

    __slots__ = ("ids",)

    def __init__(self, ids) -> None:
        self.ids = ids

    def get_real(self):
        return self.ids


_I64 = np.dtype(np.int64)
_U64 = np.dtype(np.uint64)
_MAX_TOKEN = (1 << 32) - 1


def _same_value_casts() -> bool:
    """Whether this NumPy checks a cast's values (``casting="same_value"``: NumPy 2.4 on)."""
    try:
        np.zeros(1, _I64).astype(TOKEN_DTYPE, casting="same_value")
        return True
    except (TypeError, ValueError):
        return False


_SAME_VALUE = _same_value_casts()


def _token_array(arrays) -> np.ndarray:
    """``encode_tokens`` of the arrays laid end to end, as an array of ``TOKEN_DTYPE`` whose buffer is
    those bytes (ValueError for an id outside [0, 2**32)): for LMDeploy's int64 ids one cast that
    checks the values as it goes (``casting="same_value"``, NumPy 2.4 on: no reduction, whose
    machinery is cold in a flush; before, one range check and one cast), else ``encode_tokens``
    (which names the range when an id is outside it).  The capture's helper process is sent this
    buffer as it is; ``_token_bytes`` is its bytes."""
    if not arrays:
        return np.zeros(0, TOKEN_DTYPE)
    tokens = np.concatenate(arrays)
    if tokens.dtype == _I64:
        if _SAME_VALUE:
            try:
                return tokens.astype(TOKEN_DTYPE, casting="same_value")
            except ValueError:
                pass        # an id outside the range: encode_tokens raises, naming it
        elif not tokens.size or int(tokens.view(_U64).max()) <= _MAX_TOKEN:
            # older NumPy: one range check (read as unsigned, a negative id is above the range too)
            return tokens.astype(TOKEN_DTYPE)
    return np.frombuffer(encode_tokens(tokens), TOKEN_DTYPE)


def _token_bytes(arrays) -> bytes:
    """``_token_array``'s bytes: what the encoder reads on the scheduler's thread."""
    return _token_array(arrays).tobytes()


def _token_store(seq, full: int):
    """What a record reads its first ``full`` ids from (None when ``full`` is 0): seq.all_ids is
    history_cache[:num_all_ids], and full <= num_valid_ids - 1 < num_all_ids when it covers output tokens
    (full <= input_end_pos <= num_all_ids otherwise), so its first ``full`` ids are
    history_cache.get_real()[:full] (a sequence without one, as in tests: all_ids)."""
    if not full:
        return None
    tokens = getattr(seq, "history_cache", None)
    return _AllIds(seq.all_ids) if tokens is None else tokens


def _arrival_of(snap) -> float:
    return snap[0]


def _flush_when_idle(ref, stop: threading.Event) -> None:
    """The idle flusher thread's loop: every ``IDLE_FLUSH_SECONDS`` until ``stop`` is set, the capture is
    gone or ``_flush_idle_once`` says it is closed or failed."""
    while not stop.wait(IDLE_FLUSH_SECONDS):
        capture = ref()
        if capture is None or not capture._flush_idle_once():
            return
        del capture


def data_parallel_path(path: str, dp_rank: int) -> str:
    """The capture file of data-parallel engine ``dp_rank``: ``cap.jsonl`` -> ``cap.dp1.jsonl`` (each engine
    writes, rotates and sets aside its own file; its rotated files are ``cap.dp1.<n>.jsonl``)."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.dp{int(dp_rank)}{p.suffix}"))


def capture_from_config(hostcache, block_size: int, namespaces, dp_rank: int | None = None) -> TraceCapture | None:
    """A ``TraceCapture`` when the ``capture`` setting names a file, else None.  A bad shared key
    (``LMDEPLOY_HOSTCACHE_CAPTURE_KEY``) is logged and capture stays off: serving never stops.
    ``dp_rank``: this engine's rank when LMDeploy runs several data-parallel engines with the same
    settings; each then captures to its own file (``data_parallel_path``), never to a shared one."""
    path = getattr(hostcache, "capture", "") or ""
    if not path:
        return None
    if dp_rank is not None:
        path = data_parallel_path(path, dp_rank)
    try:
        return TraceCapture(path, int(float(getattr(hostcache, "capture_max_mb", 256)) * 2**20), block_size,
                            namespaces, offload=bool(getattr(hostcache, "capture_offload", True)),
                            keep_files=int(getattr(hostcache, "capture_keep_files", 0)))
    except Exception as exc:  # noqa: BLE001
        logger.warning("lmdeploy-hostcache: trace capture to %s is off: %s", path, exc)
        return None
