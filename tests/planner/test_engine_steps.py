"""The planner's LMDeploy step model (issue 12 item 3): prefill and decode steps, admission rules."""
import gzip
import json

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner import cli as planner_cli
from lmdeploy_hostcache.planner.concurrency import Lifetimes
from lmdeploy_hostcache.eviction_eval import EVAL_NAMESPACE
from lmdeploy_hostcache.planner.engine_steps import (LONG_POLICIES, EngineSteps, SteppedTwoTierCache, _GpuTierIndex,
                                                      _last_refresh_order, replay_stepped)
from lmdeploy_hostcache.planner.replay import prepare_trace, replay
from lmdeploy_hostcache.planner.traces import Request, Trace


def _trace(reqs, bs=4):
    return Trace("t", bs, [Request(t, n, out, tuple(ids), i) for i, (t, n, out, ids) in enumerate(reqs)])


def _schedule(reqs, gpu=100, host=0, engine=EngineSteps(4, 2, 1000)):
    cache = SteppedTwoTierCache(gpu, host, "lru", 4, Lifetimes(1.0), engine=engine, record=True)
    for p in prepare_trace(_trace(reqs)):
        cache.serve_at(p)
    st = cache.finish()
    return cache, cache.results, st


def test_engine_settings_are_validated_and_the_cli_defaults_match():
    with pytest.raises(ValueError, match="prefill_interval must be an int >= 1"):
        EngineSteps(prefill_interval=0)
    with pytest.raises(ValueError, match="short_turns must be an int >= 1"):
        EngineSteps(short_turns=0)
    with pytest.raises(ValueError, match="long_aging_s must be a number > 0"):
        EngineSteps(long_aging_s=0)
    with pytest.raises(ValueError, match="long_policy must be one of size, fifo"):
        EngineSteps(long_policy="lifo")
    e = EngineSteps()
    assert (e.max_batches, e.prefill_interval, e.max_prefill_tokens) == planner_cli._STEP_DEFAULTS
    assert LONG_POLICIES == planner_cli.LONG_POLICIES
    # the long-prefill lane's settings are LMDeploy's defaults (LMDEPLOY_PT_TTFT_SHORT_TURNS, _AGING_SEC, _POLICY)
    assert e.as_dict() == {"max_batches": 128, "prefill_interval": 16, "max_prefill_tokens": 8192,
                           "short_turns": 3, "long_aging_s": 2.0, "long_policy": "size",
                           "load_delay_steps": 0, "load_block_s": 0.0}
    with pytest.raises(ValueError, match="load_delay_steps must be an int >= 0"):
        EngineSteps(load_delay_steps=-1)
    with pytest.raises(ValueError, match="load_block_s must be a finite number >= 0"):
        EngineSteps(load_block_s=float("inf"))


def test_a_host_load_lands_later_by_the_steps_its_copy_takes_beyond_the_first():
    """Two steps when the copy fits in one step (the harness with copies that land at the next poll); one more
    per further step the copy of its blocks takes, and ``load_delay_steps`` more whatever its size."""
    e = EngineSteps(load_block_s=0.01)          # 10 ms a block; 40 steps a second: 25 ms a step
    assert [e.load_steps(n, 40.0) for n in (0, 1, 2, 3, 5, 6, 25)] == [2, 2, 2, 3, 3, 4, 11]
    assert EngineSteps().load_steps(10**6, 40.0) == 2
    assert EngineSteps(load_delay_steps=3).load_steps(1, 40.0) == 5
    assert EngineSteps(load_delay_steps=1, load_block_s=0.01).load_steps(3, 40.0) == 4


def test_prefill_steps_follow_the_interval_and_the_half_batch_rule():
    # max_batches 4, prefill_interval 2. A and B arrive in the same step of an idle engine: one prefill
    # step at 1 (the next step's forward is dispatched at once, in the same slot). C arrives at 2.5 while
    # two run (not fewer than max_batches / 2); LMDeploy counts decode steps towards prefill_interval only
    # while a request waits, so C waits for decode steps 3 and 4 and prefills at 5. D arrives at 3.5, waits
    # too and joins that prefill (its pass may admit max_batches - 2 running = 2 requests).
    cache, _, st = _schedule([(0.5, 8, 10, [1, 2]), (0.6, 8, 10, [3, 4]), (2.5, 8, 10, [5, 6]),
                              (3.5, 8, 10, [7, 8])])
    assert cache.schedule == [(1, "prefill", 0), (1, "prefill", 1), (5, "prefill", 2), (5, "prefill", 3)]
    assert st.prefill_steps == 2 and st.max_running == 4
    assert st.queued_requests == 2 and st.queue_delay_s == pytest.approx(3.0)    # C: steps 3, 4; D: step 4
    # R runs; A and B (80 tokens each) arrive together: one prefill step (5) within a 1000-token budget;
    # with a 100-token budget B cannot join it and, two running, waits for 2 decode steps (6, 7)
    reqs = [(0.5, 8, 30, [1, 2]), (4.5, 80, 10, [3, 4]), (4.6, 80, 10, [5, 6])]
    cache, _, _ = _schedule(reqs)
    assert cache.schedule == [(1, "prefill", 0), (5, "prefill", 1), (5, "prefill", 2)]
    cache, _, _ = _schedule(reqs, engine=EngineSteps(4, 2, 100))
    assert cache.schedule == [(1, "prefill", 0), (5, "prefill", 1), (8, "prefill", 2)]


def test_a_host_load_waits_two_steps_and_later_arrivals_go_first():
    # A and B fill a 6-block GPU tier in turn: A's last blocks go to the host. C repeats A's prefix: blocks 1
    # and 2 are still on the GPU, block 3 is on the host, so C's load starts at step 21 and it prefills two
    # steps later (23). D arrives meanwhile, fits beside C's blocks and prefills first (22).
    cache, served, st = _schedule([(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 13, 1, [10, 11, 12, 13]),
                                   (20.5, 13, 1, [1, 2, 3, 9]), (21.5, 5, 1, [50, 51])], gpu=6, host=8)
    assert served[2] == (2, 1)
    assert cache.schedule[2:] == [(21, "load", 2), (22, "prefill", 3), (23, "prefill", 2)]
    assert st.load_waits == 1 and st.host_hit_blocks == 1


