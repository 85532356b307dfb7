"""Chained block digests: pinned known answers, process stability, incrementality, isolation."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmdeploy_hostcache.tier import digest as digest_mod
from lmdeploy_hostcache.tier.digest import (
    ChainHasher,
    Namespace,
    block_digest,
    chain_digests,
    digests_of_blocks,
    encode_tokens,
)

# Known answers computed once with xxhash directly from the formula in digest.py's docstring
# (length-prefixed namespace fields -> seed = xxh3_64(blob), root = xxh3_128(b"lmdeploy-hostcache/root"
# + blob); digest = xxh3_128(parent as 16 LE bytes || tokens as LE uint32, seed)), not by calling
# the package.  A change here means every stored host block changes identity: bump the namespace
# version on purpose, never by accident.
KAT_PLAIN = dict(
    ns=dict(model="kat/model", block_size=4, kv_format="fp16", adapter=None, tenant_salt=""),
    tokens=[0, 1, 2, 3, 4, 5, 6, 7, 2**32 - 1, 65536, 7, 0, 9],
    seed=0x1F10A2EB0C5CF8C2,
    root=0xED315B566ACDE61805D2707FE5DFC5CC,
    digests=[0xFE68135ED7BD4746968E5C607B995F9D,
             0xE4472714C17D31B633D45A3F7D0CCDDB,
             0xB1D378EF8FD8477244491E0D1488DF3F],
)
KAT_ADAPTER_SALT = dict(
    ns=dict(model="kat/model", block_size=4, kv_format="int4", adapter="lora-a", tenant_salt="tenant-1"),
    tokens=[0, 1, 2, 3, 4, 5, 6, 7],
    seed=0x7A536ABBE03F3FB2,
    root=0xFE112E79CE6251FBEA682B1C7AC4071D,
    digests=[0x7DEAB0BCAA58130431A6D10EB2711036,
             0xB7BB92042342E25727B90F4426A5BFED],
)


@pytest.mark.parametrize("kat", [KAT_PLAIN, KAT_ADAPTER_SALT], ids=["plain", "adapter+salt"])
def test_known_answer_vectors(kat):
    ns = Namespace(**kat["ns"])
    assert ns.seed == kat["seed"]
    assert ns.root == kat["root"]
    digests, blocks = chain_digests(ns, kat["tokens"])
    assert digests == kat["digests"]
    bs = ns.block_size
    for i, b in enumerate(blocks):
        assert b == np.asarray(kat["tokens"][i * bs:(i + 1) * bs], dtype="<u4").tobytes()
    # the one-block helper and the block-bytes chain agree with the pinned chain
    assert block_digest(ns.root, blocks[0], ns.seed) == kat["digests"][0]
    assert digests_of_blocks(ns, blocks) == kat["digests"]


# salted_root's known answers, computed once with xxhash directly from its formula in digest.py
# (xxh3_128(b"lmdeploy-hostcache/request-salt" + root as 16 LE bytes + uint32 LE byte length of the
# UTF-8 salt + the salt, seed)) on KAT_PLAIN's namespace; the package agreed when they were pinned.
# Every block of a request with a cache salt chains from this root, so its host and store keys
# depend on it across versions: a change here must be a deliberate namespace version bump.
KAT_SALTED_ROOTS = {"user-42": 0xAAE41BF7F76D9E68040C778A2DF2B666,
                    "h\u00e9llo": 0x0C40D1213C525E6D9A4BFA4F78459148}   # non-ASCII: the prefix counts bytes


def test_salted_root_known_answers():
    """A request's cache salt moves its chain to a pinned root (same value in every version)."""
    ns = Namespace(**KAT_PLAIN["ns"])
    for salt, root in KAT_SALTED_ROOTS.items():
        assert digest_mod.salted_root(ns, salt) == root
    assert digest_mod.salted_root(ns, "") == ns.root == KAT_PLAIN["root"]


def test_encode_tokens_is_little_endian_uint32():
    assert encode_tokens([1, 256, 2**32 - 1]) == bytes([1, 0, 0, 0, 0, 1, 0, 0, 255, 255, 255, 255])
    for dtype in (np.int64, np.int32, np.uint16, np.dtype(">u4"), np.dtype(">i8")):
        assert encode_tokens(np.array([1, 256, 65535], dtype=dtype)) == encode_tokens([1, 256, 65535])
    assert encode_tokens([]) == b""


