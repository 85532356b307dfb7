"""The ``l3:`` section of the settings file: the shared store under the host tier.

```yaml
l3:
  backend: mooncake
  master_address: 10.0.0.5:50051
  metadata_server: P2PHANDSHAKE      # or http://host:port/metadata, etcd://host:port
  protocol: tcp                      # tcp | rdma
  local_hostname: 10.0.0.7           # this node's address as other nodes reach it
  global_segment_gb: 16              # DRAM this node contributes to the shared pool (each of its TP x DP
                                     # clients gives 1/(TP x DP); Mooncake refuses a client under 16 MiB)
  local_buffer_gb: 1                 # staging buffer of each client (one per TP rank); batches are split
                                     # to fit it, and it must hold one block's object (checked at start-up)
  weights_id: ""                     # e.g. a commit hash; "" = fingerprint the checkpoint (l3/weights.py)
```

Invariants: ``parse_l3_section`` returns ``None`` (no third tier) or a valid, frozen
``L3Config``; every bad field is reported at once as a ``config.FieldError`` named
``l3.<field>`` (unknown keys with a did-you-mean); ``master_address`` is a bare ``host:port``
(no scheme, no whitespace); ``to_dict`` round-trips through ``parse_l3_section``. No store is
contacted here. Whether ``local_buffer_gb`` holds one block's object depends on the engine's slot
size: the worker checks it at start-up (``integration/l3_tier.check_local_buffer``), and so does whether
each client's share of ``global_segment_gb`` reaches ``MIN_SEGMENT_BYTES`` (``check_segment_share``).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import MAX_GIB, ConfigError, FieldError, _Bad, _number, url_host_and_port_ok

BACKENDS = ("mooncake",)
PROTOCOLS = ("tcp", "rdma")
WRITE_POLICIES = ("write_back", "write_through")
ON_UNREACHABLE = ("error", "warn")
GIB = 1 << 30


@dataclass(frozen=True)
class L3Config:
    """Validated settings of the shared store tier (see the module docstring)."""

    master_address: str
    backend: str = "mooncake"
    metadata_server: str = "P2PHANDSHAKE"
    protocol: str = "tcp"
    rdma_devices: str = ""
    local_hostname: str = "127.0.0.1"
    global_segment_gb: float = 4.0
    local_buffer_gb: float = 0.5
    timeout_ms: int = 2000
    write_policy: str = "write_back"
    on_unreachable: str = "error"
    weights_id: str = ""      # names the weights (base model, adapters, draft) in every store key; "" = fingerprints

    @property
    def global_segment_bytes(self) -> int:
        return int(self.global_segment_gb * GIB)

    @property
    def local_buffer_bytes(self) -> int:
        return int(self.local_buffer_gb * GIB)

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0

    @property
    def memory_gb(self) -> float:
        """DRAM the store tier takes on a node with one client: contributed segment plus its buffer
        (every further client, one per TP rank, adds a buffer)."""
        return self.global_segment_gb + self.local_buffer_gb

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _choice(options: tuple[str, ...]):
    allowed = " or ".join(repr(o) for o in options)

    def parse(v: Any) -> str:
        if isinstance(v, str) and v.strip().lower() in options:
            return v.strip().lower()
        raise ValueError(allowed)
    return parse


def _address(v: Any) -> str:
    allowed = "'host:port' with a port in 1..65535 (the mooncake_master RPC address)"
    if not isinstance(v, str) or v.count(":") < 1:
        raise ValueError(allowed)
    t = v.strip()
    if "://" in t:   # the master speaks its own RPC: a URL is a metadata_server, never this address
        raise ValueError(allowed + ", without a scheme: 'host:port', not a URL such as 'http://host:port'")
    if any(c.isspace() for c in t):
        raise ValueError(allowed + ", without spaces")
    host, _, port = t.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        raise ValueError(allowed)
    if ":" in host and not (host.startswith("[") and host.endswith("]") and len(host) > 2):
        # '::1' read as host ':' port 1: an IPv6 host is written in brackets
        raise ValueError(allowed + "; an IPv6 address in brackets: '[::1]:50051'")
    return t


def _metadata(v: Any) -> str:
    allowed = "'P2PHANDSHAKE', or a URL: http://host:port/metadata, etcd://host:port"
    if isinstance(v, str):
        t = v.strip()
        if t.upper() == "P2PHANDSHAKE":
            return "P2PHANDSHAKE"
        if t.startswith(("http://", "https://", "etcd://", "redis://")) and url_host_and_port_ok(t):
            return t
    raise ValueError(allowed)


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    raise ValueError("a string")


def _weights_id(v: Any) -> str:
    # A number is refused, not turned into text: YAML reads 0x1f as 31 and 0123 as 123, which would
    # silently rename the weights in every store key (as tenant_salt, it must be quoted).
    allowed = ("a name of the weights (a commit hash, a run id) as a string: printable ASCII, at most 200 "
               "characters; quote it in YAML, e.g. weights_id: \"0x1f\"")
    if isinstance(v, str) and len(v.strip()) <= 200 and v.strip().isascii() and v.strip().isprintable():
        return v.strip()
    raise ValueError(allowed)


def _hostname(v: Any) -> str:
    if isinstance(v, str) and v.strip():
        return v.strip()
    raise ValueError("this node's address as the other nodes reach it (non-empty string)")


GIB_RANGE = (0.001, MAX_GIB)   # about 1 MiB to 1 PiB, the host-cache settings' own bound
# Mooncake 0.3.13's setup refuses (status -600) a client whose global segment is under 16 MiB, whatever
# its buffer; each TP rank's client of each DP engine contributes global_segment_gb / (TP x DP)
# (integration/l3_tier.WorkerL3.build checks that share at start-up).
MIN_SEGMENT_BYTES = 16 * 2**20


def _gib(minimum: float, maximum: float):
    """A size in GiB within [minimum, maximum]: a value that rounds to 0 bytes, or one no machine has, fails
    here naming the field instead of inside Mooncake's setup."""
    allowed = f"a number of GiB in [{minimum:g}, {maximum:g}]"

    def parse(v: Any) -> float:
        try:
            out = _number(v, allowed)   # bools, text that is no number, NaN and ints beyond float range
        except _Bad:
            raise ValueError(allowed) from None
        if not minimum <= out <= maximum:
            raise ValueError(allowed)
        return out
    return parse