@pytest.mark.parametrize("block_s,prefill_at", [(0.5, 23), (1.0, 23), (1.01, 24), (2.5, 25)])
def test_a_host_load_whose_copy_takes_more_than_a_step_prefills_that_much_later(block_s, prefill_at):
    """The previous test's C with its one-block load's copy taking ``block_s`` steps (one step a second):
    within a step it lands two steps after it started, each further step the copy takes adds one; D, which
    needs no load, still prefills at 22."""
    reqs = [(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 13, 1, [10, 11, 12, 13]), (20.5, 13, 1, [1, 2, 3, 9]),
            (21.5, 5, 1, [50, 51])]
    cache, served, st = _schedule(reqs, gpu=6, host=8, engine=EngineSteps(4, 2, 1000, load_block_s=block_s))
    assert served[2] == (2, 1)
    assert cache.schedule[2:] == [(21, "load", 2), (22, "prefill", 3), (prefill_at, "prefill", 2)]


@pytest.mark.parametrize("block_s,prefill_at", [(0.0, 23), (0.2, 23), (0.3, 24), (0.6, 25)])
def test_a_load_of_several_blocks_takes_the_copy_time_of_all_of_them(block_s, prefill_at):
    """C restores four host blocks (a 4-block GPU tier kept none of A's): its copy takes 4 x ``block_s`` steps,
    so 0.2 s a block fits in a step, 0.3 (1.2 steps) lands a step later and 0.6 (2.4 steps) two."""
    reqs = [(0.5, 17, 1, [1, 2, 3, 4, 5]), (5.5, 17, 1, [10, 11, 12, 13, 14]), (20.5, 17, 1, [1, 2, 3, 4, 9]),
            (21.5, 5, 1, [50, 51])]
    cache, served, st = _schedule(reqs, gpu=4, host=8, engine=EngineSteps(4, 2, 1000, load_block_s=block_s))
    assert served[2] == (0, 4)
    assert cache.schedule[2:4] == [(21, "load", 2), (prefill_at, "prefill", 2)]


def test_a_started_load_takes_only_its_loaded_blocks_and_its_tail_waits_for_room():
    # The same requests in a 5-block tier. LMDeploy admits C's load (step 21) for its whole prefill (4 blocks
    # with the preallocation) but allocates only its matched and loaded blocks (3); D (2 blocks) arrives at
    # 21.5 and borrows the rest: it prefills at 22. C's load completes at 23 (its host copies stay in the
    # host tier until then), but its tail no longer fits beside D: C prefills at 24, after D's end.
    cache = SteppedTwoTierCache(5, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000), record=True)
    prs = prepare_trace(_trace([(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 13, 1, [10, 11, 12, 13]),
                                (20.5, 13, 1, [1, 2, 3, 9]), (21.5, 5, 1, [50, 51])]))
    for p in prs:
        cache.serve_at(p)                                   # decides the steps before D's arrival (22)
    restored = prs[2].digests[1:3]
    assert cache.schedule[-1] == (21, "load", 2) and cache._occupied() == 3
    assert all(d in cache.host for d in restored)          # read by the load in flight: still there
    st = cache.finish()
    assert cache.schedule[2:] == [(21, "load", 2), (22, "prefill", 3), (24, "prefill", 2)]
    # the load completed: the copies stay, flagged as on the GPU (the engine's keep_restored_blocks)
    assert all(cache.host.get(d).on_gpu for d in restored)
    assert st.host_hit_blocks == 2


def test_blocks_a_load_writes_are_matched_only_once_it_completes():
    # In a 6-block tier C matches blocks 1 and 2 on the GPU and loads block 3 from the host at step 21. E
    # repeats C's prefix at 21.5, while the load is in flight: LMDeploy's trie does not hold block 3 yet, so E
    # matches 2 blocks on the GPU and finds block 3 still in the host tier (read-pinned by C's load); once
    # the load completes (step 23) E would match all 3 on the GPU.
    cache = SteppedTwoTierCache(6, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000), record=True)
    prs = prepare_trace(_trace([(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 13, 1, [10, 11, 12, 13]),
                                (20.5, 13, 1, [1, 2, 3, 9]), (21.5, 13, 1, [1, 2, 3, 8])]))
    for p in prs[:3]:
        cache.serve_at(p)
    cache._run_until(22)                                    # decide step 21: C's load starts
    assert cache.results[2] == (2, 1) and cache.schedule[-1] == (21, "load", 2)
    assert cache.probe(prs[3]) == (2, 1)
    cache._step = 23
    cache._fire_due()                                       # the load completes: its blocks are published
    assert cache.probe(prs[3]) == (3, 0)


def test_a_load_of_blocks_another_load_is_writing_restores_them_into_blocks_of_its_own():
    # Round 10, items 36 and 37. C loads block 3 at step 21 (as above). E, with the same prefix, finds block 3
    # in the host tier while C's load writes it: LMDeploy's trie does not hold it yet, so E's admission counts
    # only blocks 1 and 2 as shared, and E's load takes a block of its own for block 3 and restores it. That
    # duplicate is freed when E's load completes (LMDeploy's ``_publish`` deduplicates it to the trie's block).
    cache = SteppedTwoTierCache(6, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000), record=True)
    prs = prepare_trace(_trace([(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 13, 1, [10, 11, 12, 13]),
                                (20.5, 13, 1, [1, 2, 3, 9]), (21.5, 13, 1, [1, 2, 3, 8])]))
    for p in prs:
        cache.serve_at(p)                                   # decides the steps before E's arrival (22)
    e = prs[3]
    assert cache.schedule[-1] == (21, "load", 2) and cache._occupied() == 3
    assert cache.probe(e) == (2, 1) and cache._pinned_run(e, 0) == 2
    cache._start_load(e, 22)
    assert cache.results[2:] == [(2, 1), (2, 1)]            # each load restored block 3
    assert cache._occupied() == 4 and cache.stats.host_hit_blocks == 2 == cache.stats.requests_with_host_hits
    assert e.digests[2] in cache.host                       # read by both loads in flight
    cache._step = 24
    cache._fire_due()                                       # both loads complete: the duplicate is freed
    assert cache._occupied() == 3 and not cache._load_twins and not cache._loading
    assert cache.host.get(e.digests[2]).on_gpu              # kept on the host, flagged (keep_restored)


