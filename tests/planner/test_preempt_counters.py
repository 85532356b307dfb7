"""The step model's per-request counters under preemption (audit of 2026-12-05).

A preempted request is prefilled again as a *continuation* (``SteppedTwoTierCache._preempt`` builds a new
``PreparedRequest`` with a new ``Request``); its hits are not counted again, and neither may the
per-request counters be: ``gpu_overflow_requests`` ("a request counts once"), ``chunked_requests``
("requests whose prompt was prefilled in chunks"), ``load_waits`` ("requests that waited for a host load")
and ``short_host_hit_blocks``.  Every expected value below is derived independently of the model's
counters: from the schedule the model records, or from wrapping the primitives that serve a request.
"""
import random

from lmdeploy_hostcache.planner.concurrency import Lifetimes
from lmdeploy_hostcache.planner.engine_steps import EngineSteps, SteppedTwoTierCache
from lmdeploy_hostcache.planner.replay import TwoTierCache, prepare_trace
from lmdeploy_hostcache.planner.traces import Request, Trace

BS = 4


def _instrumented(reqs, gpu, host, mrt, engine, policy):
    """Replay ``reqs`` with a log of every store that ran out of GPU room (by the request's position in the
    trace) and of every ``serve_blocks`` call: (is it an original request, position, is it a host load, short
    hit).  A load is the one serve that defers the release of its host copies (``_start_load``; a chunked prompt's
    first chunk also stores only part of the prompt, ``load_only``, but releases them at once)."""
    cache = SteppedTwoTierCache(gpu, host, policy, BS, Lifetimes(1.0), engine=engine, record=True,
                                min_restore_tokens=mrt)
    prepared = prepare_trace(Trace("t", BS, list(reqs)))
    originals = {id(p) for p in prepared}
    overflowed: set[int] = set()
    serves: list[tuple[bool, int, bool, int]] = []
    store_run, serve_blocks = cache._store_run, cache.serve_blocks

    def logged_store_run(pr, first, last):
        out = store_run(pr, first, last)
        if out[2]:
            overflowed.add(cache._position[id(pr)])
        return out

    def logged_serve_blocks(pr, defer_host_release=False, load_only=False):
        out = serve_blocks(pr, defer_host_release, load_only)
        serves.append((id(pr) in originals, cache._position[id(pr)], defer_host_release, cache.served_short))
        return out

    cache._store_run = logged_store_run
    cache.serve_blocks = logged_serve_blocks
    for p in prepared:
        cache.serve_at(p)
    st = cache.finish()
    return cache, st, prepared, overflowed, serves


# found by the auditor's fuzzer (seed 248, shrunk): request 0 is preempted 4 times, request 1 four times; their
# continuations are prefilled again, request 1's in chunks (a 34-token prompt, 24-token chunks), and request 0's
# twice after a host load of its own blocks
PREEMPTED = ([Request(8.5, 16, 21, (1017, 1018, 1019, 1020), 0),
              Request(8.6, 34, 15, (1000, 1001, 1002, 1003, 1004, 1021, 1022, 1023), 2)],
             6, 7, 0, EngineSteps(3, 2, 24), "arc")


def test_the_scenario_preempts_and_prefills_continuations_again():
    cache, st, *_ = _instrumented(*PREEMPTED)
    kinds = [(kind, pos) for _, kind, pos in cache.schedule]
    assert st.requests == 2 and st.preemptions == 8
    assert kinds.count(("chunk", 1)) == 2            # request 1's first prefill and a continuation's
    assert ("load", 0) in kinds and st.host_hit_blocks == 0   # the loads are continuations' (never counted)


def test_gpu_overflow_requests_counts_a_preempted_request_once():
    # both requests are longer than the 6-block GPU tier at some point (request 1's 34-token prompt; request 0's
    # continuation, its prompt plus up to 20 output tokens); each counts once however often a continuation
    # overflows again (the old count, keyed by the continuation's new Request object, said 4)
    _, st, _, overflowed, _ = _instrumented(*PREEMPTED)
    assert overflowed == {0, 1}
    assert st.gpu_overflow_requests == len(overflowed) == 2


