"""The host -> store chain (l3/chain.py) against a real master: node B restores, byte-exact,
prefixes only node A computed; faults fall back with zero wrong bytes and no leaked slot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l3_chain_node import BS, Node, namespace
from l3_helpers import needs_mooncake, open_client

from lmdeploy_hostcache.l3 import objects
from lmdeploy_hostcache.tier.metrics import L3TierMetrics

pytestmark = needs_mooncake
HERE = Path(__file__).resolve().parent
PROMPT = list(range(500, 500 + 6 * BS))
OTHER = list(range(9000, 9000 + 3 * BS))


def _a_computes(client, tp=1, ns=None):
    a = Node(client, slots=2, tp=tp, ns=ns)
    a.demote(PROMPT)
    a.demote(OTHER)
    a.flush()
    a.index.check_invariants()
    return a


_NODE_B = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from l3_helpers import open_client
from l3_chain_node import Node, BS
c = open_client(sys.argv[1])
try:
    b = Node(c, slots=8, tp=int(sys.argv[3]))
    prompt = list(range(500, 500 + 6 * BS))
    n, ok, slots = b.restore(prompt)
    exact = ok and b.slot_bytes_match_oracle(prompt, n, slots)
    b.index.check_invariants()
    print(json.dumps({"n": n, "ok": ok, "exact": exact, "resident": len(b.index)}))
finally:
    c.close()
"""


