"""HostTierConnector scheduler role against LMDeploy 0.18.0's real ``Scheduler`` on CPU.

Worker progress is written by hand here (``KVConnectorOutput`` in the encoding of
``integration.worker``) so each test controls exactly when a copy ends and whether it fails;
``test_connector_worker.py`` drives the real worker role and copy engine.
"""
from __future__ import annotations

import difflib
import inspect

import numpy as np
import pytest

pytest.importorskip("lmdeploy.pytorch.paging.scheduler")

from lmdeploy.messages import KVTransferConfig  # noqa: E402
from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig  # noqa: E402
from lmdeploy.pytorch.kv_connector import KVConnectorOutput, KVConnectorRole  # noqa: E402
from lmdeploy.pytorch.messages import MessageStatus, SequenceMeta, UpdateTokenMode  # noqa: E402
from lmdeploy.pytorch.paging.block_trie.kv_lifecycle import KVBlockLifecycle  # noqa: E402
from lmdeploy.pytorch.paging.block_trie.node import Node  # noqa: E402
from lmdeploy.pytorch.paging.scheduler import Scheduler  # noqa: E402
from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy  # noqa: E402

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests  # noqa: E402
from lmdeploy_hostcache.integration.connector import (  # noqa: E402
    CONNECTOR_NAME,
    HostTierConnector,
    build_host_tier_connector,
    install_scheduler_hook,
)
from lmdeploy_hostcache.integration.lifecycle import (  # noqa: E402
    UPSTREAM_TRY_EVICT_LEAF_SHA256,
    HostTierKVBlockLifecycle,
    source_sha256,
)
from lmdeploy_hostcache.integration.namespace import NamespaceFactory, kv_format_name  # noqa: E402
from lmdeploy_hostcache.integration.worker import failed_demotion_marker, pool_reset_marker, resolve_num_slots  # noqa: E402

BS = 4
MODEL = "toy-model"


def make_cache_config(num_gpu_blocks=8, host_blocks=16, min_restore_tokens=0, quant_policy=0, **hc):
    hostcache = {"min_restore_tokens": min_restore_tokens, **hc}
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": hostcache, "host_cache_blocks": host_blocks, "host_slot_bytes": 1000,
        "model_identity": MODEL})
    return CacheConfig(max_batches=8, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=num_gpu_blocks,
                       enable_prefix_caching=True, device_type="cpu", quant_policy=quant_policy,
                       kv_transfer_config=tc)


class Rig:
    """A real Scheduler with the host tier's scheduler role; the worker is played by the test."""

    def __init__(self, **kw):
        self.cc = make_cache_config(**kw)
        self.conn = build_host_tier_connector(KVConnectorRole.SCHEDULER, self.cc)
        self.side = self.conn.scheduler_side
        self.s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=4096), self.cc,
                           seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()), kv_connector=self.conn)
        install_scheduler_hook(self.s)
        self.metas = []
        self.next_session = 0

    def add(self, tokens):
        sid = self.next_session
        self.next_session += 1
        sess = self.s.add_session(sid)
        return sid, sess.add_sequence(np.asarray(tokens, dtype=np.int64))

    def step(self, output: KVConnectorOutput | None = None):
        """One prefill scheduling pass + its metadata + (optional) worker progress + forward."""
        out = self.s.schedule(is_prefill=True)
        meta = self.s.build_connector_meta(out.running)
        self.metas.append(meta)
        if output is not None:
            self.s.update_connector_output(output)
        self.s.activate_seqs(out.running)
        for seq in out.running:
            seq.update_token_ids(np.array([7]), mode=UpdateTokenMode.PREFILL)
        self.s.release_completed_prefill_reservations(out.running)
        for seq in out.running:
            seq.state.finish()
        return out.running, meta

    def complete(self, meta, fail_loads=(), fail_demotions=False):
        """Worker output finishing every op of ``meta``."""
        invalid = set()
        if fail_demotions and meta.demotion_batch is not None:
            invalid.add(failed_demotion_marker(meta.demotion_batch))
        for ld in meta.loads:
            if ld.request_id in fail_loads:
                invalid.update(ld.gpu_blocks)
        return KVConnectorOutput(
            completed_save_ids={meta.demotion_batch} if meta.demotion_batch is not None else None,
            finished_receiving={ld.request_id for ld in meta.loads} or None,
            invalid_block_ids=invalid)

    def poll(self, output: KVConnectorOutput):
        self.s.update_connector_output(output)


def deterministic_lru(monkeypatch):
    """Distinct, counter-based access times: LMDeploy's LRU then never falls back to its
    ``id(node)`` tie-break, whose order changes from run to run."""
    from lmdeploy_hostcache.testing.harness.clock import counter_access_times

    counter_access_times(monkeypatch)


def ns(adapter=None):
    return Namespace(model=MODEL, block_size=BS, kv_format=kv_format_name(0, BS, "same"), adapter=adapter)


def prompt(start, n):
    return list(range(start, start + n))


def demote_first_prompt(rig, a_tokens, b_tokens):
    """Run A to completion, free it, then run B which evicts A's trie leaves; finish the demotion."""
    sid_a, a = rig.add(a_tokens)
    rig.step()
    rig.s.end_session(sid_a)
    sid_b, b = rig.add(b_tokens)
    running, meta = rig.step()
    assert running == [b]
    assert meta is not None and meta.demotions, "evicting trie leaves must queue demotions"
    rig.poll(rig.complete(meta))
    rig.s.end_session(sid_b)
    return meta


# ---------------------------------------------------------------------------------------------


def test_eviction_demotes_leaf_with_chained_digest():
    rig = Rig(num_gpu_blocks=8)
    a_tokens = prompt(1, 17)                   # 4 full blocks enter the trie
    meta = demote_first_prompt(rig, a_tokens, prompt(100, 18))
    digests, blocks = chain_digests(ns(), a_tokens[:16])
    # LRU evicts A's deepest leaf first: its digest chains over the whole 16-token prefix.
    assert rig.side.index.is_resident(digests[3])
    slot = rig.side.index.get(digests[3]).slot
    assert meta.demotions[0][1] == slot
    assert rig.side.index.get(digests[3]).tokens == blocks[3]
    assert rig.side.metrics.demotions == len(meta.demotions)
    assert rig.side.metrics.bytes_to_host == len(meta.demotions) * 1000
    rig.side.check_balanced()