def test_chunked_requests_counts_a_request_whose_continuation_is_chunked_once():
    cache, st, *_ = _instrumented(*PREEMPTED)
    chunked = {pos for _, kind, pos in cache.schedule if kind == "chunk"}
    assert chunked == {1}
    assert st.chunked_requests == 1                  # was 2: the continuation's chunks counted again
    assert st.chunk_steps == 4                       # every chunk forward still counts: 2 prefills x 2 chunks


def test_load_waits_leaves_out_the_loads_of_continuations():
    cache, st, _, _, serves = _instrumented(*PREEMPTED)
    assert [pos for _, kind, pos in cache.schedule if kind == "load"] == [0, 0]
    admitted_by_load = {pos for original, pos, load, _ in serves if original and load}
    assert admitted_by_load == set()
    assert st.load_waits == 0                        # was 2: both loads were continuations'


def _fuzz_trace(rng):
    """Chat-like sessions (each turn resends the previous prompt plus new blocks), outputs long enough to
    grow and be preempted (the auditor's fuzz_steps.make_trace)."""
    reqs, nid, t = [], 1000, 0.0
    sessions = [[1] if rng.random() < 0.5 else [] for _ in range(rng.randint(2, 5))]
    for _ in range(rng.randint(4, 14)):
        s = rng.randrange(len(sessions))
        add = rng.randint(1, 5)
        ids = sessions[s] = sessions[s] + list(range(nid, nid + add))
        nid += add
        extra = rng.randint(0, BS - 1)
        n = len(ids) * BS + (extra if rng.random() < 0.5 else 0)
        t += rng.choice([0.0, 0.1, 0.5, 1.0, 3.0])
        reqs.append(Request(t, n, rng.randint(1, 24), tuple(ids), s))
    return reqs


def test_per_request_counters_match_an_independent_count_on_fuzzed_traces():
    """Small random traces, most of them with preemptions: every per-request counter equals the count derived
    from the schedule and the serves (about 1 s for 120 traces)."""
    preempted = loads = chunked_conts = 0
    for seed in range(120):
        rng = random.Random(seed)
        reqs = _fuzz_trace(rng)
        gpu, host, mrt = rng.randint(6, 24), rng.randint(2, 16), rng.choice([0, 4, 8, 12])
        engine = EngineSteps(rng.randint(2, 6), rng.randint(1, 6), rng.choice([8, 12, 16, 24, 64]))
        policy = rng.choice(["lru", "arc"])
        cache, st, prepared, overflowed, serves = _instrumented(reqs, gpu, host, mrt, engine, policy)
        # each original request's last serve is the one its counted hits come from (a reclaimed load is served again)
        last = {}
        for original, pos, load, short in serves:
            if original:
                last[pos] = (load, short)
        chunked = {pos for _, kind, pos in cache.schedule if kind == "chunk"}
        where = f"seed {seed}"
        assert st.requests == len(prepared) == len(last), where
        assert st.gpu_overflow_requests == len(overflowed) <= st.requests, where
        assert st.chunked_requests == len(chunked), where
        assert st.load_waits == sum(load for load, _ in last.values()), where
        assert st.short_host_hit_blocks == sum(short for _, short in last.values()), where
        assert (st.gpu_hit_blocks, st.host_hit_blocks) == tuple(map(sum, zip(*cache.results))), where
        preempted += st.preemptions > 0
        loads += st.load_waits > 0
        chunked_conts += any(not original and pos in chunked for original, pos, _, _ in serves)
    # the traces exercise what the counters must survive
    assert preempted > 60 and loads > 10 and chunked_conts > 10, (preempted, loads, chunked_conts)


# -- short_host_hit_blocks under preemption (the auditor's repro_short_hits_preemption.py) ------------------


