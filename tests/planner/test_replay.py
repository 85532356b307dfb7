"""Two-tier replay over HostIndex: hand-checked traces, tier invariants, Figure 9 validation."""
import pytest

from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
from lmdeploy_hostcache.planner.replay import TwoTierCache, prepare_trace, replay
from lmdeploy_hostcache.planner.traces import Request, Trace, read_mooncake


def _trace(*prompts, bs=4):
    """Each prompt: (block ids, input_length); default length = full blocks + 1 token."""
    reqs = []
    for i, p in enumerate(prompts):
        ids, n = p if isinstance(p, tuple) else (p, len(p) * bs + 1)
        reqs.append(Request(float(i), n, 1, tuple(ids), i))
    return Trace("hand", bs, reqs)


def _resident(idx):
    return {d for d in idx._blocks if idx.is_resident(d)}


def test_hand_checked_demote_and_restore():
    t = _trace([1, 2], [5, 6], [1, 2, 3], [5, 6])
    pr = prepare_trace(t)
    d = {h: dig for p in pr for h, dig in zip(p.request.hash_ids, p.digests)}
    c = TwoTierCache(gpu_blocks=3, host_blocks=4, block_size=4, keep_restored=False)
    assert c.serve(pr[0]) == (0, 0)                     # GPU {1,2}
    assert c.serve(pr[1]) == (0, 0)                     # 2 demoted; GPU {1,5,6}
    assert _resident(c.host) == {d[2]}
    assert c.serve(pr[2]) == (1, 1)                     # 1 on GPU, 2 restored; 6 then 5 demoted
    assert _resident(c.gpu) == {d[1], d[2], d[3]}
    assert _resident(c.host) == {d[5], d[6]}            # 2 left the host (exclusive tiers)
    assert c.serve(pr[3]) == (0, 2)                     # 5, 6 restored; 3 then 2 demoted
    assert _resident(c.gpu) == {d[1], d[5], d[6]}
    assert _resident(c.host) == {d[2], d[3]}
    st = c.finish()
    assert (st.gpu_hit_blocks, st.host_hit_blocks, st.demotions) == (1, 3, 5)
    assert st.prompt_blocks == 3 + 3 + 4 + 3
    assert st.hit_rate == pytest.approx(4 / 13) and st.host_hit_rate == pytest.approx(3 / 13)
    assert st.restored_tokens == 12 and st.recomputed_tokens == st.prompt_tokens - 16
    c.gpu.check_invariants()
    c.host.check_invariants()


def test_hand_checked_kept_restores():
    # The same requests with the server's default (keep_restored): a restored block stays on the host
    # (flagged on_gpu) and its second demotion copies nothing.
    t = _trace([1, 2], [5, 6], [1, 2, 3], [5, 6])
    pr = prepare_trace(t)
    d = {h: dig for p in pr for h, dig in zip(p.request.hash_ids, p.digests)}
    c = TwoTierCache(gpu_blocks=3, host_blocks=4, block_size=4)
    assert c.serve(pr[0]) == (0, 0) and c.serve(pr[1]) == (0, 0)
    assert c.serve(pr[2]) == (1, 1)                     # 2 restored, kept; 6 then 5 demoted
    assert _resident(c.host) == {d[2], d[5], d[6]} and c.host.get(d[2]).on_gpu
    assert c.serve(pr[3]) == (0, 2)                     # 5, 6 restored (kept); 3 demoted, 2 found there
    assert _resident(c.gpu) == {d[1], d[5], d[6]}
    assert _resident(c.host) == {d[2], d[3], d[5], d[6]}
    assert [c.host.get(d[k]).on_gpu for k in (2, 3, 5, 6)] == [False, False, True, True]
    st = c.finish()
    assert (st.gpu_hit_blocks, st.host_hit_blocks, st.demotions) == (1, 3, 4)
    assert c.host.stats.kept_restores == 3 and c.host.stats.kept_reused == 1
    c.gpu.check_invariants()
    c.host.check_invariants()


