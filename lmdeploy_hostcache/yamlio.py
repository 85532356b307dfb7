"""The one strict YAML loader every YAML file of the project goes through.

``load_yaml_file(path)`` / ``load_yaml_text(text, source=)`` return the parsed document or
raise ``YamlError`` (a ``ValueError``) whose message is one line naming the file and what is
wrong with it. Used by ``config.py`` (``--host-cache-config``), the planner's cluster file,
and any future YAML input: reuse it rather than ``yaml.safe_load``.

Invariants:
- Safe loading only (``yaml.SafeLoader``): no Python objects are ever constructed.
- A mapping that repeats a key is refused, naming the key and its line (PyYAML alone keeps
  the last value silently).
- Numbers are read as YAML 1.2 reads them: ``1e9``, ``1.0e9`` and ``-2E-3`` are floats
  (PyYAML's YAML 1.1 rules would make them strings); ``010`` is ten, not an octal eight
  (write ``0o10`` for octal); ``1:30`` is the text "1:30", not a base-60 ninety. ``0x``/``0b``
  prefixes and ``1_000`` underscores are kept (unambiguous). Booleans keep PyYAML's rules.
- Every way a file can be unusable (missing, a folder, not a regular file, unreadable,
  binary, not UTF-8, not YAML) is a ``YamlError`` naming the file; nothing else escapes (no
  ``OSError``, ``UnicodeDecodeError`` or ``yaml.YAMLError``), and nothing blocks: a FIFO, a device
  (``/dev/stdin`` included: reading settings from standard input is not supported) or a socket is
  refused before anything is read. A file over ``MAX_YAML_BYTES`` (256 KiB) is refused unparsed: PyYAML
  takes hundreds of times a file's bytes in memory. ``read_regular_file`` is that non-blocking
  regular-file read, for other small inputs (the planner's model ``config.json``, the restore
  calibration).
- ``dump_yaml`` writes with the same number rules (a string such as ``"1e3"`` is quoted), so
  ``load_yaml_text(dump_yaml(x)) == x`` for plain data.
- PyYAML is imported on first use only.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any

__all__ = ["YamlError", "dump_yaml", "load_yaml_file", "load_yaml_text"]

# YAML 1.2 core-schema floats, plus PyYAML's own 1.1 forms (.inf, .nan, 1_000.0). The loader
# reads no base-60 forms; the dumper also quotes them (``_FLOAT_DUMP``) so that a YAML 1.1
# reader elsewhere never turns a string such as "1:30.5" into a number.
_FLOAT_12_BODY = r"""[-+]?[0-9][0-9_]*(?:\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN)"""
_FLOAT_12 = re.compile(rf"^(?:{_FLOAT_12_BODY})$", re.X)
_FLOAT_DUMP = re.compile(rf"^(?:{_FLOAT_12_BODY}|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*)$", re.X)
# Integers: decimal (leading zeros stay decimal, as in YAML 1.2), 0o octal, 0x hex, 0b binary.
_INT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0b[01][01_]*)$")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class YamlError(ValueError):
    """A YAML file or text that cannot be used; ``source`` names it, ``problem`` says why."""

    def __init__(self, source: str | None, problem: str, line: int | None = None):
        self.source = source
        self.problem = problem
        self.line = line
        where = source or "<yaml>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {problem}")


_LOADER = None
_DUMPER = None


def _number_resolvers(base, *, loading: bool):
    """``base``'s implicit resolvers with YAML 1.2 number rules.

    Loading replaces both the 1.1 float and int rules (no base-60, no leading-zero octal).
    Dumping keeps the 1.1 int rule and the base-60 floats and adds the 1.2 ones, so a string
    that either a YAML 1.1 reader or this loader could take for a number is quoted.
    """
    drop = {_FLOAT_TAG, _INT_TAG} if loading else {_FLOAT_TAG}
    table = {k: [(tag, rx) for tag, rx in v if tag not in drop]
             for k, v in base.yaml_implicit_resolvers.items()}
    for ch in "-+0123456789":
        table.setdefault(ch, []).append((_INT_TAG, _INT_12))
    for ch in "-+0123456789.":
        table.setdefault(ch, []).append((_FLOAT_TAG, _FLOAT_12 if loading else _FLOAT_DUMP))
    return table


def _construct_int12(loader, node):
    """A YAML 1.2 integer (``_INT_12``): ``010`` is ten; ``0o``, ``0x``, ``0b`` name the base."""
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text[:1] == "-" else 1
    text = text.lstrip("+-")
    prefix = text[:2].lower()
    base = {"0o": 8, "0x": 16, "0b": 2}.get(prefix)
    if base is None:
        return sign * int(text, 10)
    return sign * int(text[2:], base)


def dump_yaml(data: Any) -> str:
    """Block-style YAML of plain data, keys in insertion order, readable back by ``load_yaml_text``."""
    global _DUMPER
    import yaml  # noqa: PLC0415

    if _DUMPER is None:
        class StrictDumper(yaml.SafeDumper):
            pass

        StrictDumper.yaml_implicit_resolvers = _number_resolvers(yaml.SafeDumper, loading=False)
        _DUMPER = StrictDumper
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False)


def _loader():
    """SafeLoader subclass: duplicate keys refused, YAML 1.2 numbers (built once)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml  # noqa: PLC0415

    class StrictLoader(yaml.SafeLoader):
        pass

    StrictLoader.yaml_implicit_resolvers = _number_resolvers(yaml.SafeLoader, loading=True)
    StrictLoader.add_constructor(_INT_TAG, _construct_int12)

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise YamlError(None, f"duplicate key {key!r} (first at line {first}); give each key once",
                                key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    _LOADER = StrictLoader
    return _LOADER


# a settings or cluster file is a few KiB; PyYAML's nodes take a few hundred times a file's size in memory
# (a 2 MiB file of short items: about 0.9 GB), so the cap bounds memory, not only reading
MAX_YAML_BYTES = 256 * 2**10


def load_yaml_text(text: str, *, source: str | None = None) -> Any:
    """Parse ``text`` strictly (see the module docstring); ``source`` names it in errors."""
    import yaml  # noqa: PLC0415

    if "\x00" in text:
        raise YamlError(source, "binary data (a NUL byte), not a YAML text file")
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
    except YamlError as exc:
        raise YamlError(source, exc.problem, exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise YamlError(source, f"not valid YAML: {' '.join(str(problem).split())[:200]}", line) from None
    except RecursionError:
        raise YamlError(source, "nested too deeply") from None
    except ValueError as exc:   # e.g. an int of more digits than Python converts
        raise YamlError(source, f"a value cannot be read: {str(exc)[:200]}") from None


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file or folder names (for one-line refusals)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class NotARegularFile(OSError):
    """``read_regular_file`` found a FIFO, a device or a socket (``kind`` names it, ``file_kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"is {kind}, not a regular file")
        self.kind = kind


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit`` bytes (all of them for -1) of the regular file (or a symlink to one) at ``path``,
    never blocking on what is there: opened non-blocking (a FIFO with no writer returns at once) and checked on the open
    descriptor (no window between the check and the read). Raises ``IsADirectoryError`` for a folder,
    ``NotARegularFile`` for a FIFO, a device or a socket, and the ``OSError`` of a failed open or read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a folder", os.fspath(path))
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a folder", os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(file_kind(mode))
        with os.fdopen(fd, "rb") as fh:
            fd = -1   # the file object owns it now
            return fh.read(limit)
    finally:
        if fd >= 0:
            os.close(fd)


def load_yaml_file(path: str | os.PathLike[str]) -> Any:
    """Read and parse a YAML file strictly; every failure is a ``YamlError`` naming ``path``.

    Only a regular file (or a symlink to one) is read: a FIFO, a device (``/dev/zero``,
    ``/dev/stdin`` on a terminal or pipe) or a socket is refused without reading, so nothing blocks
    waiting for a writer. It is opened non-blocking and checked on the open descriptor (no window
    between the check and the read).
    """
    path = os.fspath(path)
    try:
        raw = read_regular_file(path, MAX_YAML_BYTES + 1)   # a config is small: a mistaken file is not read whole
    except IsADirectoryError:
        raise YamlError(path, "is a folder, not a YAML file") from None
    except FileNotFoundError:
        raise YamlError(path, "cannot read it: no such file") from None
    except NotARegularFile as exc:
        raise YamlError(path, f"is {exc.kind}, not a regular file (only a regular file is read)") from None
    except OSError as exc:
        raise YamlError(path, f"cannot read it: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise YamlError(path, "binary data (a NUL byte), not a YAML text file")
    if len(raw) > MAX_YAML_BYTES:
        raise YamlError(path, f"larger than {MAX_YAML_BYTES // 2**10} KiB: not a settings file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlError(path, f"not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return load_yaml_text(text, source=path)