_CHILD = textwrap.dedent("""
    import json, sys
    from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
    ns = Namespace(model="stable/model", block_size=8, kv_format="int8", adapter="ad", tenant_salt="t")
    tokens = [(i * 7919) % 150000 for i in range(8 * 5 + 3)]
    d, _ = chain_digests(ns, tokens)
    print(json.dumps([hex(ns.seed), hex(ns.root)] + [hex(x) for x in d]))
""")


def test_digests_are_stable_across_processes_and_hash_seeds():
    import json

    ns = Namespace(model="stable/model", block_size=8, kv_format="int8", adapter="ad", tenant_salt="t")
    tokens = [(i * 7919) % 150000 for i in range(8 * 5 + 3)]
    d, _ = chain_digests(ns, tokens)
    here = [hex(ns.seed), hex(ns.root)] + [hex(x) for x in d]
    for hash_seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                             check=True, timeout=60)
        assert json.loads(out.stdout) == here, f"digests differ under PYTHONHASHSEED={hash_seed}"


@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=70),
       cuts=st.lists(st.integers(0, 70), max_size=6),
       block_size=st.sampled_from([1, 3, 8]))
def test_incremental_equals_one_shot(tokens, cuts, block_size):
    ns = Namespace(model="m", block_size=block_size)
    want_d, want_b = chain_digests(ns, tokens)
    assert len(want_d) == len(tokens) // block_size
    h = ChainHasher(ns)
    bounds = sorted(min(c, len(tokens)) for c in cuts)
    prev = 0
    for c in bounds + [len(tokens)]:
        before = list(h.digests)
        new = h.extend(tokens[prev:c])
        assert h.digests[:len(before)] == before, "extend rewrote earlier digests"
        assert new == h.num_blocks - len(before)
        prev = c
    assert h.digests == want_d
    assert h.block_bytes == want_b
    assert h.last_digest == (want_d[-1] if want_d else ns.root)


def test_extend_hashes_only_new_blocks(monkeypatch):
    ns = Namespace(model="m", block_size=4)
    calls = []
    real = digest_mod._xxh3_128
    monkeypatch.setattr(digest_mod, "_xxh3_128", lambda data, seed=0: calls.append(len(data)) or real(data, seed))
    h = ChainHasher(ns)
    assert h.extend(range(10)) == 2
    assert len(calls) == 2
    calls.clear()
    assert h.extend(range(10, 13)) == 1      # 2 pending + 3 new = one more block, 1 pending
    assert calls == [16 + 4 * 4]             # exactly one block hashed: parent16 || 4 tokens
    calls.clear()
    assert h.extend([]) == 0
    assert calls == []


def test_partial_blocks_are_kept_until_complete():
    ns = Namespace(model="m", block_size=4)
    h = ChainHasher(ns)
    assert h.extend([1, 2, 3]) == 0
    assert h.num_blocks == 0 and h.digests == [] and h.last_digest == ns.root
    assert h.extend([4]) == 1
    assert h.digests == chain_digests(ns, [1, 2, 3, 4])[0]
    # a trailing partial block never gets a digest
    assert chain_digests(ns, [1, 2, 3])[0] == []
    assert chain_digests(ns, [1, 2, 3, 4, 5, 6, 7]) == chain_digests(ns, [1, 2, 3, 4])


def test_chain_continues_from_a_parent_digest():
    """Where the GPU match ended, hashing resumes from that block's digest: same chain."""
    ns = Namespace(model="m", block_size=4)
    tokens = list(range(100, 124))
    full, blocks = chain_digests(ns, tokens)
    for k in range(1, len(full)):
        tail, tail_blocks = chain_digests(ns, tokens[4 * k:], parent=full[k - 1])
        assert tail == full[k:]
        assert tail_blocks == blocks[k:]
        assert ChainHasher(ns, parent=full[k - 1]).last_digest == full[k - 1]


def test_chain_digest_depends_on_the_whole_prefix():
    ns = Namespace(model="m", block_size=2)
    a, _ = chain_digests(ns, [1, 2, 3, 4])
    b, _ = chain_digests(ns, [9, 2, 3, 4])
    assert a[1] != b[1], "same second block under different first blocks must differ"
    assert chain_digests(ns, [3, 4])[0][0] not in a[1:], "a block's digest is not position-free"


