"""agents.py N SEED0 SEED1 FRACS CAND...: the ninth round's agents-restart shape,
AgentWorkload(sessions=80, growth_blocks=16, order='random', restart=0.3 (env RESTART), requests=N, seed),
seeds [SEED0, SEED1); prints, per seed and fraction, candidate - lru in points, then per candidate and
fraction the mean and the minimum over the seeds, and the replay seconds per candidate (lru's too).
Candidates: lru, arc, or hk... names (hawkeye.parse)."""
import os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hawkeye
hawkeye.install()
from lmdeploy_hostcache.eviction_eval import chains_from_trace, footprint, replay
from lmdeploy_hostcache.planner.generator import AgentWorkload, generate
n = int(sys.argv[1]); seeds = range(int(sys.argv[2]), int(sys.argv[3]))
fracs = [float(x) for x in sys.argv[4].split(',')]; names = sys.argv[5:]
restart = float(os.environ.get('RESTART', '0.3'))
mk = lambda k: k if k in ('lru', 'arc') else hawkeye.parse(k)()
res = {}; tt = {k: 0.0 for k in ['lru', *names]}
t0 = time.time()
for s in seeds:
    ch = chains_from_trace(generate(AgentWorkload(sessions=80, growth_blocks=16, order='random', restart=restart, requests=n, seed=s)))
    fp = footprint(ch)
    for f in fracs:
        c = round(f * fp)
        t = time.time(); l = replay(ch, c, 'lru').hit_rate; tt['lru'] += time.time() - t
        row = []
        for k in names:
            t = time.time(); x = replay(ch, c, mk(k)).hit_rate; tt[k] += time.time() - t
            d = 100 * (x - l); res.setdefault((k, f), []).append(d); row.append(f'{k} {d:+.2f}')
        print(f'seed {s} f {f} cap {c} lru {l:.4f}', ' | '.join(row), flush=True)
print(f'--- agents restart={restart} n={n} seeds {seeds.start}-{seeds.stop - 1} ({time.time() - t0:.0f}s); candidate - lru in points')
for k in names:
    cells = [f'{f}: mean {statistics.mean(res[(k, f)]):+.2f} min {min(res[(k, f)]):+.2f}' for f in fracs]
    print(f'{k:28s}', ' | '.join(cells), f' [{tt[k]:.0f}s; lru {tt["lru"]:.0f}s]')
