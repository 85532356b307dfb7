"""Validated settings of the host-memory tier: ``HostCacheConfig``.

One frozen dataclass, loadable from YAML (``from_yaml``), from a flat mapping
(``from_dict``: what LMDeploy's ``kv_connector_extra_config`` carries, or parsed CLI
flags), and written back (``to_dict`` / ``to_yaml``) so that
``from_dict(cfg.to_dict()) == cfg`` and ``from_yaml`` of ``to_yaml()`` gives ``cfg`` back.

Invariants:
- An instance is always valid: every constructor path (``HostCacheConfig(...)``,
  ``from_dict``, ``from_yaml``, ``replace``) validates every field and raises
  ``ConfigError`` *before* returning anything, naming the field, the bad value and what
  is allowed. Unknown keys are rejected with a did-you-mean suggestion.
- Values are normalised: numbers are ``float`` (``int`` for ``min_restore_tokens``, which may
  also be the string ``"auto"``),
  flags are ``bool``, ``host_cache_gb`` is a float or the string ``"auto"``.
- No torch, triton or lmdeploy import here (the scheduler and offline tools use it).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tier.eviction import DEFAULT_POLICY, OFFLINE_ONLY, POLICIES

__all__ = [
    "AUTO",
    "ConfigError",
    "FieldError",
    "HostCacheConfig",
    "HOST_KV_FORMATS",
    "capture_field_error",
    "capture_path_problem",
    "eviction_policy_names",
    "load_config",
    "markdown_reference",
]

AUTO = "auto"
HOST_KV_FORMATS = ("same", "int8", "int4")


# The single place that decides which eviction policies a config may name: the servable
# names of ``lmdeploy_hostcache.tier.eviction.POLICIES`` (offline-only ones such as Belady need
# the future and are evaluation tools, never servable).
def eviction_policy_names() -> tuple[str, ...]:
    """Names a config may use for ``eviction_policy`` (sorted; offline-only ones excluded)."""
    return tuple(sorted(n for n in POLICIES if n not in OFFLINE_ONLY))


@dataclass(frozen=True)
class FieldError:
    """One invalid field: which, what was given, what would be accepted."""

    field: str
    value: Any
    allowed: str
    problem: str = ""  # set for errors that are not a bad value (unknown field, duplicate key)

    def __str__(self) -> str:
        if self.problem:
            return f"{self.field}: {self.problem}"
        return f"{self.field}: got {_show(self.value)}; allowed: {self.allowed}"


class ConfigError(ValueError):
    """Invalid host-cache settings. ``errors`` lists every bad field; ``field`` is the first."""

    def __init__(self, errors: list[FieldError], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        self.field = self.errors[0].field if self.errors else None
        prefix = f"{source}: " if source else ""
        body = "; ".join(str(e) for e in self.errors) or "invalid configuration"
        super().__init__(f"{prefix}invalid host-cache config: {body}")


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 120
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 3, 6, 6


def _show(value: Any) -> str:
    """The value as the error shows it, bounded (a YAML alias bomb or a 5,000-digit int stays one short line)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits (int)"
    if isinstance(value, str):
        return _SHOW.repr(value)
    return f"{_SHOW.repr(value)} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------
# Field parsers: value -> normalised value, or raise _Bad(allowed-text).


class _Bad(Exception):
    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


def _number(value: Any, allowed: str) -> float:
    """A finite real number; numeric strings accepted (flat dicts from a CLI or JSON)."""
    if isinstance(value, bool):
        raise _Bad(allowed)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise _Bad(allowed) from None
    if not isinstance(value, (int, float)):
        raise _Bad(allowed)
    try:
        out = float(value)
    except OverflowError:  # an int beyond float range
        raise _Bad(allowed) from None
    if not math.isfinite(out):
        raise _Bad(allowed)
    return out


MAX_GIB = 1_048_576.0   # 1 PiB: no machine has more; a larger size is a typo, refused here, not at start-up