def test_host_hit_waits_for_remote_kvs_then_readmits_with_cached_tokens():
    rig = Rig(num_gpu_blocks=8)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    n_host = len(rig.side.index)
    assert n_host >= 1
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    running, meta = rig.step()
    assert running == [] and c.status == MessageStatus.WAITING_FOR_REMOTE_KVS
    assert len(meta.loads) == 1 and meta.loads[0].request_id == c.seq_id
    load = meta.loads[0]
    gpu_match = 16 - BS * len(load.gpu_blocks)
    # Loaded slots are pinned while the worker copies.
    assert all(rig.side.index.allocator.pins(s) == 1 for s in load.slots)
    # the request's chain started at its trie cursor (the GPU match), not at the root, and
    # equals the chain hashed from the root
    chain = rig.side._chains[c.seq_id]
    assert chain.start_block == gpu_match // BS > 0
    assert chain.slice(chain.start_block, 4)[0] == chain_digests(ns(), a_tokens[:16])[0][chain.start_block:]
    rig.poll(rig.complete(meta))
    assert c.status == MessageStatus.WAITING
    assert c.num_history_ids == 16 and c.cached_tokens == 16
    assert rig.side.metrics.restored_tokens == 16 - gpu_match
    assert rig.side.metrics.hit_blocks >= len(load.gpu_blocks)
    # kept restores (keep_restored_blocks, the default): the restored blocks stay on the host,
    # flagged as on the GPU, out of the eviction policy
    digests, _ = chain_digests(ns(), a_tokens[:16])
    restored = digests[gpu_match // BS:4]
    assert len(restored) == len(load.gpu_blocks)
    assert all(rig.side.index.get(d).on_gpu for d in restored)
    running, _ = rig.step()
    assert running == [c] and c.num_history_ids == 19
    # the restored blocks are ordinary trie blocks now: a later request matches them on GPU
    rig.s.end_session(sid)
    sid2, d = rig.add(a_tokens[:16] + [9, 9])
    running, meta = rig.step()
    assert running == [d] and d.cached_tokens == 16
    assert not meta or not meta.loads
    rig.side.check_balanced()


def host_hit_request(**rig_options):
    """A rig whose host tier holds the demoted blocks of a first prompt, and a waiting request whose prompt
    starts with that prompt's first 16 tokens (a host hit): ``(rig, first prompt, session id, sequence)``."""
    rig = Rig(num_gpu_blocks=8, **rig_options)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    return rig, a_tokens, sid, c


def test_failed_load_rolls_back_and_recomputes():
    rig, a_tokens, sid, c = host_hit_request()
    _, meta = rig.step()
    (load,) = meta.loads
    fallback = 16 - BS * len(load.gpu_blocks)
    rig.poll(rig.complete(meta, fail_loads={c.seq_id}))
    assert c.status == MessageStatus.WAITING
    assert c.num_history_ids == fallback
    assert rig.side.metrics.restore_failures == 1 and rig.side.metrics.restored_tokens == 0
    # host copies stay (the GPU never got valid bytes) and are unpinned
    digests, _ = chain_digests(ns(), a_tokens[:16])
    assert all(rig.side.index.is_resident(d) for d in digests[fallback // BS:4])
    assert all(rig.side.index.allocator.pins(s) == 0 for s in load.slots)
    # this turn recomputes instead of retrying the host tier
    running, meta2 = rig.step()
    assert running == [c] and not (meta2 and meta2.loads)
    assert c.num_history_ids == 19
    rig.side.check_balanced()


def test_abort_during_load_unpins_and_keeps_host_copy():
    rig, a_tokens, sid, c = host_hit_request()
    _, meta = rig.step()
    (load,) = meta.loads
    rig.s.end_session(sid)                      # deferred by LMDeploy: the worker may be writing
    assert sid in rig.s.sessions and c.status == MessageStatus.WAITING_FOR_REMOTE_KVS
    rig.poll(rig.complete(meta))                # the copy itself succeeded
    assert sid not in rig.s.sessions
    digests, _ = chain_digests(ns(), a_tokens[:16])
    restored = digests[4 - len(load.gpu_blocks):4]
    assert all(rig.side.index.is_resident(d) for d in restored), "a cancelled restore keeps host copies"
    assert all(rig.side.index.allocator.pins(s) == 0 for s in load.slots)
    assert rig.s.block_manager.get_num_free_gpu_blocks() + len(rig.s.block_trie.leaves) <= 8
    rig.side.check_balanced()


def test_abort_before_load_is_shipped_never_reaches_worker():
    rig, _, sid, c = host_hit_request()
    out = rig.s.schedule(is_prefill=True)      # load admitted, metadata not built yet
    assert c.status == MessageStatus.WAITING_FOR_REMOTE_KVS and out.running == []
    rig.s.end_session(sid)
    meta = rig.s.build_connector_meta([])
    assert meta is not None and meta.loads == ()
    rig.poll(rig.complete(meta))                # the step's output also delivers the owed failure
    assert sid not in rig.s.sessions
    assert rig.side.metrics.restore_failures == 1
    rig.side.check_balanced()
    assert rig.s.build_connector_meta([]) is None, "nothing left in flight"


def test_min_restore_tokens_skips_short_hits():
    # one host block (4 tokens) is below min_restore_tokens=8: recompute, no load
    rig = Rig(num_gpu_blocks=8, min_restore_tokens=8)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    assert len(rig.side.index) == 1
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    running, meta = rig.step()
    assert running == [c] and not (meta and meta.loads)
    assert c.cached_tokens == 12
    # the same hit with min_restore_tokens=4 is restored
    rig = Rig(num_gpu_blocks=8, min_restore_tokens=4)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    running, meta = rig.step()
    assert running == [] and len(meta.loads) == 1


def test_failed_demotion_drops_block():
    rig = Rig(num_gpu_blocks=8)
    _, a = rig.add(prompt(1, 17))
    rig.step()
    rig.s.end_session(0)
    rig.add(prompt(100, 18))
    _, meta = rig.step()
    assert meta.demotions
    rig.poll(rig.complete(meta, fail_demotions=True))
    assert len(rig.side.index) == 0
    assert rig.side.metrics.demotion_failures == len(meta.demotions)
    rig.side.check_balanced()


def test_completion_waits_for_every_tp_rank_and_ignores_unknown_ids():
    rig = Rig(num_gpu_blocks=8)
    rig.add(prompt(1, 17))
    rig.step()
    rig.s.end_session(0)
    rig.add(prompt(100, 18))
    _, meta = rig.step()
    # a failure marker from one rank arrives before the batch completes on every rank
    rig.poll(KVConnectorOutput(invalid_block_ids={failed_demotion_marker(meta.demotion_batch)}))
    assert rig.side.has_inflight()
    rig.poll(KVConnectorOutput(completed_save_ids={meta.demotion_batch, 999}, finished_receiving={12345}))
    assert len(rig.side.index) == 0 and not rig.side.has_inflight()


def test_worker_drain_settles_everything_in_flight():
    rig, _, sid, c = host_hit_request()
    _, meta = rig.step()
    assert meta.loads
    rig.s.end_session(sid)
    rig.s.finish_kv_transfers_after_worker_drain()
    assert sid not in rig.s.sessions
    assert not rig.side.has_inflight()
    rig.side.check_balanced()


def test_refcounts_and_slots_balanced_under_pressure(monkeypatch):
    """Many overlapping prompts through a tiny GPU and host, with copy failures and aborts in
    the middle of loads: every pin and ref is returned and the host still serves hits."""
    deterministic_lru(monkeypatch)
    rng = np.random.default_rng(0)
    rig = Rig(num_gpu_blocks=12, host_blocks=16)
    stems = [prompt(1000 * k, 12) for k in range(1, 5)]
    inflight = []
    live = []
    for it in range(60):
        stem = stems[rng.integers(len(stems))]
        tail = list(rng.integers(1, 50, size=int(rng.integers(1, 9))))
        live.append(rig.add(stem + tail)[0])
        output = None
        if inflight and it % 5 != 4:
            m = inflight.pop(0)
            output = rig.complete(m, fail_loads={ld.request_id for ld in m.loads} if it % 4 == 1 else (),
                                  fail_demotions=it % 7 == 3)
        _, meta = rig.step(output)
        if meta is not None and meta.has_work:
            inflight.append(meta)
        while len(live) > 3:
            sid = live.pop(0 if it % 6 else int(rng.integers(len(live))))  # sometimes one mid-load
            if sid in rig.s.sessions:
                rig.s.end_session(sid)
    for _ in range(100):  # drain: every copy completes one step after it was shipped
        _, meta = rig.step(rig.complete(inflight.pop(0)) if inflight else None)
        if meta is not None and meta.has_work:
            inflight.append(meta)
        if not inflight and not rig.side.has_inflight() and not rig.s.has_unfinished():
            break
    for sid in list(rig.s.sessions):
        rig.s.end_session(sid)
    assert not rig.side.has_inflight() and not rig.s.has_unfinished()
    rig.side.check_balanced()
    m = rig.side.metrics
    assert m.restore_failures > 0 and m.demotion_failures > 0, m.snapshot()
    assert m.demotions > 0 and m.hit_blocks > 0 and m.restored_tokens > 0, m.snapshot()
    assert m.restored_tokens <= m.hit_tokens and m.hit_blocks <= m.lookup_blocks, m.snapshot()
    # GPU refcounts: only the trie holds blocks now; one ref each.
    alloc = rig.s.block_manager.allocator
    trie_blocks = []
    stack = list(rig.s.block_trie._roots.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.block_id >= 0:
            trie_blocks.append(node.block_id)
    assert all(int(alloc.get_ref_count(b)) == 1 for b in trie_blocks)
    assert rig.s.block_manager.get_num_free_gpu_blocks() == 12 - len(trie_blocks)


# ---------------------------------------------------------------------------------------------
# eviction hook


def test_upstream_try_evict_leaf_is_the_pinned_source():
    assert source_sha256(KVBlockLifecycle._try_evict_leaf) == UPSTREAM_TRY_EVICT_LEAF_SHA256
    up = inspect.getsource(KVBlockLifecycle._try_evict_leaf).splitlines()
    ours = inspect.getsource(HostTierKVBlockLifecycle._try_evict_leaf).splitlines()
    added = [ln for ln in difflib.ndiff(up, ours) if ln.startswith("+ ")]
    removed = [ln for ln in difflib.ndiff(up, ours) if ln.startswith("- ")]
    assert removed == []
    assert [ln[2:].strip() for ln in added if not ln[2:].strip().startswith("#")] == [
        "observer = self._host_tier_observer",
        "if observer is not None:",
        "observer(leaf, int(self.allocator.get_physical_blocks(leaf.block_id)))",
    ]


def _random_trie_run(seed, hooked, monkeypatch):
    """Fill a stock or hooked scheduler's trie, then evict in small batches; return the order.

    Access times come from a counter, distinct per block, so LRU never falls back to its
    ``id(node)`` tie-break (memory addresses differ between the two runs).
    """
    deterministic_lru(monkeypatch)
    rng = np.random.default_rng(seed)
    cc = CacheConfig(max_batches=8, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=40,
                     enable_prefix_caching=True, device_type="cpu")
    s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=4096), cc,
                  seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()))
    seen = []
    if hooked:
        from lmdeploy_hostcache.integration.lifecycle import install_lifecycle_observer
        install_lifecycle_observer(s.block_trie._kv_lifecycle, lambda leaf, gpu: seen.append(gpu))
    for sid in range(8):
        toks = [int(rng.integers(1, 4))] * 4 + list(rng.integers(1, 4, size=int(rng.integers(4, 14))))
        s.add_session(sid).add_sequence(np.asarray(toks, dtype=np.int64))
        out = s.schedule(is_prefill=True)
        s.activate_seqs(out.running)
        for q in out.running:
            q.update_token_ids(np.array([1]), mode=UpdateTokenMode.PREFILL)
            q.state.finish()
        s.end_session(sid)
    alloc = s.block_manager.allocator

    def trie_pages():
        pages, stack = set(), list(s.block_trie._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.block_id >= 0:
                pages.add(int(alloc.get_physical_blocks(node.block_id)))
        return pages

    order, prev = [], trie_pages()
    while s.block_trie.evict(int(rng.integers(1, 3))) > 0:
        cur = trie_pages()
        order.append(sorted(prev - cur))
        prev = cur
    return order, seen


@pytest.mark.parametrize("seed", range(4))
def test_hook_keeps_stock_eviction_order(seed, monkeypatch):
    stock, _ = _random_trie_run(seed, False, monkeypatch)
    hooked, seen = _random_trie_run(seed, True, monkeypatch)
    assert stock == hooked and len(stock) > 0
    assert sorted(seen) == sorted(b for batch in hooked for b in batch)


def test_install_hook_is_noop_for_stock_scheduler():
    cc = CacheConfig(max_batches=8, block_size=BS, num_cpu_blocks=0, num_gpu_blocks=8,
                     enable_prefix_caching=True, device_type="cpu")
    s = Scheduler(SchedulerConfig(max_batches=8, max_session_len=4096), cc,
                  seq_meta=SequenceMeta(BS, strategy=ARSequenceStrategy()))
    install_scheduler_hook(s)
    assert type(s.block_trie._kv_lifecycle) is KVBlockLifecycle


@pytest.mark.parametrize("routed_experts", [False, True])
def test_a_request_that_wants_its_routed_experts_is_never_restored_from_host(routed_experts):
    """The API returns each token's routed experts (RL routing replay); a host copy holds KV only, so
    LMDeploy's own trie refuses such matches and the host tier must too: the request recomputes."""
    rig = Rig(num_gpu_blocks=8)
    a = prompt(1, 17)
    demote_first_prompt(rig, a, prompt(100, 30))
    assert len(rig.side.index) == 4
    _, c = rig.add(a[:16] + [5, 5, 5])
    c.sampling_param.return_routed_experts = routed_experts
    _, meta = rig.step()
    loads = [ld.request_id for ld in meta.loads] if meta is not None else []
    if routed_experts:
        assert loads == [] and c.status != MessageStatus.WAITING_FOR_REMOTE_KVS
    else:
        assert loads == [c.seq_id] and c.status == MessageStatus.WAITING_FOR_REMOTE_KVS


@pytest.mark.parametrize("flag", [None, "out_ce_loss", "out_logits"])
def test_a_request_whose_result_scores_its_prompt_is_never_restored_from_host(flag):
    """return_ppl (the prompt's cross-entropy) and output_logits are computed over the tokens the forward
    runs: a restored prefix would drop out of them, so such a request recomputes."""
    rig = Rig(num_gpu_blocks=8)
    a = prompt(1, 17)
    demote_first_prompt(rig, a, prompt(100, 30))
    _, c = rig.add(a[:16] + [5, 5, 5])
    if flag:
        setattr(c.sampling_param, flag, True)
    _, meta = rig.step()
    loads = [ld.request_id for ld in meta.loads] if meta is not None else []
    assert loads == ([] if flag else [c.seq_id])


def test_a_weight_update_stops_the_shared_store_for_the_engine(active, caplog):
    """The store's keys name the weights the engine started with: once they change in place (RL's
    update_params, the checkpoint-engine updates) the engine neither reads nor writes the store."""
    import asyncio
    from types import SimpleNamespace

    from lmdeploy.pytorch.engine.engine import Engine

    from lmdeploy_hostcache.l3.chain import SchedulerChain
    from lmdeploy_hostcache.l3.keys import StoreKeyspace

    rig = Rig()
    calls = []

    async def run_update(fn, *args):
        return fn(*args)

    engine = SimpleNamespace(scheduler=SimpleNamespace(kv_connector=rig.side), _run_weights_update=run_update,
                             executor=SimpleNamespace(update_params=calls.append,
                                                      update_weights_from_ipc=lambda *a: calls.append(a)))
    Engine.update_params(engine, "no store configured")        # without l3: only LMDeploy's own update
    assert calls == ["no store configured"] and rig.side.l3 is None
    chain = SchedulerChain(rig.side.index, None, [StoreKeyspace(ns())])
    rig.side.l3 = SimpleNamespace(chain=chain, close=lambda: None)
    asyncio.run(Engine.update_weights_from_ipc(engine, "ipc", None))
    assert calls[-1] == ("ipc", None) and chain.stopped == "weights updated in place (update_weights_from_ipc)"
    assert any("updated in place" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        Engine.update_params(engine, "again")
    assert calls[-1] == "again" and "update_weights_from_ipc" in chain.stopped, "stopped once, by the first"
    assert not any("updated in place" in r.message for r in caplog.records), "warned once"


def test_multimodal_path_is_never_cached():
    rig = Rig()
    side = rig.side
    root = rig.s.block_trie._get_or_create_root(None)
    text = Node(1, 0, np.arange(4), prefix_len=4)
    text.attach_to(root)
    mm = Node(2, 1, np.arange(4, 8), prefix_len=8, extra_identity=("img",))
    mm.attach_to(text)
    after = Node(3, 2, np.arange(8, 12), prefix_len=12)
    after.attach_to(mm)
    assert side.node_digest(text) == chain_digests(ns(), np.arange(4))[0][0]
    assert side.node_digest(mm) is None and side.node_digest(after) is None
    side.on_evict(after, 5)
    assert side._pending_demotions == [] and len(side.index) == 0


# ---------------------------------------------------------------------------------------------
# namespace and sizing


def test_namespace_separates_everything_that_changes_kv_bytes():
    base = NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "same"))
    variants = [
        NamespaceFactory("other-model", BS, kv_format_name(0, BS, "same")).for_adapter(None),
        NamespaceFactory(MODEL, BS, kv_format_name(4, BS, "same")).for_adapter(None),
        NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "int4")).for_adapter(None),
        NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "same"), tenant_salt="t").for_adapter(None),
        base.for_adapter("lora-a"),
        NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "same", "float16")).for_adapter(None),
        NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "same", "bfloat16")).for_adapter(None),
    ]
    roots = {base.for_adapter(None).root} | {v.root for v in variants}
    assert len(roots) == 8
    assert base.for_adapter("") is base.for_adapter(None)


