"""bench.py [bench eviction args...]: `bench eviction` with the round-10 candidates (names ``hk...``, see
hawkeye.parse) added to the policies; prints the bench's own tables and summaries, then per candidate
and trace the policy's counters (averse inserts, evictions, hawk-mode share) of its last replay, and
the summed replay seconds per policy and trace.  Example:
  .venv/bin/python scripts/eviction_round10/bench.py --set tuning --policies lru arc belady hk:tau=0.2
"""
import io, json, sys, contextlib, os, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hawkeye
hawkeye.install()
args = sys.argv[1:]
if "--policies" in args:
    i = args.index("--policies") + 1
    names = []
    while i < len(args) and not args[i].startswith("--"):
        names.append(args[i]); i += 1
    hawkeye.register(names)
from lmdeploy_hostcache import cli
import lmdeploy_hostcache.eviction_eval as ev
_replay = ev.replay
last = {}
def replay(chains, cap, policy="lru", **kw):
    if isinstance(policy, str) and policy.startswith("hk"):
        pol = hawkeye.parse(policy)()
        r = _replay(chains, cap, pol, **kw)
        st = dict(pol.stats)
        st.update(R=pol.R, optgen_hit=pol.opt.n_hit, optgen_miss=pol.opt.n_miss, optgen_expired=pol.opt.n_expired,
                  optgen_records=len(pol.opt.rec), ghost=len(pol._ghost), resident=len(r.stats) and None)
        last[(policy, chains.name, cap)] = st
        return r
    return _replay(chains, cap, policy, **kw)
ev.replay = replay
buf = io.StringIO()
want_json = "--json" in args
with contextlib.redirect_stdout(buf):
    rc = cli.main(["bench", "eviction", "--no-progress", "--json", *[a for a in args if a != "--json"]])
out = json.loads(buf.getvalue())
if want_json:
    print(json.dumps(out))
else:
    # compact tables: per trace, hit rate (gap share) per policy
    by = {}
    for r in out["results"]:
        by.setdefault(r["trace"], {}).setdefault((r["capacity"], r["fraction"]), {})[r["policy"]] = r
    pols = list(dict.fromkeys(r["policy"] for r in out["results"]))
    for tr, caps in by.items():
        print(f"\n{tr}")
        print(f"{'cap':>8} {'frac':>5} " + " ".join(f"{p[:22]:>22}" for p in pols))
        for (cap, fr), row in caps.items():
            cells = []
            for p in pols:
                r = row[p]; g = r["gap_share"]
                cells.append(f"{r['hit_rate']:.4f}" + (f" ({g:+.2f})" if g is not None and p not in ('lru', 'belady') else ""))
            print(f"{cap:>8} {fr if fr is not None else '':>5} " + " ".join(f"{c:>22}" for c in cells))
    print("\nper policy and trace: pooled gap share / mean share / worst vs lru (pts @ cap)")
    for s in out["summary"]:
        m = "n/a" if s["mean_gap_share"] is None else f"{s['mean_gap_share']:+.3f}"
        p = "n/a" if s["pooled_gap_share"] is None else f"{s['pooled_gap_share']:+.3f}"
        print(f"  {s['policy']:>34} [{s['set']}] {s['trace'][:30]:<30} pooled {p:>7} mean {m:>7} worst {100*s['min_delta_vs_lru']:+.2f} pts @ {s['min_delta_capacity']}")
    print("\nper policy and set:")
    for s in out["set_summary"]:
        p = "n/a" if s["pooled_gap_share"] is None else f"{s['pooled_gap_share']:+.3f}"
        print(f"  {s['policy']:>34} [{s['set']}] {s['traces']} traces {s['points']} points, {s['points_below_guard']} below guard; pooled {p}; worst {100*s['min_delta_vs_lru']:+.2f} pts ({s['min_delta_trace']} @ {s['min_delta_capacity']})")
    secs = {}
    for r in out["results"]:
        secs.setdefault((r["policy"], r["trace"]), 0.0)
        secs[(r["policy"], r["trace"])] += r["seconds"]
    print("\nreplay seconds summed over capacities:")
    for (p, t), s in secs.items():
        print(f"  {p:>34} {t[:30]:<30} {s:8.1f}")
    if last:
        print("\ncandidate counters per replay (averse inserts / all inserts, averse evictions / evictions, hawk-mode requests, OPTgen labels hit/miss/expired, R):")
        for (p, t, cap), st in last.items():
            ins = st["averse_inserts"] + st["friendly_inserts"]
            print(f"  {p:>34} {t[:24]:<24} {cap:>7}: averse ins {st['averse_inserts']}/{ins}, averse ev {st['averse_evictions']}/{st['evictions']}, "
                  f"hawk-mode {st['hawk_mode_requests']}/{st['requests']} (sw {st['switches']}), opt {st['optgen_hit']}/{st['optgen_miss']}/{st['optgen_expired']}, R {st['R']}")
    print(f"\ntotal {out['seconds']} s")
print("rc", rc, file=sys.stderr)
