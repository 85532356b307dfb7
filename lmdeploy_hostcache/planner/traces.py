"""Request traces: a common in-memory form and readers for Mooncake JSONL and WEKA session JSON.

A trace carries chained *block ids*, not tokens: block ``i`` of two requests has the same id
only if the two prompts agree on every token up to the end of block ``i``.  Invariants of
``Trace`` (checked by ``Trace.__post_init__`` / the readers, which raise ``ValueError`` naming
the file, line and field):

* ``block_size`` > 0 and every request's ``input_length`` >= 0;
* a request lists at most ``ceil(input_length / block_size)`` block ids (Mooncake lists the
  partial last block too, WEKA lists full blocks only);
* requests are sorted by ``timestamp`` (seconds; stable, so ties keep file order);
* block ids are unique inside one trace's id space (merged files are offset, never mixed);
* every timestamp is finite (a NaN would make the arrival order undefined: refused, with a count);
* a file that cannot be read or decoded (a corrupt or mislabelled ``.gz``, a folder, bytes that
  are not UTF-8) raises ``ValueError`` naming the file, never ``OSError``/``EOFError``;
  ``read_traces`` reads regular files only: a FIFO, a pipe (``<(...)``) or a device is refused
  before anything is read (a trace is read more than once, and a FIFO with no writer would block);
* a Mooncake-layout record may state its own ``block_size`` (captured files do, see
  ``lmdeploy_hostcache/capture``): every record of a file must then state the same one, and a
  caller's ``block_size`` that differs is refused naming the file, line and field.  Without it the
  caller's block size applies (default 512, Mooncake's);
* a record's ``session`` (str or int) is its session key; ``capture`` (a key fingerprint) marks
  keyed block ids: several files are merged into one id space only when every record of every
  file carries the same fingerprint (captures made with one key), never otherwise;
* a record's optional ``output_hash_ids`` (captured files since they carry it; Mooncake, WEKA and
  older captures have none) are the ids of the full blocks past the prompt's whose KV the request
  computed while decoding (``capture/record.py``): exactly ``kept_output_blocks(input_length,
  output_length, block_size)`` ids, the prompt's full blocks all named by ``hash_ids``; the request
  carries them (``Request.output_hash_ids``, None when absent) and the replays store its kept output
  blocks under them, so a later prompt that re-sends the reply hits them.

``read_traces(files_or_folders, fmt, block_size, stagger_s)`` reads any of these into one trace
(format sniffed per file; the planner and ``bench eviction --trace`` both use it).

``trace_warnings(trace)`` lists what a trace can be read with but probably not replayed
faithfully (block ids out of order or not chained, an ``input_length`` its ids do not cover),
each with a count; the planner prints them.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import stat
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..capture.record import kept_output_blocks
from ..yamlio import file_kind

MOONCAKE_BLOCK_SIZE = 512
WEKA_BLOCK_SIZE = 64


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt: arrival time (s), token counts, chained block ids and a session key."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session: int | str
    # ids of the full blocks past the prompt's that the request computed while decoding (its output blocks,
    # ``capture.record.kept_output_blocks`` of them), chained after the prompt's full blocks; None: not known
    # (the replays then give those blocks digests no request produces)
    output_hash_ids: tuple[int, ...] | None = None
    # False when the reader derived ``session`` (``derive_session``: a Mooncake record without one), which
    # no client sends: the cache-aware router's session affinity then gets no key (planner/cluster_routing.py)
    session_given: bool = True

    def prompt_blocks(self, block_size: int) -> int:
        """Blocks the prompt occupies, the partial last block included."""
        return -(-self.input_length // block_size)

    def full_blocks(self, block_size: int) -> int:
        """Full blocks with a known id: the only blocks a prefix cache stores."""
        return min(len(self.hash_ids), self.input_length // block_size)

    def matchable_blocks(self, block_size: int) -> int:
        """Blocks a prefix match may reuse: LMDeploy always recomputes the last prompt token,
        so a full block that ends exactly at the prompt's end is never reused."""
        return min(len(self.hash_ids), max(self.input_length - 1, 0) // block_size)


@dataclass
class Trace:
    """A replayable list of requests in one block-id space."""

    name: str
    block_size: int
    requests: list[Request] = field(default_factory=list)
    source: str = ""
    # Fingerprint of the capture key when the block ids are keyed hashes (captured files): their
    # order inside a request carries no meaning, so ``trace_warnings`` does not check it.
    capture_key: str = ""
    # what the readers skipped, one sentence each (``trace_warnings`` reports them)
    read_warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"trace {self.name!r}: block_size must be a positive int, got {self.block_size!r}")
        bs = self.block_size
        for i, r in enumerate(self.requests):
            if len(r.hash_ids) > r.prompt_blocks(bs):
                raise ValueError(
                    f"trace {self.name!r} request {i}: hash_ids has {len(r.hash_ids)} ids but input_length "
                    f"{r.input_length} spans only {r.prompt_blocks(bs)} blocks of {bs}")
            out = r.output_hash_ids
            if out is not None and (len(out) != kept_output_blocks(r.input_length, r.output_length, bs)
                                    or out and len(r.hash_ids) < r.input_length // bs):
                raise ValueError(
                    f"trace {self.name!r} request {i}: output_hash_ids has {len(out)} ids but input_length "
                    f"{r.input_length} and output_length {r.output_length} leave "
                    f"{kept_output_blocks(r.input_length, r.output_length, bs)} full blocks of {bs} past the "
                    "prompt's (whose ids hash_ids must all name)")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.input_length for r in self.requests)

    @property
    def total_prompt_blocks(self) -> int:
        bs = self.block_size
        return sum(r.prompt_blocks(bs) for r in self.requests)

    def head(self, n: int) -> "Trace":
        """The first ``n`` requests (for quick looks and tests)."""
        if n < 0:
            raise ValueError(f"limit must be >= 0, got {n}")
        return Trace(self.name, self.block_size, self.requests[:n], self.source, self.capture_key,
                     list(self.read_warnings))