def test_fp16_and_bf16_engines_never_share_a_store_key():
    """Blocks of the two dtypes have one size and pass every token and checksum check: only the dtype in
    the namespace keeps a bf16 node from restoring an fp16 node's bytes out of the shared store."""
    from types import SimpleNamespace

    import torch

    from lmdeploy_hostcache.config import HostCacheConfig
    from lmdeploy_hostcache.integration.engine_config import kv_dtype_name
    from lmdeploy_hostcache.l3.keys import StoreKeyspace

    names = {d: kv_dtype_name(SimpleNamespace(dtype=d), 0) for d in (torch.float16, torch.bfloat16)}
    assert names == {torch.float16: "float16", torch.bfloat16: "bfloat16"}
    spaces = [StoreKeyspace(NamespaceFactory(MODEL, BS, kv_format_name(0, BS, "same", n)).for_adapter(None),
                            block_nbytes=4096) for n in names.values()]
    assert spaces[0].key(7) != spaces[1].key(7)
    cc = make_cache_config()
    cc.kv_transfer_config.kv_connector_extra_config["kv_dtype"] = "bfloat16"
    assert NamespaceFactory.from_cache_config(cc, HostCacheConfig()).kv_format.startswith("native:bfloat16/")
    cc.kv_transfer_config.kv_connector_extra_config["kv_dtype"] = 16
    with pytest.raises(ValueError, match=r"kv_dtype'\] must be a non-empty string"):
        NamespaceFactory.from_cache_config(cc, HostCacheConfig())