def test_a_host_hit_is_restored_up_to_half_the_host_slots():
    # the connector holds a reported hit from its lookup until its load starts and holds at most half the
    # host slots, so it reports no more: A's 4 blocks wait in a 6-slot host tier, 3 are restored, 1 recomputed
    pr = prepare_trace(_trace([1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]))
    c = TwoTierCache(gpu_blocks=4, host_blocks=6, block_size=4)
    assert [c.serve(p) for p in pr] == [(0, 0), (0, 0), (0, 3)]
    c = TwoTierCache(gpu_blocks=4, host_blocks=8, block_size=4)
    assert [c.serve(p) for p in pr] == [(0, 0), (0, 0), (0, 4)]


def test_a_host_hit_under_min_restore_tokens_is_recomputed():
    # the connector recomputes a host hit of fewer than min_restore_tokens tokens (its lookup reports no
    # external tokens): A's blocks 1, 2 are demoted by B; A again finds 2 blocks (8 tokens) there
    pr = prepare_trace(_trace([1, 2], [5, 6], [1, 2]))
    for tokens, want in ((0, 2), (8, 2), (9, 0), (12, 0)):
        c = TwoTierCache(gpu_blocks=2, host_blocks=8, block_size=4, min_restore_tokens=tokens)
        got = [c.serve(p) for p in pr]
        assert got == [(0, 0), (0, 0), (0, want)], tokens
        st = c.finish()
        assert st.short_host_hit_blocks == 2 - want and st.host_hit_blocks == want
        assert st.requests_with_host_hits == (want > 0)
        c.gpu.check_invariants()
        c.host.check_invariants()
    # a recomputed hit is neither read nor touched: its host copies stay as they were stored
    d = {h: dig for p in pr for h, dig in zip(p.request.hash_ids, p.digests)}
    c = TwoTierCache(gpu_blocks=2, host_blocks=8, block_size=4, min_restore_tokens=12)
    for p in pr:
        c.serve(p)
    assert [(c.host.get(d[k]).hits, c.host.get(d[k]).on_gpu) for k in (1, 2)] == [(0, False), (0, False)]
    with pytest.raises(ValueError, match="min_restore_tokens"):
        TwoTierCache(gpu_blocks=3, host_blocks=8, block_size=4, min_restore_tokens=-1)


def test_partial_last_block_is_never_cached():
    t = _trace(([1, 2], 6), ([1, 2], 6))  # one full block + a partial one, twice
    st = replay(prepare_trace(t), gpu_blocks=8, host_blocks=0, block_size=4)
    assert st.prompt_blocks == 4 and st.gpu_hit_blocks == 1