def test_an_attempt_in_a_prefill_pass_evicts_at_once_unless_the_token_budget_refuses_it_first():
    # 12-block tier, prefill_interval 2. Y ends and stays cached (2 blocks); W decodes for 20 steps. A (5
    # blocks with its preallocation) and B (5) arrive in the same step: A prefills at 6 and B, tried in the
    # same pass, does not fit beside W and A: its attempt evicts Y's blocks at once (step 6). With a 24-token
    # prefill budget B (16 tokens after A's 16) is refused by the budget gate before any eviction: Y's
    # blocks go at B's next attempt, when the interval makes a prefill due (decode steps 7 and 8: step 9).
    reqs = [(0.5, 8, 1, [80, 81]), (0.6, 4, 20, [70]), (5.5, 16, 10, [1, 2, 3, 4]), (5.6, 16, 1, [5, 6, 7, 8])]
    for budget, step in ((1000, 6), (24, 9)):
        cache = SteppedTwoTierCache(12, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, budget), record=True)
        demoted_at = []
        prepare_store = cache.host.prepare_store

        def noting(digest, parent, block_bytes, demoted_at=demoted_at, prepare_store=prepare_store, cache=cache):
            demoted_at.append(cache._clock)
            return prepare_store(digest, parent, block_bytes)

        cache.host.prepare_store = noting
        for p in prepare_trace(_trace(reqs)):
            cache.serve_at(p)
        cache.finish()
        assert cache.schedule[2] == (6, "prefill", 2)
        assert demoted_at[:2] == [step, step], budget


def test_the_waiting_queue_s_tokens_trigger_a_prefill():
    # Two run (not fewer than max_batches / 2) and the interval is 8: C (40 tokens) arrives at 4.5 and waits,
    # below the 64-token threshold; D (40 more) arrives at 5.5 and the queue (80 tokens) reaches it, so a
    # prefill is due at 6. C prefills then; D does not fit in that pass's 64-token budget and waits for the
    # interval (decode steps 7 to 14: prefill at 15). Alone, C (below the threshold) waits for the interval.
    reqs = [(0.5, 8, 30, [1, 2]), (0.6, 8, 30, [3, 4]), (4.5, 40, 1, [5, 6]), (5.5, 40, 1, [7, 8])]
    cache, _, _ = _schedule(reqs, engine=EngineSteps(4, 8, 64))
    assert cache.schedule[2:] == [(6, "prefill", 2), (15, "prefill", 3)]
    cache, _, _ = _schedule(reqs[:3], engine=EngineSteps(4, 8, 64))
    assert cache.schedule[2:] == [(13, "prefill", 2)]


def test_an_admission_that_finds_too_little_room_evicts_at_once():
    # Z (2 blocks) ends and stays cached; A runs with 4 blocks and grows; B needs 5 blocks (its prompt and
    # preallocated tokens) beside A in an 8-block tier. LMDeploy's first attempt at step 4 evicts Z's blocks
    # to make room and keeps them evicted when B still does not fit: they reach the host tier at step 4,
    # not at B's prefill (13).
    cache = SteppedTwoTierCache(8, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000), record=True)
    demoted_at = []
    prepare_store = cache.host.prepare_store

    def noting(digest, parent, block_bytes):
        demoted_at.append(cache._clock)
        return prepare_store(digest, parent, block_bytes)

    cache.host.prepare_store = noting
    for p in prepare_trace(_trace([(0.5, 8, 1, [90, 91]), (2.5, 16, 10, [1, 2, 3, 4]), (3.5, 16, 1, [5, 6, 7, 8])])):
        cache.serve_at(p)
    st = cache.finish()
    assert cache.schedule == [(1, "prefill", 0), (3, "prefill", 1), (13, "prefill", 2)]
    assert demoted_at[:2] == [4, 4] and st.attempt_evictions == 2


def test_a_request_does_not_start_before_the_blocks_it_needs_are_free():
    # 8 GPU blocks. A holds its 4 prompt blocks and grows to 7 while it decodes 10 tokens; B needs 5
    # (its prompt plus prefill_interval preallocated tokens) and waits until A's end is seen. A prefills
    # in step 1 with its first decode in the same slot (idle engine), decode steps 1..9 give tokens
    # 2..10, the engine schedules step 10 before it sees the end, so B prefills at 11.
    cache, _, st = _schedule([(0.5, 16, 10, [1, 2, 3, 4]), (1.5, 16, 1, [5, 6, 7, 8])], gpu=8)
    assert cache.schedule == [(1, "prefill", 0), (11, "prefill", 1)]
    assert st.queued_requests == 1


def test_without_evictions_the_gpu_hits_are_the_sequential_ones_and_the_state_is_balanced():
    reqs = [(0.7 * i, 4 * (2 + i % 3) + 1, 1 + i % 4, list(range(100 * (i % 5), 100 * (i % 5) + 3 + i % 3)))
            for i in range(40)]
    pr = prepare_trace(_trace(reqs))
    seq = replay(pr, 10_000, 0, "lru", 4)
    stepped = replay_stepped(pr, 10_000, 0, "lru", 4, Lifetimes(1.0), EngineSteps(4, 3, 64))
    assert stepped.gpu_hit_blocks == seq.gpu_hit_blocks > 0 and stepped.requests == 40
    cache = SteppedTwoTierCache(14, 6, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 3, 64))
    for p in pr:
        cache.serve_at(p)
    st = cache.finish()
    assert st.requests == 40 and st.prefill_steps > 0 and st.decode_steps > 0
    assert not cache._pins and cache._held_now == 0 and not cache._running and not cache._loaded
    assert cache.gpu.allocator.num_used == len(cache.gpu)
    assert not any(cache.gpu.allocator.pins(s) for s in range(14))
    cache.host.check_invariants()