def test_namespace_requires_model_identity():
    cc = make_cache_config()
    del cc.kv_transfer_config.kv_connector_extra_config["model_identity"]
    with pytest.raises(ValueError, match="model_identity"):
        build_host_tier_connector(KVConnectorRole.SCHEDULER, cc)


def test_slot_count_resolution_and_errors():
    from lmdeploy_hostcache.config import HostCacheConfig

    cfg = HostCacheConfig(host_cache_gb=0.001)
    assert resolve_num_slots({"host_cache_blocks": 7}, cfg, 2) == 7
    assert resolve_num_slots({"host_slot_bytes": 1024}, cfg, 1) == int(0.001 * 2**30) // 1024
    assert resolve_num_slots({"host_slot_bytes": 1024}, cfg, 2) == int(0.001 * 2**30) // 2 // 1024
    with pytest.raises(ValueError, match="host_cache_blocks"):
        resolve_num_slots({"host_cache_blocks": 0}, cfg, 1)
    with pytest.raises(ValueError, match="host_slot_bytes"):
        resolve_num_slots({}, cfg, 1)
    with pytest.raises(ValueError, match="auto"):
        resolve_num_slots({"host_slot_bytes": 1024}, HostCacheConfig(), 1)


def test_wrong_role_calls_and_wrong_connector_name_raise():
    cc = make_cache_config()
    conn = build_host_tier_connector(KVConnectorRole.SCHEDULER, cc)
    assert isinstance(conn, HostTierConnector)
    with pytest.raises(RuntimeError, match="worker-side"):
        conn.get_finished()
    cc.kv_transfer_config.kv_connector = "MooncakeStoreConnector"
    with pytest.raises(ValueError, match="MooncakeStoreConnector"):
        build_host_tier_connector(KVConnectorRole.SCHEDULER, cc)


