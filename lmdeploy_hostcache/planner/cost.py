"""The TTFT cost model: what a host hit saves against recomputing the same tokens.

Per request, with ``r`` tokens restored from the host tier in ``B`` bytes per TP rank::

    saving_s = r / prefill_tokens_per_s  -  B / (h2d_gbps * 1e9)

i.e. the prefill time those tokens would have cost minus the host-to-GPU copy time (ranks copy
their shards in parallel over their own links, so per-rank bytes count).  Both rates are
**model inputs, never measurements**: the defaults are assumptions, overridable on the command
line, and every report says so.

Assumed defaults:

* ``prefill_tokens_per_s``: 30,000 tokens/s for an 8B-parameter model on one H100 (the public
  figure quoted in docs/planner.md), scaled by 8 / params for the presets (prefill FLOPs grow
  with parameter count), 30,000 for a config.json without a parameter count;
* ``h2d_gbps``: 25 GB/s (10**9 bytes/s), what pinned copies achieve on PCIe Gen4 x16.

Not modelled: copy/compute overlap (a layer-wise pipeline hides part of the copy), the extra
engine step a load takes in LMDeploy, dequantization of int8/int4 host blocks, queueing.
A saving can be negative: then restoring is slower than recomputing on these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFILL_TOKENS_PER_S_8B = 30_000.0
DEFAULT_H2D_GBPS = 25.0


@dataclass(frozen=True)
class CostModel:
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S_8B
    h2d_gbps: float = DEFAULT_H2D_GBPS
    prefill_assumed: bool = True
    h2d_assumed: bool = True

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "h2d_gbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

    @classmethod
    def for_model(cls, params_b: float | None, prefill_tokens_per_s: float | None = None,
                  h2d_gbps: float | None = None) -> "CostModel":
        """Defaults scaled to the model's size unless the caller gives the rates."""
        if prefill_tokens_per_s is None:
            scale = 8.0 / params_b if params_b else 1.0
            prefill = DEFAULT_PREFILL_TOKENS_PER_S_8B * scale
        else:
            prefill = prefill_tokens_per_s
        return cls(prefill_tokens_per_s=float(prefill),
                   h2d_gbps=float(DEFAULT_H2D_GBPS if h2d_gbps is None else h2d_gbps),
                   prefill_assumed=prefill_tokens_per_s is None, h2d_assumed=h2d_gbps is None)

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def copy_s(self, nbytes: int) -> float:
        return nbytes / (self.h2d_gbps * 1e9)

    def restore_saving_s(self, tokens: int, nbytes: int) -> float:
        """Seconds saved by restoring ``tokens`` (``nbytes`` per rank) instead of recomputing."""
        return self.prefill_s(tokens) - self.copy_s(nbytes)

    def describe(self) -> str:
        p = f"{self.prefill_tokens_per_s:,.0f} prefill tokens/s" + (" (assumed)" if self.prefill_assumed else "")
        h = f"{self.h2d_gbps:g} GB/s host->GPU" + (" (assumed)" if self.h2d_assumed else "")
        return f"{p}, {h}; model inputs, not measurements"