def _node_b(master, tp):
    out = subprocess.run([sys.executable, "-c", _NODE_B, master.address, str(HERE), str(tp)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MC_TCP_BIND_ADDRESS": "127.0.0.1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_b_restores_byte_exact_what_only_node_a_computed(own_master):
    m = L3TierMetrics()
    c = open_client(own_master.address, metrics=m)
    try:
        _a_computes(c, tp=2)                     # node A: TP2, writes two shards per block
        assert m.snapshot()["put_blocks"] == 2 * 9
        assert _node_b(own_master, tp=2) == {"n": 6, "ok": True, "exact": True, "resident": 6}
        assert _node_b(own_master, tp=1) == {"n": 0, "ok": False, "exact": False, "resident": 0}  # TP1 never reads TP2 bytes
    finally:
        c.close()


def test_other_format_or_salt_never_hits(master):
    c = open_client(master.address)
    try:
        _a_computes(c, ns=namespace(salt="tenant-a"))
        for ns in (namespace(salt="tenant-b"), namespace(kv_format="int4/kb64", salt="tenant-a")):
            assert Node(c, slots=8, ns=ns).restore(PROMPT)[0] == 0
        b = Node(c, slots=8, ns=namespace(salt="tenant-a"))
        n, ok, slots = b.restore(PROMPT)
        assert (n, ok) == (6, True) and b.slot_bytes_match_oracle(PROMPT, n, slots)
    finally:
        c.close()


def _rolled_back(b: Node):
    assert len(b.index) == 0 and b.index.num_free_slots == b.index.num_slots
    b.index.check_invariants()


def test_master_killed_between_lookup_and_stage(own_master):
    c = open_client(own_master.address, timeout_ms=1500)
    try:
        _a_computes(c)
        b = Node(c, slots=8)
        n, ok, _ = b.restore(PROMPT, before_stage=own_master.kill)
        assert (n, ok) == (6, False)
        _rolled_back(b)
        assert b.restore(PROMPT)[0] == 0          # lookups now fail: 0, i.e. recompute
        assert b.chain.lookup_errors >= 1
    finally:
        c.close()


def test_timeout_during_stage(master):
    """A read that outlives its deadline (here: the real client behind a slow get; a paused master
    still serves gets from the client's own segment, and its exists() timeout is tested in
    test_l3_store.py) fails the stage and rolls back."""
    import threading

    c = open_client(master.address, timeout_ms=300)
    release = threading.Event()
    try:
        ns = namespace(salt="slow")
        _a_computes(c, ns=ns)
        b = Node(c, slots=8, ns=ns)
        real_get = c.backend.get_batch

        class Slow:
            def __getattr__(self, name):
                return getattr(c.backend_real, name)

            def get_batch(self, keys):
                release.wait(5)
                return real_get(keys)

        c.backend_real, c.backend = c.backend, Slow()
        n, ok, _ = b.restore(PROMPT)
        assert (n, ok) == (6, False)
        _rolled_back(b)
    finally:
        release.set()
        if hasattr(c, "backend_real"):
            c.backend = c.backend_real
        import time
        time.sleep(0.2)
        c.close()


def test_corrupted_object_rolls_back_the_whole_batch(master):
    c = open_client(master.address)
    try:
        ns = namespace(salt="corrupt")
        _a_computes(c, ns=ns)
        b = Node(c, slots=8, ns=ns)
        digests, tb = b.chain_of(PROMPT)
        key = b.workers[0].space.key(digests[3])
        blob = bytearray(c.get([key])[0])
        blob[objects.HEADER_BYTES + len(tb[3]) + 17] ^= 0x10       # one bit of block 3's KV bytes
        assert c.backend.remove(key, True) == 0
        assert c.put([(key, bytes(blob))]) == [True]
        n, ok, slots = b.restore(PROMPT)
        assert (n, ok) == (6, False)                 # blocks 0-2 were fine: still nothing is used
        _rolled_back(b)
        # the corrupt object was removed: no node's lookup finds it any more, and the next write-back
        # of block 3 puts a good one (a put never replaces an object)
        assert c.exists([key]) == [False]
        assert b.restore(PROMPT)[:2] == (3, True)
        _a_computes(c, ns=ns)
        b2 = Node(c, slots=8, ns=ns)
        n, ok, slots = b2.restore(PROMPT)
        assert (n, ok) == (6, True) and b2.slot_bytes_match_oracle(PROMPT, n, slots)
    finally:
        c.close()


def test_full_store_keeps_what_fits_and_never_lies(own_master):
    m = L3TierMetrics()
    c = open_client(own_master.address, segment_mb=16, metrics=m)
    try:
        prompts = [list(range(100_000 + 1000 * k, 100_000 + 1000 * k + 80 * BS)) for k in range(30)]
        a = Node(c, slots=4)                     # 8 KiB objects: 2,400 of them overflow a 16 MiB segment
        for toks in prompts:
            a.demote(toks)
        a.flush()
        s = m.snapshot()
        assert s["put_refused"] > 0 and s["put_blocks"] > 0
        restored = 0
        for toks in prompts:                     # whatever a lookup finds restores byte-exact
            b = Node(c, slots=80)
            n, ok, slots = b.restore(toks)
            if n:
                assert ok and b.slot_bytes_match_oracle(toks, n, slots)
                restored += n
            else:
                _rolled_back(b)
        assert restored > 0
    finally:
        c.close()


def test_write_through_writes_new_host_blocks_at_once(master):
    m = L3TierMetrics()
    c = open_client(master.address, metrics=m)
    try:
        ns = namespace(salt="wt")
        a = Node(c, slots=16, ns=ns, write_policy="write_through")
        a.demote(PROMPT)
        a._worker_step()                          # the next step carries the write-throughs
        assert len(a.index) == 6                  # nothing was evicted ...
        b = Node(c, slots=8, ns=ns)
        n, ok, slots = b.restore(PROMPT)          # ... yet node B finds the whole prefix
        assert (n, ok) == (6, True) and b.slot_bytes_match_oracle(PROMPT, n, slots)
        puts = m.snapshot()["put_blocks"]
        w = Node(c, slots=8, ns=ns, write_policy="write_through")
        assert w.restore(PROMPT)[:2] == (6, True)
        w._worker_step()
        assert m.snapshot()["put_blocks"] == puts   # staged blocks are not written back again
    finally:
        c.close()


def test_lookup_counts_a_block_only_when_every_rank_has_its_object(master):
    """A TP2 lookup stops at the first block one rank's object is missing for (rank 1 or rank 0): a hit
    counted from one rank's object alone would fail the other rank's stage and recompute the turn."""
    c = open_client(master.address)
    try:
        ns = namespace(salt="one-rank-missing")
        a = _a_computes(c, tp=2, ns=ns)
        digests, tb = a.chain_of(PROMPT)
        b = Node(c, slots=8, tp=2, ns=ns)
        assert b.chain.probe(digests) == 6
        assert c.backend.remove(a.workers[1].space.key(digests[3]), True) == 0    # rank 1's shard of block 3
        assert b.chain.probe(digests) == 3 and b.chain.lookup(digests, tb) == 3
        assert c.backend.remove(a.workers[0].space.key(digests[1]), True) == 0    # rank 0's shard of block 1
        assert b.chain.probe(digests) == 1
        n, ok, slots = b.restore(PROMPT)
        assert (n, ok) == (1, True) and b.slot_bytes_match_oracle(PROMPT, n, slots)
    finally:
        c.close()


def test_failed_stage_counts_store_failures_not_orphans(master):
    """A stage that fails (an object went between lookup and stage) releases its reserved blocks leaf first:
    each is one store failure, none is counted as an orphaned host block (which would show as host evictions)."""
    c = open_client(master.address)
    try:
        ns = namespace(salt="stage-fails")
        _a_computes(c, ns=ns)
        b = Node(c, slots=8, ns=ns)
        digests, _ = b.chain_of(PROMPT)
        key = b.workers[0].space.key(digests[4])
        n, ok, _ = b.restore(PROMPT, before_stage=lambda: c.backend.remove(key, True))
        assert (n, ok) == (6, False)
        _rolled_back(b)
        st = b.index.stats
        assert (st.store_failures, st.dropped, st.orphaned, st.evictions) == (6, 6, 0, 0)
    finally:
        c.close()
