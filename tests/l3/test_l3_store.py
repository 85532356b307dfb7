"""A real mooncake_master on 127.0.0.1: round trips, batched exists, mixed nodes on one store,
and the faults (master killed, timeout, full store, corrupted object) as clear L3 errors."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.l3 import L3Corrupt, L3Error, L3Full, L3Missing, L3Timeout, L3Unavailable
from lmdeploy_hostcache.l3 import objects
from lmdeploy_hostcache.l3.config import parse_l3_section
from lmdeploy_hostcache.l3.keys import StoreKeyspace
from lmdeploy_hostcache.tier.metrics import L3TierMetrics

from l3_helpers import needs_mooncake, open_client

pytestmark = needs_mooncake

BS = 4


def ns(**kw):
    base = dict(model="m", block_size=BS, kv_format="native/kb64")
    base.update(kw)
    return Namespace(**base)


def payload_for(tag: str, i: int, n: int = 4096) -> bytes:
    import hashlib

    seed = hashlib.sha256(f"{tag}/{i}".encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def test_round_trip_byte_exact_and_batched_exists(client):
    space = StoreKeyspace(ns(tenant_salt="rt"), head_count=8, block_nbytes=4096)
    tokens = list(range(1000, 1000 + 6 * BS))
    digests, tb = chain_digests(space.namespace, tokens)
    payloads = [payload_for("rt", i) for i in range(6)]
    assert client.count_prefix(space, digests) == 0
    assert client.put_blocks(space, digests[:4], tb[:4], payloads[:4]) == [True] * 4
    assert client.exists(space.keys(digests)) == [True] * 4 + [False] * 2
    assert client.count_prefix(space, digests) == 4
    got = client.get_blocks(space, digests[:4], tb[:4], 4096)
    assert [bytes(g) for g in got] == payloads[:4]
    # a gap stops the prefix: block 5 without block 4
    client.put_blocks(space, digests[5:], tb[5:], payloads[5:])
    assert client.count_prefix(space, digests) == 4
    # a read of a block that is not there is an error for the whole batch, never a partial result
    with pytest.raises(L3Missing):
        client.get_blocks(space, digests[3:5], tb[3:5], 4096)


def test_metrics_count_each_way(master):
    m = L3TierMetrics()
    c = open_client(master.address, metrics=m)
    try:
        space = StoreKeyspace(ns(tenant_salt="metrics"), block_nbytes=1024)
        digests, tb = chain_digests(space.namespace, list(range(3 * BS)))
        c.put_blocks(space, digests, tb, [payload_for("m", i, 1024) for i in range(3)])
        assert c.count_prefix(space, digests) == 3
        c.get_blocks(space, digests, tb, 1024)
        s = m.snapshot()
        obj = objects.object_nbytes(BS * 4, 1024)
        assert s["put_blocks"] == 3 and s["bytes_to_l3"] == 3 * obj
        assert s["get_blocks"] == 3 and s["bytes_from_l3"] == 3 * obj
        assert s["lookups"] == 1 and s["hit_blocks"] == 3 and s["errors"] == 0
        assert s["get_latency_count"] == 1 and s["get_latency_mean_s"] > 0
        assert "l3-tier: lookups=1 hit_blocks=3/3" in m.log_line()
    finally:
        c.close()


NODES = {   # "nodes" that would compute different bytes for the very same tokens
    "tp1_fp16": dict(ns=dict(), tp_size=1, tp_rank=0, head_start=0, head_count=8),
    "tp2_fp16_r0": dict(ns=dict(), tp_size=2, tp_rank=0, head_start=0, head_count=4),
    "tp2_fp16_r1": dict(ns=dict(), tp_size=2, tp_rank=1, head_start=4, head_count=4),
    "tp1_int4": dict(ns=dict(kv_format="int4/kb64"), tp_size=1, tp_rank=0, head_start=0, head_count=8),
    "tp1_salt_a": dict(ns=dict(tenant_salt="a"), tp_size=1, tp_rank=0, head_start=0, head_count=8),
    "tp1_salt_b": dict(ns=dict(tenant_salt="b"), tp_size=1, tp_rank=0, head_start=0, head_count=8),
}


def _space(spec) -> StoreKeyspace:
    return StoreKeyspace(ns(**spec["ns"]), tp_size=spec["tp_size"], tp_rank=spec["tp_rank"],
                         head_start=spec["head_start"], head_count=spec["head_count"])


def test_mixed_nodes_on_one_store_never_share_a_block(client):
    tokens = list(range(7, 7 + 5 * BS))          # the same prompt on every node
    spaces = {name: _space(spec) for name, spec in NODES.items()}
    chains = {name: chain_digests(s.namespace, tokens) for name, s in spaces.items()}
    writers = list(NODES)[::2]                   # half the nodes compute and write the prefix
    for name in writers:
        d, tb = chains[name]
        assert all(client.put_blocks(spaces[name], d, tb, [payload_for(name, i) for i in range(5)]))
    all_keys = [spaces[n].key(d) for n in NODES for d in chains[n][0]]
    assert len(set(all_keys)) == len(all_keys), "two nodes share a store key"
    for name in NODES:
        d, tb = chains[name]
        n = client.count_prefix(spaces[name], d)
        if name in writers:
            assert n == 5
            got = client.get_blocks(spaces[name], d, tb, 4096)
            assert [bytes(g) for g in got] == [payload_for(name, i) for i in range(5)]
        else:
            assert n == 0, f"{name} sees blocks another kind of node wrote"


def test_a_foreign_object_under_our_key_is_refused(client):
    """Even if another node's bytes landed under our key, header + key hash + checksum refuse them."""
    a, b = _space(NODES["tp1_fp16"]), _space(NODES["tp2_fp16_r0"])
    tokens = list(range(50, 50 + BS))
    da, ta = chain_digests(a.namespace, tokens)
    db, _ = chain_digests(b.namespace, tokens)
    foreign = objects.encode(b.key(db[0]), ta[0], payload_for("foreign", 0))
    assert client.put([(a.key(da[0]), foreign)]) == [True]
    with pytest.raises(L3Corrupt, match="another key"):
        client.get_blocks(a, da, ta, 4096)


