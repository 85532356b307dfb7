"""Issue 16: a per-request cache salt isolates every tier, through LMDeploy's real Scheduler and
BlockTrie on the CPU harness (oracle-checked KV bytes after every step).

Tenant B sends tenant A's exact prompt with another salt: zero GPU hits and zero host hits, and
its KV is still the oracle's; tenant A with its own salt hits; unsalted requests behave as stock.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

harness = pytest.importorskip("lmdeploy_hostcache.testing.harness")
from lmdeploy_hostcache.testing.harness.clock import counter_access_times  # noqa: E402
from lmdeploy_hostcache.testing.harness.host_tier import (HostSlotChecker, HostTierSpec, build_host_tier_engine,  # noqa: E402
                                                          rank_checkers, scheduler_side)

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests, salted_root  # noqa: E402
from lmdeploy_hostcache.integration.salted_trie import install_salted_trie  # noqa: E402
from lmdeploy_hostcache.l3.keys import StoreKeyspace  # noqa: E402

BS = 16


def _engine(gpu_blocks=24, host_slots=64):
    engine = build_host_tier_engine(harness.HarnessModel(dtype=torch.float16),
                                    harness.HarnessCacheSpec(num_gpu_blocks=gpu_blocks, quant_policy=0,
                                                             max_prefill_token_num=512),
                                    HostTierSpec(host_slots=host_slots, min_restore_tokens=BS))
    install_salted_trie(engine.scheduler.block_trie)
    # GPU blocks and host slots, salted ones included (the slot checker chains each from its salted root)
    return engine, rank_checkers(engine) + [HostSlotChecker(engine)]


def _run(engine, checkers, prompt, salt=None, new_tokens=2):
    h = engine.add_request(prompt, new_tokens)
    if salt is not None:
        engine.sequence_of(h.session_id).cache_salt = salt
    for _ in range(500):
        if h.finished:
            break
        engine.step()
        for c in checkers:
            c.check(f"salt={salt!r}")
    assert h.finished
    for c in checkers:
        assert c.stats.wrong_blocks == 0, c.stats.first_error
    return h


def _prompt(seed, blocks):
    return np.random.default_rng(seed).integers(1, 30000, size=blocks * BS + 3)


def test_gpu_trie_never_matches_across_salts():
    engine, checkers = _engine()
    p = _prompt(1, 6)
    first = _run(engine, checkers, p, salt="tenant-a")
    assert first.cached_tokens == 0
    assert _run(engine, checkers, p, salt="tenant-b").cached_tokens == 0       # other salt: no GPU hit
    assert _run(engine, checkers, p).cached_tokens == 0                          # unsalted: no GPU hit
    assert _run(engine, checkers, p, salt="tenant-a").cached_tokens >= 6 * BS - BS  # own salt: hit
    assert _run(engine, checkers, p).cached_tokens >= 6 * BS - BS                    # unsalted shares as stock
    roots = engine.scheduler.block_trie._roots
    assert None in roots and (None, "tenant-a") in roots and (None, "tenant-b") in roots


def test_host_tier_never_restores_across_salts_and_still_hits_for_the_same_salt(monkeypatch):
    counter_access_times(monkeypatch)   # LMDeploy's whole-second LRU stamps would make eviction order vary
    engine, checkers = _engine(gpu_blocks=16, host_slots=64)
    side = scheduler_side(engine)
    p = _prompt(2, 7)
    _run(engine, checkers, p, salt="tenant-a")
    for i in range(4):  # flush the GPU trie: tenant A's blocks are demoted to host
        _run(engine, checkers, _prompt(100 + i, 7), salt="filler")
    assert side.stats()["host_blocks"] > 0
    hits0 = side.stats()["hit_blocks"]
    b = _run(engine, checkers, p, salt="tenant-b")
    assert b.cached_tokens == 0 and side.stats()["hit_blocks"] == hits0     # zero GPU and host hits
    for i in range(4):
        _run(engine, checkers, _prompt(200 + i, 7), salt="filler")
    hits1 = side.stats()["hit_blocks"]
    a = _run(engine, checkers, p, salt="tenant-a")
    assert side.stats()["hit_blocks"] > hits1 and a.cached_tokens > 0      # same salt: host hits
    side.check_balanced()
    slots = checkers[-1]
    slots.verify("end")
    assert slots.stats.slots_compared > 0 and slots.stats.unknown_resident == 0, slots.stats


def test_unsalted_digests_are_bit_identical_and_salts_change_every_digest_and_store_key():
    ns = Namespace(model="m", block_size=4)
    toks = list(range(32))
    plain = chain_digests(ns, toks)[0]
    assert salted_root(ns, "") == ns.root and salted_root(ns, None) == ns.root
    assert chain_digests(ns, toks, parent=salted_root(ns, ""))[0] == plain
    a = chain_digests(ns, toks, parent=salted_root(ns, "a"))[0]
    b = chain_digests(ns, toks, parent=salted_root(ns, "b"))[0]
    assert not (set(a) & set(plain)) and not (set(a) & set(b))
    space = StoreKeyspace(ns)
    assert not set(space.keys(a)) & set(space.keys(plain))                    # L3 keys follow the digest
    with pytest.raises(ValueError):
        salted_root(ns, b"bytes")


def test_a_new_salt_per_request_does_not_grow_the_trie_roots_without_bound(monkeypatch):
    """Any client may send a fresh cache_salt with every request; salted roots with no cached block
    left are swept, so the roots follow the cached blocks, and every check still holds across sweeps."""
    from lmdeploy_hostcache.integration import salted_trie

    monkeypatch.setattr(salted_trie, "PRUNE_MIN_ROOTS", 8)
    engine, checkers = _engine(gpu_blocks=24, host_slots=16)
    trie = engine.scheduler.block_trie
    p = _prompt(7, 2)
    most = most_live = 0
    for i in range(60):
        _run(engine, checkers, _prompt(100 + i, 2), salt=f"once-{i}", new_tokens=1)
        if i == 0:
            _run(engine, checkers, p, salt="kept")
        most = max(most, len(trie._roots))
        most_live = max(most_live, sum(1 for r in trie._roots.values() if r.children))
    # bounded by the roots that still hold cached blocks (the sweep rule), not by the 61 salts seen
    assert most <= max(8, 2 * most_live) + 1 and most < 61, (most, most_live)
    # a salt whose blocks are still cached keeps its root and its hits
    assert _run(engine, checkers, p, salt="kept").cached_tokens >= BS or ("", "kept") not in trie._roots


def test_an_unsalted_request_never_reuses_a_salted_requests_state_checkpoint():
    """SSM/hybrid models reuse published recurrent-state checkpoints, indexed by adapter and tokens only: an
    unsalted request sending a salted tenant's prompt matched that tenant's checkpoint (its KV blocks and
    state) and went on under the tenant's root. A checkpoint under an unsalted root is still reused."""
    from lmdeploy.pytorch.paging.block_trie.checkpoint import freeze_state_checkpoint_match_data
    from lmdeploy.pytorch.paging.block_trie.node import Node, NodeStateCheckpoint
    from lmdeploy.pytorch.paging.block_trie.trie import BlockTrie

    from lmdeploy_hostcache.integration.request_salt import node_root_salt
    from lmdeploy_hostcache.integration.salted_trie import root_key

    class Allocator:
        def update_access_time(self, blocks):
            pass

        def add_ref_count(self, blocks, n):
            pass

    engine, _ = _engine()
    trie = BlockTrie(allocator=Allocator(), block_size=BS, enabled=True, checkpoint_state_manager=object())
    install_salted_trie(trie)
    prompt = _prompt(7, 3)

    def publish(salt: str, first_block: int) -> None:
        """Two blocks of ``prompt`` under the root of ``salt`` and a checkpoint after them, as LMDeploy's
        ``StateCheckpointLifecycle`` publishes one."""
        trie.__dict__["_hostcache_cur_salt"] = salt
        node = trie._get_or_create_root(None)
        trie.__dict__["_hostcache_cur_salt"] = ""
        for i in range(2):
            tokens = prompt[i * BS:(i + 1) * BS]
            child = Node(trie._hash_block(tokens, ()), first_block + i, tokens, prefix_len=(i + 1) * BS,
                         adapter_name=None)
            child.attach_to(node)
            node = child
        node.state_checkpoint = NodeStateCheckpoint(slot=first_block, step=2 * BS, published=True)
        node.state_checkpoint.exact_match_data = freeze_state_checkpoint_match_data(
            prompt[:2 * BS].copy(), (), np.array([first_block, first_block + 1]),
            trie._hash_block(prompt[BS:2 * BS], ()))
        trie._checkpoint_index.add(node)

    def match(salt=None):
        h = engine.add_request(prompt, 2)
        seq = engine.sequence_of(h.session_id)
        if salt is not None:
            seq.cache_salt = salt
        trie.match(seq)
        return seq.prefix_cache.trie_cursor

    publish("tenant-a", 100)
    assert trie._roots.get(root_key(None, "tenant-a")) is not None
    for salt in ("tenant-b", None):                      # another salt, no salt: a miss, at their own root
        cursor = match(salt)
        assert cursor.prefix_len == 0 and node_root_salt(cursor) == (salt or "")
    publish("", 200)                                      # the same prompt under the unsalted root: reused
    cursor = match()
    assert cursor.prefix_len == 2 * BS and node_root_salt(cursor) == "" and cursor.block_id == 201