def _parse_host_cache_gb(value: Any) -> float | str:
    allowed = f"a number of GiB in [0, {MAX_GIB:.0f}] (0 disables the tier), or 'auto'"
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    out = _number(value, allowed)
    if not 0 <= out <= MAX_GIB:
        raise _Bad(allowed)
    return out


def _parse_reserve_gb(value: Any) -> float:
    allowed = f"a number of GiB in [0, {MAX_GIB:.0f}]"
    out = _number(value, allowed)
    if not 0 <= out <= MAX_GIB:
        raise _Bad(allowed)
    return out


def _parse_host_kv_format(value: Any) -> str:
    allowed = " or ".join(repr(f) for f in HOST_KV_FORMATS)
    if isinstance(value, str) and value.strip().lower() in HOST_KV_FORMATS:
        return value.strip().lower()
    raise _Bad(allowed)


def _parse_eviction_policy(value: Any) -> str:
    names = eviction_policy_names()
    allowed = " or ".join(repr(n) for n in names)
    if isinstance(value, str) and value.strip().lower() in names:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() in OFFLINE_ONLY:
        allowed += " (belady needs future requests: offline evaluation only)"
    raise _Bad(allowed)


# A whole number given as text is read with int(), which refuses more than 4300 digits with a ValueError
# of its own (sys.get_int_max_str_digits); text longer than this is the field's error instead. Far above
# any token count (as l3/config._timeout_ms bounds its text to 20 digits).
MAX_INT_TEXT_DIGITS = 20


def _whole_number(value: Any, allowed: str) -> int:
    """An int >= 0: an int, a float with no fraction, or a string of digits (flat dicts from a CLI or JSON)."""
    if isinstance(value, bool):
        raise _Bad(allowed)
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise _Bad(allowed)
        digits = text.lstrip("0") or "0"
        if len(digits) > MAX_INT_TEXT_DIGITS:   # int() refuses > 4300 digits with its own ValueError
            raise _Bad(f"{allowed} (at most {MAX_INT_TEXT_DIGITS} digits)")
        return int(digits)
    if isinstance(value, float):
        if not value.is_integer() or value < 0:
            raise _Bad(allowed)
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise _Bad(allowed)
    return value


def _parse_min_restore_tokens(value: Any) -> int | str:
    allowed = "a whole number of tokens >= 0, or 'auto'"
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO   # resolved per engine by restore_cost.resolve_min_restore_tokens
    return _whole_number(value, allowed)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad("true or false")