GZIP_MAGIC = b"\x1f\x8b"


def _same_content(plain: Path, compressed: Path) -> bool:
    """Whether ``compressed`` (gzip) holds exactly ``plain``'s bytes (read in pieces, stopping at the first
    difference; a file that cannot be read counts as different, and its reader reports it)."""
    try:
        with open(plain, "rb") as a, gzip.open(compressed, "rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except READ_ERRORS:
        return False
# Errors reading a file can raise besides ValueError: turned into one ValueError naming the file.
READ_ERRORS = (OSError, EOFError, zlib.error)


def _open_bytes(path: str | os.PathLike) -> io.BufferedIOBase:
    """Bytes of a trace file, gunzipped when its first bytes are the gzip magic (whatever its name)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a trace file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rb")
    if path.suffix == ".gz":
        raise ValueError(f"{path}: named .gz but not gzip-compressed")
    return open(path, "rb")


def _text(raw: bytes, where: str, whole_file: bool) -> str:
    """``raw`` as UTF-8, without a leading byte-order mark (an editor's, at a file's start); a bad byte is
    named by its column (and, in a whole file, its line)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        at = f"line {line}, byte {col}" if whole_file else f"byte {col}"
        raise ValueError(f"{where}: not UTF-8 text ({at})") from None


def _json(text: str, where: str):
    """One JSON document; every way it can fail (syntax, nesting too deep, an int too long to convert) is
    one ValueError naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f" at line {exc.lineno}" if exc.lineno > 1 else ""
        raise ValueError(f"{where}: not JSON ({exc.msg}{at})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:   # e.g. an integer of more than sys.get_int_max_str_digits() digits
        if "integer string conversion" in str(exc):   # Python's advice (set_int_max_str_digits) is not the user's
            raise ValueError(f"{where}: not usable JSON (an integer of more than {sys.get_int_max_str_digits()} "
                             "digits; block ids, lengths and timestamps are below 2**64)") from None
        raise ValueError(f"{where}: not usable JSON ({exc})") from None


def _read_error(path, exc: BaseException) -> ValueError:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        why = f"corrupt or truncated gzip data ({exc})"
    else:
        why = getattr(exc, "strerror", None) or str(exc)
    return ValueError(f"{path}: cannot read the trace: {why}")


MAX_TRACE_BLOCK_ID = 2**64 - 1   # replays encode a block id in 8 bytes (tier.digest.block_id_bytes)
MAX_TIME_VALUE = 1e300   # a time field above this is no time (and a larger int has no float)
MAX_OUTPUT_TOKENS = 10_000_000   # no model generates this many tokens for one request


MAX_TRACE_INT = 2**40   # a length or block size above this is no request (and its GiB would overflow a float)


def _int_field(obj: dict, key: str, where: str, minimum: int = 0, bounded: bool = True) -> int:
    """An int field >= ``minimum`` and (``bounded``) at most ``MAX_TRACE_INT``."""
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or bounded and v > MAX_TRACE_INT:
        shown = f"an int of {v.bit_length()} bits" if isinstance(v, int) and v.bit_length() > 64 else repr(v)[:80]
        raise ValueError(f"{where}: field {key!r} must be an int in [{minimum}, 2**40], got {shown}")
    return v


def _num_field(obj: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in obj:
        if default is None:
            raise ValueError(f"{where}: missing field {key!r}")
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: field {key!r} must be a number >= 0, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        return v  # the readers count these and refuse the file with the count
    if v < 0:
        raise ValueError(f"{where}: field {key!r} must be a number >= 0, got {v!r}")
    if isinstance(v, int) and v > MAX_TIME_VALUE:
        raise ValueError(f"{where}: field {key!r} is out of range (an int of {v.bit_length()} bits; at most "
                         f"{MAX_TIME_VALUE:.0e})")
    return float(v)


class _NonFinite:
    """Counts rows whose time field is NaN/Infinity; ``check`` refuses the file naming the count."""

    def __init__(self, field_name: str) -> None:
        self.field = field_name
        self.count = 0
        self.first = ""

    def see(self, value: float, where: str) -> None:
        if not math.isfinite(value):
            self.count += 1
            self.first = self.first or where

    def check(self, path) -> None:
        if self.count:
            raise ValueError(f"{path}: {self.count} request(s) have a non-finite {self.field!r} (NaN or "
                             f"Infinity), first at {self.first}: arrival order is undefined")


def _hash_ids(obj: dict, where: str) -> tuple[int, ...]:
    if "hash_ids" not in obj:
        raise ValueError(f"{where}: missing field 'hash_ids' (a list of block ids per request)")
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise ValueError(f"{where}: field 'hash_ids' must be a list of ints, got {type(ids).__name__}")
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: field 'hash_ids' must hold ints >= 0, found {v!r}")
        if v > MAX_TRACE_BLOCK_ID:
            raise ValueError(f"{where}: field 'hash_ids' holds an id of {v.bit_length()} bits; block ids are below 2**64")
    return tuple(ids)


def _output_hash_ids(obj: dict, where: str, input_length: int, output_length: int, ids: tuple[int, ...],
                     block_size: int) -> tuple[int, ...] | None:
    """A record's optional ``output_hash_ids``: ints in [0, 2**64), exactly ``kept_output_blocks`` of them,
    after ``hash_ids`` naming every full block of the prompt (the chain they continue)."""
    if "output_hash_ids" not in obj:
        return None
    out = obj["output_hash_ids"]
    if not isinstance(out, list):
        raise ValueError(f"{where}: field 'output_hash_ids' must be a list of ints, got {type(out).__name__}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: field 'output_hash_ids' must hold ints >= 0, found {v!r}"[:200])
        if v > MAX_TRACE_BLOCK_ID:
            raise ValueError(f"{where}: field 'output_hash_ids' holds an id of {v.bit_length()} bits; block ids are "
                             "below 2**64")
    kept = kept_output_blocks(input_length, output_length, block_size)
    if len(out) != kept:
        raise ValueError(f"{where}: field 'output_hash_ids' has {len(out)} ids but input_length {input_length} and "
                         f"output_length {output_length} leave {kept} full blocks of {block_size} past the prompt's "
                         "(the blocks whose KV the request computed: (input + output - 1) // block_size less "
                         "input // block_size)")
    if out and len(ids) < input_length // block_size:
        raise ValueError(f"{where}: field 'output_hash_ids' continues the prompt's {input_length // block_size} full "
                         f"blocks, but 'hash_ids' names only {len(ids)}")
    return tuple(out)


def _output_length(obj: dict, key: str, where: str) -> int:
    n = _int_field(obj, key, where, bounded=False) if key in obj else 0
    if n > MAX_OUTPUT_TOKENS:
        raise ValueError(f"{where}: field {key!r} is {n:,} tokens; no model generates more than "
                         f"{MAX_OUTPUT_TOKENS:,} for one request")
    return n


def derive_session(hash_ids: Sequence[int]) -> int:
    """Session key for traces without one: the second block id (the first block is a prompt
    every request shares in the Mooncake traces), else the first, else -1 for empty prompts.

    Requests that share their second block share more than the system prompt, so they are
    turns of one conversation (or questions over one document) -- the unit a session-sticky
    router keeps on one node."""
    if len(hash_ids) >= 2:
        return hash_ids[1]
    return hash_ids[0] if hash_ids else -1


class _MooncakeFile:
    """What the records of one Mooncake-layout file state about themselves (block size, key)."""

    def __init__(self, path, block_size: int | None) -> None:
        self.path = path
        self.given = block_size          # the caller's (--block-size), None: not given
        self.block_size: int | None = None
        self.block_size_where = ""
        self.capture: str | None = None  # None: no record seen yet; "": records without a key
        self.capture_where = ""

    def record_block_size(self, obj: dict, where: str) -> int:
        if "block_size" not in obj:
            stated = None
        else:
            stated = _int_field(obj, "block_size", where, minimum=1)
        if self.block_size is None and not self.block_size_where:
            self.block_size, self.block_size_where = stated, where
            if stated is not None and self.given is not None and stated != self.given:
                raise ValueError(f"{where}: field 'block_size' is {stated} but --block-size {self.given} was given "
                                 "(a captured file states its own block size; drop --block-size)")
        elif stated != self.block_size:
            raise ValueError(f"{where}: field 'block_size' is {stated if stated is not None else 'absent'} but "
                             f"{self.block_size_where} states "
                             f"{self.block_size if self.block_size is not None else 'none'}: one file, one block size")
        return stated or self.given or MOONCAKE_BLOCK_SIZE

    def record_capture(self, obj: dict, where: str) -> None:
        key = obj.get("capture", "")
        if not isinstance(key, str):
            raise ValueError(f"{where}: field 'capture' must be a string (the capture key's fingerprint), got {key!r}")
        if self.capture is None:
            self.capture, self.capture_where = key, where
        elif key != self.capture:
            raise ValueError(f"{where}: field 'capture' is {key or 'absent'!r} but {self.capture_where} has "
                             f"{self.capture or 'none'!r}: records of different captures cannot share one file")


def read_mooncake(path: str | os.PathLike, block_size: int | None = None,
                  name: str | None = None) -> Trace:
    """Mooncake JSONL (``.jsonl`` or ``.jsonl.gz``): ``timestamp`` in ms, ``input_length``,
    ``output_length``, ``hash_ids`` of ``block_size``-token blocks (the partial last block
    included); optional per-record ``block_size``, ``session`` and ``capture`` (captured files).

    ``block_size``: the caller's block size (None: the file's own, else 512); a file that states
    another one is refused."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size <= 0):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    reqs: list[Request] = []
    bad_time = _NonFinite("timestamp")
    meta = _MooncakeFile(path, block_size)
    skipped: list[str] = []
    try:
        with _open_bytes(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    _mooncake_line(_text(raw, where, whole_file=False), where, meta, reqs, bad_time)
                except ValueError as exc:
                    if raw.endswith(b"\n") or _parses_as_json(raw):
                        raise   # a whole line, or a whole JSON value that is not a record: a real error
                    # the last line, unterminated and not whole JSON: a record cut by a crash or still being
                    # written (every record ends in a newline), skipped and reported
                    skipped.append(f"{where}: the last line has no newline and is not a whole record ({exc}); "
                                   "skipped (a write cut short, or one still in progress)")
    except READ_ERRORS as exc:
        raise _read_error(path, exc) from None
    bad_time.check(path)
    reqs.sort(key=lambda r: r.timestamp)
    bs = meta.block_size or block_size or MOONCAKE_BLOCK_SIZE
    return Trace(name or Path(path).name, bs, reqs, source=str(path), capture_key=meta.capture or "",
                 read_warnings=skipped)


def read_mooncake_files(paths: Sequence[str | os.PathLike], block_size: int | None = None,
                        name: str | None = None) -> Trace:
    """One Mooncake-layout file, or several captured files made with one capture key (the same
    ``capture`` fingerprint and block size in every record): merged by arrival time into one id
    space, e.g. the files of every node of a cluster, or one node's rotated files."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_mooncake_files: no files given")
    traces = [read_mooncake(p, block_size) for p in paths]
    cut_only = [t for t in traces if not t.requests and t.read_warnings]   # only a record cut short: skipped
    if cut_only and len(cut_only) < len(traces):
        kept = [(p, t) for p, t in zip(paths, traces) if t.requests or not t.read_warnings]
        paths, traces = [p for p, _ in kept], [t for _, t in kept]
        traces[0].read_warnings[:0] = [w for t in cut_only for w in t.read_warnings]
    if len(traces) == 1:
        if name:
            traces[0].name = name
        return traces[0]
    first = traces[0]
    for p, t in zip(paths, traces):
        if not t.capture_key:
            raise ValueError(f"{p}: Mooncake-layout files are merged only when they are captures made with one key "
                             "(field 'capture' in every record); this file has none: give one trace at a time")
        if t.capture_key != first.capture_key:
            raise ValueError(f"{p}: field 'capture' is {t.capture_key!r} but {paths[0]} has {first.capture_key!r}: "
                             "captures made with different keys share no block ids and cannot be merged")
        if t.block_size != first.block_size:
            raise ValueError(f"{p}: field 'block_size' is {t.block_size} but {paths[0]} states {first.block_size}")
    reqs = sorted((r for t in traces for r in t.requests), key=lambda r: r.timestamp)
    label = name or f"{len(paths)} captured files"
    return Trace(label, first.block_size, reqs, source=", ".join(map(str, paths)), capture_key=first.capture_key,
                 read_warnings=[w for t in traces for w in t.read_warnings])


def _parses_as_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _mooncake_line(line: str, where: str, meta: _MooncakeFile, reqs: list[Request], bad_time: _NonFinite) -> None:
    line = line.strip()
    if not line:
        return
    obj = _json(line, where)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    block_size = meta.record_block_size(obj, where)
    meta.record_capture(obj, where)
    ids = _hash_ids(obj, where)
    inp = _int_field(obj, "input_length", where)
    if len(ids) > -(-inp // block_size):
        raise ValueError(f"{where}: {len(ids)} hash_ids for input_length {inp} "
                         f"(at most {-(-inp // block_size)} blocks of {block_size})")
    ts = _num_field(obj, "timestamp", where)
    bad_time.see(ts, where)
    session = obj.get("session")
    given = session is not None
    if not given:
        session = derive_session(ids)
    elif isinstance(session, bool) or not isinstance(session, (str, int)):
        raise ValueError(f"{where}: field 'session' must be a string or an int, got {session!r}")
    out = _output_length(obj, "output_length", where)
    reqs.append(Request(
        timestamp=ts / 1000.0,
        input_length=inp,
        output_length=out,
        hash_ids=ids,
        session=session,
        output_hash_ids=_output_hash_ids(obj, where, inp, out, ids, block_size),
        session_given=given,
    ))


def _weka_requests(items: list, t0: float, session: str, id_offset: int, where: str,
                   out: list[Request], bad_time: _NonFinite, block_size: int, depth: int = 0) -> int:
    """Flatten WEKA requests (sub-agent requests nested, their ``t`` relative to the sub-agent's
    start); returns the largest local hash id seen."""
    if depth > MAX_SUBAGENT_DEPTH:
        raise ValueError(f"{where}: sub-agents nested more than {MAX_SUBAGENT_DEPTH} deep")
    max_id = 0
    for i, r in enumerate(items):
        w = f"{where} requests[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{w}: expected an object")
        t = t0 + _num_field(r, "t", w, default=0.0)
        bad_time.see(t, w)
        if "hash_ids" not in r and isinstance(r.get("requests"), list):  # sub-agent
            agent = r.get("agent_id", i)
            max_id = max(max_id, _weka_requests(r["requests"], t, f"{session}/{agent}", id_offset, w, out,
                                                 bad_time, block_size, depth + 1))
            continue
        ids = _hash_ids(r, w)
        inp = _int_field(r, "in", w)
        if len(ids) > -(-inp // block_size):
            raise ValueError(f"{w}: {len(ids)} hash_ids for in={inp} (at most {-(-inp // block_size)} blocks of "
                             f"{block_size})")
        if ids:
            max_id = max(max_id, max(ids))
            if max_id + id_offset > MAX_TRACE_BLOCK_ID:
                raise ValueError(f"{w}: block id {max_id} is too large to be offset past the earlier files' ids "
                                 "(merged ids must stay below 2**64): give this file alone")
        out.append(Request(timestamp=t, input_length=inp, output_length=_output_length(r, "out", w),
                           hash_ids=tuple(h + id_offset for h in ids), session=session))
    return max_id


MAX_SUBAGENT_DEPTH = 64


def read_weka(paths: Iterable[str | os.PathLike], stagger_s: float = 0.0, name: str | None = None) -> Trace:
    """Merge WEKA session files: file ``k`` starts ``k * stagger_s`` seconds after the first.

    Hash ids are local to a file, so each file's ids are offset past the previous files' ids;
    the session key is the file's ``id`` (sub-agents get ``id/agent_id``)."""
    if stagger_s < 0:
        raise ValueError(f"stagger_s must be >= 0, got {stagger_s}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_weka: no session files given")
    reqs: list[Request] = []
    block_size = None
    offset = 0
    bad_time = _NonFinite("t")
    for k, path in enumerate(paths):
        try:
            with _open_bytes(path) as fh:
                raw = fh.read()
        except READ_ERRORS as exc:
            raise _read_error(path, exc) from None
        doc = _json(_text(raw, str(path), whole_file=True), str(path))
        where = str(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
            raise ValueError(f"{where}: expected an object with a 'requests' list")
        bs = _int_field(doc, "block_size", where, minimum=1) if "block_size" in doc else WEKA_BLOCK_SIZE
        if block_size is None:
            block_size = bs
        elif bs != block_size:
            raise ValueError(f"{where}: block_size {bs} differs from {block_size} of {paths[0]}")
        scope = doc.get("hash_id_scope", "local")
        if scope != "local":
            raise ValueError(f"{where}: hash_id_scope {scope!r} is not supported (only 'local')")
        session = str(doc.get("id", path.stem))
        max_id = _weka_requests(doc["requests"], k * stagger_s, session, offset, where, reqs, bad_time, bs)
        offset += max_id + 1
    bad_time.check(", ".join(map(str, paths)))
    assert block_size is not None
    reqs.sort(key=lambda r: r.timestamp)
    label = name or (paths[0].name if len(paths) == 1 else f"{len(paths)} WEKA sessions")
    return Trace(label, block_size, reqs, source=", ".join(map(str, paths)))


def sniff_format(path: str | os.PathLike) -> str:
    """'mooncake' or 'weka' from the file's first non-blank line."""
    try:
        with _open_bytes(path) as fh:
            first, lineno, cut = b"", 0, False
            for lineno, raw in enumerate(fh, 1):          # the first non-blank line, whole
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")   # a byte-order mark (an editor's): not content
                if raw.strip():
                    first, cut = raw.strip(), not raw.endswith(b"\n")
                    break
    except READ_ERRORS as exc:
        raise _read_error(path, exc) from None
    if not first:
        raise ValueError(f"{path}: empty trace file")
    _text(first, f"{path}:{lineno}", whole_file=False)
    if not first.startswith(b"{"):
        raise ValueError(f"{path}: neither Mooncake JSONL nor WEKA session JSON")
    try:   # a line that is a whole object is a Mooncake record unless it is a session with a 'requests' list
        obj = json.loads(first)
    except (ValueError, RecursionError):
        # the file's only line, cut short (a capture's first record killed mid-write): the Mooncake
        # reader skips it and says so; else an object spread over several lines (or not JSON: the WEKA
        # reader says where)
        return "mooncake" if cut else "weka"
    return "weka" if isinstance(obj, dict) and isinstance(obj.get("requests"), list) else "mooncake"


TRACE_FORMATS = ("auto", "mooncake", "weka")


def _empty_file(f: Path) -> bool:
    """A regular file of no bytes: it holds no requests (a capture's live file before any traffic)."""
    return f.is_file() and f.stat().st_size == 0


def list_trace_files(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The files ``read_traces`` reads for ``sources``, in order, each once: a folder gives its non-empty
    ``*.json``, ``*.jsonl``, ``*.jsonl.gz``; every one a regular file (a FIFO, pipe or device is refused
    unopened).  Raises ``ValueError`` naming the source."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for t in sources:
        tp = Path(t)
        try:   # os.stat, not Path.is_dir/exists: those raise under a folder this user cannot enter
            is_dir = stat.S_ISDIR(os.stat(tp).st_mode)
            if is_dir:
                os.listdir(tp)   # Path.glob would take an unreadable folder for an empty one
        except FileNotFoundError:
            raise ValueError(f"trace file {tp} does not exist") from None
        except OSError as exc:   # permission denied, a symlink loop
            raise ValueError(f"trace {tp}: cannot read it: {exc.strerror or exc}") from None
        if is_dir:
            found = sorted(tp.glob("*.json")) + sorted(tp.glob("*.jsonl")) + sorted(tp.glob("*.jsonl.gz"))
            if not found:
                raise ValueError(f"trace folder {tp} holds no *.json / *.jsonl files")
            # an empty file in a folder holds no requests yet (a capture's live file before any traffic)
            found = [f for f in found if not _empty_file(f)]
            if not found:
                raise ValueError(f"trace folder {tp} holds only empty files")
            names = {f.name for f in found}
            twice = next((f for f in found if f.name.endswith(".gz") and f.name[:-3] in names
                          and _same_content(f.with_name(f.name[:-3]), f)), None)
            if twice is not None:   # gzip -k leaves both: every request would count twice
                raise ValueError(f"trace folder {tp} holds {twice.name[:-3]} and {twice.name}, the same file plain "
                                 "and compressed: keep one of them")
        else:
            found = [tp]
        for f in found:     # a file named twice (or a folder and a file in it) is read once
            try:
                key = f.resolve()
            except (OSError, RuntimeError) as exc:   # a symlink loop (RuntimeError before Python 3.13)
                raise ValueError(f"trace file {f}: cannot read it: {exc}") from None
            if key not in seen:
                seen.add(key)
                paths.append(f)
    if not paths:
        raise ValueError("no trace files given")
    if len(paths) > 1:   # an empty file among several (a live capture file right after a rotation), as in a folder
        nonempty = [f for f in paths if not _empty_file(f)]
        if not nonempty:
            raise ValueError(f"the trace files given ({', '.join(map(str, paths))}) are all empty")
        paths = nonempty
    for f in paths:
        try:
            mode = f.stat().st_mode
        except OSError as exc:   # e.g. a dangling symlink in a folder
            raise ValueError(f"trace file {f}: cannot read it: {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):   # never opened: a FIFO with no writer would block here
            raise ValueError(f"trace file {f} is {file_kind(mode)}, not a regular file: write the trace to a file "
                             "(it is read more than once)")
    return paths


def read_traces(sources: Sequence[str | os.PathLike], fmt: str = "auto", block_size: int | None = None,
                stagger_s: float = 0.0) -> Trace:
    """One trace from files and folders (a folder gives its ``*.json``, ``*.jsonl``, ``*.jsonl.gz``):
    several WEKA session files are merged (file ``k`` starts ``k * stagger_s`` s after the first),
    several Mooncake-layout files only when they are captures made with one key
    (``read_mooncake_files``).  ``fmt`` 'auto' sniffs every file and refuses a mix; ``block_size``
    applies to Mooncake-layout files only (a WEKA file states its own)."""
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"trace format must be one of {TRACE_FORMATS}, got {fmt!r}")
    paths = list_trace_files(sources)
    if fmt == "auto":
        fmts: dict[str, Path] = {}
        for x in paths:
            fmts.setdefault(sniff_format(x), x)
        if len(fmts) > 1:
            raise ValueError("traces mix formats: " + ", ".join(f"{f} is {kind}" for kind, f in sorted(fmts.items()))
                             + "; give one format at a time")
        fmt = next(iter(fmts))
    if fmt == "mooncake":  # several files only when they are captures sharing one key
        return read_mooncake_files(paths, block_size)
    if block_size is not None:
        raise ValueError(f"--block-size applies to Mooncake-layout traces; {paths[0]} is a WEKA session "
                         "file, which states its own block_size")
    return read_weka(paths, stagger_s=stagger_s)


# A prompt longer than this is no real request (no model has such a context): counted as absurd.
MAX_PLAUSIBLE_INPUT_TOKENS = 10_000_000


def trace_warnings(trace: Trace) -> list[str]:
    """What a readable trace holds that a replay would silently get wrong, with counts.

    * block ids out of order: chained prefix-block ids are handed out as blocks first appear,
      so inside one request they increase (not checked for captured files, whose ids are keyed
      hashes); a request whose ids do not is counted, and so is a
      block id that follows two different parents (the ids are then not chained);
    * ``input_length`` its ids do not cover: more than one block (two for WEKA, which lists
      full blocks only) past the last id, or more than ``MAX_PLAUSIBLE_INPUT_TOKENS``: those
      tokens can never hit, so the hit rate is understated.
    """
    bs = trace.block_size
    unordered = unchained = uncovered = absurd = 0
    first_unordered = first_uncovered = None
    parent_of: dict[int, int] = {}
    for i, r in enumerate(trace.requests):
        ids = r.hash_ids
        if not trace.capture_key and any(b <= a for a, b in zip(ids, ids[1:])):
            unordered += 1
            first_unordered = i if first_unordered is None else first_unordered
        prev = -1
        for h in ids:
            if parent_of.setdefault(h, prev) != prev:
                unchained += 1
            prev = h
        if r.input_length > MAX_PLAUSIBLE_INPUT_TOKENS:
            absurd += 1
        elif r.prompt_blocks(bs) > len(ids) + 1 and ids:
            uncovered += 1
            first_uncovered = i if first_uncovered is None else first_uncovered
    n = len(trace.requests)
    out = list(trace.read_warnings)
    if unordered:
        out.append(f"trace {trace.name}: {unordered:,} of {n:,} requests list block ids out of order (an id not "
                   f"above the one before it; first: request {first_unordered}): prefix-chained ids increase, "
                   "so this trace's hit rates are probably wrong")
    if unchained:
        out.append(f"trace {trace.name}: {unchained:,} block-id uses follow a different parent block than the "
                   "id's first use: the ids are not prefix-chained, so shared prefixes are not what the trace meant")
    if absurd:
        out.append(f"trace {trace.name}: {absurd:,} of {n:,} requests have an input_length above "
                   f"{MAX_PLAUSIBLE_INPUT_TOKENS:,} tokens (no real prompt is that long): their tokens dominate "
                   "the token counts and can never hit")
    if uncovered:
        out.append(f"trace {trace.name}: {uncovered:,} of {n:,} requests have an input_length their hash_ids "
                   f"do not cover (more than one {bs}-token block past the last id; first: request "
                   f"{first_uncovered}): the uncovered tokens always miss")
    return out