def test_corrupted_object_is_caught_by_checksum(client):
    space = _space(NODES["tp1_salt_a"])
    tokens = list(range(300, 300 + BS))
    d, tb = chain_digests(space.namespace, tokens)
    key = space.key(d[0])
    blob = bytearray(objects.encode(key, tb[0], payload_for("c", 0)))
    blob[-100] ^= 0x01                            # one bit flipped in the KV bytes, in the store
    assert client.put([(key, bytes(blob))]) == [True]
    assert client.count_prefix(space, d) == 1     # the lookup cannot know ...
    with pytest.raises(L3Corrupt, match="checksum"):   # ... the read does
        client.get_blocks(space, d, tb, 4096)


_NODE_B = r"""
import sys
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.l3.backend import open_mooncake
from lmdeploy_hostcache.l3.client import L3Client
from lmdeploy_hostcache.l3.config import parse_l3_section
from lmdeploy_hostcache.l3.keys import StoreKeyspace
cfg = parse_l3_section({"master_address": sys.argv[1], "global_segment_gb": 1/16, "local_buffer_gb": 1/32})
c = L3Client(open_mooncake(cfg), timeout_s=5)
space = StoreKeyspace(Namespace(model="m", block_size=4, kv_format="native/kb64", tenant_salt="xproc"),
                      head_count=8)
d, tb = chain_digests(space.namespace, list(range(900, 900 + 12)))
n = c.count_prefix(space, d)
got = c.get_blocks(space, d[:n], tb[:n], 65536)
sys.stdout.buffer.write(b"N=%d\n" % n + b"".join(bytes(g) for g in got))
sys.stdout.flush()
c.close()
"""