def _evict_storm_during_admission(side, seen=None):
    """Evict every host candidate between the lookup and the allocation: what the demotions
    LMDeploy makes to admit a request can do to a small host tier. ``seen`` gets the holds
    present at that moment."""
    real = side.update_state_after_alloc

    def evict_then_alloc(request, block_ids, n):
        if seen is not None:
            seen.append({r: tuple(side.index.allocator.pins(side.index.get(d).slot) for d in ds)
                         for r, (ds, _) in side._holds.items()})
        side.index.evict(side.num_slots)
        return real(request, block_ids, n)

    side.update_state_after_alloc = evict_then_alloc
    return real


def test_host_hit_is_held_from_lookup_until_its_load_starts():
    rig = Rig(num_gpu_blocks=8, host_blocks=4)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    side = rig.side
    seen = []
    _evict_storm_during_admission(side, seen)
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    _, meta = rig.step()
    assert seen == [{c.seq_id: (1,)}]     # held (one pin) while LMDeploy made room
    assert c.status == MessageStatus.WAITING_FOR_REMOTE_KVS and len(meta.loads) == 1
    assert side.index.stats.holds == 1 and side.index.stats.evictions == 0   # the storm found nothing
    assert not side._holds and side._held_blocks == 0   # the load's own pins replaced the hold
    rig.poll(rig.complete(meta))
    assert c.status == MessageStatus.WAITING and side.metrics.restore_failures == 0
    assert side.metrics.restored_tokens == BS
    rig.side.check_balanced()


def test_load_destinations_without_a_host_hit_fall_back_to_recompute(monkeypatch, caplog):
    """If LMDeploy ever hands load destinations for a request whose host hit the connector no longer
    has, the turn recomputes (the load fails before reaching a worker) instead of an exception in
    LMDeploy's scheduling pass."""
    rig = Rig(num_gpu_blocks=8)
    a = prompt(1, 17)
    demote_first_prompt(rig, a, prompt(100, 30))
    side = rig.side
    real = side.get_num_new_matched_tokens

    def lose_the_plan(request, num_computed_tokens):
        out = real(request, num_computed_tokens)
        side._plans.clear()
        return out

    monkeypatch.setattr(side, "get_num_new_matched_tokens", lose_the_plan)
    failures = side.metrics.restore_failures
    _, c = rig.add(a[:16] + [5, 5, 5])
    with caplog.at_level("WARNING"):
        rig.step()
    assert any("without a host hit" in r.getMessage() for r in caplog.records)
    assert side.metrics.restore_failures == failures + 1 and not side._pending_loads
    monkeypatch.undo()
    for _ in range(3):
        rig.step()
    side.check_balanced()


def test_a_hold_ends_with_its_scheduling_pass(monkeypatch):
    """A request whose hit was held but that LMDeploy could not admit keeps no pin after the pass."""
    rig = Rig(num_gpu_blocks=8, host_blocks=4)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    side = rig.side
    helper = rig.s.eviction_helper
    seen = []

    def no_room(seq, *args, **kwargs):
        seen.append(dict(side._holds))
        return False

    monkeypatch.setattr(helper, "try_make_capacity_for", no_room)
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    running, meta = rig.step()
    assert running == [] and c.status == MessageStatus.WAITING and not (meta and meta.loads)
    assert seen and all(len(h.get(c.seq_id, ((), 0))[0]) == 1 for h in seen)   # held during the pass
    assert not side._holds and side._held_blocks == 0                     # released at its end
    side.check_balanced()
    monkeypatch.undo()
    _, meta = rig.step()                                                   # the next pass admits it
    assert c.status == MessageStatus.WAITING_FOR_REMOTE_KVS and len(meta.loads) == 1
    rig.poll(rig.complete(meta))
    assert side.metrics.restored_tokens == BS
    side.check_balanced()


def test_a_host_hit_beyond_the_hold_budget_is_not_reported():
    # one slot: the hold budget (half the slots) is 0 blocks. The hit could not be held while LMDeploy makes
    # room (the storm would take it and the load would fail), so the lookup reports none: a plain prefill,
    # no failed load
    rig = Rig(num_gpu_blocks=8, host_blocks=1)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    side = rig.side
    _evict_storm_during_admission(side)
    sid, c = rig.add(a_tokens[:16] + [5, 5, 5])
    running, meta = rig.step()
    assert running == [c] and not (meta and meta.loads)
    assert side.metrics.hit_blocks == 1 and side.metrics.restore_failures == 0   # found, not reported
    assert side.index.stats.holds == 0
    rig.side.check_balanced()


@pytest.mark.parametrize("disagree", ["host_tier_dropped", "history_moved", "more_blocks", "partial_block"])
def test_a_host_hit_that_changes_between_lookup_and_allocation_falls_back_to_recompute(disagree):
    """Between the lookup and LMDeploy's allocation the held hit can leave the host tier (the tier dropped: a
    worker pool rebuilt). And a load is planned for the blocks the lookup counted from (LMDeploy's computed
    history then), whole blocks each: if the destinations LMDeploy allocates start elsewhere, cover more blocks
    than the hit or a part of one (not in 0.18: a guard for later versions), the host blocks would land at the
    wrong positions. Either way the load fails and the turn recomputes."""
    rig = Rig(num_gpu_blocks=8, host_blocks=4)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    side = rig.side
    real = side.update_state_after_alloc

    def disagreeing_alloc(request, block_ids, n):
        if disagree == "host_tier_dropped":
            side.drop_host_tier("test: pool rebuilt")
        elif disagree == "history_moved":
            side._plans[int(request.seq_id)].first_block -= 1
        elif disagree == "more_blocks":
            block_ids, n = list(block_ids) + [max(block_ids) + 1], n + BS
        else:
            n -= 1
        return real(request, block_ids, n)

    side.update_state_after_alloc = disagreeing_alloc
    _, c = rig.add(a_tokens[:16] + [5, 5, 5])
    _, meta = rig.step()
    assert c.status == MessageStatus.WAITING_FOR_REMOTE_KVS and meta.loads == ()
    rig.poll(rig.complete(meta))
    assert c.status == MessageStatus.WAITING and side.metrics.restore_failures == 1
    side.update_state_after_alloc = real
    running, meta = rig.step()
    assert running == [c] and not (meta and meta.loads)
    side.check_balanced()


