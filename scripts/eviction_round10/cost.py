"""cost.py [CAND]: metadata of the round-10 policy on tuning traces (chat generator at 0.03 and 0.12, WEKA at
0.12 of the footprint): per replay, the largest counts seen at the end of each request of ghost digests, OPTgen
records, occupancy-vector cells, shadow entries and lazy-heap entries, divided by the slot count, and the replay
time against lru and arc on the same trace and capacity (measured here, 2 shared cores)."""
import glob, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hawkeye
hawkeye.install()
from lmdeploy_hostcache.eviction_eval import chat_chains, load_weka, footprint, replay
cand = sys.argv[1] if len(sys.argv) > 1 else "hk:tau=0.7,lam=2,duel=1"
weka = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "../../../shared/traces/weka_sample/*.json")))
traces = {"chat": chat_chains(), "weka": load_weka(weka)}
for name, f in (("chat", 0.03), ("chat", 0.12), ("weka", 0.12)):
    ch = traces[name]; cap = round(f * footprint(ch))
    pol = hawkeye.parse(cand)()
    peak = {}
    orig = pol.begin_request
    def br(ds, n, pol=pol, peak=peak, orig=orig):
        orig(ds, n)
        cur = {"ghost": len(pol._ghost), "optgen_records": len(pol.opt.rec), "optgen_queue": len(pol.opt.q),
               "occ_cells": len(pol.opt.occ), "hawk_heap": len(pol._heap.heap),
               "lru_heap": len(pol._lru.heap) if pol._lru is not None else 0}
        if pol.duel:
            cur.update(shadow_lru=len(pol.s_lru), shadow_pol=len(pol.s_hk), shadow_heap=len(pol.s_heap))
        for k, v in cur.items():
            peak[k] = max(peak.get(k, 0), v)
    pol.begin_request = br
    t = time.perf_counter(); r = replay(ch, cap, pol); tc = time.perf_counter() - t
    tl = replay(ch, cap, "lru").seconds; ta = replay(ch, cap, "arc").seconds
    print(f"{name} {f} cap {cap} R {pol.R}: hit {r.hit_rate:.4f}; replay {tc:.2f} s vs lru {tl:.2f} s, arc {ta:.2f} s")
    print("   peak per slot: " + ", ".join(f"{k} {v / cap:.2f}" for k, v in peak.items()))
print("per resident block: one _M record (key, class, averse flag) in pdata; arc keeps one (segment), lru none")