def _parse_tenant_salt(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Bad("a string (quote it in YAML, e.g. tenant_salt: \"1234\")")


CAPTURE_SUFFIXES = (".jsonl", ".json")   # what `plan` finds in a folder (and the rotated files keep the suffix)
CAPTURE_MIN_MB = 1.0
CAPTURE_MAX_MB = 1_048_576.0   # 1 TiB per file


def _parse_capture(value: Any) -> str:
    allowed = "a file path ending in .jsonl (or .json), which `plan` finds in a folder (empty: no capture)"
    if value is None:
        return ""
    if isinstance(value, str) and "\0" not in value:
        out = value.strip()
        if out and not out.endswith(CAPTURE_SUFFIXES):
            raise _Bad(allowed)
        return out
    raise _Bad(allowed)


def url_host_and_port_ok(url: str) -> bool:
    """Whether ``url`` (any scheme) names a host, and a port in 0..65535 if it gives one (``urlsplit``)."""
    from urllib.parse import urlsplit  # noqa: PLC0415

    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 -- raises ValueError outside 0..65535
    except ValueError:
        return False
    return bool(parts.hostname)


def capture_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why trace capture cannot write ``path``, as a phrase (None when it can, as far as a check that opens and
    creates nothing tells).

    The capture's writer (``capture/writer.py``) creates ``path`` in its folder, sets an earlier or a full file
    aside beside it (a rename there), and writes only to a regular file (a folder, a FIFO, a device or a socket
    at ``path`` is never written). So the folder must exist and be writable by this user, and anything already
    at ``path`` must be a writable regular file (``outfile.output_problem``, plus the file's own write bit). A relative
    ``path`` is checked against the current folder, as the engine started from it resolves it. The field's
    parser does not check this (a config is valid on any machine): ``lmdeploy serve api_server`` and
    ``doctor --config`` call it for an enabled tier; at run time a capture that fails is logged and serving
    goes on.
    """
    from .outfile import output_problem, writable_by_this_user  # noqa: PLC0415

    target = os.path.abspath(os.fspath(path))
    problem = output_problem(target)   # the folder (capture creates files there), a regular file at the path
    if problem is None and os.path.exists(target) and not writable_by_this_user(target):
        problem = "it is not writable by this user (capture appends to it)"
    return problem


def capture_field_error(path: str) -> FieldError | None:
    """``capture_path_problem`` as the ``capture`` field's error (naming the path, saying what to give), or None:
    the one message ``lmdeploy serve api_server`` and ``doctor --config`` print."""
    problem = capture_path_problem(path)
    if problem is None:
        return None
    return FieldError("capture", path, "", problem=f"{path}: {problem}; trace capture could not write it: give a "
                                                   "file in an existing folder this user can write")


def _parse_capture_max_mb(value: Any) -> float:
    allowed = f"a number of MiB in [{CAPTURE_MIN_MB:g}, {CAPTURE_MAX_MB:.0f}]"
    out = _number(value, allowed)
    if not CAPTURE_MIN_MB <= out <= CAPTURE_MAX_MB:
        raise _Bad(allowed)
    return out


CAPTURE_MAX_KEEP_FILES = 1_000_000


def _parse_capture_keep_files(value: Any) -> int:
    allowed = f"a whole number of files in [0, {CAPTURE_MAX_KEEP_FILES:,}] (0: keep every rotated file)"
    out = _whole_number(value, allowed)
    if out > CAPTURE_MAX_KEEP_FILES:
        raise _Bad(allowed)
    return out


def _parse_l3(value: Any) -> Any:
    # The shared store tier's section is parsed and validated in lmdeploy_hostcache/l3/config.py
    # (its errors name ``l3.<field>``); this is only the hook.
    from .l3.config import parse_l3_section  # noqa: PLC0415

    return parse_l3_section(value)


def _meta(parse, help_text: str, allowed: str) -> dict[str, Any]:
    return {"parse": parse, "help": help_text, "allowed": allowed}


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCacheConfig:
    """Settings of the host-memory (DRAM) prefix-cache tier; see each field's ``help``."""

    host_cache_gb: float | str = field(default=AUTO, metadata=_meta(
        _parse_host_cache_gb,
        "Host DRAM for the tier on this node, in GiB (2^30 bytes), summed over the engine's "
        "TP ranks (with data parallelism, shared equally by the DP engines). `auto`: available RAM "
        "minus `host_memory_reserve_gb`, at most half of "
        "total RAM (`lmdeploy-hostcache doctor` shows the figure and why). 0 disables the tier.",
        "number in [0, 1048576], or `auto`"))
    host_memory_reserve_gb: float = field(default=8.0, metadata=_meta(
        _parse_reserve_gb,
        "RAM that `auto` leaves to the OS, the engine process and its workers, in GiB. "
        "Ignored when `host_cache_gb` is a number.",
        "number in [0, 1048576]"))
    host_kv_format: str = field(default="same", metadata=_meta(
        _parse_host_kv_format,
        "Format of blocks in host memory. `same`: the GPU cache's bytes, copied as they are "
        "(lossless; with an int4/int8 GPU cache the packed bytes move as is). `int8`/`int4`: "
        "an fp16/bf16 GPU cache is quantized on offload like LMDeploy's KV quantization "
        "(lossy: a restored prefix can change outputs slightly).",
        "`same`, `int8` or `int4`"))
    eviction_policy: str = field(default=DEFAULT_POLICY, metadata=_meta(
        _parse_eviction_policy,
        "How the host tier picks a victim when full. Always leaf-first: a block whose "
        "children are host-resident is never evicted. `lru` (the default, as LMDeploy's GPU "
        "cache evicts): every other policy measured falls below it on some traffic. `arc` wins "
        "up to 12% of the gap to the offline Belady bound on the Mooncake traces it was tuned on "
        "(about 0 to 4% on traffic it was not chosen on) and falls about a point below `lru` on agent "
        "sessions that restart "
        "(docs/eviction.md).",
        "`lru`, `arc` or `s3fifo` (`lmdeploy_hostcache.tier.eviction.POLICIES`)"))
    min_restore_tokens: int | str = field(default=256, metadata=_meta(
        _parse_min_restore_tokens,
        "Smallest host hit worth restoring, in tokens. A shorter hit is recomputed: a restore "
        "costs at least one extra engine step, which a short prefill does not. 0 restores "
        "every hit. `auto`: restore when the modelled restore time (copy + one engine step) is "
        "below the modelled recompute time, from the figures in the JSON file named by "
        "`LMDEPLOY_HOSTCACHE_CALIBRATION` (the GPU proof kit writes one), else from assumed, "
        "unmeasured figures (`lmdeploy_hostcache/restore_cost.py`).",
        "integer >= 0, or `auto`"))
    keep_restored_blocks: bool = field(default=True, metadata=_meta(
        _parse_bool,
        "Keep a restored block's host copy while host memory has room for it, so when LMDeploy "
        "evicts the block again nothing is copied back (an inclusive tier). A kept copy is "
        "always the first slot reused when the host needs one, before any eviction. `false`: a "
        "restored block leaves host memory (exclusive tiers: every re-eviction copies it again).",
        "`true` or `false`"))
    pin_memory: bool = field(default=True, metadata=_meta(
        _parse_bool,
        "Allocate the host pool page-locked (pinned), so copies are asynchronous DMA at full "
        "PCIe speed. Pinned memory cannot be swapped out; false uses pageable memory "
        "(slower, synchronous copies).",
        "`true` or `false`"))
    verify_tokens: bool = field(default=True, metadata=_meta(
        _parse_bool,
        "Compare each host block's stored token ids with the request's before a restore, so "
        "a digest collision can never restore another prompt's KV.",
        "`true` or `false`"))
    checksum: bool = field(default=False, metadata=_meta(
        _parse_bool,
        "Checksum each block's bytes when stored and check it before a restore (catches "
        "host-memory corruption; costs CPU time per block).",
        "`true` or `false`"))
    tenant_salt: str = field(default="", metadata=_meta(
        _parse_tenant_salt,
        "Mixed into every block digest: engines or tenants with different salts never share "
        "host blocks. Treat a non-empty salt as a secret (it is masked in logs).",
        "any string"))
    capture: str = field(default="", metadata=_meta(
        _parse_capture,
        "Trace capture: append one JSON line per finished request to this file, in the layout "
        "`lmdeploy-hostcache plan` reads (arrival, input/output lengths, block size, keyed block "
        "ids; never token ids or text; docs/planner.md \"Capturing your own traffic\"). Empty: off. "
        "A write error is logged once and capture stops; serving goes on.",
        "a path ending in .jsonl or .json, or empty"))
    capture_max_mb: float = field(default=256.0, metadata=_meta(
        _parse_capture_max_mb,
        "Size at which the capture file is rotated (renamed `<name>.<n>.jsonl`; a new one is "
        "started), in MiB. It bounds each file, not their total: see `capture_keep_files`.",
        "number in [1, 1048576]"))
    capture_keep_files: int = field(default=0, metadata=_meta(
        _parse_capture_keep_files,
        "Rotated capture files kept: at each rotation (and when an earlier capture's file is set aside "
        "at start) the oldest `<name>.<n>.jsonl` (`.json` for a .json capture) beyond this many are "
        "deleted, any regular file so named that no writer holds, so the capture takes at most about "
        "(this + 1) x `capture_max_mb` of disk. 0: every rotated file is kept (a capture is data; disk "
        "use then grows with traffic).",
        "int in [0, 1000000]"))
    capture_offload: bool = field(default=True, metadata=_meta(
        _parse_bool,
        "Encode and write the captured records in a helper process started with the engine (its "
        "digests, keyed ids and file writes then run off LMDeploy's scheduler thread, on another "
        "core); `false`: on the scheduler's thread. The file is the same either way.",
        "`true` or `false`"))

    l3: Any = field(default=None, metadata=_meta(
        _parse_l3,
        "The shared third tier: a Mooncake Store under the host tier, shared by every node "
        "(a mapping: `master_address`, `metadata_server`, `protocol`, `global_segment_gb`, "
        "`local_buffer_gb`, `weights_id`, ...; docs/integration.md \"Three tiers\"). Store keys name the "
        "weights (a fingerprint of the checkpoint, or `weights_id`). Absent or null: no third tier.",
        "null, or a mapping with at least `master_address` (`lmdeploy_hostcache/l3/config.py`)"))

    # -- validation ---------------------------------------------------------------------
    def __post_init__(self) -> None:
        errors: list[FieldError] = []
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            try:
                values[f.name] = f.metadata["parse"](raw)
            except _Bad as bad:
                errors.append(FieldError(f.name, raw, bad.allowed))
            except ConfigError as exc:  # a section (l3) reports its own fields
                errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tenant_salt" and value:
                parts.append(f"{f.name}='***'")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"HostCacheConfig({', '.join(parts)})"

    # -- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_keys: Iterable[str] = (),
                  source: str | None = None) -> HostCacheConfig:
        """Build from a flat mapping; missing keys take their defaults.

        Keys may use ``-`` for ``_`` (``host-cache-gb``). Keys listed in ``ignore_keys``
        are skipped (e.g. values the integration adds to ``kv_connector_extra_config``);
        any other unknown key raises ``ConfigError`` with a did-you-mean suggestion.
        """
        if not isinstance(data, Mapping):
            raise ConfigError([FieldError("<top level>", data, "a mapping of field: value")], source)
        errors: list[FieldError] = []
        kwargs = _normalise_keys(data, cls.field_names(), set(ignore_keys), errors)
        try:
            config = cls(**kwargs)
        except ConfigError as exc:
            errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors, source)
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> HostCacheConfig:
        """Load a flat YAML mapping (an empty file means all defaults: ``host_cache_gb: auto``).

        Every unusable file (missing, a folder, binary, not UTF-8, not YAML, a repeated key)
        raises ``ConfigError`` naming the file (``yamlio.load_yaml_file``).
        """
        from .yamlio import YamlError, load_yaml_file  # noqa: PLC0415

        path = os.fspath(path)
        try:
            data = load_yaml_file(path)
        except YamlError as exc:
            raise _yaml_config_error(exc, path) from None
        return cls._from_document(data, path)

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str | None = None) -> HostCacheConfig:
        from .yamlio import YamlError, load_yaml_text  # noqa: PLC0415

        try:
            data = load_yaml_text(text, source=source)
        except YamlError as exc:
            raise _yaml_config_error(exc, source) from None
        return cls._from_document(data, source)

    @classmethod
    def _from_document(cls, data: Any, source: str | None) -> HostCacheConfig:
        if data is None:  # an empty file (or only comments): say what it means, once per load
            import logging  # noqa: PLC0415

            logging.getLogger("lmdeploy_hostcache").warning(
                "lmdeploy-hostcache: %s is empty: every setting takes its default, so host_cache_gb is "
                "'auto' (up to half of this machine's RAM, pinned); set host_cache_gb to size the tier, "
                "0 to turn it off", source or "the YAML config")
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError([FieldError("<top level>", data, "a mapping of field: value")], source)
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> HostCacheConfig:
        """A validated copy with ``changes`` applied (unknown names rejected)."""
        merged = self.to_dict()
        errors: list[FieldError] = []
        merged.update(_normalise_keys(changes, self.field_names(), set(), errors))
        if errors:
            raise ConfigError(errors)
        return type(self)(**merged)

    # -- output -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every field (plain YAML/JSON types), in declaration order."""
        out = {name: getattr(self, name) for name in self.field_names()}
        if out.get("l3") is not None:
            out["l3"] = out["l3"].to_dict()
        return out

    def to_yaml(self) -> str:
        from .yamlio import dump_yaml  # noqa: PLC0415

        return dump_yaml(self.to_dict())

    def redacted_dict(self) -> dict[str, Any]:
        """``to_dict`` with a non-empty ``tenant_salt`` masked: for logs and ``doctor``."""
        out = self.to_dict()
        if out["tenant_salt"]:
            out["tenant_salt"] = "***"
        return out

    @property
    def enabled(self) -> bool:
        """False only when ``host_cache_gb`` is 0."""
        return self.host_cache_gb != 0.0


