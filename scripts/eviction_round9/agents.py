"""agents.py N SEED0 SEED1 FRACS CAND...: AgentWorkload(80,16,random,restart=0.3) cand - lru in points."""
import sys, time, statistics, json
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)))
from cands import CANDS, install
install()
from lmdeploy_hostcache.eviction_eval import chains_from_trace, footprint, replay
from lmdeploy_hostcache.planner.generator import AgentWorkload, generate
n = int(sys.argv[1]); seeds = range(int(sys.argv[2]), int(sys.argv[3]))
fracs = [float(x) for x in sys.argv[4].split(',')]; names = sys.argv[5:]
restart = float(__import__('os').environ.get('RESTART', '0.3'))
res = {}
t0 = time.time(); tt = {k: 0.0 for k in names}
for s in seeds:
    ch = chains_from_trace(generate(AgentWorkload(sessions=80, growth_blocks=16, order='random', restart=restart, requests=n, seed=s)))
    fp = footprint(ch)
    for f in fracs:
        c = round(f * fp)
        l = replay(ch, c, 'lru').hit_rate
        row = []
        for k in names:
            t = time.time(); x = replay(ch, c, CANDS[k]()).hit_rate; tt[k] += time.time() - t
            d = 100 * (x - l); res.setdefault((k, f), []).append(d); row.append(f'{k} {d:+.2f}')
        print(f'seed {s} f {f} lru {l:.4f}', ' | '.join(row), flush=True)
print(f'--- n={n} seeds {seeds.start}-{seeds.stop - 1} restart={restart} ({time.time() - t0:.0f}s)')
out = []
for k in names:
    cells = []
    for f in fracs:
        d = res[(k, f)]
        cells.append(f'{f}: mean {statistics.mean(d):+.2f} min {min(d):+.2f}')
        out.append(dict(cand=k, frac=f, mean=statistics.mean(d), min=min(d), n=len(d), restart=restart, requests=n))
    print(f'{k:10s}', ' | '.join(cells), f' [{tt[k]:.0f}s]')
with open(f'agents_{n}_{seeds.start}_{seeds.stop}_{restart}.jsonl', 'a') as fh:
    for o in out: fh.write(json.dumps(o) + '\n')
