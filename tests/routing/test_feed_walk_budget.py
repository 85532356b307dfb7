"""The node feed's GPU-tier reconciliation on LMDeploy's real scheduler (CPU): one ``on_step``
visits at most ``walk_budget`` trie nodes whatever the trie's size, a pass spreads over steps, and
the published GPU tier still converges to the trie's contents (additions by running requests and
removals the eviction observer never reported, a cleared trie) without ever publishing a block
the trie does not hold; a feed read encodes its answer without holding the feed's lock."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lmdeploy.pytorch.paging.scheduler")

from lmdeploy.messages import KVTransferConfig  # noqa: E402
from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig  # noqa: E402
from lmdeploy.pytorch.kv_connector import KVConnectorRole  # noqa: E402
from lmdeploy.pytorch.messages import SequenceMeta, UpdateTokenMode  # noqa: E402
from lmdeploy.pytorch.paging.block_trie.node import Node  # noqa: E402
from lmdeploy.pytorch.paging.scheduler import Scheduler  # noqa: E402
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy  # noqa: E402

from lmdeploy_hostcache.integration import cache_state_feed as csf  # noqa: E402
from lmdeploy_hostcache.integration.cache_state_feed import NodeCacheFeed  # noqa: E402
from lmdeploy_hostcache.integration.connector import (CONNECTOR_NAME, build_host_tier_connector,  # noqa: E402
                                                      install_scheduler_hook)
from lmdeploy_hostcache.routing import feed as routing_feed  # noqa: E402
from lmdeploy_hostcache.routing.ids import publish_id  # noqa: E402
from lmdeploy_hostcache.routing.table import GPU, HOST  # noqa: E402
from lmdeploy_hostcache.tier.digest import block_digest, encode_tokens  # noqa: E402

BS = 4
BUDGET = 8


class Engine:
    """A real Scheduler with the host tier's scheduler role; requests are prefilled by hand."""

    def __init__(self, gpu_blocks: int, max_batches: int = 8):
        tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
            "hostcache_config": {"min_restore_tokens": 0}, "host_cache_blocks": 16, "host_slot_bytes": 1000,
            "model_identity": "toy"})
        cc = CacheConfig(max_batches=max_batches, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=gpu_blocks,
                         enable_prefix_caching=True, device_type="cpu", kv_transfer_config=tc,
                         max_prefill_token_num=1 << 16)
        conn = build_host_tier_connector(KVConnectorRole.SCHEDULER, cc)
        self.s = Scheduler(SchedulerConfig(max_batches=max_batches, max_session_len=1 << 14), cc,
                           seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=conn)
        install_scheduler_hook(self.s)
        self.side = conn.scheduler_side
        self.trie = self.s.block_trie
        self.next_sid = 0
        self.running: dict[int, object] = {}

    def start(self, tokens) -> bool:
        """Prefill a request and leave it running (its blocks join the trie now); False if not scheduled."""
        sid = self.next_sid
        self.next_sid += 1
        seq = self.s.add_session(sid).add_sequence(np.asarray(tokens, dtype=np.int64))
        out = self.s.schedule(is_prefill=True)
        if seq not in out.running:
            self.s.end_session(sid)
            return False
        self.s.activate_seqs(out.running)
        seq.update_token_ids(np.array([7]), mode=UpdateTokenMode.PREFILL)
        self.s.release_completed_prefill_reservations(out.running)
        self.running[sid] = seq
        return True

    def finish(self, sid: int, feed: NodeCacheFeed | None = None) -> None:
        seq = self.running.pop(sid)
        if feed is not None:      # what the connector's request_finished does with a feed attached
            feed.on_request_finished(seq)
        seq.state.finish()
        self.s.end_session(sid)

    def truth(self) -> set[int]:
        """Published ids of every base-model trie block, chained independently of the feed."""
        ns = self.side.namespaces.for_adapter(None)
        root = self.trie._roots.get(None)
        out, stack = set(), [(c, ns.root) for c in (root.children.values() if root is not None else ())]
        while stack:
            node, parent = stack.pop()
            d = block_digest(parent, encode_tokens(node.token_ids), ns.seed)
            out.add(publish_id(d))
            stack.extend((c, d) for c in node.children.values())
        return out

    def nodes(self) -> int:
        stack, n = [r for r in self.trie._roots.values()], 0
        while stack:
            x = stack.pop()
            n += x.block_id >= 0
            stack.extend(x.children.values())
        return n