def test_a_chain_asked_from_before_the_trie_cursor_is_hashed_from_the_root():
    """A request's chain starts at its trie cursor's memoised digest only when the cursor is not past the
    first block asked for; otherwise it is hashed from the root, so every digest names its own position."""
    rig = Rig(num_gpu_blocks=8)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    tokens = a_tokens[:16] + [5, 5, 5]
    _, c = rig.add(tokens)
    rig.step()                                   # matched on the GPU up to block 3, then computed
    assert int(c.prefix_cache.trie_cursor.prefix_len) >= 3 * BS
    side = rig.side
    side._chains.pop(int(c.seq_id), None)
    digests, blocks = side._request_chain(c, 1, 4).slice(1, 4)
    expected, expected_bytes = chain_digests(ns(), tokens)
    assert digests == expected[1:4] and blocks == expected_bytes[1:4]


def test_next_turn_of_a_preempted_session_restores_from_host(monkeypatch):
    """Turn 1 ends (session kept), other traffic reclaims its blocks down to the host; turn 2
    of the same sequence (new input_start_pos) restores its history from the host tier."""
    deterministic_lru(monkeypatch)
    rig = Rig(num_gpu_blocks=8)
    sid, a = rig.add(prompt(1, 17))
    rig.step()                                   # turn 1 prefill; a is STOPPED, keeps its blocks
    other, _ = rig.add(prompt(500, 25))          # needs 7 blocks: a's blocks are reclaimed
    _, meta = rig.step()
    assert meta is not None and meta.demotions
    rig.poll(rig.complete(meta))
    rig.s.end_session(other)
    assert a.num_blocks == 0 and a.num_history_ids == 0
    a.update_token_ids(np.array([40, 41, 42], dtype=np.int64), mode=UpdateTokenMode.INPUTS)
    a.state.activate()                           # what the engine does for a new turn
    assert a.status == MessageStatus.WAITING
    _, meta = rig.step()
    assert a.status == MessageStatus.WAITING_FOR_REMOTE_KVS and meta.loads
    rig.poll(rig.complete(meta))
    restored = BS * len(meta.loads[0].gpu_blocks)
    assert a.status == MessageStatus.WAITING and a.num_history_ids == 16 and restored > 0  # GPU + host
    assert rig.side.metrics.restored_tokens == restored
    running, _ = rig.step()
    assert running == [a] and a.num_history_ids == 21   # 18 tokens of turn 1 + 3 new, all computed
    rig.side.check_balanced()


def test_page_reused_within_one_step_is_not_demoted_twice():
    """A page evicted (and queued for demotion) earlier in the same step, then reallocated and
    evicted again, never had this node's bytes computed: it must not be stored, and its host
    descendants (chained under its digest) are dropped as orphans."""
    rig = Rig()
    side = rig.side
    root = rig.s.block_trie._get_or_create_root(None)
    first = Node(1, 0, np.arange(4), prefix_len=4)
    first.attach_to(root)
    second = Node(2, 1, np.arange(10, 14), prefix_len=4)
    second.attach_to(root)
    child_digests, child_bytes = chain_digests(ns(), list(range(10, 14)) + list(range(20, 24)))
    assert child_digests[0] == side.node_digest(second)
    child = child_digests[1]
    side.index.complete_store(child, True, side.index.prepare_store(child, child_digests[0], child_bytes[1]))
    orphaned = side.index.stats.orphaned
    side.on_evict(first, 5)
    [(_, gpu, slot)] = side._pending_demotions
    assert gpu == 5
    side.on_evict(second, 5)
    assert len(side._pending_demotions) == 1 and side.node_digest(second) not in side.index
    assert child not in side.index and side.index.stats.orphaned == orphaned + 1
    meta = rig.s.build_connector_meta([])
    assert meta.demotions == ((5, slot),)
    side.on_evict(second, 5)                      # next step: the page is fair game again
    assert len(side._pending_demotions) == 1


def test_a_speculative_requests_recompute_overlap_is_never_restored_from_host():
    """LMDeploy's speculative-decoding sequences recompute the last ``recompute_blocks`` of their matched
    prefix (the draft model needs it; ``KVLoadCoordinator`` leaves them to the connector): a host hit that
    ends inside that overlap is not reported, where the same prompt without the overlap restores it."""
    def lookup(recompute_blocks):
        rig = Rig(num_gpu_blocks=8)
        demote_first_prompt(rig, prompt(1, 17), prompt(100, 18))
        assert len(rig.side.index) == 1          # A's last full block (tokens 13..16) is on the host
        _, seq = rig.add(prompt(1, 16) + [5] * 5)
        seq.prefix_cache.recompute_overlap.recompute_blocks = recompute_blocks
        answers = []
        orig = rig.side.get_num_new_matched_tokens

        def spy(request, num_computed):
            answers.append((num_computed, orig(request, num_computed)))
            return answers[-1][1]
        rig.side.get_num_new_matched_tokens = spy
        _, meta = rig.step()
        return answers, meta

    answers, meta = lookup(0)
    assert answers == [(12, (4, True))] and meta.loads and len(meta.loads[0].slots) == 1
    answers, meta = lookup(1)
    assert answers == [(12, (0, False))], answers
    assert meta is None or not meta.loads


def test_a_pool_reset_report_drops_the_tiers_only_for_a_rebuild_the_scheduler_did_not_see():
    """Every new worker pool reports the metadata step its copies start at. After a teardown the scheduler
    saw (the sleep drain sets the floor), that report is routine and changes nothing. A report past the floor
    is a pool rebuilt unseen: the host index is dropped, and LMDeploy's GPU prefix trie is emptied, since the
    KV cache behind it was rebuilt with it: a later request re-using a cached prompt matches nothing."""
    rig = Rig(num_gpu_blocks=8)
    side = rig.side
    demote_first_prompt(rig, prompt(1, 17), prompt(100, 18))
    side.finish_transfers_after_worker_drain()    # engine sleep
    floor = side._pool_floor
    demote_first_prompt(rig, prompt(200, 17), prompt(300, 18))
    host_blocks, resets, free = len(side.index), side.tier_resets, rig.s.block_manager.get_num_free_gpu_blocks()
    assert host_blocks > 0 and free < 8
    rig.poll(KVConnectorOutput(invalid_block_ids={pool_reset_marker(floor)}))   # the woken pool's report
    assert (len(side.index), side.tier_resets, rig.s.block_manager.get_num_free_gpu_blocks()) == \
        (host_blocks, resets, free), "a teardown the scheduler saw must not drop the tiers again"
    rig.poll(KVConnectorOutput(invalid_block_ids={pool_reset_marker(side._step + 1)}))   # rebuilt unseen
    assert len(side.index) == 0 and side.tier_resets == resets + 1
    assert rig.s.block_manager.get_num_free_gpu_blocks() == 8, "the GPU prefix trie outlived its KV cache"
    _, seq = rig.add(prompt(300, 16) + [9, 9])
    rig.step()
    assert seq.cached_tokens == 0
    side.check_balanced()


