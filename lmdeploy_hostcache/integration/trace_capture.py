"""LMDeploy glue of trace capture: one record per finished request, from the scheduler role.

``HostTierScheduler`` calls ``on_new_request(seq)`` (LMDeploy registered a sequence) and
``on_request_finished(seq, chain)`` (LMDeploy ended it, finished or aborted; ``chain``: the host
tier's digest chain of the request, or None) when ``capture`` is set.  At the end the record is
built from what the sequence holds: the prompt is ``seq.all_ids[:seq.input_end_pos]`` (read as
``seq.history_cache.get_real()[:full]``, the prompt's ``full`` full-block ids: ``all_ids`` is
``history_cache[:num_all_ids]``, ``history_cache[...]`` is ``get_real()[...]``, and
``full <= input_end_pos <= num_all_ids``; a sequence without a ``history_cache``, as in tests, is read
through ``all_ids``), the output length
``seq.num_all_ids - seq.input_end_pos``, the block ids the capture key's ids of the prompt's full-block
digests (the same chained digests the host tier uses, in the request's namespace: model, block size, KV format,
tenant salt, adapter, rooted at the request's cache salt when it has one).  The arrival is the capture clock's
reading at ``on_new_request`` (wall-clock seconds by default; a test may pass another clock).

Everything runs on the scheduler's thread, when LMDeploy registers a sequence (``on_new_request``) and inside
its ``end_session`` (``seconds`` sums both hooks' time, flushes included): a capture thread was tried and
measured worse, because its hashing competes for the GIL with the scheduler (docs/planner.md "Capturing your
own traffic").  The file is opened and the base model's chain root computed when the engine starts
(``open_seconds``; an unwritable path shows then).  The hook only takes what the record needs from the
sequence (``snapshot``: no hashing, no copy, no numpy call: a reference to the sequence's token store and the
length of the prompt's full blocks; LMDeploy never writes an ended sequence's tokens again, it drops them) and
the host tier's digest chain of the request (``connector._RequestChain``, a reference the connector drops
right after) and queues them (``on_request_finished`` runs ``snapshot``'s code inline, one call less in a hook
that runs cold; ``tests/capture`` checks that both give the same tuple); every ``FLUSH_RECORDS`` queued
requests, or at the first request end ``FLUSH_SECONDS`` after the oldest queued one, or at
``close``/interpreter exit, the queue is encoded (``encode_many``: the prompts' ids sliced, laid end to end
and encoded by one value-checked cast, chained digests, keyed ids, JSON lines) and written with one
``os.write``: one warm pass over a batch costs far less than a cold pass per request.
A process killed without ``close`` loses the records still queued (at most ``FLUSH_RECORDS - 1``).
Digests are computed only where nothing already holds them: a prompt that continues one captured
earlier with the same first block (the next turn of a conversation) takes that prompt's digests and
ids, so a turn costs its new blocks, not its whole history; up to ``RECENT_PER_BLOCK`` prompts are
remembered per first block (conversations that share a system prompt interleave), under at most
``RECENT_PROMPTS`` first blocks, each with an xxh3 of its token bytes to check the continuation, and
the newest one the prompt continues is taken (it then replaces that one).  The blocks the host tier's
lookup hashed (from the request's GPU-matched prefix on) are taken from its chain where it holds at
least ``CHAIN_MIN_BLOCKS`` of the blocks still to digest (below that, hashing them from the batch's
bytes costs less than reading the chain's objects, cold by then: they are not read at all where fewer
than that many blocks are left), the chain's parent digest is the one
computed here and its block bytes equal the prompt's (so the ids are those of the formula whatever the
chain holds).  A batch whose sequences hold fewer ids than their prompts' full blocks is not written
(an error: capture stops).  Counters: ``records`` (hook calls), ``blocks_hashed`` and ``blocks_reused``
(chain steps run and skipped: each full prompt block is hashed at most once per request),
``blocks_from_chain`` (of the skipped ones, taken from the host tier's chain), ``flushes``
(``flushes_by_age`` of them by ``FLUSH_SECONDS``); ``key.derived`` counts keyed hashes
(``capture/keys.py``).  The remembered prompts and the key's id memo live in process
memory only (digests, ids and an xxh3 of tokens; never written).

Invariants: neither hook ever raises into LMDeploy (any error turns capture off for the engine,
logged once: ``capture/writer.py`` for file errors, here for everything else; after either, the hooks
do no work); a sequence seen
only at its end gets an arrival from LMDeploy's ``arrive_time`` (``perf_counter`` based, mapped
to the capture clock); multimodal prompts are captured with their token ids' digests like any
other (the host tier never stores their blocks, which the planner cannot know).
"""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from time import perf_counter
from typing import Callable

