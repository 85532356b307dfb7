import sys, time; sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)))
from cands import CANDS, install
install()
from lmdeploy_hostcache.eviction_eval import chains_from_trace, replay
from lmdeploy_hostcache.planner.generator import AgentWorkload, generate
seed=int(sys.argv[1]); cap=int(sys.argv[2])
ch = chains_from_trace(generate(AgentWorkload(sessions=80, growth_blocks=16, order='random', restart=0.3, requests=30000, seed=seed)))
l = replay(ch, cap, 'lru').hit_rate
for k in sys.argv[3:]:
    t=time.time(); x = replay(ch, cap, CANDS[k]()).hit_rate
    print(f'30000 seed {seed} cap {cap} lru {l:.4f} {k} {100*(x-l):+.2f} ({time.time()-t:.0f}s)', flush=True)