def _short_hits_check(reqs, gpu, host, mrt, engine, policy, expected):
    """A host hit shorter than min_restore_tokens is recomputed and counted in short_host_hit_blocks when the
    request is served; a continuation is served (adding its short hits) and then taken back.  The expected
    count is computed independently at every serve: the raw host continuation (``probe_found``) capped as the
    docs say (half the host slots, less the holds of the step's other lookups) and compared with the threshold;
    only each original request's last serve counts."""
    cache = SteppedTwoTierCache(gpu, host, policy, BS, Lifetimes(1.0), engine=engine, record=True,
                                min_restore_tokens=mrt)
    prepared = prepare_trace(Trace("t", BS, reqs))
    originals = {id(p): i for i, p in enumerate(prepared)}
    min_blocks = -(-mrt // BS)
    last_short, cont_short = {}, []
    orig_serve = cache.serve_blocks

    def serve_blocks(pr, defer_host_release=False, load_only=False):
        assert not cache._loading, "no loads in these scenarios (the raw lookup would need the state before them)"
        _, found = TwoTierCache.probe_found(cache, pr)
        h = min(found, cache.host.num_slots // 2)
        others = cache._step_held - len(cache._step_holds.get(id(pr), ()))
        if h and cache._step_held:
            h = min(h, max(0, cache.host.num_slots // 2 - others))
        short = h if 0 < h < min_blocks else 0
        out = orig_serve(pr, defer_host_release, load_only)
        if id(pr) in originals:
            last_short[originals[id(pr)]] = short
        else:
            cont_short.append((cache._position[id(pr)], short))
        return out

    cache.serve_blocks = serve_blocks
    for p in prepared:
        cache.serve_at(p)
    st = cache.finish()
    assert st.preemptions > 0, "the scenario must preempt"
    assert any(s for _, s in cont_short), "a continuation must meet a short host hit (the take-back path)"
    assert st.short_host_hit_blocks == sum(last_short.values()) == expected
    assert st.requests == len(reqs) and st.prompt_blocks == sum(p.prompt_blocks for p in prepared)
    assert (st.gpu_hit_blocks, st.host_hit_blocks) == tuple(map(sum, zip(*cache.results)))


def test_short_host_hits_are_counted_once_when_a_preempted_request_is_resumed_or_prefilled_again():
    # request 0 is preempted at step 4 and prefilled again as a continuation whose 1-block host hit (its own
    # block 1001, demoted meanwhile) is short; request 2's 1-block host hit (block 1026) is short: 1
    _short_hits_check([Request(0.5, 13, 11, (1, 1000, 1001), 2),
                       Request(2.7, 26, 10, (1, 1022, 1023, 1024, 1025, 1026), 0),
                       Request(4.3, 50, 8, (1, 1022, 1023, 1024, 1025, 1026, 1032, 1033, 1034, 1035, 1036, 1037), 0)],
                      gpu=10, host=16, mrt=8, engine=EngineSteps(3, 2, 64), policy="lru", expected=1)


def test_short_host_hits_are_counted_once_when_chunked_continuations_find_them_again():
    # request 3's first prefill has a 2-block short hit (1004, 1005); it is preempted and its continuation again
    # finds 2 short blocks; requests 1 and 2's continuations find 2 each: only request 3's first count stays
    _short_hits_check([Request(3.1, 16, 4, (1, 1004, 1005, 1006), 0),
                       Request(3.1, 24, 18, (1, 1007, 1008, 1009, 1010, 1011), 1),
                       Request(9.1, 32, 24, (1, 1000, 1001, 1002, 1003, 1015, 1016, 1017), 3),
                       Request(10.1, 28, 22, (1, 1004, 1005, 1006, 1018, 1019, 1020), 0)],
                      gpu=21, host=4, mrt=12, engine=EngineSteps(5, 6, 8), policy="arc", expected=2)