def test_request_longer_than_gpu_tier_overflows_without_evicting_itself():
    t = _trace([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    c = TwoTierCache(gpu_blocks=3, host_blocks=10, block_size=4)
    pr = prepare_trace(t)
    assert c.serve(pr[0]) == (0, 0)
    assert c.serve(pr[1]) == (3, 0)  # blocks 1-3 stayed; 4, 5 never fit
    st = c.finish()
    assert st.gpu_overflow_requests == 2 and st.demotions == 0
    c.gpu.check_invariants()


def test_request_never_evicts_its_own_gpu_hits():
    t = _trace([1, 2], [5, 6], [1, 2, 3, 4], [1, 2, 3, 4])
    c = TwoTierCache(gpu_blocks=4, host_blocks=0, block_size=4)
    got = [c.serve(p) for p in prepare_trace(t)]
    assert got == [(0, 0), (0, 0), (2, 0), (4, 0)]  # 6 then 5 were evicted for 3 and 4, not 1 or 2
    c.gpu.check_invariants()


@pytest.fixture(scope="module")
def chat_prepared():
    return prepare_trace(generate_chat(ChatWorkload(sessions=150, seed=1)))


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("gpu, host", [(40, 150), (150, 600), (400, 50)])
def test_tiers_stay_exclusive_and_consistent(chat_prepared, gpu, host, keep):
    # exclusive tiers: no block in both; kept restores: exactly the host's on_gpu blocks are in both
    c = TwoTierCache(gpu, host, block_size=64, keep_restored=keep)
    for k, p in enumerate(chat_prepared):
        c.serve(p)
        if k % 200 == 0:
            c.gpu.check_invariants()
            c.host.check_invariants()
            on_gpu = {d for d, b in c.host._blocks.items() if b.on_gpu}
            assert _resident(c.gpu) & set(c.host._blocks) == on_gpu
            assert keep or not on_gpu
    st = c.finish()
    assert len(c.gpu) <= gpu and len(c.host) <= host
    assert st.host_hit_blocks > 0
    # every host block's chain continues a block held by some tier (no unreachable orphans)
    for b in c.host._blocks.values():
        assert b.parent == chat_prepared[0].root or b.parent in c.gpu._blocks or b.parent in c.host._blocks


def test_gpu_tier_is_unchanged_by_the_host_tier(chat_prepared):
    """The GPU-only column is read off the two-tier run: check that it equals a real GPU-only run."""
    both = TwoTierCache(60, 500, block_size=64)
    alone = TwoTierCache(60, 0, block_size=64)
    g_both = [both.serve(p)[0] for p in chat_prepared]
    g_alone = [alone.serve(p)[0] for p in chat_prepared]
    assert g_both == g_alone
    assert both.finish().hit_rate > alone.finish().hit_rate


def test_unknown_host_policy_is_refused():
    with pytest.raises(ValueError, match="eviction_policy 'nope'"):
        TwoTierCache(4, 4, host_policy="nope")
    with pytest.raises(ValueError, match="gpu_blocks"):
        TwoTierCache(-1, 4)


# Mooncake FAST'25 Figure 9, synthetic column (../shared/traces/README.md): tokens -> hit rate.
FIGURE9_SYNTHETIC = [(1e4, 0.00), (1e6, 0.15), (2e6, 0.23), (3e6, 0.30), (1e7, 0.59), (5e7, 0.66)]


def test_reproduces_mooncake_figure9_synthetic_with_lru(shared_traces):
    trace = read_mooncake(shared_traces / "mooncake" / "synthetic_trace.jsonl")
    assert len(trace) == 3993
    pr = prepare_trace(trace)
    got = []
    for tokens, paper in FIGURE9_SYNTHETIC:
        st = replay(pr, gpu_blocks=int(tokens) // 512, host_blocks=0, host_policy="lru", block_size=512,
                    show_progress=False)
        got.append((tokens, paper, round(st.hit_rate, 3)))
    bad = [g for g in got if abs(g[2] - g[1]) > 0.03]
    assert not bad, f"outside +/-0.03 of Figure 9 (tokens, paper, replay): {got}"


@pytest.mark.parametrize("policy", ["lru", "arc", "s3fifo"])
def test_kept_restores_change_no_hit_and_save_re_demotions(policy):
    # keep_restored (the server's default) only fills slots an exclusive host tier would leave free
    # and reuses them before any eviction: block for block the same hits as exclusive tiers, but a
    # restored block the GPU evicts again is found on the host and not copied again.
    prs = prepare_trace(generate_chat(ChatWorkload(sessions=120, seed=3)))
    for gpu, host in ((60, 150), (60, 2000), (200, 400)):
        excl = TwoTierCache(gpu, host, policy, 64, keep_restored=False)
        kept = TwoTierCache(gpu, host, policy, 64, keep_restored=True)
        for p in prs:
            assert excl.serve(p) == kept.serve(p)
        kept.host.check_invariants()
        a, b = excl.finish(), kept.finish()
        assert b.host_hit_blocks == a.host_hit_blocks > 0 and b.host_evictions == a.host_evictions
        assert b.demotions < a.demotions
        assert kept.host.stats.kept_reused == a.demotions - b.demotions
