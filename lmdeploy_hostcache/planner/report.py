"""Plain-text tables, the ``--json`` object and the sweep plot.

Every number printed comes from the replay just run or from the stated cost-model inputs; the
TTFT figures are estimates from ``cost.CostModel``, labelled as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..outfile import save_figure
from .cost import CostModel
from .geometry import BlockSizing
from .replay import ReplayStats


@dataclass(frozen=True)
class TTFTEstimate:
    """Cost-model estimate of prefill time, GPU-only against GPU+host, over one replay."""

    gpu_only_prefill_s: float      # total over all requests
    two_tier_prefill_s: float      # recompute + host->GPU copy, total
    saving_s: float                # gpu_only - two_tier
    requests: int
    requests_with_host_hits: int

    @classmethod
    def of(cls, st: ReplayStats, sizing: BlockSizing, cost: CostModel) -> "TTFTEstimate":
        gpu_only = cost.prefill_s(st.prompt_tokens - st.gpu_hit_tokens)
        copy = cost.copy_s(st.host_hit_blocks * sizing.host_block_bytes)
        two_tier = cost.prefill_s(st.recomputed_tokens) + copy
        return cls(gpu_only, two_tier, gpu_only - two_tier, st.requests, st.requests_with_host_hits)

    @property
    def mean_saving_ms(self) -> float:
        return 1e3 * self.saving_s / self.requests if self.requests else 0.0

    @property
    def mean_saving_ms_host_hit_requests(self) -> float:
        n = self.requests_with_host_hits
        return 1e3 * self.saving_s / n if n else 0.0

    def as_dict(self) -> dict:
        return {"gpu_only_prefill_s_total": self.gpu_only_prefill_s,
                "with_host_prefill_s_total": self.two_tier_prefill_s,
                "saving_s_total": self.saving_s,
                "saving_ms_mean_per_request": self.mean_saving_ms,
                "saving_ms_mean_per_request_with_host_hits": self.mean_saving_ms_host_hit_requests,
                "gpu_only_prefill_ms_mean": 1e3 * self.gpu_only_prefill_s / max(self.requests, 1),
                "with_host_prefill_ms_mean": 1e3 * self.two_tier_prefill_s / max(self.requests, 1),
                "estimate": True}


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned first column, right-aligned others."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def single_run_table(st: ReplayStats, sizing: BlockSizing | None, ttft: TTFTEstimate | None) -> str:
    """GPU-only vs GPU+host for one replay.  The GPU-only column is this run's GPU tier: with
    exclusive tiers the host tier never changes what the GPU tier holds (tested).  Capacity is the
    configured size in whole blocks; "used" is the most each tier held at once (``gpu_peak_blocks``,
    ``host_peak_blocks``), which a trace with fewer distinct blocks than the capacity keeps below it."""
    cap_blocks = (fmt_int(st.gpu_blocks), f"{fmt_int(st.gpu_blocks)} + {fmt_int(st.host_blocks)}")
    rows = [["capacity (blocks)", *cap_blocks]]
    if sizing is not None:
        g = sizing.gpu_gb_for(st.gpu_blocks)
        h = sizing.host_gb_for(st.host_blocks)
        rows.append(["capacity (GiB)", f"{g:.1f}", f"{g:.1f} + {h:.1f}"])
        # what the tiers held at their fullest: memory follows the trace, never the configured size
        g = sizing.gpu_gb_for(st.gpu_peak_blocks)
        h = sizing.host_gb_for(st.host_peak_blocks)
        rows.append(["used (GiB, at the peak)", f"{g:.1f}", f"{g:.1f} + {h:.1f}"])
    rows += [
        ["hit rate (prompt blocks)", f"{st.gpu_hit_rate:.3f}", f"{st.hit_rate:.3f}"],
        ["  from GPU tier", f"{st.gpu_hit_rate:.3f}", f"{st.gpu_hit_rate:.3f}"],
        ["  from host tier", "-", f"{st.host_hit_rate:.3f}"],
        ["tokens reused on GPU", fmt_int(st.gpu_hit_tokens), fmt_int(st.gpu_hit_tokens)],
        ["tokens restored from host", "0", fmt_int(st.restored_tokens)],
        ["tokens recomputed", fmt_int(st.prompt_tokens - st.gpu_hit_tokens), fmt_int(st.recomputed_tokens)],
    ]
    if st.short_host_hit_blocks:
        rows.append(["  of them host hits under min_restore_tokens", "-",
                     fmt_int(st.short_host_hit_blocks * st.block_size)])
    if ttft is not None:
        n = max(ttft.requests, 1)
        rows.append(["est. prefill per request (ms)", f"{1e3 * ttft.gpu_only_prefill_s / n:.1f}",
                     f"{1e3 * ttft.two_tier_prefill_s / n:.1f}"])
    return render_table(rows, ["", "GPU only", "GPU + host"])


def sweep_table(points: Sequence[tuple[float | None, ReplayStats, TTFTEstimate | None]], tier: str,
                unit: str) -> str:
    """One row per sweep point; in blocks the value is the capacity, so it is one column. The last column counts
    the requests longer than the GPU tier (``gpu_overflow_requests``), which LMDeploy would refuse."""
    rows = []
    for value, st, ttft in points:
        cap = st.host_blocks if tier == "host" else st.gpu_blocks
        size = [fmt_int(cap)] if unit == "blocks" else [f"{value:g}" if value is not None else "-", fmt_int(cap)]
        rows.append([*size, f"{st.hit_rate:.3f}", f"{st.gpu_hit_rate:.3f}", f"{st.host_hit_rate:.3f}",
                     fmt_int(st.restored_tokens), f"{ttft.mean_saving_ms:.1f}" if ttft is not None else "-",
                     fmt_int(st.gpu_overflow_requests)])
    size_head = [f"{tier} blocks"] if unit == "blocks" else [f"{tier} {unit}", f"{tier} blocks"]
    return render_table(rows, [*size_head, "hit rate", "GPU", "host", "tokens restored", "est. TTFT saving ms/req",
                               "longer than GPU"])


def pick_recommendation(values: Sequence[float], hit_rates: Sequence[float], tolerance: float = 0.01) -> float:
    """Smallest value whose hit rate is within ``tolerance`` of the best (of the values given: a caller leaves
    out the points it cannot recommend)."""
    best = max(hit_rates)
    for v, h in sorted(zip(values, hit_rates)):
        if h >= best - tolerance:
            return v
    raise AssertionError("unreachable: the best value satisfies its own tolerance")


def plot_sweep(path: str, xs: Sequence[float], stats: Sequence[ReplayStats], xlabel: str, title: str) -> str:
    """Write a PNG of hit rate (total, GPU, host) against capacity; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(xs, [s.hit_rate for s in stats], "o-", label="total")
    ax.plot(xs, [s.gpu_hit_rate for s in stats], "s--", label="GPU tier")
    ax.plot(xs, [s.host_hit_rate for s in stats], "^--", label="host tier")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("hit rate (fraction of prompt blocks)")
    ax.set_ylim(0, max(0.05, max(s.hit_rate for s in stats) * 1.15))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