def test_observer_errors_never_break_lmdeploy_eviction(monkeypatch):
    rig = Rig(num_gpu_blocks=8)

    def broken_prepare_store(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(rig.side.index, "prepare_store", broken_prepare_store)
    sid, _ = rig.add(prompt(1, 17))
    rig.step()
    rig.s.end_session(sid)
    _, b = rig.add(prompt(100, 18))
    running, meta = rig.step()                    # eviction must still free the pages
    assert running == [b] and not (meta and meta.demotions)
    assert rig.side.metrics.demotion_failures >= 1


@pytest.mark.parametrize("policy,verify", [("lru", True), ("s3fifo", False), ("arc", True)])
def test_scheduler_side_honours_policy_and_verify_settings(policy, verify):
    """No HostCacheConfig field is silently ignored by the scheduler side."""
    from lmdeploy_hostcache.tier.eviction import POLICIES

    conn = build_host_tier_connector(KVConnectorRole.SCHEDULER,
                                     make_cache_config(eviction_policy=policy, verify_tokens=verify))
    index = conn.scheduler_side.index
    assert isinstance(index.policy, POLICIES[policy])
    assert index.verify_tokens is verify


def test_failed_block_ids_of_an_unknown_result_never_fail_a_later_load():
    """A worker output naming a request with no load in flight (unknown, finished or a duplicate) and failed GPU
    blocks changes nothing: its ids once stayed in the scheduler for good (across an engine sleep too) and
    failed the next healthy load into those reused GPU blocks."""
    rig = Rig(num_gpu_blocks=16)
    rig.poll(KVConnectorOutput(finished_receiving={4242}, invalid_block_ids=set(range(16))))
    assert not rig.side._invalid
    rig.s.finish_kv_transfers_after_worker_drain()       # engine sleep: the tier is dropped and starts again
    a = prompt(1, 17)
    sid, seq = rig.add(a)
    rig.step()
    rig.s.end_session(sid)
    rig.s.block_trie.evict(1 << 20)                      # A's blocks are demoted to the new pool
    meta = rig.s.build_connector_meta([])
    assert meta is not None and meta.demotions
    rig.poll(rig.complete(meta))
    _, c = rig.add(a[:16] + [5, 5, 5])
    _, meta = rig.step()
    assert meta is not None and meta.loads
    rig.poll(rig.complete(meta))                         # the worker reports the load done, nothing failed
    m = rig.side.metrics
    assert m.restore_failures == 0 and m.restored_tokens == 16 and not rig.side._failed_turns


def test_a_turn_is_counted_once_however_its_gpu_match_moves():
    """LMDeploy asks again at every admission attempt, and the GPU match may grow or shrink between
    attempts: the turn is one lookup, and each host hit block is counted once (a window that moved
    used to be counted as a new lookup, with its hits again)."""
    rig = Rig(num_gpu_blocks=5, host_blocks=16)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))   # B needs every GPU block: A's four are demoted
    side = rig.side
    digests, blocks = chain_digests(ns(), a_tokens[:16])
    resident = side.index.lookup(digests, blocks)
    assert resident >= 3
    _, c = rig.add(a_tokens[:16] + [5, 5, 5])
    before = side.metrics.snapshot()
    for computed in (0, 2 * BS, 0, 3 * BS, 0):
        side.get_num_new_matched_tokens(c, computed)
    after = side.metrics.snapshot()
    assert after["lookups"] - before["lookups"] == 1
    assert after["hit_blocks"] - before["hit_blocks"] == resident
    assert after["hit_tokens"] - before["hit_tokens"] == resident * BS
    side._release_all_holds()
    side.check_balanced()


def test_a_retry_whose_gpu_match_shrank_counts_the_newly_covered_blocks():
    """A turn's first admission attempt saw a longer GPU match than a later one (those GPU blocks were
    evicted and demoted meanwhile): the blocks below the first attempt's window are looked up and hit
    in the later attempt and counted then, so per turn hit blocks <= lookup blocks and every restored
    token is in hit_tokens (they used to be left out: restored_tokens exceeded hit_tokens)."""
    rig = Rig(num_gpu_blocks=5, host_blocks=16)
    a_tokens = prompt(1, 17)
    demote_first_prompt(rig, a_tokens, prompt(100, 18))
    side = rig.side
    digests, blocks = chain_digests(ns(), a_tokens[:16])
    resident = side.index.lookup(digests, blocks)
    assert resident == 4
    _, c = rig.add(a_tokens[:16] + [5, 5, 5])
    before = side.metrics.snapshot()
    side.get_num_new_matched_tokens(c, 3 * BS)   # an earlier attempt, when the GPU still matched 3 blocks
    side._release_all_holds()
    _, meta = rig.step()                         # the real attempt: GPU match 0, the host restores all 4
    assert c.status == MessageStatus.WAITING_FOR_REMOTE_KVS, c.status
    rig.poll(rig.complete(meta))
    d = {k: side.metrics.snapshot()[k] - before[k]
         for k in ("lookups", "lookup_blocks", "hit_blocks", "hit_tokens", "restored_tokens")}
    assert d == {"lookups": 1, "lookup_blocks": 4, "hit_blocks": 4, "hit_tokens": 4 * BS,
                 "restored_tokens": 4 * BS}, d
    side.check_balanced()


def test_a_cancelled_restore_whose_copy_completed_counts_its_bytes():
    """bytes_to_gpu counts every load the workers copied on every rank, a restore cancelled while its
    copy ran included (those bytes moved); a failed load counts none."""
    rig, a_tokens, sid, c = host_hit_request()
    _, meta = rig.step()
    (load,) = meta.loads
    rig.s.end_session(sid)                      # cancelled while the worker copies
    rig.poll(rig.complete(meta))                # the copy itself succeeded
    m = rig.side.metrics
    assert (m.restore_failures, m.restored_tokens) == (1, 0)
    assert m.bytes_to_gpu == len(load.gpu_blocks) * 1000
    sid, c = rig.add(a_tokens[:16] + [6, 6, 6])
    _, meta = rig.step()
    (load,) = meta.loads
    rig.poll(rig.complete(meta, fail_loads={load.request_id}))
    assert m.restore_failures == 2 and m.bytes_to_gpu == len(load.gpu_blocks) * 1000, "a failed copy moved nothing"
    rig.side.check_balanced()