def test_second_process_reads_exactly_what_the_first_wrote(client, master, tmp_path):
    space = StoreKeyspace(ns(tenant_salt="xproc"), head_count=8)
    d, tb = chain_digests(space.namespace, list(range(900, 900 + 3 * BS)))
    payloads = [payload_for("x", i, 65536) for i in range(3)]
    client.put_blocks(space, d, tb, payloads)
    out = subprocess.run([sys.executable, "-c", _NODE_B, master.address], capture_output=True,
                         timeout=120, env={**os.environ, "MC_TCP_BIND_ADDRESS": "127.0.0.1"})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    head, _, body = out.stdout.partition(b"\n")
    assert head == b"N=3" and body == b"".join(payloads)


# -- faults: each gives one clear L3 error, which the caller turns into a recompute -------------

def test_unreachable_master_is_a_clear_startup_error():
    from lmdeploy_hostcache.l3.backend import open_mooncake
    from lmdeploy_hostcache.l3.master import free_port

    addr = f"127.0.0.1:{free_port()}"
    cfg = parse_l3_section({"master_address": addr, "global_segment_gb": 1 / 16, "local_buffer_gb": 1 / 32})
    t0 = time.monotonic()
    with pytest.raises(L3Unavailable, match=addr.replace(".", r"\.")):
        open_mooncake(cfg)
    assert time.monotonic() - t0 < 10


def test_master_killed_mid_run(own_master):
    m = L3TierMetrics()
    c = open_client(own_master.address, timeout_ms=1500, metrics=m)
    try:
        space = StoreKeyspace(ns(tenant_salt="kill"))
        d, tb = chain_digests(space.namespace, list(range(2 * BS)))
        c.put_blocks(space, d, tb, [payload_for("k", i) for i in range(2)])
        assert c.count_prefix(space, d) == 2
        own_master.kill()
        # unavailable, timed out or missing, depending on where the client is in its reconnect
        # loop: always an L3Error, never bytes, never longer than the deadline
        for call in (lambda: c.count_prefix(space, d), lambda: c.get_blocks(space, d, tb, 4096),
                     lambda: c.put_blocks(space, d, tb, [payload_for("k", i) for i in range(2)])):
            t0 = time.monotonic()
            with pytest.raises(L3Error):
                call()
            assert time.monotonic() - t0 < 3
        assert m.snapshot()["errors"] >= 3
    finally:
        t0 = time.monotonic()
        c.close()   # mooncake 0.3.13 retries its unmount for ~10-25 s against a dead master
        closer = getattr(c, "closer", None)
        if closer is not None:   # a call was stuck: its backend closes when it returns; a process exiting before
            closer.join(60)      # that leaves Mooncake's threads running at exit (an abort after the tests passed)
            assert not closer.is_alive()
        assert time.monotonic() - t0 < 60


def test_setup_against_a_hung_master_is_refused_within_the_setup_timeout(own_master):
    """A master that accepts connections and answers nothing (SIGSTOP): Mooncake's setup holds the GIL for
    minutes in-process, so setup_timeout_s could not fire and the engine start froze; the setup is tried in
    a child process first, killed at the timeout."""
    from lmdeploy_hostcache.l3.backend import open_mooncake

    cfg = parse_l3_section({"master_address": own_master.address, "global_segment_gb": 1 / 32,
                            "local_buffer_gb": 1 / 64})
    own_master.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(L3Unavailable, match="did not answer setup within 3 s"):
            open_mooncake(cfg, setup_timeout_s=3)
        assert time.monotonic() - t0 < 8
    finally:
        own_master.resume()