import numpy as np
from xxhash import xxh3_128_intdigest as _xxh3_128

from ..capture import CaptureKey, RotatingWriter
from ..capture.record import _FAST_MS, json_string, timestamp_text
from ..digest import TOKEN_DTYPE, encode_tokens, salted_root
from .request_salt import sequence_salt

logger = logging.getLogger("lmdeploy_hostcache.capture")

FLUSH_RECORDS = 64      # queued requests encoded and written together
RECENT_PROMPTS = 128    # first blocks under which prompts are remembered for a later one that continues one
RECENT_PER_BLOCK = 4    # ... and prompts remembered per first block (conversations sharing a system prompt)
FLUSH_SECONDS = 1.0     # ... or sooner, at the first request end this long after the oldest queued one
# the host tier's chain of a request is read only where it holds at least this many of the blocks still to
# digest: reading its objects (cold by then) costs more than hashing a few blocks from the batch's bytes
CHAIN_MIN_BLOCKS = 8


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
        self._queue: list[tuple] = []     # snapshots not yet written
        self._queued_at = 0.0             # perf_counter when the oldest queued snapshot was taken
        self._roots: dict[tuple, tuple[int, int, bytes]] = {}    # (adapter, salt) -> (chain root, seed, root bytes)
        # first block's digest -> [(bytes, xxh3 of its tokens, blocks, last digest, ids' text), ...] of the
        # latest prompts with that first block (at most RECENT_PER_BLOCK, newest last)
        self._recent: dict[int, list] = {}
        # the constant part of every line after the ids (capture_line's layout)
        self._after_ids = f'],"block_size":{self.block_size},"capture":{json_string(self.key.fingerprint)}'
        self.flush_records = FLUSH_RECORDS
        self.flush_seconds = FLUSH_SECONDS
        self.chain_min_blocks = CHAIN_MIN_BLOCKS
        self.failed = ""
        self.seconds = 0.0          # time spent in the hooks and flushes, inside LMDeploy's scheduler step
        self.records = 0
        self.blocks_hashed = 0
        self.blocks_reused = 0
        self.blocks_from_chain = 0  # of blocks_reused: digests taken from the host tier's chain of the request
        self.flushes = 0
        self.flushes_by_age = 0     # of which: the oldest queued record waited FLUSH_SECONDS
        atexit.register(_flush_at_exit, weakref.ref(self))
        logger.info("lmdeploy-hostcache: capturing request traces to %s (key fingerprint %s)", path,
                    self.key.fingerprint)
        self._root(None, "")        # the base model's unsalted root, computed at engine start
        t0 = time.perf_counter()
        if not self.writer.open():  # at engine start, not in a request's step: a bad path shows now
            self.failed = self.writer.failed     # (logged by the writer)
        self.open_seconds = time.perf_counter() - t0

    def on_new_request(self, seq) -> None:
        if self.failed:
            return
        t0 = perf_counter()
        try:
            self._arrival[seq.seq_id] = (seq.input_start_pos, self.clock())
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            self._fail(exc)
        self.seconds += perf_counter() - t0

    def on_request_finished(self, seq, chain=None) -> None:
        """``chain``: the host tier's digest chain of this request (``connector._RequestChain``), when
        its lookup computed one; its digests are taken where they check out (``encode_many``)."""
        if self.failed:
            self._arrival.pop(getattr(seq, "seq_id", None), None)
            return
        t0 = perf_counter()
        queue = self._queue
        try:
            if not queue:
                self._queued_at = t0
            # snapshot(seq, chain), inlined: the same tuple (tests/capture), one call less in a cold hook
            noted = self._arrival.pop(seq.seq_id, None)
            start = seq.input_start_pos
            if noted is not None and noted[0] == start:
                arrival = noted[1]
            else:  # a later turn of a session, or registered before capture began
                arrival = self.clock() - max(0.0, time.perf_counter() - float(seq.arrive_time))
            prompt_len = seq.input_end_pos
            full = prompt_len - prompt_len % self.block_size
            output_len = seq.num_all_ids - prompt_len
            if full:
                try:
                    tokens = seq.history_cache
                except AttributeError:
                    tokens = _AllIds(seq.all_ids)
            else:
                tokens = None
            queue.append((arrival, prompt_len, output_len if output_len > 0 else 0, tokens, full, seq.adapter_name,
                          sequence_salt(seq), seq.session.session_id if start > 0 else None, chain))
            if len(queue) >= self.flush_records:
                self._flush()
            elif t0 - self._queued_at >= self.flush_seconds:
                self.flushes_by_age += 1
                self._flush()
        except Exception as exc:  # noqa: BLE001 -- never into LMDeploy
            self._fail(exc)
        self.seconds += perf_counter() - t0
        self.records += 1

    def flush(self) -> None:
        """Encode and write the queued records now (never raises)."""
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
        self.flushes += 1
        self.writer.write_lines(self.encode_many(queue))
        if self.writer.failed:      # a file error (logged by the writer): the hooks do no more work
            self.failed = self.writer.failed
            self._arrival.clear()

    def record(self, seq, chain=None) -> str:
        """The JSON line of a sequence LMDeploy is ending."""
        return self.encode(self.snapshot(seq, chain))

    def snapshot(self, seq, chain=None) -> tuple:
        """What the record needs from the sequence (cheap: no hashing, no copy, no numpy call: LMDeploy's
        token store of the sequence, ``seq.history_cache``, and the length of the prompt's full blocks;
        ``encode_many`` slices it, LMDeploy never writes an ended sequence's tokens again) and the host
        tier's chain (a reference: the connector drops it right after, nothing changes it any more)."""
        noted = self._arrival.pop(seq.seq_id, None)
        start = seq.input_start_pos
        if noted is not None and noted[0] == start:
            arrival = noted[1]
        else:  # a later turn of a session, or registered before capture began
            arrival = self.clock() - max(0.0, time.perf_counter() - float(seq.arrive_time))
        prompt_len = seq.input_end_pos
        full = prompt_len - prompt_len % self.block_size
        output_len = seq.num_all_ids - prompt_len
        if full:
            # seq.all_ids is history_cache[:num_all_ids], and full <= input_end_pos <= num_all_ids: its first
            # ``full`` ids are history_cache.get_real()[:full] (a sequence without one, as in tests: all_ids)
            tokens = getattr(seq, "history_cache", None)
            if tokens is None:
                tokens = _AllIds(seq.all_ids)
        else:
            tokens = None
        return (arrival, prompt_len, output_len if output_len > 0 else 0, tokens, full, seq.adapter_name,
                sequence_salt(seq), seq.session.session_id if start > 0 else None, chain)

    def encode(self, snap: tuple) -> str:
        """The JSON line of a snapshot: chained digests, keyed ids, the record."""
        return self.encode_many((snap,))[0]

    def encode_many(self, snaps) -> list[str]:
        """The JSON lines of snapshots.  The digests are ``digest.py``'s chain (``block_digest`` from
        the request's salted root, as ``ChainHasher`` computes it): the prompts' full-block ids of the
        whole batch are sliced, laid end to end and encoded by one value-checked cast (``_token_bytes``); a block's
        digest is then taken, in this order, from the newest remembered prompt this one continues (same
        first block, the remembered bytes' xxh3 equal), from the host tier's chain of the request (only
        where it holds at least ``chain_min_blocks`` of the blocks still to digest, its parent digest is
        the one computed here, its seed is the request's and its block bytes equal the prompt's), else
        computed (``block_digest``'s formula, inlined; ``blocks_hashed`` counts them).  Each line is
        ``capture_line``'s (formatted here, field for field the same: tests compare), from the ids'
        text (``CaptureKey.block_ids_text``)."""
        data = _token_bytes([snap[3].get_real()[:snap[4]] for snap in snaps if snap[3] is not None])
        view = memoryview(data)     # slices without copies, for the xxh3 checks
        bs = self.block_size
        step = bs * _ITEM
        roots, key, recent = self._roots, self.key, self._recent
        base = roots.get((None, "")) or self._root(None, "")
        ids_text = key.block_ids_text
        chain_min = self.chain_min_blocks if self.chain_min_blocks > 0 else 1
        after_ids = self._after_ids
        lines = []
        append = lines.append
        offset = total = hashed = from_chain = 0
        for arrival, prompt_len, output_len, tokens, full, adapter_name, salt, session, chain in snaps:
            if tokens is None:
                text = ""
            else:
                if adapter_name is None and not salt:
                    parent, seed, root_bytes = base
                else:
                    parent, seed, root_bytes = roots.get((adapter_name, salt)) or self._root(adapter_name, salt)
                end = offset + full * _ITEM
                blocks = full // bs
                total += blocks
                first = _xxh3_128(root_bytes + data[offset:offset + step], seed)
                hashed += 1
                # the remembered prompts with this first block, newest last: the newest one this prompt
                # continues gives its digests and ids
                kept = recent.get(first)
                seen = None
                if kept is not None:
                    size = end - offset
                    for at in range(len(kept) - 1, -1, -1):
                        prior = kept[at]
                        if prior[0] <= size and _xxh3_128(view[offset:offset + prior[0]]) == prior[1]:
                            seen = prior
                            del kept[at]     # this prompt takes its place: it holds the same and more
                            break
                if seen is not None:
                    j, parent, text = seen[2], seen[3], seen[4]   # this prompt continues that one
                    new = []
                else:
                    j, parent, new, text = 1, first, [first], ""
                # the host tier's chain covers blocks [cs, ce) of this prompt: digests ds, token bytes bb; its
                # objects are not read where fewer than chain_min blocks are left to digest (ce <= blocks)
                if chain is not None and blocks - j >= chain_min:
                    h = chain.hasher
                    ds = h.digests
                    cs = chain.start_block
                    ce = cs + len(ds)
                    if ce > blocks:
                        ce = blocks
                    if ce - (j if j > cs else cs) >= chain_min and h.namespace.seed == seed:
                        if j < cs:   # up to the chain's first block
                            for at in range(offset + j * step, offset + cs * step, step):
                                parent = _xxh3_128(parent.to_bytes(16, "little") + data[at:at + step], seed)
                                new.append(parent)
                            hashed += cs - j
                            j = cs
                        if (parent == (ds[j - cs - 1] if j > cs else h.parent)
                                and b"".join(h.block_bytes[j - cs:ce - cs])
                                == data[offset + j * step:offset + ce * step]):
                            new += ds[j - cs:ce - cs]
                            parent = new[-1]
                            from_chain += ce - j
                            j = ce
                if j < blocks:
                    for at in range(offset + j * step, end, step):
                        parent = _xxh3_128(parent.to_bytes(16, "little") + data[at:at + step], seed)
                        new.append(parent)
                    hashed += blocks - j
                if new:
                    more = ids_text(new)
                    text = f"{text},{more}" if text else more
                prior = (end - offset, _xxh3_128(view[offset:end]), blocks, parent, text)
                if kept is None:
                    if len(recent) >= RECENT_PROMPTS:
                        recent.clear()
                    recent[first] = [prior]
                else:
                    if len(kept) >= RECENT_PER_BLOCK:
                        del kept[0]
                    kept.append(prior)
                offset = end
            ms = arrival * 1000.0
            if -_FAST_MS < ms < _FAST_MS:   # timestamp_text's fast form, inlined
                stamp = "%.3f" % ms
                if stamp[-1] == "0":
                    stamp = stamp.rstrip("0")
                    if stamp[-1] == ".":
                        stamp += "0"
            else:
                stamp = timestamp_text(arrival)
            append(f'{{"timestamp":{stamp},"input_length":{prompt_len},"output_length":{output_len},'
                   f'"hash_ids":[{text}{after_ids}}}\n' if session is None else
                   f'{{"timestamp":{stamp},"input_length":{prompt_len},"output_length":{output_len},'
                   f'"hash_ids":[{text}{after_ids},"session":{json_string(key.session_id(session))}}}\n')
        if offset != len(data):     # nothing written: some sequence held fewer ids than its prompt's blocks
            raise ValueError(f"capture batch: {len(data)} token bytes for {offset} bytes of full prompt blocks")
        self.blocks_hashed += hashed
        self.blocks_from_chain += from_chain
        self.blocks_reused += total - hashed
        return lines

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

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        self._arrival.clear()
        self._queue.clear()
        logger.warning("lmdeploy-hostcache: trace capture stopped after an unexpected error (%s); serving goes on "
                       "without capture", self.failed)

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _AllIds:
    """``seq.all_ids`` of a sequence without LMDeploy's ``history_cache`` (tests), read the same way."""

    __slots__ = ("ids",)

    def __init__(self, ids) -> None:
        self.ids = ids

    def get_real(self):
        return self.ids


_ITEM = TOKEN_DTYPE.itemsize     # bytes per token id in a digest's block bytes
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


def _token_bytes(arrays) -> bytes:
    """``encode_tokens`` of the arrays laid end to end (ValueError for an id outside [0, 2**32)): for
    LMDeploy's int64 ids one cast that checks the values as it goes (``casting="same_value"``, NumPy 2.4
    on: no reduction, whose machinery is cold in a flush; before, one range check and one cast), else
    ``encode_tokens`` (which names the range when an id is outside it)."""
    if not arrays:
        return b""
    tokens = np.concatenate(arrays)
    if tokens.dtype == _I64:
        if _SAME_VALUE:
            try:
                return tokens.astype(TOKEN_DTYPE, casting="same_value").tobytes()
            except ValueError:
                pass        # an id outside the range: encode_tokens raises, naming it
        elif not tokens.size or int(tokens.view(_U64).max()) <= _MAX_TOKEN:
            # older NumPy: one range check (read as unsigned, a negative id is above the range too)
            return tokens.astype(TOKEN_DTYPE).tobytes()
    return encode_tokens(tokens)


def _flush_at_exit(ref) -> None:
    capture = ref()
    if capture is not None:
        capture.flush()
        capture.writer.close()


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