def _timeout_ms(v: Any) -> int:
    allowed = "a whole number of milliseconds in 1..600000"
    if isinstance(v, bool):
        raise ValueError(allowed)
    if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit() and len(v.strip()) <= 20:
        v = int(v.strip())
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or not 0 < v <= 600_000:
        raise ValueError(allowed)
    return v


_PARSERS = {
    "master_address": _address,
    "backend": _choice(BACKENDS),
    "metadata_server": _metadata,
    "protocol": _choice(PROTOCOLS),
    "rdma_devices": _text,
    "local_hostname": _hostname,
    "global_segment_gb": _gib(MIN_SEGMENT_BYTES / GIB, GIB_RANGE[1]),
    "local_buffer_gb": _gib(*GIB_RANGE),
    "timeout_ms": _timeout_ms,
    "write_policy": _choice(WRITE_POLICIES),
    "on_unreachable": _choice(ON_UNREACHABLE),
    "weights_id": _weights_id,
}
assert set(_PARSERS) == set(L3Config.field_names())


def parse_l3_section(value: Any, prefix: str = "l3") -> L3Config | None:
    """``None`` (absent, null or ``false``) or a validated ``L3Config``; raises ``ConfigError``
    listing every bad field as ``l3.<field>``."""
    if value is None or value is False:
        return None
    if isinstance(value, L3Config):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError([FieldError(prefix, value, "a mapping with at least master_address "
                                      "(or null for no third tier)")])
    errors: list[FieldError] = []
    known = L3Config.field_names()
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        name = key.strip().replace("-", "_") if isinstance(key, str) else key
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            errors.append(FieldError(f"{prefix}.{key}", raw, ", ".join(known),
                                     f"unknown field; {hint}known fields: {', '.join(known)}"))
            continue
        if name in kwargs:
            errors.append(FieldError(f"{prefix}.{name}", raw, "one value per field", "given twice"))
            continue
        try:
            kwargs[name] = _PARSERS[name](raw)
        except ValueError as bad:
            errors.append(FieldError(f"{prefix}.{name}", raw, str(bad)))
    if "master_address" not in kwargs and not any(e.field == f"{prefix}.master_address" for e in errors):
        errors.append(FieldError(f"{prefix}.master_address", None, "'host:port'",
                                 "missing: the mooncake_master RPC address is required"))
    if errors:
        raise ConfigError(errors)
    return L3Config(**kwargs)