def _fill(engine: Engine, rng, requests: int, blocks: int, prefixes=None, finish=True) -> None:
    for _ in range(requests):
        head = prefixes[rng.integers(len(prefixes))] if prefixes else np.empty(0, dtype=np.int64)
        tail = rng.integers(0, 30000, size=max(blocks * BS + 1 - len(head), BS + 1))
        if engine.start(np.concatenate([head, tail])) and finish:
            engine.finish(max(engine.running))


class Counter:
    """Counts the trie nodes one on_step hashes (``side.node_digest``): the nodes its walk met."""

    def __init__(self, side):
        self.calls, self._inner = 0, side.node_digest
        side.node_digest = self

    def __call__(self, node):
        self.calls += 1
        return self._inner(node)


class EventCheck:
    """After each on_step: every id it published as stored is in the trie now (counts withdrawals)."""

    def __init__(self, engine: Engine, feed: NodeCacheFeed):
        self.engine, self.feed, self.seq, self.removed = engine, feed, feed.publisher.seq, 0

    def __call__(self) -> None:
        pub = self.feed.publisher
        new = list(pub._ring)[len(pub._ring) - (pub.seq - self.seq):] if pub.seq > self.seq else []
        self.seq = pub.seq
        stored = {i for op, i in new if op == (GPU << 1)}
        self.removed += sum(1 for op, _ in new if op == (GPU << 1) | 1)
        assert stored <= self.engine.truth(), "a block published as stored is not in the trie"


def _steps_until_exact(engine: Engine, feed: NodeCacheFeed, counter: Counter, limit: int, check=None) -> int:
    """Budgeted on_step until the published GPU tier equals the trie; every step within budget."""
    for step in range(1, limit + 1):
        counter.calls = 0
        feed.on_step()
        assert counter.calls <= feed.walk_budget and feed.last_step_units <= feed.walk_budget, \
            (counter.calls, feed.last_step_units)
        if check is not None:
            check()
        if feed.publisher.contents()[GPU] == engine.truth() and feed._walk is None and feed._leftovers is None:
            return step
    raise AssertionError(f"the published GPU tier did not converge in {limit} steps")


def _limit(engine: Engine, feed: NodeCacheFeed) -> int:
    """Steps two whole passes take at most: one already going on, one that starts after the last change."""
    per_pass = (engine.nodes() + len(engine.trie._roots)) // feed.walk_budget + 2 \
        + (len(feed._gpu) + engine.nodes()) // feed.walk_budget + 2
    return 2 * per_pass + 2


def test_one_step_visits_at_most_the_budget_and_a_pass_spreads_over_steps():
    engine = Engine(gpu_blocks=512)
    rng = np.random.default_rng(0)
    _fill(engine, rng, requests=40, blocks=8)
    n = engine.nodes()
    assert n >= 300
    feed = NodeCacheFeed(engine.side, engine.trie, 512, walk_budget=BUDGET, gpu_refresh_s=0.0)
    counter = Counter(engine.side)
    steps = _steps_until_exact(engine, feed, counter, _limit(engine, feed))
    assert steps >= n // BUDGET, "a pass of the whole trie cannot fit in fewer steps"
    assert feed.publisher.contents()[GPU] == engine.truth()
    # nothing changes: a new pass again visits at most BUDGET nodes per step, publishes nothing
    seq0, passes = feed.publisher.seq, feed.passes
    while feed.passes < passes + 2:
        counter.calls = 0
        feed.on_step()
        assert counter.calls <= BUDGET and feed.last_step_units <= BUDGET
    assert feed.publisher.seq == seq0
    # force: one whole pass at once (tools, tests), exactly the trie
    counter.calls = 0
    feed.on_step(force=True)
    assert counter.calls >= n and feed.publisher.contents()[GPU] == engine.truth()