def test_client_timeout_when_master_hangs(own_master):
    m = L3TierMetrics()
    c = open_client(own_master.address, timeout_ms=300, metrics=m)
    try:
        space = StoreKeyspace(ns(tenant_salt="hang"))
        d, tb = chain_digests(space.namespace, list(range(BS)))
        c.put_blocks(space, d, tb, [payload_for("h", 0)])
        own_master.pause()
        t0 = time.monotonic()
        with pytest.raises(L3Timeout, match="0.3 s"):
            c.count_prefix(space, d)
        assert time.monotonic() - t0 < 2
        with pytest.raises(L3Unavailable, match="still blocked"):   # fails fast, no pile-up
            c.get_blocks(space, d, tb, 4096)
        own_master.resume()
        deadline = time.monotonic() + 20
        while True:                               # the stuck call drains, then calls work again
            try:
                assert c.count_prefix(space, d) == 1
                break
            except L3Unavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert [bytes(g) for g in c.get_blocks(space, d, tb, 4096)] == [payload_for("h", 0)]
        s = m.snapshot()
        assert s["timeouts"] == 1 and s["errors"] >= 2
    finally:
        own_master.resume()
        c.close()


def test_full_store_refuses_and_strict_put_raises(own_master):
    m = L3TierMetrics()
    c = open_client(own_master.address, segment_mb=16, metrics=m)
    try:
        space = StoreKeyspace(ns(tenant_salt="full"))
        d, tb = chain_digests(space.namespace, list(range(40 * BS)))
        big = [payload_for("f", i, 1 << 20) for i in range(40)]
        stored = c.put_blocks(space, d, tb, big)
        assert any(stored) and not all(stored), stored     # 16 MiB cannot hold 40 MiB
        assert m.snapshot()["put_refused"] == stored.count(False)
        # the master may evict on its own to make room: trust only what exists now, and
        # everything that exists reads back byte-exact
        there = c.exists(space.keys(d))
        assert 0 < sum(there) < 40
        for i in (i for i, ok in enumerate(there) if ok):
            assert bytes(c.get_blocks(space, d[i:i + 1], tb[i:i + 1], 1 << 20)[0]) == big[i]
        with pytest.raises(L3Full):
            more, mtb = chain_digests(ns(tenant_salt="full2"), list(range(40 * BS)))
            c.put_blocks(StoreKeyspace(ns(tenant_salt="full2")), more, mtb, big, strict=True)
    finally:
        c.close()


def test_startup_policy_error_or_warn(caplog, master):
    from lmdeploy_hostcache.l3.backend import connect
    from lmdeploy_hostcache.l3.master import free_port

    addr = f"127.0.0.1:{free_port()}"
    base = {"master_address": addr, "global_segment_gb": 1 / 16, "local_buffer_gb": 1 / 32}
    with pytest.raises(L3Unavailable, match=addr.replace(".", r"\.")):
        connect(parse_l3_section(base))
    with caplog.at_level("WARNING", logger="lmdeploy_hostcache.l3"):
        assert connect(parse_l3_section({**base, "on_unreachable": "warn"})) is None
    assert addr in caplog.text and "without the shared L3 tier" in caplog.text
    c = connect(parse_l3_section({**base, "master_address": master.address}), metrics=L3TierMetrics())
    try:
        assert c is not None and c.exists(["nothing-here"]) == [False]
    finally:
        c.close()


def test_the_smallest_segment_mooncake_accepts_is_the_one_start_up_allows(master):
    """``MIN_SEGMENT_BYTES`` is Mooncake's own floor: a client contributing it starts, one page less is
    refused by setup, and that refusal is not reported as an unreachable master (it answered)."""
    import dataclasses

    from lmdeploy_hostcache.l3.backend import open_mooncake
    from lmdeploy_hostcache.l3.config import GIB, MIN_SEGMENT_BYTES

    base = parse_l3_section({"master_address": master.address, "local_buffer_gb": 1 / 64})
    store = open_mooncake(dataclasses.replace(base, global_segment_gb=MIN_SEGMENT_BYTES / GIB), setup_timeout_s=20)
    store.close()
    with pytest.raises(L3Unavailable, match="setup returned") as ei:
        open_mooncake(dataclasses.replace(base, global_segment_gb=(MIN_SEGMENT_BYTES - 4096) / GIB), setup_timeout_s=20)
    assert "cannot reach" not in str(ei.value)