def _normalise_keys(data: Mapping[str, Any], known: tuple[str, ...], ignore: set[str],
                    errors: list[FieldError]) -> dict[str, Any]:
    """Map keys to field names (``-`` -> ``_``); append unknown/duplicate keys to ``errors``."""
    out: dict[str, Any] = {}
    seen_as: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            errors.append(FieldError(repr(key), value, "a field name", "field names are strings"))
            continue
        if key in ignore:
            continue
        name = key.strip().replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            errors.append(FieldError(key, value, ", ".join(known),
                                     f"unknown field; {hint}known fields: {', '.join(known)}"))
            continue
        if name in seen_as:
            errors.append(FieldError(name, value, "one value per field",
                                     f"given twice (as {seen_as[name]!r} and {key!r})"))
            continue
        seen_as[name] = key
        out[name] = value
    return out


def _yaml_config_error(exc, source: str | None) -> ConfigError:
    """``ConfigError`` for a file ``yamlio`` refused (the field is ``<file>``/``<yaml>``)."""
    problem = exc.problem if exc.line is None else f"line {exc.line}: {exc.problem}"
    name = "<yaml>" if "YAML" in exc.problem or "duplicate key" in exc.problem else "<file>"
    return ConfigError([FieldError(name, None, "a flat YAML mapping of field: value", problem)], source)


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | HostCacheConfig | None = None,
                **overrides: Any) -> HostCacheConfig:
    """Config from a YAML path, a flat mapping, an existing config or defaults (``None``).

    ``overrides`` win over the source (how ``--host-cache-gb 64`` combines with
    ``--host-cache-config FILE``); an override whose value is ``None`` is ignored, so
    unset CLI flags can be passed straight through.
    """
    if source is None:
        base = HostCacheConfig()
    elif isinstance(source, HostCacheConfig):
        base = source
    elif isinstance(source, Mapping):
        base = HostCacheConfig.from_dict(source)
    elif isinstance(source, (str, os.PathLike)):
        base = HostCacheConfig.from_yaml(source)
    else:
        raise TypeError(f"load_config: source must be a YAML path, a mapping, a HostCacheConfig or None, "
                        f"not {type(source).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**given) if given else base


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == "":
        return '`""`'
    return str(value)


def markdown_reference() -> str:
    """The configuration table in README.md (tests check README holds exactly this)."""
    lines = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = HostCacheConfig()
    for f in dataclasses.fields(HostCacheConfig):
        default = _default_text(getattr(defaults, f.name))
        if not default.startswith("`"):
            default = f"`{default}`"
        lines.append(f"| `{f.name}` | {default} | {f.metadata['allowed']} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - `python -m lmdeploy_hostcache.config` prints the table
    print(markdown_reference(), end="")
