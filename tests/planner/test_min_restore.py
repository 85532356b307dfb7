"""``min_restore_tokens`` in the planner's shared-store replay (``planner/l3.py``): host and store hits
count together against the threshold, as in the connector; and a block the GPU evicts that the host cannot
take is lost, never written to the store from the GPU (the engine writes to the store from host slots only)."""
import pytest

from lmdeploy_hostcache.planner.l3 import SharedStore, ThreeTierCache
from lmdeploy_hostcache.planner.replay import prepare_trace
from lmdeploy_hostcache.planner.traces import Request, Trace


def _prepared(*prompts, bs=4):
    return prepare_trace(Trace("hand", bs, [Request(float(i), len(p) * bs + 1, 1, tuple(p), i)
                                            for i, p in enumerate(prompts)]))


@pytest.mark.parametrize("tokens, restored, from_store", [(0, 1, 2), (12, 1, 2), (13, 0, 0)])
def test_host_and_store_hits_count_together(tokens, restored, from_store):
    (pr,) = _prepared([1, 2, 3])
    d, b = pr.digests, pr.block_bytes
    store = SharedStore(8)
    c = ThreeTierCache(4, 8, store, "lru", 4, min_restore_tokens=tokens)
    c.host.prepare_store(d[0], pr.root, b[0])        # block 1 on this node's host tier
    c.host.complete_store(d[0], True)
    for i in (1, 2):                                  # blocks 2, 3 in the shared store
        store.index.prepare_store(d[i], d[i - 1], b[i])
        store.index.complete_store(d[i], True)
    # one host block (4 tokens) is under 12, but with the store's two the hit is 12 tokens
    assert c.serve(pr) == (0, restored)
    assert c.l3_hit_blocks == from_store
    assert c.stats.short_host_hit_blocks == 1 - restored
    assert c.restored_with_host == 0                  # a later routing probe adds no store hit
    c.host.check_invariants()
    store.index.check_invariants()


def test_a_block_the_host_cannot_take_is_not_written_to_the_store():
    store = SharedStore(8)
    c = ThreeTierCache(2, 0, store, "lru", 4)         # no host tier: every GPU eviction is refused
    for pr in _prepared([1, 2], [5, 6]):
        c.serve(pr)
    st = c.finish()
    assert st.demotions_refused == 2
    assert store.puts == 0 and len(store.index) == 0
