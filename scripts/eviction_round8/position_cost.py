"""Eighth eviction round (issue 12's third hint): the cost of recomputing a block at its position.

A prompt block at position p (tokens before it) costs its linear layers plus attention over p
tokens to recompute, so a deep block is worth more than a shallow one when it hits.  This script
replays traces with per-request hit counts and reports two metrics per policy:

* the block hit rate (the bench's metric) and its share of the LRU -> Belady gap;
* the saved prefill compute: sum over hit blocks of the cost of recomputing them, divided by the
  cost of every prompt block, and its share of the LRU -> Belady gap on that metric (Belady is the
  block-count optimum, a reference here, not a bound on weighted cost).

Cost model (an assumption, printed): Llama-3-8B, per token 2 x (non-embedding params + lm_head)
FLOPs for the linear layers, 4 x layers x q_heads x head_dim FLOPs per earlier token for attention;
a block of ``bs`` tokens starting at position s costs bs x (linear + attn x (s + bs / 2)).

Candidate policies (prototypes, not in the package):

* ``gd``: GreedyDual over leaf candidates, H = L + w(depth) / w(0) on insert and on access, evict
  the lowest H, L = the victim's H.  With equal costs this is LRU.
* ``gdf``: the same with H = L + w(depth) / w(0) x min(1 + hits, F).
* ``gdb``: the same with the cost raised to a power ``beta`` (a stronger position preference).

Run: ``.venv/bin/python scripts/eviction_round8/position_cost.py tuning|heldout POLICY...``
(POLICY from lru, arc, belady, gd, gdf:F, gdb:BETA).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lmdeploy_hostcache.eviction_eval import belady_share, chat_chains, footprint, load_mooncake, load_weka, replay
from lmdeploy_hostcache.tier.eviction import EvictionPolicy, _LazyHeap

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO.parent / "shared" / "traces"
FRACTIONS = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5)

# Llama-3-8B: 32 layers, hidden 4096, 32 q heads x 128, 8 kv heads, intermediate 14336, vocab 128256
LAYERS, HIDDEN, KV, INTER, VOCAB = 32, 4096, 1024, 14336, 128256
LINEAR = 2 * (LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * INTER) + HIDDEN * VOCAB)
ATTN = 4 * LAYERS * HIDDEN   # per token, per earlier token (QK^T and AV)


def block_cost(i: int, bs: int) -> float:
    """FLOPs to recompute block ``i`` (0-based) of ``bs`` tokens, in units of a block at position 0."""
    return (LINEAR + ATTN * (i * bs + bs / 2)) / (LINEAR + ATTN * bs / 2)


class GreedyDualPosition(EvictionPolicy):
    """GreedyDual over leaf candidates; a block's cost is ``block_cost(depth) ** beta`` (x uses, capped)."""

    def __init__(self, bs: int, beta: float = 1.0, freq_cap: int = 1) -> None:
        self.name = f"gd(beta={beta:g},F={freq_cap})"
        self.bs, self.beta, self.cap = bs, beta, freq_cap
        self.L = 0.0
        self.depth: dict[int, int] = {}
        self._heap = _LazyHeap(lambda key, b: b.candidate and key == b.pdata[1])

    def _h(self, b) -> float:
        return self.L + block_cost(b.pdata[0], self.bs) ** self.beta * min(1 + b.hits, self.cap)

    def on_insert(self, b) -> None:
        d = self.depth.get(b.parent, -1) + 1
        self.depth[b.digest] = d
        b.pdata = [d, 0.0]
        b.pdata[1] = self._h(b)

    def on_access(self, b) -> None:
        b.pdata[1] = self._h(b)
        if b.candidate:
            self._heap.push(b.pdata[1], b)

    def on_remove(self, b, evicted: bool) -> None:
        self.depth.pop(b.digest, None)

    def add_candidate(self, b) -> None:
        self._heap.add(b.pdata[1], b)

    def remove_candidate(self, b) -> None:
        self._heap.live -= 1

    def pop_victim(self):
        b = self._heap.pop()
        if b is not None:
            self._heap.live -= 1
            self.L = max(self.L, b.pdata[1])
        return b


