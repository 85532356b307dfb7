"""Concurrency in the planner (issue 12 item 3): running requests pin their blocks."""
import json

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner.concurrency import ConcurrentTwoTierCache, Lifetimes, replay_concurrent
from lmdeploy_hostcache.planner.replay import prepare_trace, replay
from lmdeploy_hostcache.planner.traces import Request, Trace


def _trace(reqs, bs=4):
    return Trace("t", bs, [Request(t, n, out, tuple(ids), i) for i, (t, n, out, ids) in enumerate(reqs)])


def test_lifetimes_are_validated_and_labelled():
    with pytest.raises(ValueError, match="decode_tokens_per_s must be a number > 0"):
        Lifetimes(0)
    lt = Lifetimes(10.0, 100.0)
    assert lt.duration_s(200, 30) == pytest.approx(2.0 + 3.0)
    assert "assumed" in lt.describe() and lt.as_dict()["note"] == "assumed rates, not measurements"


def test_a_running_request_takes_room_from_reusable_prefix():
    # GPU of 6 blocks of 4 tokens. X caches blocks 1,2 and finishes at once. A (4 full blocks + a partial
    # block, 2 output tokens at 0.1 token/s) runs 20 s: 4 pinned blocks + 1 held block; the held block
    # evicts X's leaf (block 2). Y repeats X's prompt and must wait for A (5 + 3 > 6 blocks).
    x = (0.0, 9, 0, [1, 2, 3])
    a = (1.0, 17, 2, [30, 31, 32, 33, 34])
    y = (2.0, 9, 0, [1, 2, 3])
    pr = prepare_trace(_trace([x, a, y]))
    seq = replay(pr, 6, 0, "lru", 4)
    assert seq.gpu_hit_blocks == 2          # one at a time: A is gone when Y comes, X's 2 blocks hit
    cache = ConcurrentTwoTierCache(6, 0, "lru", 4, Lifetimes(decode_tokens_per_s=0.1))
    assert cache.serve_at(pr[0]) == (0, 0)
    assert cache.serve_at(pr[1]) == (0, 0)
    a_blocks = pr[1].digests
    assert all(cache.gpu.allocator.pins(cache.gpu.get(d).slot) == 1 for d in a_blocks)   # pinned while running
    assert cache._occupied() == 5 and cache.gpu.get(pr[0].digests[1]) is None          # X's leaf was evicted
    assert cache.serve_at(pr[2]) == (1, 0)  # waited for A (until t = 21), then only block 1 was left
    st = cache.finish()
    assert st.queued_requests == 1 and st.queue_delay_s == pytest.approx(21.0 - 2.0)
    assert st.gpu_hit_blocks == 1 < seq.gpu_hit_blocks


def test_an_idle_trace_gives_the_sequential_gpu_hits():
    # Requests far apart in time: nothing runs concurrently, and a request that holds nothing but its
    # prompt's blocks (block-aligned prompts, no output tokens) leaves the GPU tier as the sequential
    # replay does. (The host tier may differ: a copy in flight is pinned until the clock moves on.)
    reqs = [(10.0 * i, 4 * (2 + i % 3), 0, list(range(100 * (i % 5), 100 * (i % 5) + 2 + i % 3)))
            for i in range(30)]
    pr = prepare_trace(_trace(reqs))
    seq = replay(pr, 12, 0, "lru", 4)
    conc = replay_concurrent(pr, 12, 0, "lru", 4, Lifetimes(decode_tokens_per_s=1.0))
    assert conc.gpu_hit_blocks == seq.gpu_hit_blocks > 0
    assert conc.max_running == 1 and conc.queued_requests == 0 and conc.output_blocks == 0