def test_a_pass_starts_at_most_every_gpu_refresh_s():
    engine = Engine(gpu_blocks=256)
    _fill(engine, np.random.default_rng(1), requests=10, blocks=6)
    feed = NodeCacheFeed(engine.side, engine.trie, 256, walk_budget=1 << 20, gpu_refresh_s=3600.0)
    counter = Counter(engine.side)
    feed.on_step()                       # the first pass: whole within one step (the budget is large)
    assert counter.calls == engine.nodes() and feed.passes == 1
    assert feed.publisher.contents()[GPU] == engine.truth()
    counter.calls = 0
    for _ in range(5):
        feed.on_step()
    assert counter.calls == 0 and feed.last_step_units == 0


def test_running_requests_and_unobserved_evictions_converge_within_budget():
    """No eviction observer chained and no request_finished: only the budgeted walk sees the trie.
    Requests start (their blocks join the trie while they run), finish and are evicted between
    the steps of passes; the feed never publishes a block the trie lacks, and once the trie stops
    changing it converges (additions and withdrawals) within two passes' worth of steps."""
    engine = Engine(gpu_blocks=96, max_batches=4)
    rng = np.random.default_rng(2)
    prefixes = [rng.integers(0, 30000, size=BS * k) for k in (2, 3, 5)]
    feed = NodeCacheFeed(engine.side, engine.trie, 96, walk_budget=BUDGET, gpu_refresh_s=0.0)
    counter, check = Counter(engine.side), EventCheck(engine, feed)
    for it in range(120):
        if len(engine.running) >= 3 or (engine.running and rng.random() < 0.4):
            engine.finish(min(engine.running))
        _fill(engine, rng, requests=1, blocks=int(rng.integers(3, 9)), prefixes=prefixes, finish=False)
        counter.calls = 0
        feed.on_step()
        assert counter.calls <= BUDGET and feed.last_step_units <= BUDGET
        check()
    assert check.removed > 0, "the workload evicted blocks the walk had published, unobserved"
    while engine.running:
        engine.finish(min(engine.running))
    assert engine.trie.evict(30) > 0     # more leaves leave, unobserved
    _steps_until_exact(engine, feed, counter, _limit(engine, feed), check)
    assert feed._stale == 0


def test_events_and_walk_together_never_show_a_block_the_trie_lacks():
    """The connector's path: eviction observer chained, request_finished publishing the path. The
    published GPU tier is a subset of the trie after every step, and equal to it once it settles."""
    engine = Engine(gpu_blocks=80, max_batches=4)
    rng = np.random.default_rng(3)
    prefixes = [rng.integers(0, 30000, size=BS * k) for k in (1, 4)]
    feed = NodeCacheFeed(engine.side, engine.trie, 80, walk_budget=BUDGET, gpu_refresh_s=0.0)
    feed.chain_eviction(engine.trie._kv_lifecycle)
    counter = Counter(engine.side)
    for it in range(150):
        if len(engine.running) >= 3 or (engine.running and rng.random() < 0.5):
            engine.finish(min(engine.running), feed)
        _fill(engine, rng, requests=1, blocks=int(rng.integers(2, 8)), prefixes=prefixes, finish=False)
        counter.calls = 0
        feed.on_step()
        assert counter.calls <= BUDGET
        assert feed.publisher.contents()[GPU] <= engine.truth()
    while engine.running:
        engine.finish(min(engine.running), feed)
    _steps_until_exact(engine, feed, counter, _limit(engine, feed))
    feed.close()