def make(name: str, bs: int):
    if name in ("lru", "arc", "belady", "s3fifo"):
        return name
    kind, _, arg = name.partition(":")
    if kind == "gd":
        return GreedyDualPosition(bs)
    if kind == "gdf":
        return GreedyDualPosition(bs, freq_cap=int(arg))
    if kind == "gdb":
        return GreedyDualPosition(bs, beta=float(arg))
    raise SystemExit(f"unknown policy {name!r}")


def sources(which: str):
    if which == "tuning":
        weka = sorted((TRACES / "weka_sample").glob("*.json"))
        return [("weka_sample", 64, lambda: load_weka([str(w) for w in weka])), ("chat generator", 64, chat_chains)]
    if which == "heldout":
        m = TRACES / "mooncake"
        return [(n, 512, lambda n=n: load_mooncake(str(m / n))) for n in ("conversation_trace.jsonl",
                                                                           "synthetic_trace.jsonl")]
    raise SystemExit("first argument: tuning or heldout")


def main() -> None:
    which, names = sys.argv[1], sys.argv[2:] or ["lru", "arc", "belady", "gd"]
    for need in ("lru", "belady"):
        if need not in names:
            names.insert(0 if need == "lru" else len(names), need)
    print(f"cost model (assumed): Llama-3-8B, linear {LINEAR / 1e9:.2f} GFLOP/token, attention "
          f"{ATTN / 1e3:.0f} kFLOP per token per earlier token (equal at {LINEAR / ATTN:,.0f} tokens)")
    t0 = time.perf_counter()
    for label, bs, load in sources(which):
        chains = load()
        fp = footprint(chains)
        costs_of = {}

        def prompt_cost(n: int) -> float:
            c = costs_of.get(n)
            if c is None:
                c = costs_of[n] = sum(block_cost(i, bs) for i in range(n))
            return c

        total = sum(prompt_cost(n) for n in chains.prompt_blocks)
        median_blocks = sorted(chains.prompt_blocks)[len(chains.prompt_blocks) // 2]
        print(f"{label}: median prompt {median_blocks} blocks of {bs} tokens (~{median_blocks * bs:,} tokens); a "
              f"block there costs {block_cost(median_blocks - 1, bs):.2f}x the first block", flush=True)
        sums = {n: [0.0, 0.0, 0.0, 0.0] for n in names}  # (hit - lru), (belady - lru) per metric
        worst = {n: (0.0, None) for n in names}
        for frac in FRACTIONS:
            cap = max(1, int(frac * fp))
            row = {}
            for n in names:
                hits: list[int] = []
                r = replay(chains, cap, make(n, bs), hits_out=hits)
                row[n] = (r.hit_rate, sum(prompt_cost(k) for k in hits) / total)
            lru, bel = row["lru"], row["belady"]
            cells = []
            for n in names:
                h, c = row[n]
                s = sums[n]
                s[0] += h - lru[0]
                s[1] += bel[0] - lru[0]
                s[2] += c - lru[1]
                s[3] += bel[1] - lru[1]
                if h - lru[0] < worst[n][0]:
                    worst[n] = (h - lru[0], frac)
                sh, sc = belady_share(lru[0], h, bel[0]), belady_share(lru[1], c, bel[1])
                cells.append(f"{n} {h:.4f}/{c:.4f}" + (f" ({sh:+.2f}/{sc:+.2f})" if sh is not None and
                                                          sc is not None and n not in ("lru", "belady") else ""))
            print(f"{label} @ {cap} ({frac}): " + "  ".join(cells), flush=True)
        for n in names:
            if n in ("lru", "belady"):
                continue
            s = sums[n]
            print(f"  {label} {n}: pooled share of the gap, hit rate {s[0] / s[1]:+.3f}, saved compute "
                  f"{s[2] / s[3]:+.3f}; worst vs LRU {100 * worst[n][0]:+.2f} pts"
                  + (f" @ {worst[n][1]}" if worst[n][1] is not None else ""), flush=True)
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
