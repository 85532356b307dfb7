"""Restore or recompute: the per-request cost decision behind ``min_restore_tokens: auto``.

A host hit of ``n`` tokens (past the GPU prefix match) can be restored (copied host -> GPU through
LMDeploy's external-load path; the request then waits at least one engine step) or recomputed
(prefilled with the rest of the prompt). The model:

    restore_s(n)   = restore_overhead_s + n * bytes_per_token / restore_bytes_per_s
    recompute_s(n) = n / prefill_tokens_per_s

and a hit is restored when ``restore_s(n) < recompute_s(n)``. Both sides are linear in ``n``, so the
decision is one threshold per engine (``threshold_tokens``):

    n > restore_overhead_s / (1 / prefill_tokens_per_s - bytes_per_token / restore_bytes_per_s)

and "never" when the bracket is <= 0 (moving a token's KV costs more than computing it). The
connector compares each request's hit with that threshold, so the decision is per request.
Prefill is taken as linear in ``n``; attention makes later tokens dearer to recompute, so the
model errs towards recomputing (it never restores a hit that the linear model says loses).

Calibration (``RestoreCalibration``): ``restore_gbps`` (host -> GPU restore bandwidth, 1e9 B/s),
``prefill_tokens_per_s`` (the served model's prefill rate on that GPU) and ``restore_overhead_ms``
(what a restore adds besides the copy: one engine step). Where they come from, in order:

1. the JSON file named by ``LMDEPLOY_HOSTCACHE_CALIBRATION`` (the GPU proof kit writes one as
   ``calibration.json``: ``{"restore_gbps": .., "prefill_tokens_per_s": .., "restore_overhead_ms":
   .., "gpu": .., "model": ..}``; the figures hold for the GPU and model they were measured on);
2. ``ASSUMED``: figures assumed, NOT measured (used without a calibration file): 20 GB/s restore
   (a pinned PCIe Gen4 x16 host -> device copy), 10,000 prefill tokens/s (a ~8B model on one
   datacenter GPU), 20 ms overhead (one engine step). Replace them with the kit's figures.

With ``bytes_per_token`` unknown (0: the executor did not report slot bytes) ``auto`` falls back to
``FALLBACK_TOKENS`` (256, the fixed default). Invariants: pure (no torch, no LMDeploy); every
result is an int >= 0; ``NEVER`` (a hit can never reach it) means "always recompute".
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import asdict, dataclass

__all__ = ["ASSUMED", "ENV_CALIBRATION", "FALLBACK_TOKENS", "NEVER", "CalibrationError", "RestoreCalibration",
           "load_calibration", "resolve_min_restore_tokens", "should_restore", "threshold_tokens"]

ENV_CALIBRATION = "LMDEPLOY_HOSTCACHE_CALIBRATION"
FALLBACK_TOKENS = 256
NEVER = 1 << 62


class CalibrationError(ValueError):
    """A calibration file or value that cannot be used (names the file and the field)."""


@dataclass(frozen=True)
class RestoreCalibration:
    restore_gbps: float
    prefill_tokens_per_s: float
    restore_overhead_ms: float
    source: str = "assumed"

    def __post_init__(self):
        for name in ("restore_gbps", "prefill_tokens_per_s", "restore_overhead_ms"):
            v = getattr(self, name)
            out = _finite(v)
            if out is None or out < 0 or (out == 0 and name != "restore_overhead_ms"):
                allowed = ">= 0" if name == "restore_overhead_ms" else "> 0"
                raise CalibrationError(f"{self.source}: {name}: got {reprlib.repr(v)}; "
                                       f"allowed: a finite number {allowed}")
            object.__setattr__(self, name, out)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(v) -> float | None:
    """``v`` as a finite float, or None (not a number, NaN, infinite, or an int beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        out = float(v)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


ASSUMED = RestoreCalibration(restore_gbps=20.0, prefill_tokens_per_s=10_000.0, restore_overhead_ms=20.0,
                             source="assumed (not measured): 20 GB/s restore, 10k prefill tokens/s, 20 ms step")


def threshold_tokens(cal: RestoreCalibration, bytes_per_token: float) -> int:
    """Smallest hit (tokens) whose restore beats recomputing it; ``NEVER`` when none does."""
    if bytes_per_token <= 0:
        return FALLBACK_TOKENS
    per_token_gain = 1.0 / cal.prefill_tokens_per_s - bytes_per_token / (cal.restore_gbps * 1e9)
    if per_token_gain <= 0:
        return NEVER
    n = cal.restore_overhead_ms / 1e3 / per_token_gain
    if not math.isfinite(n) or n >= NEVER:   # figures so large the threshold overflows: no hit reaches it
        return NEVER
    return min(NEVER, int(math.floor(n)) + 1)


def should_restore(num_tokens: int, cal: RestoreCalibration, bytes_per_token: float) -> bool:
    """The per-request decision: restore a hit of ``num_tokens`` tokens?"""
    return num_tokens > 0 and num_tokens >= threshold_tokens(cal, bytes_per_token)


def _refuse_duplicate_keys(pairs):
    """A JSON object as a dict; a key given twice is refused (json keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"field {key!r} is given twice")
        out[key] = value
    return out


def load_calibration(path: str | None = None) -> RestoreCalibration:
    """The calibration at ``path``, else at ``$LMDEPLOY_HOSTCACHE_CALIBRATION``, else ``ASSUMED``."""
    path = path or os.environ.get(ENV_CALIBRATION, "").strip() or None
    if path is None:
        return ASSUMED
    from .yamlio import NotARegularFile, read_regular_file

    try:
        # a FIFO or a device (one nothing writes to) is refused, not waited on
        raw = read_regular_file(path, -1)
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except (IsADirectoryError, NotARegularFile):
        raise CalibrationError(f"{path}: not a regular file; the restore calibration is a JSON file") from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the restore calibration: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not a JSON restore calibration: {str(exc)[:200]}") from None
    except RecursionError:
        raise CalibrationError(f"{path}: not a JSON restore calibration: nested too deeply") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: a JSON object with restore_gbps, prefill_tokens_per_s, "
                               f"restore_overhead_ms expected")
    missing = [k for k in ("restore_gbps", "prefill_tokens_per_s", "restore_overhead_ms") if k not in data]
    if missing:
        raise CalibrationError(f"{path}: missing field {missing[0]} (needs restore_gbps, prefill_tokens_per_s, "
                               f"restore_overhead_ms)")
    return RestoreCalibration(data["restore_gbps"], data["prefill_tokens_per_s"], data["restore_overhead_ms"],
                              source=path)


def resolve_min_restore_tokens(value, bytes_per_token: float, calibration: RestoreCalibration | None = None) -> int:
    """``min_restore_tokens`` as the connector applies it: a number as is; ``auto`` -> the threshold."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return threshold_tokens(calibration or load_calibration(), bytes_per_token)
    return int(value)
