"""Replays eviction round 7's guarded ``arc`` prototype (docs/eviction.md, seventh round).

Run from the repository root:

    .venv/bin/python scripts/eviction_round7/guarded_eval.py tuning '{"window": 4, "margin": 0}'
    .venv/bin/python scripts/eviction_round7/guarded_eval.py uniform '{"window": 4, "margin": 0}' ...

``tuning``: the WEKA sessions and the chat generator at the bench's six fractions; per trace, the
pooled gap share and the worst point vs LRU of ``arc`` and of each variant.  ``uniform``: 12 seeds
of the prototype draw's short nearly-uniform documents shape (169 documents, Zipf 0.07, 1,647
requests) at 0.06, 0.12 and 0.25 of the footprint; per capacity, mean, sd, min and max of
policy - lru in points, for ``arc`` and each variant.
"""
import glob
import json
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guarded import GuardedARC  # noqa: E402

from lmdeploy_hostcache.eviction_eval import (chains_from_ids, chat_chains, footprint, load_weka,  # noqa: E402
                                              replay)

FRACS = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5)
WEKA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces", "weka_sample", "*.json")


def uniform_documents(seed, documents=169, zipf=0.07, requests=1647):
    """The prototype draw's documents shape (no partial blocks; ids chained per document)."""
    rng = random.Random(seed)
    nid = [0]

    def new():
        nid[0] += 1
        return nid[0]
    docs = [[new() for _ in range(rng.randint(4, 120))] for _ in range(documents)]
    w = [1 / (k + 1) ** zipf for k in range(documents)]
    chains = [docs[rng.choices(range(documents), w)[0]] + [new() for _ in range(rng.randint(0, 3))]
              for _ in range(requests)]
    return chains_from_ids("uniform documents", chains)


def tuning(variants):
    for name, ch in (("weka", load_weka(sorted(glob.glob(WEKA)))), ("chat", chat_chains())):
        fp = footprint(ch)
        tot = {}
        for f in FRACS:
            cap = max(1, int(f * fp))
            lru, bel = replay(ch, cap, "lru").hit_rate, replay(ch, cap, "belady").hit_rate
            pols = {"arc": "arc", **{json.dumps(v, sort_keys=True): GuardedARC(cap, **v) for v in variants}}
            for k, pol in pols.items():
                x = replay(ch, cap, pol).hit_rate
                t = tot.setdefault(k, [0.0, 0.0, 0.0])
                t[0] += x - lru
                t[1] += bel - lru
                t[2] = min(t[2], x - lru)
        for k, (win, gap, worst) in tot.items():
            print(f"{name} {k}: pooled gap share {win / gap:+.3f}, worst vs lru {100 * worst:+.2f} pts", flush=True)


def uniform(variants):
    res = {}
    for s in range(12):
        ch = uniform_documents(100 + s)
        fp = footprint(ch)
        for f in (0.06, 0.12, 0.25):
            cap = int(f * fp)
            lru = replay(ch, cap, "lru").hit_rate
            res.setdefault(("arc", f), []).append(100 * (replay(ch, cap, "arc").hit_rate - lru))
            for v in variants:
                res.setdefault((json.dumps(v, sort_keys=True), f), []).append(
                    100 * (replay(ch, cap, GuardedARC(cap, **v)).hit_rate - lru))
    for (k, f), d in res.items():
        print(f"{k} @ {f}: mean {statistics.mean(d):+.2f} sd {statistics.stdev(d):.2f} "
              f"min {min(d):+.2f} max {max(d):+.2f} pts", flush=True)


if __name__ == "__main__":
    mode, variants = sys.argv[1], [json.loads(v) for v in sys.argv[2:]]
    {"tuning": tuning, "uniform": uniform}[mode](variants)