def test_a_cleared_trie_is_withdrawn_within_budget():
    engine = Engine(gpu_blocks=512)
    _fill(engine, np.random.default_rng(4), requests=30, blocks=8)
    feed = NodeCacheFeed(engine.side, engine.trie, 512, walk_budget=BUDGET, gpu_refresh_s=0.0)
    feed.on_step(force=True)
    published = len(feed.publisher.contents()[GPU])
    assert published == len(engine.truth()) >= 200
    engine.trie._roots[None] = Node(-1, -1, None)   # every block gone at once, no event
    counter = Counter(engine.side)
    steps = _steps_until_exact(engine, feed, counter, 2 * (published // BUDGET + 4))
    assert feed.publisher.contents()[GPU] == set() and steps >= published // BUDGET


def test_a_read_encodes_its_answer_without_the_lock(monkeypatch):
    """A new reader's snapshot (and an events answer) is encoded after the feed's lock is released:
    the scheduler thread's listeners, which take that lock, wait only for a copy."""
    engine = Engine(gpu_blocks=256)
    _fill(engine, np.random.default_rng(5), requests=10, blocks=6)
    feed = NodeCacheFeed(engine.side, engine.trie, 256)
    feed.on_step(force=True)
    with feed.lock:
        for i in range(5000):
            feed.publisher.stored(HOST, (i + 1) << 70)
    expected_snapshot = feed.publisher.poll(None, None)
    since = feed.publisher.seq - 3000
    expected_events = feed.publisher.poll(feed.publisher.epoch, since, 1000)
    encoded = []
    real_b64 = routing_feed._b64

    def b64(arr):
        assert not feed.lock.locked(), "the answer is encoded under the feed's lock"
        encoded.append(len(arr))
        return real_b64(arr)

    monkeypatch.setattr(routing_feed, "_b64", b64)
    snap = feed.poll(None, None)
    assert snap == expected_snapshot and encoded
    assert feed.poll(feed.publisher.epoch, since, 1000) == expected_events
    assert feed.poll(expected_events["epoch"], expected_events["seq"])["seq"] == feed.publisher.seq
    assert feed.poll("another-epoch", since)["snapshot"] == expected_snapshot["snapshot"]
    assert csf.NodeCacheFeed.poll is not routing_feed.FeedPublisher.poll


def test_running_requests_blocks_are_published_at_the_next_step_not_the_next_pass():
    """``on_running`` (the connector calls it with the step's running requests before ``on_step``): a running
    request's trie blocks are published at once, walking up only to the first block already published, while
    no reconciliation pass runs (it would take trie blocks / walk_budget steps to reach them)."""
    engine = Engine(gpu_blocks=256)
    rng = np.random.default_rng(5)
    _fill(engine, rng, requests=6, blocks=6)
    feed = NodeCacheFeed(engine.side, engine.trie, 256, walk_budget=1 << 20, gpu_refresh_s=3600.0)
    feed.on_step()                                   # one whole pass now, none for an hour
    assert feed.publisher.contents()[GPU] == engine.truth()
    prefix = rng.integers(0, 30000, size=3 * BS)
    assert engine.start(np.concatenate([prefix, rng.integers(0, 30000, size=5 * BS + 1)]))
    counter = Counter(engine.side)
    feed.on_running(list(engine.running.values()))
    feed.on_step()                                   # no pass: nothing else publishes
    assert feed.publisher.contents()[GPU] == engine.truth()
    first = counter.calls
    assert 0 < first <= 9, "the new path up to its first published block, no more"
    counter.calls = 0
    feed.on_running(list(engine.running.values()))   # nothing new: one lookup per running request
    assert counter.calls == len(engine.running)
    # a second request shares the first one's prefix: only its own new blocks are walked
    assert engine.start(np.concatenate([prefix, rng.integers(0, 30000, size=2 * BS + 1)]))
    counter.calls = 0
    feed.on_running([engine.running[max(engine.running)]])
    assert feed.publisher.contents()[GPU] == engine.truth() and counter.calls <= 3 + 1
