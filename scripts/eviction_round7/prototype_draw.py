"""Eviction round 7's prototype draw (docs/eviction.md, seventh round): arc vs lru (and belady) on
workloads drawn at random from four prototype families (chat, rag, loop, mixed), one JSON line per
capacity.  Superseded by ``bench eviction --set generated``; kept because the round's first figures
come from it.  Run from the repository root:

    .venv/bin/python scripts/eviction_round7/prototype_draw.py 7 10 chat,rag,loop,mixed > r7.jsonl

(the round's run was stopped during the mixed family, after 217 capacities).
"""
import json, random, sys, time
from lmdeploy_hostcache.eviction_eval import chains_from_ids, chains_from_trace, footprint, replay, belady_share
from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat

FRACS = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5)

def chat(rng, i):
    lo_u = rng.randint(10, 500); lo_r = rng.randint(10, 500)
    w = ChatWorkload(sessions=rng.randint(80, 500), mean_turns=rng.uniform(1.2, 15),
                     system_prompts=rng.randint(1, 40), system_prompt_tokens=rng.choice([0, 300, 1500, 4000]),
                     user_tokens=(lo_u, lo_u + rng.randint(0, 1500)), reply_tokens=(lo_r, lo_r + rng.randint(0, 1200)),
                     mean_think_s=rng.uniform(2, 600), mean_session_gap_s=rng.uniform(0.2, 30),
                     block_size=rng.choice([16, 32, 64, 128, 512]), seed=rng.randrange(10**6))
    return f"chat{i}", chains_from_trace(generate_chat(w)), w.__dict__ if hasattr(w, '__dict__') else repr(w)

def rag(rng, i):
    D = rng.randint(30, 800); a = rng.uniform(0.0, 1.5); N = rng.randint(1500, 5000)
    drift = rng.choice([0, 0, 500, 2000])
    nid = [0]
    def new():
        nid[0] += 1; return nid[0]
    docs = [[new() for _ in range(rng.randint(4, 120))] for _ in range(D)]
    ranks = list(range(D)); w = [1 / (k + 1) ** a for k in range(D)]
    chains = []
    for r in range(N):
        if drift and r and r % drift == 0:
            rng.shuffle(ranks)
        d = docs[ranks[rng.choices(range(D), w)[0]]]
        chains.append(d + [new() for _ in range(rng.randint(0, 3))])
    return f"rag{i}", chains_from_ids(f"rag{i}", chains), dict(D=D, a=a, N=N, drift=drift)

def loop(rng, i):
    K = rng.randint(4, 60); g = rng.randint(1, 12); N = rng.randint(800, 3000)
    order = rng.choice(["rr", "random", "bursty"])
    nid = [0]
    def new():
        nid[0] += 1; return nid[0]
    sess = [[new() for _ in range(rng.randint(2, 30))] for _ in range(K)]
    chains = []; cur = 0
    for r in range(N):
        if order == "rr": k = r % K
        elif order == "random": k = rng.randrange(K)
        else:
            if rng.random() < 0.3: cur = rng.randrange(K)
            k = cur
        if rng.random() < 0.02:  # session restarts
            sess[k] = [new() for _ in range(rng.randint(2, 30))]
        sess[k] = sess[k] + [new() for _ in range(g)]
        chains.append(list(sess[k]))
    return f"loop{i}", chains_from_ids(f"loop{i}", chains), dict(K=K, g=g, N=N, order=order)

def mixed(rng, i):
    n1, c1, p1 = chat(rng, i); n2, c2, p2 = rag(rng, i)
    # interleave by request index, offsetting ids via digests already distinct per namespace? rebuild ids
    import itertools
    a = [list(x) for x in c1.digests]; b = [list(x) for x in c2.digests]
    # digests from different builders are distinct 64-bit values; reuse them as ids
    out = []; ia = ib = 0
    while ia < len(a) or ib < len(b):
        if ib >= len(b) or (ia < len(a) and rng.random() < len(a) / (len(a) + len(b))):
            out.append(a[ia]); ia += 1
        else:
            out.append(b[ib]); ib += 1
    m = {}
    out = [[m.setdefault(d, len(m) + 1) for d in c] for c in out]
    return f"mixed{i}", chains_from_ids(f"mixed{i}", out), dict(chat=p1, rag=p2)

FAMS = {"chat": chat, "rag": rag, "loop": loop, "mixed": mixed}

def main():
    seed = int(sys.argv[1]); n_per = int(sys.argv[2]); fams = sys.argv[3].split(",")
    pols = sys.argv[4].split(",") if len(sys.argv) > 4 else ["lru", "arc", "belady"]
    rng = random.Random(seed)
    for fam in fams:
        for i in range(n_per):
            name, ch, params = FAMS[fam](rng, i)
            fp = footprint(ch)
            for f in FRACS:
                cap = max(1, int(f * fp))
                row = {"trace": name, "fam": fam, "frac": f, "cap": cap, "fp": fp, "reqs": len(ch)}
                for p in pols:
                    row[p] = replay(ch, cap, p).hit_rate
                print(json.dumps(row), flush=True)
            print(json.dumps({"params": name, "p": str(params)}), flush=True)

main()
