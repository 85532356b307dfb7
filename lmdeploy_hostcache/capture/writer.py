"""Append-only capture file, rotated at a size limit, that never raises into serving.

``RotatingWriter(path, max_bytes)`` appends whole lines on an ``O_APPEND`` descriptor, opened by
``open()`` (trace capture opens it when the engine starts) or at the first write: ``write(line)``
one line, ``write_lines(lines)`` a batch with one ``os.write`` per file it goes to (``writes`` counts
the ``os.write`` calls; a batch that fits the file is joined and encoded in one piece).  When a line
would take the file past ``max_bytes`` the file is closed and renamed ``<stem>.<n>.jsonl`` (the first free
``n`` past the highest one found beside ``path`` when the writer first opened it, so numbers grow with age,
claimed atomically; the search starts past the last number this writer took; the file is renamed before
it is released) and a new ``path`` is started, so every file ``plan`` reads holds whole records.
With ``keep_files`` = K > 0 a rotation (and the set-aside at first open) then deletes the rotated files
of ``path`` (regular files named ``<stem>.<m><suffix>``, ``m`` without a leading zero) numbered at or
below the one it took less K, except one another writer holds (its ``flock``), so at most K of them
stay beside the live file (earlier captures' among them); K = 0 keeps them all.  A deletion that fails
is logged once and capture goes on.  Before each batch the writer checks that ``path`` is still the
file it has open (``_follow_path``): one moved or deleted meanwhile (log rotation, an operator) is
followed by a new file at ``path`` (or the empty one put there), never by writes into a file no name
reaches; a non-empty file of another writer there stops capture.  Each writer holds an exclusive ``flock`` on its file: a
second writer given the same path (two engines sharing one capture file) stops, logged once, before it
writes a line there or sets the other's file aside.  A non-empty regular file found at ``path`` when it
is first opened (an earlier capture, made with another key, that no writer holds) is set aside the same
way, never appended to; anything at ``path`` that is not
a regular file (a folder, a FIFO, a device, a socket; a symlink counts as what it points to) is never
written, nor renamed (checked right before a rename): capture stops, logged once.  Nothing blocks: the
path is checked before it is opened, opened with ``O_NONBLOCK`` (a FIFO without a reader fails at once
instead of waiting for one) and checked again on the open descriptor (so what is written to is the
regular file checked); the rotated files' names are claimed with ``O_EXCL``, which opens nothing that
is there.  Invariants: ``open`` and the writes never raise and never wait on what is at ``path``; the
first failure (unwritable folder, full disk, a rename refused, not a regular file) is logged once at
WARNING with the path and the reason, after which capture stays off for this writer (``failed`` set,
later lines counted in ``dropped``); a line is written whole or not at all (a short write is treated as
a failure, and the partial lines are taken back).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from pathlib import Path

logger = logging.getLogger("lmdeploy_hostcache.capture")

DEFAULT_MAX_BYTES = 256 * 2**20
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _refuse_unless_regular(path: Path, mode: int) -> None:
    """OSError naming what is at ``path`` unless ``mode`` is a regular file's (capture writes only to one)."""
    if stat.S_ISREG(mode):
        return
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            raise OSError(errno.EINVAL, f"is {name}, not a regular file")
    raise OSError(errno.EINVAL, "is not a regular file")


_WRITTEN_ELSEWHERE = ("another process is writing it (two engines given one capture file?); give each engine "
                      "its own")


