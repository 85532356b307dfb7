"""Output files (plots, JSON results) written whole or not at all.

Invariant: a write that fails part-way (disk full, Ctrl-C, a matplotlib error) leaves the file that was
at the path before exactly as it was, and no partial file beside it: the bytes go to a temporary file
in the same folder, which replaces the path (``os.replace``, atomic on POSIX) only once it is complete.
The new file gets the permissions a plain ``open(path, "w")`` would give it (``0666`` less the umask).
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with replacing(path) as fh:`` writes ``fh`` to a temporary file that replaces ``path`` when the
    block ends without an exception; on an exception the temporary file is removed and ``path`` kept."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as fh:
        fh.write(text)


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """``fig.savefig`` through ``replacing``; the format is the path's suffix."""
    fmt = Path(path).suffix.lstrip(".").lower() or None
    with replacing(path, "wb") as fh:
        fig.savefig(fh, format=fmt, **savefig_kwargs)


def writable_by_this_user(path: str | os.PathLike, mode: int = os.W_OK) -> bool:
    """``os.access`` for the effective user where the platform can ask for it."""
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    return os.access(path, mode, **effective)


def output_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot take a file this user creates there, as a phrase, or None; opens and creates nothing.

    The folder must exist and be writable by this user (``replacing`` makes its temporary file there, trace
    capture its files); anything already at ``path`` must be a regular file (a folder, FIFO or device is refused:
    ``yamlio.file_kind`` names it)."""
    from .yamlio import file_kind

    target = Path(path)
    folder = target.parent
    try:
        folder_mode = os.stat(folder).st_mode
    except FileNotFoundError:
        return f"its folder {folder} does not exist"
    except NotADirectoryError:
        return f"its folder {folder} does not exist (a part of that path is a file)"
    except OSError as exc:
        return f"its folder {folder} cannot be read ({exc.strerror or exc})"
    if not stat.S_ISDIR(folder_mode):
        return f"its folder {folder} is not a folder"
    if not writable_by_this_user(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is not writable by this user"
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "it is a folder, not a regular file"
    if not stat.S_ISREG(mode):
        return f"it is {file_kind(mode)}, not a regular file"
    return None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing file (False when either is missing or unreadable)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