def test_cache_state_is_balanced_after_finish():
    reqs = [(0.5 * i, 4 * 5 + 2, 7, [1, 2, 3, 4, 5 + i, 50 + i]) for i in range(20)]
    pr = prepare_trace(_trace(reqs))
    cache = ConcurrentTwoTierCache(12, 8, "lru", 4, Lifetimes(decode_tokens_per_s=2.0))
    for p in pr:
        cache.serve_at(p)
    st = cache.finish()
    assert not cache._pins and cache._held_now == 0 and not cache._running
    cache.host.check_invariants()
    assert cache.gpu.allocator.num_used == len(cache.gpu)   # every held slot went back
    assert st.output_blocks > 0 and st.max_running > 1
    assert not any(cache.gpu.allocator.pins(s) for s in range(12))


def test_plan_reports_hit_rates_with_and_without_concurrency(capsys):
    assert main(["plan", "--quiet", "--limit", "400", "--gpu-blocks", "40", "--host-blocks", "200",
                 "--decode-tokens-per-s", "25"]) == 0
    out = capsys.readouterr().out
    assert "with concurrency" in out and "one request at a time" in out and "25 tokens/s" in out
    assert main(["plan", "--json", "--limit", "400", "--gpu-blocks", "40", "--host-blocks", "200"]) == 0
    o = json.loads(capsys.readouterr().out)
    w = o["with_concurrency"]
    assert w["requests"] == o["requests"] == 400 and w["lifetimes"]["decode_tokens_per_s"] == 40.0
    assert w["gpu_hit_rate"] <= o["gpu_hit_rate"] + 1e-9   # pinned blocks only take room from reuse
    assert main(["plan", "--json", "--limit", "50", "--no-concurrency"]) == 0
    assert "with_concurrency" not in json.loads(capsys.readouterr().out)


def test_a_request_pins_the_resident_block_it_does_not_match():
    # LMDeploy never matches the block that ends at the prompt's last token (it recomputes that token),
    # but when the trie already holds it the sequence shares the trie's block: held while the request
    # runs, stamped when it ends. X stores blocks 1 and 2; Y repeats X's 8-token prompt: GPU hit = block
    # 1, block 2 is already there. Both stay pinned while Y decodes.
    x = (0.0, 8, 0, [1, 2])
    y = (1.0, 8, 8, [1, 2])
    pr = prepare_trace(_trace([x, y]))
    cache = ConcurrentTwoTierCache(4, 0, "lru", 4, Lifetimes(decode_tokens_per_s=1.0))
    cache.serve_at(pr[0])
    assert cache.serve_at(pr[1]) == (1, 0)
    assert all(cache.gpu.allocator.pins(cache.gpu.get(d).slot) == 1 for d in pr[1].digests)
    cache.finish()
    assert not cache._pins and not any(cache.gpu.allocator.pins(s) for s in range(4))


@pytest.mark.parametrize("host_write_s,y_arrival,restored", [(0.0, 1.0, 2), (1.5, 1.0, 0), (1.5, 2.5, 2)])
def test_a_host_copy_is_restorable_host_write_s_after_its_eviction(host_write_s, y_arrival, restored):
    # GPU of 3 blocks: Z (t = 0.5) evicts X's two blocks to the host; Y repeats X's prompt. The copies
    # started at 0.5 are restorable only once the clock is more than host_write_s past that.
    x = (0.0, 9, 0, [1, 2, 3])
    z = (0.5, 9, 0, [7, 8, 9])
    y = (y_arrival, 9, 0, [1, 2, 3])
    pr = prepare_trace(_trace([x, z, y]))
    cache = ConcurrentTwoTierCache(3, 4, "lru", 4, Lifetimes(decode_tokens_per_s=1.0), host_write_s=host_write_s)
    cache.serve_at(pr[0])
    cache.serve_at(pr[1])
    assert cache.stats.demotions == 2
    assert cache.serve_at(pr[2]) == (0, restored)
    cache.finish()
    cache.host.check_invariants()


def test_host_write_s_is_validated_and_reported(capsys):
    with pytest.raises(ValueError, match="host_write_s must be a number >= 0"):
        ConcurrentTwoTierCache(4, 4, "lru", 4, host_write_s=-1.0)
    assert main(["plan", "--json", "--limit", "50", "--host-write-s", "2.5"]) == 0
    assert json.loads(capsys.readouterr().out)["with_concurrency"]["host_write_s"] == 2.5