def _lock_for_writing(fd: int) -> None:
    """An exclusive ``flock`` on the open file, not waited for: OSError when another writer holds it. A
    filesystem that cannot lock (``ENOLCK``; ``EBADF`` where NFS emulates flock with fcntl locks on a
    descriptor not open for writing) leaves the file unlocked, as before locks were taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, _WRITTEN_ELSEWHERE) from None
    except OSError:
        pass


def _delete_unless_written(path: str) -> bool:
    """Delete the file at ``path`` unless a writer holds it (its ``flock``); True when deleted.  A file that
    cannot be probed (unreadable) is deleted as it would be without locks; one already gone is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                _lock_for_writing(fd)
            except OSError:
                return False            # another writer's live file
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _refuse_if_written(path: Path) -> None:
    """OSError when a writer holds the file at ``path`` (checked before it is set aside). A file this
    process may rename but not read is not probed (it is set aside as before)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        _lock_for_writing(fd)
    finally:
        os.close(fd)    # releases the probe's lock


class RotatingWriter:
    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, keep_files: int = 0) -> None:
        if max_bytes <= 0:
            raise ValueError(f"capture max bytes must be > 0, got {max_bytes}")
        if keep_files < 0:
            raise ValueError(f"capture keep_files must be >= 0, got {keep_files}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.keep_files = int(keep_files)
        self.deleted = 0        # rotated files deleted (keep_files)
        self._delete_failed = False
        self._fd: int | None = None
        self._size = 0
        self.failed = ""        # the reason capture stopped ("" while it runs)
        self.written = 0        # records written
        self.dropped = 0        # records not written (after a failure)
        self.rotations = 0
        self.writes = 0         # os.write calls made
        self.reopened = 0       # times the file at path was found moved, deleted or replaced
        self._opened = False
        self._ident: tuple[int, int] | None = None   # (st_dev, st_ino) of the open file
        self._next_aside = 1    # the first <stem>.<n> number not yet known to be taken

    def open(self) -> bool:
        """Open the file now (``write_lines`` opens it otherwise); False, logged once, when it cannot."""
        if self.failed:
            return False
        if self._fd is None:
            try:
                self._open_first()
            except Exception as exc:  # noqa: BLE001 -- capture must never stop serving
                self._stop(exc)
                return False
        return True

    def _open_first(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if not self._opened:
            # rotated numbers grow with age, an earlier capture's included: a rotation never takes a number
            # below one already there, so keep_files deletes the oldest
            self._next_aside = max(self._rotated_numbers(), default=0) + 1
        if st is not None:
            _refuse_unless_regular(self.path, st.st_mode)   # a folder, a FIFO, a device: never renamed
            if not self._opened and st.st_size:
                _refuse_if_written(self.path)   # another process's live capture: never set aside, never shared
                newest = self._set_aside()   # an earlier capture's file (another key): never append to it
                if self.keep_files:
                    self._delete_rotated(newest)
        self._opened = True
        self._open()

    def _stop(self, exc: BaseException) -> None:
        why = getattr(exc, "strerror", None) or str(exc)
        self.failed = f"{self.path}: {why}"
        logger.warning("lmdeploy-hostcache: trace capture stopped: cannot write %s (%s); serving goes on "
                       "without capture", self.path, why)
        self._close()

    def _open(self) -> None:
        """Open ``path`` for appending without blocking; OSError (nothing left open) unless it is a regular file."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(
            os, "O_NOCTTY", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:   # ENXIO: a FIFO without a reader (it appeared after the check), or a device
            if exc.errno == errno.ENXIO:
                _refuse_unless_regular(self.path, os.stat(self.path).st_mode)
            raise
        try:
            st = os.fstat(fd)
            _refuse_unless_regular(self.path, st.st_mode)
            _lock_for_writing(fd)           # one writer per file: another process's capture here stops this one
            if _NONBLOCK:
                os.set_blocking(fd, True)   # a regular file: writes as before
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._ident = fd, st.st_size, (st.st_dev, st.st_ino)

    def _follow_path(self) -> None:
        """Before a batch: keep writing the file at ``path``.  When it was moved or deleted (a log
        rotation, an operator's ``mv``/``rm``) a new file is started there, and an empty file put in its
        place (logrotate's ``create``) is taken; the one moved keeps what it holds.  A non-empty file that
        is not this writer's (another process writing the same path) stops capture, logged once: setting
        it aside would make the two writers set each other's files aside at every batch.  A file
        truncated in place (``copytruncate``) is followed by its size."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == self._ident:
            self._size = st.st_size
            return
        if st is not None:
            _refuse_unless_regular(self.path, st.st_mode)
            if st.st_size:
                raise OSError(errno.EEXIST, "another file, not empty, took its place (another process writing this "
                                            "path? give each engine its own capture file)")
        self.reopened += 1
        (logger.warning if self.reopened == 1 else logger.info)(
            "lmdeploy-hostcache: the trace capture file %s was %s; capture goes on in a new file there",
            self.path, "moved or deleted" if st is None else "replaced by an empty file")
        self._close()
        self._open()

    def _set_aside(self) -> int:
        """Rename the file to the first free ``<stem>.<n><suffix>``, never over another file: the name is
        claimed by creating it empty (``O_EXCL`` fails if it exists: another writer may set aside a file
        of the same stem at the same moment) and only the claimed empty file is then replaced (a crash in
        between leaves an empty file, which ``plan`` skips; no hard links, which some filesystems lack)."""
        _refuse_unless_regular(self.path, os.stat(self.path).st_mode)   # only a file is ever renamed
        stem, suffix = self._stem_and_suffix()
        n = self._next_aside     # numbers below it were taken when last looked at: the search stays short
        while True:
            target = self.path.parent / f"{stem}.{n}{suffix}"
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                break
            except FileExistsError:
                n += 1
        self._next_aside = n + 1
        os.replace(self.path, target)
        return n

    def _stem_and_suffix(self) -> tuple[str, str]:
        """``path``'s name split as its rotated files are named: ``<stem>.<n><suffix>``."""
        suffix = self.path.suffix or ".jsonl"
        return (self.path.name[:-len(self.path.suffix)] if self.path.suffix else self.path.name), suffix

    def _rotated_files(self) -> list[tuple[int, str]]:
        """(n, path) of the regular files named ``<stem>.<n><suffix>`` (n as this writer writes it: no
        leading zero) beside ``path``."""
        stem, suffix = self._stem_and_suffix()
        names = re.compile(re.escape(stem) + r"\.([1-9][0-9]*)" + re.escape(suffix))
        with os.scandir(self.path.parent) as entries:
            return [(int(m.group(1)), e.path) for e in entries
                    if (m := names.fullmatch(e.name)) and e.is_file(follow_symlinks=False)]

    def _rotated_numbers(self) -> list[int]:
        try:
            return [n for n, _ in self._rotated_files()]
        except OSError:       # an unreadable folder: the search for a free number starts at 1, as before
            return []

    def _delete_rotated(self, newest: int) -> None:
        """Delete the rotated files numbered ``newest - keep_files`` or below, except one another writer holds
        (its ``flock``: a file of that name may be another engine's live capture)."""
        last = newest - self.keep_files
        try:
            old = [name for n, name in self._rotated_files() if n <= last]
        except OSError as exc:
            old, failure = [], exc
        else:
            failure = None
        for name in old:
            try:
                self.deleted += _delete_unless_written(name)
            except OSError as exc:
                failure = exc
        if failure is not None and not self._delete_failed:
            self._delete_failed = True
            logger.warning("lmdeploy-hostcache: could not delete an old rotated capture file beside %s "
                           "(capture_keep_files %d): %s; capture goes on", self.path, self.keep_files, failure)

    def _rotate(self) -> None:
        newest = None
        try:
            newest = self._set_aside()   # renamed while this writer still holds it (and its lock): no gap to take it
        except FileNotFoundError:   # moved or deleted since the batch began: a new file starts all the same
            pass
        if newest is not None and self.keep_files:
            self._delete_rotated(newest)
        self._close()
        self.rotations += 1
        self._open()

    def write(self, line: str) -> bool:
        """Append one record line; False (and nothing raised) when capture is off or failed."""
        return self.write_lines((line,)) == 1

    def write_lines(self, lines) -> int:
        """Append whole record lines, one ``os.write`` per file they go to; how many were written
        (nothing raised: after a failure the lines not yet written are counted in ``dropped``)."""
        if self.failed or not lines:
            self.dropped += len(lines)
            return 0
        done = 0
        try:
            if self._fd is None:
                self._open_first()
            else:
                self._follow_path()
            data = "".join(lines).encode("utf-8")
            if self._size + len(data) <= self.max_bytes or not self._size and len(lines) == 1:
                return self._append([data], len(data), len(lines))    # the common case: no rotation
            chunk: list[bytes] = []
            chunk_bytes = 0
            for line in lines:
                data = line.encode("utf-8")
                if self._size + chunk_bytes and self._size + chunk_bytes + len(data) > self.max_bytes:
                    if chunk:
                        done += self._append(chunk, chunk_bytes)
                        chunk, chunk_bytes = [], 0
                    self._rotate()
                chunk.append(data)
                chunk_bytes += len(data)
            if chunk:
                done += self._append(chunk, chunk_bytes)
            return done
        except Exception as exc:  # noqa: BLE001 -- capture must never stop serving
            self.dropped += len(lines) - done
            self._stop(exc)
            return done

    def _append(self, chunk: list[bytes], nbytes: int, lines: int = 0) -> int:
        """One ``os.write`` of whole lines (``lines`` of them, else one per chunk item); a short write is
        taken back and raised."""
        data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
        self.writes += 1
        n = os.write(self._fd, data)
        if n != nbytes:
            try:  # take the partial lines back so the file keeps whole records
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise OSError(f"short write ({n} of {nbytes} bytes; disk full?)")
        self._size += n
        lines = lines or len(chunk)
        self.written += lines
        return lines

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        self._close()
