"""diag.py: per-class OPTgen hit share (labels) at the end of an LRU-ordered replay (tau=0) on chat 0.03/0.06 and WEKA 0.06/0.12."""
import sys; sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)))
import hawkeye; hawkeye.install()
from lmdeploy_hostcache.eviction_eval import chat_chains, load_weka, footprint, replay
import glob
ch = {'chat': chat_chains(), 'weka': load_weka(sorted(glob.glob('../shared/traces/weka_sample/*.json')))}
for name, f in [('chat', 0.03), ('chat', 0.06), ('weka', 0.06), ('weka', 0.12)]:
    c = ch[name]; cap = round(f * footprint(c))
    p = hawkeye.HawkPolicy(tau=0.0)
    r = replay(c, cap, p)
    print(name, f, cap, 'lru', round(r.hit_rate, 4))
    rows = []
    for k in range(hawkeye.NCLS):
        if p.n[k] >= 8:
            kind, rest = divmod(k, 9); dep, tip = divmod(rest, 3)
            rows.append((kind, dep, tip, p.n[k], p.h[k] / p.n[k]))
    for kind in range(5):
        nk = p.n[hawkeye.NCLS + kind]
        print(f'  kind {kind}: n {nk:.0f} p {p.h[hawkeye.NCLS+kind]/max(nk,1):.2f} |', ' '.join(f'd{d}t{t}:{pp:.2f}({n:.0f})' for (kk, d, t, n, pp) in rows if kk == kind))