def test_plan_engine_steps_reports_the_step_model(capsys):
    assert main(["plan", "--quiet", "--limit", "150", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--decode-tokens-per-s", "25", "--engine-steps", "--max-batches", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    w = out["with_concurrency"]
    # a load's copy time: the host block's bytes per rank at the cost model's link rate (64 MiB at 25 GB/s)
    assert w["engine_steps"] == {"max_batches": 8, "prefill_interval": 16, "max_prefill_tokens": 8192,
                                 "short_turns": 3, "long_aging_s": 2.0, "long_policy": "size", "load_delay_steps": 0,
                                 "load_block_s": out["host_block_bytes_per_rank"] / (out["cost_model"]["h2d_gbps"] * 1e9)}
    assert w["engine_steps"]["load_block_s"] == pytest.approx(64 * 2**20 / 25e9)
    assert w["requests"] == 150 and w["prefill_steps"] > 0 and w["decode_steps"] > 0
    assert w["chunk_steps"] > 0 and w["chunked_requests"] > 0      # the trace's longest prompts
    assert main(["plan", "--quiet", "--limit", "150", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--engine-steps"]) == 0
    text = capsys.readouterr().out
    assert "LMDeploy step model: max_batches 128, prefill_interval 16" in text
    assert "one step = 1 / 40 s (the assumed decode rate per request)" in text
    assert "a host load copies a block in 2.68 ms" in text and "a host load lands 2 steps after it starts" in text
    assert "approximate" not in text and "approximate" not in w["note"]
    assert main(["plan", "--quiet", "--limit", "150", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--engine-steps", "--load-delay-steps", "2", "--h2d-gbps", "50"]) == 0
    text = capsys.readouterr().out
    assert "a host load copies a block in 1.34 ms, every host load takes 2 more step(s)" in text
    assert "a host load lands 4 steps after it starts" in text and "one host block's copy takes" not in text
    # a link so slow that one block's copy takes steps: said, since it moves every load's landing
    assert main(["plan", "--quiet", "--limit", "30", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--engine-steps", "--h2d-gbps", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "a host load copies a block in 1,342 ms" in text
    assert ("one host block's copy takes 53.69 steps at the link rate (--h2d-gbps; one step = 1 / 40 s), so every "
            "host load lands at least 55 steps after it starts") in text


def test_a_load_time_the_step_model_would_replay_for_ever_is_refused(capsys):
    """Every step of a load in flight is replayed: a link so slow (or a delay so long) that one block's load
    takes more than 100,000 steps is refused before the replay, naming the option."""
    assert main(["plan", "--quiet", "--limit", "20", "--engine-steps", "--h2d-gbps", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --h2d-gbps 1e-06: one host block's load would take 2,684,356 steps") and \
        "at most 100,000" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["plan", "--quiet", "--limit", "20", "--engine-steps", "--load-delay-steps", "100001"])
    assert "--load-delay-steps: expected an int in [0, 100000]" in capsys.readouterr().err


def test_the_default_concurrency_figures_say_they_are_approximate_and_name_the_step_model(capsys):
    """Off the rows the tests pin, the default model often misses the harness by more than 0.02 (no batch
    limit, no chunked prefill): its figures say so and point to the mode checked against the engine."""
    from lmdeploy_hostcache.planner.concurrency import APPROXIMATE_ADMISSION

    argv = ["plan", "--quiet", "--limit", "100", "--gpu-blocks", "40", "--host-blocks", "200"]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("concurrency model:"))
    assert APPROXIMATE_ADMISSION in line and "--engine-steps" in line
    assert main([*argv, "--json"]) == 0
    assert APPROXIMATE_ADMISSION in json.loads(capsys.readouterr().out)["with_concurrency"]["note"]


@pytest.mark.parametrize("argv,message", [
    (["--max-batches", "8"], "--max-batches set the step model: add --engine-steps"),
    (["--engine-steps", "--no-concurrency"], "--no-concurrency skips the concurrency replay that --engine-steps sets"),
    (["--no-concurrency", "--decode-tokens-per-s", "5", "--host-write-s", "1"],
     "--no-concurrency skips the concurrency replay that --decode-tokens-per-s, --host-write-s set"),
    (["--engine-steps", "--sweep"], "--engine-steps applies to a single run"),
    (["--short-prefill-turns", "2"], "--short-prefill-turns set the step model: add --engine-steps"),
    (["--long-prefill-aging-s", "5"], "--long-prefill-aging-s set the step model: add --engine-steps"),
    (["--long-prefill-policy", "fifo"], "--long-prefill-policy set the step model: add --engine-steps"),
    (["--load-delay-steps", "1"], "--load-delay-steps set the step model: add --engine-steps"),
])
def test_step_options_without_the_step_model_are_refused(capsys, argv, message):
    assert main(["plan", "--quiet", "--limit", "50", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_pass_that_starts_a_load_goes_on_to_the_next_waiting_request():
    # R1 and R2 decode (two running: not fewer than max_batches / 2). C (13 tokens, its first three blocks in
    # the host tier) and D (5 tokens) arrive together: their 18 tokens reach max_prefill_tokens, so step 15
    # prefills. Its pass starts C's load and, as LMDeploy's pass does after LOAD_STARTED, goes on to D, which
    # prefills in the same step: D must not wait for the decode steps a queue of 5 tokens would need.
    reqs = [(0.5, 13, 1, [1, 2, 3, 4]), (5.5, 37, 1, list(range(100, 110))), (10.5, 5, 30, [20, 21]),
            (10.6, 5, 30, [22, 23]), (14.5, 13, 1, [1, 2, 3, 9]), (14.6, 5, 1, [30, 31])]
    cache = SteppedTwoTierCache(12, 8, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 18), record=True)
    for p in prepare_trace(_trace(reqs)):
        cache.serve_at(p)
    cache.finish()
    assert cache.results[4] == (0, 3)
    assert [e for e in cache.schedule if e[2] in (4, 5)][:2] == [(15, "load", 4), (15, "prefill", 5)]


@pytest.mark.parametrize("output,left", [(4, 0), (9, 2)])
def test_a_decoding_request_leaves_the_full_blocks_it_held_at_its_last_growth(output, left):
    # 13 tokens, 4 preallocated (prefill_interval): 5 blocks (20 tokens) on admission. With 4 output tokens it
    # never grows, and LMDeploy attaches a decoding sequence's full blocks to its trie only when it grows:
    # the block its output filled (tokens 13-16) is freed at its end, not cached. With 9 it grows once, at
    # token 8 (20 tokens held: 5 full blocks), and leaves the 2 full blocks past its prompt's 3.
    _, _, st = _schedule([(0.5, 13, output, [1, 2, 3, 4])], engine=EngineSteps(4, 4, 1000))
    assert st.output_blocks == left


def test_plan_engine_steps_says_when_prompts_would_be_prefilled_in_chunks(capsys):
    # the bundled trace's prompts are thousands of tokens long: with a 4,096-token budget some are chunked by
    # LMDeploy; the note says how many and which lane settings the step model assumes (none above all)
    base = ["plan", "--quiet", "--limit", "200", "--gpu-blocks", "40", "--host-blocks", "200", "--engine-steps"]
    assert main([*base, "--max-prefill-tokens", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    notes = [n for n in out["notes"] if "max_prefill_tokens" in n]
    first = [json.loads(line) for line in gzip.open(planner_cli.bundled_trace_path(), "rt")][:200]
    longer = sum(r["input_length"] > 4096 for r in first)
    assert 0 < longer < 200
    assert len(notes) == 1 and notes[0].startswith(f"step model: {longer:,} of 200 prompts are longer than")
    assert "prefills the uncached part of such a prompt in chunks" in notes[0]
    assert "LMDEPLOY_PT_TTFT_SHORT_TURNS" in notes[0] and "the step model follows these settings" in notes[0]
    assert main([*base, "--max-prefill-tokens", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not [n for n in out["notes"] if "max_prefill_tokens" in n]
    assert main([*base, "--max-prefill-tokens", "4096"]) == 0
    assert f"note: step model: {longer:,} of 200 prompts are longer than max_prefill_tokens (4,096)" in \
        capsys.readouterr().out


def test_a_long_prompt_is_prefilled_in_chunks_with_a_decode_step_after_each_chunk_but_the_last():
    # max_prefill_tokens 16: L (40 tokens) is prefilled in chunks of 16, 16 and 8 tokens, one forward each.
    # R decodes. L's first chunk runs at 3 (a short-only pass skips it, then a long-first pass takes it);
    # after a chunk LMDeploy defers the next one for a decode step (4); the second chunk runs at 5 and the
    # last one, never deferred, at 6: it gives L's first token. L holds only its chunks' blocks meanwhile
    # (16 tokens: 4 blocks after its first chunk, no preallocation).
    reqs = [(0.5, 8, 20, [1, 2]), (2.5, 40, 3, list(range(10, 20)))]
    cache = SteppedTwoTierCache(100, 0, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 16), record=True)
    for p in prepare_trace(_trace(reqs)):
        cache.serve_at(p)
    cache._run_until(4)
    ch = cache._chunked
    assert ch is not None and len(ch.pinned) + len(ch.held) == 4
    st = cache.finish()
    assert cache.schedule == [(1, "prefill", 0), (3, "chunk", 1), (5, "chunk", 1), (6, "prefill", 1)]
    assert st.chunk_steps == 3 and st.chunked_requests == 1 and st.prefill_steps == 1
    assert cache.results == [(0, 0), (0, 0)] and not cache._pins and cache._held_now == 0


def test_short_prompts_go_first_smallest_first_while_a_long_prompt_waits():
    # R1 and R2 decode. L (40 tokens, longer than max_prefill_tokens 16), S12 (12) and S8 (8) arrive together.
    # LMDeploy's short turns try the short prompts smallest first and skip L: S8 at 3 (S12 no longer fits the
    # 16-token budget: skipped, not a stop), S12 at 4; L waits for a batch slot (4 running) and starts its
    # chunks at 8. With one short turn per long chunk, the long turn comes after S8: L's first chunk at 4,
    # and S12 waits for a slot.
    reqs = [(0.5, 8, 30, [1, 2]), (0.6, 8, 30, [3, 4]), (2.5, 40, 3, list(range(10, 20))), (2.6, 12, 3, [30, 31, 32]),
            (2.7, 8, 3, [40, 41])]
    cache, _, _ = _schedule(reqs, engine=EngineSteps(4, 2, 16))
    assert cache.schedule[2:] == [(3, "prefill", 4), (4, "prefill", 3), (8, "chunk", 2), (10, "chunk", 2),
                                  (11, "prefill", 2)]
    cache, _, _ = _schedule(reqs, engine=EngineSteps(4, 2, 16, short_turns=1))
    assert cache.schedule[2:] == [(3, "prefill", 4), (4, "chunk", 2), (6, "chunk", 2), (7, "prefill", 2),
                                  (10, "prefill", 3)]


def test_the_long_prompt_with_fewest_chunks_goes_first_unless_one_has_aged_or_the_policy_is_fifo():
    # max_prefill_tokens 16, one step per second. L40 (3 chunks) and L64 (4 chunks) arrive together: L40, the
    # smaller, is chunked first (steps 1-4). L24 (2 chunks) arrives at 3.5. When L40 is done (step 5), the
    # long-first turn takes the prompt with the fewest chunks, L24, unless aging has credited L64 one chunk per
    # long_aging_s of waiting (LMDEPLOY_PT_TTFT_AGING_SEC): with 1 s, L64 has waited 4 steps (priority 4 - 4 = 0)
    # and L24 one (2 - 1 = 1), so L64 goes first.
    reqs = [(0.5, 8, 30, [1, 2]), (0.6, 40, 3, list(range(10, 20))), (0.7, 64, 3, list(range(40, 56))),
            (3.5, 24, 3, list(range(30, 36)))]
    cache, _, st = _schedule(reqs, engine=EngineSteps(4, 2, 16, long_aging_s=100.0))
    assert cache.schedule[1:] == [(1, "chunk", 1), (3, "chunk", 1), (4, "prefill", 1), (5, "chunk", 3),
                                  (6, "prefill", 3), (7, "chunk", 2), (9, "chunk", 2), (11, "chunk", 2),
                                  (12, "prefill", 2)]
    cache, _, st = _schedule(reqs, engine=EngineSteps(4, 2, 16, long_aging_s=1.0))
    assert cache.schedule[1:] == [(1, "chunk", 1), (3, "chunk", 1), (4, "prefill", 1), (5, "chunk", 2),
                                  (7, "chunk", 2), (9, "chunk", 2), (10, "prefill", 2), (11, "chunk", 3),
                                  (12, "prefill", 3)]
    assert st.chunked_requests == 3 and not cache._pins
    # LMDEPLOY_PT_TTFT_POLICY=fifo: the long prompts in arrival order, whatever their size or the aging (L64 at 5)
    for aging in (100.0, 1.0):
        cache, _, _ = _schedule(reqs, engine=EngineSteps(4, 2, 16, long_aging_s=aging, long_policy="fifo"))
        assert cache.schedule[4:6] == [(5, "chunk", 2), (7, "chunk", 2)]


@given(hst.lists(hst.tuples(hst.integers(0, 3), hst.integers(0, 6)), max_size=40))
def test_refreshing_each_block_once_at_its_last_refresh_leaves_the_gpu_tier_s_lru_order(refreshes):
    # The short-only pass that skips the same long prompts as the last one (``_skip_refresh``) refreshes each
    # block once, in the order of its last refresh in the skipped prompts' matches, instead of every match in
    # turn. Both must leave the same LRU order, hence the same victims: four chains of 6 blocks sharing one
    # root block, and a random sequence of matched prefixes (chain, length).
    chains = [[0] + [10 * c + i for i in range(1, 7)] for c in range(4)]
    tiers = []
    for _ in range(2):
        tier = _GpuTierIndex(32, verify_tokens=False, on_evict=None)
        for chain in chains:
            parent = EVAL_NAMESPACE.root
            for d in chain:
                if d not in tier._blocks:
                    assert tier.prepare_store(d, parent, b"") is not None
                    tier.complete_store(d, True)
                parent = d
        tiers.append(tier)
    matches = [tuple(chains[c][:n]) for c, n in refreshes]
    for matched in matches:
        tiers[0].touch(matched)
    tiers[1].touch(_last_refresh_order(matches))

    def lru_order(tier):
        return [b.digest for b in sorted(tier._blocks.values(), key=lambda b: b.last_access)]

    assert lru_order(tiers[0]) == lru_order(tiers[1])
    victims = []
    for tier in tiers:
        gone, before = [], set(tier._blocks)
        while tier.evict(1):
            gone += sorted(before - set(tier._blocks))
            before = set(tier._blocks)
        victims.append(gone)
    assert victims[0] == victims[1] and len(victims[0]) == 25


def test_an_admission_that_lacks_free_blocks_first_reclaims_a_completed_load_its_pass_skipped():
    # max_prefill_tokens 16, 14 GPU blocks, 8 host slots. R's blocks [1, 2, 3] end up in the host tier, A (40 tokens:
    # long) matches 2 of them on the GPU and loads 1 at 5; its load completes at 7. At 7 a short-only pass skips A
    # (its tail is still long) and tries B, which arrived at 6.6: the free blocks do not cover B, so LMDeploy's
    # eviction helper (with the connector's reclaim of completed loads) first takes A's blocks. A goes back to the
    # queue and B prefills at 7 (without the reclaim: at 8). A loads again at 10, and the blocks its first
    # load restored count as restored when matched again: 1 GPU hit and 2 restored.
    reqs = [(0.5, 12, 1, [1, 2, 3]), (1.5, 16, 1, [10, 11, 12, 13]), (2.5, 16, 1, [20, 21, 22, 23]),
            (3.5, 8, 40, [30, 31]), (4.5, 40, 2, [1, 2, 3] + list(range(40, 47))),
            (5.6, 16, 1, [60, 61, 62, 63]), (6.6, 16, 2, [50, 51, 52, 53])]
    cache, results, st = _schedule(reqs, gpu=14, host=8, engine=EngineSteps(4, 2, 16))
    assert cache.schedule[4:8] == [(5, "load", 4), (6, "prefill", 5), (7, "prefill", 6), (10, "load", 4)]
    assert st.reclaimed_loads == 1 and results[4] == (1, 2)
    assert not cache._pins and cache._held_now == 0


def test_an_admission_reclaims_completed_loads_from_the_back_of_its_pass_s_queue():
    # Item 38: LMDeploy's ``_evictable_sequences`` walks ``reversed(skipped_waiting + waiting)``: the requests the
    # pass has not tried yet, the last first, then those it skipped, the last skipped first.
    cache = SteppedTwoTierCache(4, 0, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000))
    a, b, c, d = ((0, k, (0, 0, (), 0), object()) for k in range(4))
    order = []

    def reclaim(entry):
        order.append(entry)
        cache._loaded.remove(entry)

    cache._reclaim_load = reclaim
    cache._loaded = [a, b, c, d]
    cache._pass_skipped, cache._pass_pending = [a, b], [c, d]
    cache._reclaim_queued(cache.gpu.num_free_slots + 1)      # more than the free blocks: every candidate goes
    assert order == [d, c, b, a]
    assert cache._reclaim_queued(1) == 0                     # the free blocks cover it: nothing reclaimed
    cache._pass_skipped = cache._pass_pending = None
    assert cache._reclaim_queued(99) == 0                    # outside a pass: nothing


def _holding_steps(reqs, gpu=20, host=0, engine=EngineSteps(4, 2, 1000)):
    """The steps at which the model took GPU blocks for running requests (admissions' partial blocks and
    decode growth), and the cache."""
    cache = SteppedTwoTierCache(gpu, host, "lru", 4, Lifetimes(1.0), engine=engine, record=True)
    steps = []
    hold = cache._hold

    def noting_hold(n):
        steps.append(cache._step)
        return hold(n)

    cache._hold = noting_hold
    for p in prepare_trace(_trace(reqs)):
        cache.serve_at(p)
    cache.finish()
    return steps, cache


def test_a_running_request_grows_at_the_decode_step_whose_scheduler_has_seen_its_tokens():
    # LMDeploy's schedule_running grows a decoding sequence by a block when the tokens the scheduler has seen fill
    # what it holds; a forward's token reaches the scheduler two steps later. X (step 1) holds a partial block. R
    # (6 tokens, prefill_interval 2: 2 blocks, 8 slots) prefills at 2 (token 1, its own partial block held), decodes
    # at 3, 4, 5...: its tokens fill the 8 slots once 2 are seen, at decode step 5 (tokens of steps 2 and 3).
    base = [(0.5, 8, 1, [1, 2]), (1.5, 6, 10, [3, 4])]
    steps, _ = _holding_steps(base)
    assert steps[2] == 5
    # A prefills at 4 (arriving at 3.5): at the decode step after it (5) the scheduler has seen the tokens of steps
    # 2 and 3, all of R's so far: it grows there, one decode step sooner than in a run of decode steps (6)
    steps, cache = _holding_steps(base + [(3.5, 4, 1, [5])])
    assert cache.schedule[2] == (4, "prefill", 2) and steps[2:4] == [4, 5]
    # A prefills at 5 (arriving at 4.5), where R's growth was due: it waits for the next decode step (6), after A's
    # admission took its block
    steps, cache = _holding_steps(base + [(4.5, 4, 1, [5])])
    assert cache.schedule[2] == (5, "prefill", 2) and steps[2:4] == [5, 6]


def test_a_growth_without_a_free_block_first_reclaims_a_completed_load():
    # max_prefill_tokens 16, 11 GPU blocks, 8 host slots. X's blocks [1, 2] reach the host tier; R1 and R2 run from 5;
    # L (10 tokens, [1, 2, 3]) matches block 1 on the GPU and loads block 2 at 9; its load completes at 11 while it
    # waits (two requests run, prefill_interval not reached, L's 2-token tail is short of max_prefill_tokens). At 11
    # R1 and R2 each grow by a block, and no block is free for the second: LMDeploy's eviction helper (with the
    # connector's reclaim of completed loads) first takes L's blocks. L goes back to the queue with its whole prompt,
    # so with W (8 tokens, arrived at 10.5) the queue holds 18 tokens, past max_prefill_tokens: the prefill is due at
    # 12 (without the reclaim: at 13, after prefill_interval decode steps). L's restored block counts as restored.
    reqs = [(0.5, 8, 1, [1, 2]), (2.5, 16, 1, [10, 11, 12, 13]), (4.5, 6, 8, [20, 21]), (4.6, 6, 8, [30, 31]),
            (6.5, 10, 2, [1, 2, 3]), (10.5, 8, 2, [40, 41])]
    cache, results, st = _schedule(reqs, gpu=11, host=8, engine=EngineSteps(4, 2, 16))
    assert cache.schedule[4:] == [(9, "load", 4), (12, "prefill", 4), (13, "prefill", 5)]
    assert st.reclaimed_loads == 1 and results[4] == (1, 1)
    assert not cache._pins and cache._held_now == 0


def test_a_lookup_s_hold_lasts_the_step_and_caps_the_later_lookups_of_that_step():
    # The connector holds a lookup's host hit until the request's load starts or the step's connector metadata is
    # built, and reports a hit only up to what the hold budget (half the host slots) leaves beside the step's other
    # holds. Host tier of 6 slots (budget 3) holding A's chain [1, 2, 3] and B's [10, 11, 12].
    cache = SteppedTwoTierCache(8, 6, "lru", 4, Lifetimes(1.0), engine=EngineSteps(4, 2, 1000))
    a, b = prepare_trace(_trace([(0.5, 16, 1, [1, 2, 3, 4]), (0.6, 16, 1, [10, 11, 12, 13])]))
    for pr in (a, b):
        parent = pr.root
        for d, blk in zip(pr.digests[:3], pr.block_bytes[:3]):
            assert cache.host.prepare_store(d, parent, blk) is not None
            cache.host.complete_store(d, True)
            parent = d
    assert cache.probe(a) == (0, 3) and cache.probe(b) == (0, 3)
    cache._hold_hit(a, a.digests[:1])
    assert cache.probe(b) == (0, 2)          # 3 - A's 1 held block
    assert cache.probe(a) == (0, 3)          # its own hold does not count against it
    assert cache.host.evict(6) == 5          # the held block stays
    assert a.digests[0] in cache.host and cache.probe(b) == (0, 0)
    cache._release_step_holds()
    assert cache.host.evict(1) == 1 and not cache._step_holds and cache._step_held == 0
    # In a replay: at step 14, request 4's lookup holds its 1-block hit and its attempt is refused; in the step's
    # second pass request 3's 3-block hit is capped at 2. Its third block, neither held nor refreshed, is evicted
    # before request 3 loads at 17: 2 blocks restored, not 3, and request 4 restores 2 at 24, not 1.
    reqs = [(3.5, 15, 1, [20, 21, 22, 23]), (6.5, 12, 6, [1, 2, 3]), (6.6, 15, 3, [10, 11, 300, 301]),
            (6.7, 19, 4, [20, 21, 22, 23, 400]), (7.7, 18, 6, [1, 2, 3, 4, 500])]
    cache, results, _ = _schedule(reqs, gpu=7, host=6, engine=EngineSteps(4, 4, 16))
    assert cache.schedule[3:] == [(17, "load", 3), (19, "prefill", 3), (24, "load", 4), (26, "prefill", 4)]
    assert results[3:] == [(0, 2), (0, 2)]
    assert not cache._step_holds and not cache._pins


def test_a_load_reclaimed_twice_counts_what_all_its_loads_restored_and_the_totals_add_up():
    # max_prefill_tokens 16, 10 GPU blocks, 8 host slots. Request 2 ([1, 2] from request 0, then 6 blocks of its own)
    # loads at 21; its load is reclaimed twice (for the chunks of requests 3 and 5) and made again at 31 and 38. Its
    # result counts what all its loads restored, and the run's totals are the sums of the per-request results (with
    # a load reclaimed twice they once drifted: host 3 and GPU 0 here, for results summing to 2 and 1).
    reqs = [(2.5, 16, 3, [1, 2, 3, 100]), (3.0, 32, 6, [10, 200, 201, 202, 203, 204, 205, 206]),
            (3.5, 30, 1, [1, 2, 300, 301, 302, 303, 304, 305]), (3.6, 28, 8, [20, 21, 400, 401, 402, 403, 404]),
            (3.7, 15, 6, [20, 21, 22, 500]), (3.8, 36, 4, [10, 11, 600, 601, 602, 603, 604, 605, 606])]
    cache, results, st = _schedule(reqs, gpu=10, host=8, engine=EngineSteps(4, 4, 16))
    assert [e for e in cache.schedule if e[2] == 2] == [(21, "load", 2), (31, "load", 2), (38, "load", 2),
                                                        (40, "chunk", 2), (41, "prefill", 2)]
    assert results[2] == (0, 2) and results[3] == (1, 0)
    assert (st.gpu_hit_blocks, st.host_hit_blocks) == (sum(g for g, _ in results), sum(h for _, h in results)) == (1, 2)
    assert st.requests == len(reqs) and st.requests_with_host_hits == sum(h > 0 for _, h in results)


def test_a_running_request_without_a_block_to_grow_into_is_preempted_and_prefills_again():
    # 4 GPU blocks. A (4 tokens, 12 out) prefills at 3 (an idle engine runs its first decode in the same slot) and B
    # (4 tokens) at 4; each holds 2 blocks (its prompt and 2 preallocated tokens): the tier is full, nothing cached.
    # At decode step 8 the scheduler has seen 4 of A's tokens (those of steps 3 to 6), which fill its 8 slots, and
    # no block is free or evictable: LMDeploy preempts A (schedule_running). Its blocks are freed and its
    # continuation (its prompt and the 4 tokens seen; the token of step 7, in flight, is dropped) waits; B grows into
    # the freed blocks, and A prefills again at 13, once B's end freed its. The continuation is not a new request.
    cache, results, st = _schedule([(2.5, 4, 12, [100]), (3.5, 4, 8, [200])], gpu=4)
    assert cache.schedule == [(3, "prefill", 0), (4, "prefill", 1), (8, "preempt", 0), (13, "prefill", 0)]
    assert st.preemptions == 1 and st.held_short_blocks == 0
    # B's growth (schedule_running) takes the blocks A kept: A is prefilled again as a whole prompt
    assert (st.resumed_preemptions, st.reclaimed_preemptions) == (0, 1)
    assert st.requests == 2 and st.prompt_blocks == 2 and results == [(0, 0), (0, 0)]
    assert not cache._pins and cache._held_now == 0 and not cache._waiting


def test_a_preempted_request_keeps_its_blocks_and_resumes_with_them_when_nothing_reclaims_them():
    # 6 GPU blocks. A (6 tokens, 12 out) prefills at 3, B and C (4 tokens, 4 out: they never grow) at 4; each holds 2
    # blocks: the tier is full. A's third token fills its 8 slots; at decode step 5 no block is free or evictable and
    # A is preempted. LMDeploy keeps its blocks (WAITING, step kept): it waits as a one-token prompt. No capacity
    # making needs blocks before B and C end, so the pass at 9 resumes A with its blocks and one more (it is not
    # prefilled again: GPU hits and prompt blocks are counted once), and its output blocks still extend its prompt.
    cache, results, st = _schedule([(2.5, 6, 12, [100]), (3.5, 4, 4, [200]), (3.6, 4, 4, [300])], gpu=6)
    assert cache.schedule == [(3, "prefill", 0), (4, "prefill", 1), (4, "prefill", 2), (5, "preempt", 0),
                              (9, "prefill", 0)]
    assert (st.preemptions, st.resumed_preemptions, st.reclaimed_preemptions) == (1, 1, 0)
    assert st.requests == 3 and st.prompt_blocks == 2 + 1 + 1 and results == [(0, 0), (0, 0), (0, 0)]
    # A's 18 tokens leave the output blocks full at its last growth cached: 16 tokens, 3 blocks past its prompt's
    assert st.output_blocks == 3 and st.held_short_blocks == 0
    assert not cache._pins and cache._held_now == 0 and not cache._waiting and not cache._parked
    # with 4 output tokens A is preempted at its first growth (nothing attached yet) and ends without another:
    # its resumed admission attached its full blocks to the trie (block_trie.allocate), so the one its 2 seen
    # output tokens completed (6 + 2 = 8 tokens) stays cached at its end
    cache, results, st = _schedule([(2.5, 6, 4, [100]), (3.5, 4, 4, [200]), (3.6, 4, 4, [300])], gpu=6)
    assert (st.preemptions, st.resumed_preemptions, st.output_blocks) == (1, 1, 1)


def test_host_copies_an_idle_engine_s_forward_started_land_a_step_sooner():
    # host copies take 1.5 steps: a copy started while step t is scheduled is loadable from step t + 2, because the
    # engine schedules t + 1 before it reads t's output. An idle engine dispatches its forward and, at once, the next
    # step's, and then reads the first one's output: its copies are loadable from t + 1 (the harness: a preempted
    # request's blocks, demoted by the chunk that reclaimed them at t, loaded by its next admission at t + 1).
    # 5 GPU blocks: A ([1, 2], 8 tokens) ends and stays cached; the idle engine admits B (12 tokens) at 11, which
    # evicts A's block 2 to the host tier.
    cache = SteppedTwoTierCache(5, 8, "lru", 4, Lifetimes(1.0), host_write_s=1.5, engine=EngineSteps(4, 2, 1000),
                                record=True)
    prepared = prepare_trace(_trace([(0.5, 8, 1, [1, 2]), (10.5, 12, 3, [3, 4, 5]), (12.5, 4, 1, [9]),
                                     (13.5, 12, 1, [1, 2, 6])]))
    for p in prepared[:3]:
        cache.serve_at(p)        # decides the steps before 13
    assert cache.schedule == [(1, "prefill", 0), (11, "prefill", 1)] and cache.stats.demotions == 1
    # at step 12 a prompt that continues A's matches block 1 on the GPU and block 2 in the host tier (a pipelined
    # step's copy would still be in flight: (1, 0))
    assert cache._probe_at(prepared[3], 12) == (1, 1)


def test_a_growth_s_demotions_find_the_host_copies_that_landed_resident():
    # 6 GPU blocks, 2 host slots, copies take 1.5 steps, at most 2 requests in a batch. A ([1, 2]) and B ([3, 4])
    # end and stay cached. C and D (one block each, 12 output tokens) are admitted at 9: their 4 blocks evict A's
    # two, whose host copies fill the host tier and land at 11. The batch is full and nothing waits, so no prefill
    # pass runs after that. When C and D grow, B's blocks are evicted: the host tier holds A's two landed copies,
    # evicts them and stores B's. Before the growths settled the host copies (only a pass did), A's copies still
    # counted as in flight there, nothing could be evicted, and both demotions were refused (2).
    cache = SteppedTwoTierCache(6, 2, "lru", 4, Lifetimes(1.0), host_write_s=1.5, engine=EngineSteps(2, 2, 1000),
                                record=True)
    for p in prepare_trace(_trace([(0.5, 8, 1, [1, 2]), (4.5, 8, 1, [3, 4]), (8.5, 4, 12, [5]), (8.6, 4, 12, [6])])):
        cache.serve_at(p)
    st = cache.finish()
    assert cache.schedule[:4] == [(1, "prefill", 0), (5, "prefill", 1), (9, "prefill", 2), (9, "prefill", 3)]
    assert st.demotions_refused == 0 and st.demotions == 5


def _steps_run(reqs, *, one_decision_per_step):
    from lmdeploy_hostcache.planner import engine_steps as es
    from lmdeploy_hostcache.planner.concurrency import Lifetimes
    from lmdeploy_hostcache.planner.replay import prepare_trace
    from lmdeploy_hostcache.planner.traces import Request, Trace

    trace = Trace("t", 4, [Request(t, n, o, tuple(i), k) for k, (t, n, o, i) in enumerate(reqs)])
    c = es.SteppedTwoTierCache(25, 0, "lru", 4, Lifetimes(1.0), engine=es.EngineSteps(5, 4, 16), record=True)
    if one_decision_per_step:
        c._next_event = lambda limit: 1
    for p in prepare_trace(trace):
        c.serve_at(p)
    st = c.finish()
    return c.schedule, st.decode_steps, st.preemptions


def test_a_preemption_inside_a_run_of_decode_steps_ends_the_run():
    """Runs of decode steps are a shortcut for one decision per step: a growth that preempts a request
    in the middle of a run puts it in the queue, so the next step may be a prefill pass (LMDeploy decides
    every step). The shortcut and the step-by-step replay give the same schedule."""
    reqs = [(2.0, 3, 60, [100]), (4.5, 7, 60, [0, 1]), (5.0, 22, 60, [0, 1, 2, 3, 4, 5])]
    batched = _steps_run(reqs, one_decision_per_step=False)
    stepwise = _steps_run(reqs, one_decision_per_step=True)
    assert batched[2] >= 1, "the trace must preempt"
    assert batched == stepwise


def test_a_request_counts_once_among_those_longer_than_the_gpu_tier(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in (
        {"timestamp": 0, "input_length": 40, "output_length": 5, "hash_ids": list(range(1, 11)), "block_size": 4},
        {"timestamp": 0, "input_length": 8, "output_length": 5, "hash_ids": [50, 51], "block_size": 4},
        {"timestamp": 100, "input_length": 40, "output_length": 5, "hash_ids": list(range(1, 11)), "block_size": 4})))
    assert main(["plan", str(trace), "--engine-steps", "--gpu-blocks", "3", "--host-blocks", "10",
                 "--max-prefill-tokens", "2", "--max-batches", "4", "--prefill-interval", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["with_concurrency"]["gpu_overflow_requests"]
    # requests 0 and 2 (10 blocks each) are longer than the 3-block tier, request 1 (2 blocks) is not; chunks,
    # retries and the continuations of the preempted ones are the same request (test_preempt_counters.py)
    assert got == 2, got