@pytest.mark.parametrize("bad", [[-1], [2**32], [0, 5, 2**40], np.array([-3], dtype=np.int8)])
def test_out_of_range_tokens_raise_before_anything_changes(bad):
    ns = Namespace(model="m", block_size=2)
    h = ChainHasher(ns)
    h.extend([7, 8, 9])
    snapshot = (list(h.digests), list(h.block_bytes), h.last_digest)
    with pytest.raises(ValueError, match="out of range"):
        h.extend(bad)
    assert (list(h.digests), list(h.block_bytes), h.last_digest) == snapshot
    h.extend([10])  # the pending token survived the failed call
    assert h.digests == chain_digests(ns, [7, 8, 9, 10])[0]


@pytest.mark.parametrize("bad, msg", [
    (np.array([1.0, 2.0]), "integers"),
    (np.zeros((2, 2), dtype=np.int64), "1-D"),
    (["a"], "integers"),
    (np.array([True, False]), "integers"),      # a mask is not token ids
])
def test_non_integer_tokens_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        encode_tokens(bad)


@pytest.mark.parametrize("kwargs, field", [
    (dict(model="", block_size=4), "model"),
    (dict(model="m", block_size=0), "block_size"),
    (dict(model="m", block_size=-64), "block_size"),
    (dict(model="m", block_size=4.0), "block_size"),
])
def test_bad_namespace_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Namespace(**kwargs)


_BASE = dict(model="org/model-8b", block_size=4, kv_format="fp16", adapter=None, tenant_salt="")
_VARIANTS = {
    "model": ["org/model-8b", "org/model-70b", "org/model-8b-instruct"],
    "adapter": [None, "", "lora-a", "lora-b"],
    "kv_format": ["fp16", "bf16", "int8", "int4", "fp16>int4"],
    "block_size": [4, 2, 1],
    "tenant_salt": ["", "tenant-a", "tenant-b"],
}


@pytest.mark.parametrize("field", sorted(_VARIANTS))
def test_namespace_isolation_for_every_field(field):
    tokens = list(range(1000, 1008))  # a multiple of every block size in _VARIANTS
    seen_roots, seen_seeds, seen_digests = {}, {}, {}
    for value in _VARIANTS[field]:
        ns = Namespace(**dict(_BASE, **{field: value}))
        digests, _ = chain_digests(ns, tokens)
        for store, key in ((seen_roots, ns.root), (seen_seeds, ns.seed)):
            assert key not in store, f"{field}={value!r} shares root/seed with {field}={store.get(key)!r}"
            store[key] = value
        for d in digests:
            assert d not in seen_digests, f"{field}={value!r} shares a block digest with {seen_digests[d]!r}"
            seen_digests[d] = value


def test_namespace_fields_cannot_bleed_into_each_other():
    """Length-prefixed fields: moving characters from one field to the next changes the namespace."""
    pairs = [
        (dict(model="ab", kv_format="c"), dict(model="a", kv_format="bc")),
        (dict(model="m", kv_format="x", tenant_salt=""), dict(model="m", kv_format="", tenant_salt="x")),
        (dict(model="m", adapter="x"), dict(model="mx", adapter="")),
    ]
    for a, b in pairs:
        na = Namespace(**dict(_BASE, **a))
        nb = Namespace(**dict(_BASE, **b))
        assert na.root != nb.root and na.seed != nb.seed, (a, b)


def test_all_namespace_combinations_are_distinct():
    combos = list(itertools.product(["m1", "m2"], [None, "lora"], ["fp16", "int4"], [2, 4], ["", "s"]))
    roots = {Namespace(model=m, adapter=a, kv_format=k, block_size=b, tenant_salt=s).root
             for m, a, k, b, s in combos}
    assert len(roots) == len(combos)


def test_namespace_equality_ignores_derived_fields_but_not_inputs():
    a = Namespace(**_BASE)
    b = Namespace(**_BASE)
    assert a == b and a.root == b.root and a.seed == b.seed
    assert a != Namespace(**dict(_BASE, tenant_salt="x"))
