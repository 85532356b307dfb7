"""Store keys and the object format, without a store."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.l3 import L3Corrupt
from lmdeploy_hostcache.l3 import objects
from lmdeploy_hostcache.l3.keys import StoreKeyspace


def ns(**kw):
    base = dict(model="m", block_size=4, kv_format="native/kb64")
    base.update(kw)
    return Namespace(**base)


def test_keys_differ_for_tp_format_salt_shard_and_adapter():
    d = 123456789
    spaces = [
        StoreKeyspace(ns(), tp_size=1, tp_rank=0, head_start=0, head_count=8),
        StoreKeyspace(ns(), tp_size=2, tp_rank=0, head_start=0, head_count=4),
        StoreKeyspace(ns(), tp_size=2, tp_rank=1, head_start=4, head_count=4),
        StoreKeyspace(ns(kv_format="int4/kb64"), tp_size=1, head_count=8),
        StoreKeyspace(ns(tenant_salt="s1"), tp_size=1, head_count=8),
        StoreKeyspace(ns(tenant_salt="s2"), tp_size=1, head_count=8),
        StoreKeyspace(ns(adapter="lora"), tp_size=1, head_count=8),
        StoreKeyspace(ns(), tp_size=1, head_count=8, block_nbytes=1024),
    ]
    keys = [s.key(d) for s in spaces]
    assert len(set(keys)) == len(keys)
    # deterministic, and the salt never appears in a key
    assert StoreKeyspace(ns(tenant_salt="s1"), head_count=8).key(d) == keys[4]
    salted = StoreKeyspace(ns(tenant_salt="secret-salt"), head_count=8).key(d)
    assert "secret" not in salted and "salt" not in salted
    assert all(k.startswith("lhc1/") and len(k.split("/")[2]) == 32 for k in keys)


def test_key_validation():
    with pytest.raises(ValueError, match="tp_rank"):
        StoreKeyspace(ns(), tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match="tp_size"):
        StoreKeyspace(ns(), tp_size=0)
    with pytest.raises(ValueError, match="digest"):
        StoreKeyspace(ns()).key(-1)


def test_object_round_trip_and_every_corruption_is_caught():
    space = StoreKeyspace(ns())
    digests, tokens = chain_digests(space.namespace, list(range(8)))
    key = space.key(digests[0])
    payload = bytes(range(256)) * 4
    blob = objects.encode(key, tokens[0], payload)
    assert bytes(objects.decode(key, blob, tokens[0], len(payload))) == payload
    for i in range(len(blob)):   # any flipped byte anywhere is caught
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(L3Corrupt):
            objects.decode(key, bytes(bad), tokens[0], len(payload))
    with pytest.raises(L3Corrupt, match="another key"):
        objects.decode(space.key(digests[1]), blob, tokens[0])
    with pytest.raises(L3Corrupt, match="token ids differ"):
        objects.decode(key, blob, tokens[1])
    with pytest.raises(L3Corrupt, match="payload is"):
        objects.decode(key, blob, tokens[0], len(payload) + 1)
    with pytest.raises(L3Corrupt, match="shorter"):
        objects.decode(key, blob[:10], tokens[0])
    with pytest.raises(L3Corrupt):
        objects.decode(key, blob[:-1], tokens[0])


def test_an_object_of_another_format_version_is_refused(monkeypatch):
    """A sound object (valid checksum) written by another format version is refused, not misread."""
    space = StoreKeyspace(ns())
    digests, tokens = chain_digests(space.namespace, list(range(8)))
    key = space.key(digests[0])
    monkeypatch.setattr(objects, "VERSION", objects.VERSION + 1)
    blob = objects.encode(key, tokens[0], b"\x01" * 64)
    assert bytes(objects.decode(key, blob, tokens[0])) == b"\x01" * 64   # sound under its own version
    monkeypatch.undo()
    with pytest.raises(L3Corrupt, match=f"v{objects.VERSION} object"):
        objects.decode(key, blob, tokens[0])


def test_engine_keyspaces_differ_per_rank_and_tp_size():
    """Keyspaces built as the engine builds them (no head shard stated, same slot bytes on every rank) give
    each TP rank its own key, and a TP1 node never shares a key with a TP2 node's rank 0."""
    from lmdeploy_hostcache.integration.l3_tier import rank_keyspace
    from lmdeploy_hostcache.integration.namespace import NamespaceFactory

    namespaces = NamespaceFactory(model="m", block_size=4, kv_format="native/kb64")
    extra = {"host_slot_bytes": 1024}
    tp2 = [rank_keyspace(namespaces, 2, r, extra) for r in range(2)]
    tp1 = rank_keyspace(namespaces, 1, 0, extra)
    assert all(s.head_start == s.head_count == 0 and s.block_nbytes == 1024 for s in tp2 + [tp1])
    d = 123456789
    keys = [tp1.key(d), tp2[0].key(d), tp2[1].key(d)]
    assert len(set(keys)) == 3
    # both sides (scheduler and worker) derive the same key for the same rank
    assert rank_keyspace(namespaces, 2, 1, extra).key(d) == keys[2]