def _fake_leaf(digest: int, parent: int, tokens):
    """What ``on_evict`` reads of a trie leaf: its memoised digest, its parent's, its tokens."""
    from types import SimpleNamespace

    return SimpleNamespace(_hostcache_digest=digest, token_ids=np.asarray(tokens, dtype=np.int64),
                           parent=SimpleNamespace(_hostcache_digest=parent))


def test_a_refused_demotion_is_counted_and_its_pinned_host_orphans_are_evictions():
    """A GPU eviction the host tier has no slot for is counted (demotions_refused; it was counted nowhere),
    and the host blocks chained under it, orphaned, are counted in host_evictions once each: a pinned one
    too (it used to be missed, being freed later, at its last unpin)."""
    rig = Rig(num_gpu_blocks=8, host_blocks=4)
    side, idx = rig.side, rig.side.index
    root = ns().root
    x, (child, *writing) = 0x1000, (0x1001, 0x2001, 0x2002, 0x2003)
    assert idx.prepare_store(child, x, b"c") is not None     # a host block chained under x (on the GPU)
    idx.complete_store(child, True)
    idx.hold([child])                                       # pinned: a lookup's hit
    for d in writing:                                       # every other slot is being written: no room
        assert idx.prepare_store(d, root, b"w") is not None
    before = side.metrics.snapshot()
    side.on_evict(_fake_leaf(x, root, prompt(1, BS)), 3)    # the GPU evicts x: no slot for it
    assert side._pending_demotions == [] and x not in idx and idx.get(child) is None
    d = {k: side.metrics.snapshot()[k] - before[k] for k in ("demotions", "demotions_refused", "host_evictions")}
    assert d == {"demotions": 0, "demotions_refused": 1, "host_evictions": 1}, d
    idx.release([child])                                    # its slot is freed now: counted once, not again
    assert side.stats()["host_evictions"] - before["host_evictions"] == 1
    idx.check_invariants()


def test_the_host_subtree_of_a_failed_demotion_is_counted_as_evicted():
    """A demotion that fails drops its block (demotion_failures) and dooms the host blocks chained under
    it: those are orphans, counted in host_evictions (they used to be counted nowhere)."""
    rig = Rig(num_gpu_blocks=8, host_blocks=8)
    side, idx = rig.side, rig.side.index
    parent, child = 0x3000, 0x3001
    slot = idx.prepare_store(parent, ns().root, b"p")
    assert idx.prepare_store(child, parent, b"c") is not None
    idx.complete_store(child, True)                        # resident under a parent still being written
    side._inflight_demotions[7] = (1, ((parent, slot),))    # shipped as batch 7 of step 1
    before = side.metrics.snapshot()
    rig.poll(KVConnectorOutput(completed_save_ids={7}, invalid_block_ids={failed_demotion_marker(7)}))
    assert len(idx) == 0
    d = {k: side.metrics.snapshot()[k] - before[k] for k in ("demotion_failures", "host_evictions", "bytes_to_host")}
    assert d == {"demotion_failures": 1, "host_evictions": 1, "bytes_to_host": 0}, d
    side.check_balanced()


def test_blocks_dropped_with_the_host_pool_are_not_evictions():
    """Engine sleep drops the whole index with its pool: neither those blocks nor the subtrees of the
    unshipped demotions failed on the way are host evictions."""
    rig = Rig(num_gpu_blocks=8, host_blocks=8)
    side, idx = rig.side, rig.side.index
    parent, child = 0x4000, 0x4001
    slot = idx.prepare_store(parent, ns().root, b"p")
    assert idx.prepare_store(child, parent, b"c") is not None
    idx.complete_store(child, True)
    side._pending_demotions.append((parent, 5, slot))      # queued this step, never shipped
    before = side.stats()["host_evictions"]
    side.finish_transfers_after_worker_drain()
    assert len(idx) == 0 and side.stats()["host_evictions"] == before


def test_a_scheduler_side_whose_store_tier_fails_to_start_leaves_no_capture_running(tmp_path):
    """The scheduler side starts the trace capture before the store tier.  When the store cannot be reached
    (``on_unreachable: error``) the start fails, and nothing of the capture may outlive it: no helper process,
    no flusher thread, no lock on the file (an engine built again in this process captures to it)."""
    import threading

    import psutil

    from lmdeploy_hostcache.l3 import L3Unavailable
    from lmdeploy_hostcache.l3.master import free_port

    capture = str(tmp_path / "capture.jsonl")
    children = {p.pid for p in psutil.Process().children()}
    l3 = {"master_address": f"127.0.0.1:{free_port()}", "on_unreachable": "error"}
    with pytest.raises(L3Unavailable):
        build_host_tier_connector(KVConnectorRole.SCHEDULER, make_cache_config(capture=capture, l3=l3))
    left = [p for p in psutil.Process().children() if p.pid not in children and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    assert not [t for t in threading.enumerate() if t.name == "hostcache-capture-flush"]
    again = build_host_tier_connector(KVConnectorRole.SCHEDULER, make_cache_config(capture=capture)).scheduler_side
    try:
        assert again.capture is not None and not again.capture.failed, again.capture.failed
    finally:
        again.capture.close()


def test_a_lookup_that_stops_at_a_block_mid_demotion_is_counted_once_per_turn():
    """A block is matchable in the host tier once its demotion has landed.  A request asking for it before that
    recomputes it unless a later admission attempt finds it landed; ``lookups_behind_demotion`` counts such a turn
    once, however often LMDeploy asks again."""
    rig = Rig(num_gpu_blocks=8)
    a_tokens = prompt(1, 17)
    sid_a, _ = rig.add(a_tokens)
    rig.step()
    rig.s.end_session(sid_a)
    rig.add(prompt(100, 18))
    _, demoting = rig.step()                  # B's admission evicts A's trie leaves: their demotion is in flight
    assert demoting is not None and demoting.demotions
    digests, _ = chain_digests(ns(), a_tokens[:16])
    writing = [d for d in digests if rig.side.index.is_writing(d)]
    assert writing and not any(rig.side.index.is_resident(d) for d in writing)
    assert rig.side.metrics.lookups_behind_demotion == 0
    _, c = rig.add(a_tokens[:16] + [5, 5, 5])
    before = rig.side.metrics.lookups
    matched = rig.side.get_num_new_matched_tokens(c, 16 - BS * len(writing))
    assert matched == (0, False)              # nothing matchable past the GPU match yet
    rig.side.get_num_new_matched_tokens(c, 16 - BS * len(writing))      # LMDeploy asks again: one turn
    assert rig.side.metrics.lookups_behind_demotion == 1 and rig.side.metrics.lookups == before + 1
    rig.poll(rig.complete(demoting))          # the copy lands: the same turn now finds the blocks
    assert all(rig.side.index.is_resident(d) for d in writing)
    assert rig.side.get_num_new_matched_tokens(c, 16 - BS * len(writing))[0] == BS * len(writing)
    assert rig.side.metrics.lookups_behind_demotion == 1
