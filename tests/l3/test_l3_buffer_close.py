"""The store client and the client's local buffer, ``close`` after a stuck call, and the master address.

* Mooncake moves every object of a call through the client's local buffer (``l3.local_buffer_gb``);
  a batch that does not fit fails as a whole (every key of a ``get_batch`` answers empty bytes, a
  put -600). ``L3Client`` splits its batches so that each call fits (``client.buffer_need``), and
  a worker whose buffer cannot hold one block's object refuses to start naming ``l3.local_buffer_gb``.
* ``close`` after a call missed its deadline returns at once and still closes the backend once
  that call returns.
* ``l3.master_address`` is a bare ``host:port``: a URL or whitespace is refused naming the field.

``BufferStore`` below answers as Mooncake 0.3.13 does, its buffer allocator simulated exactly
(checked against the real one in ``test_restore_larger_than_the_buffer_through_a_real_store``).
"""
from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest

from l3_helpers import needs_mooncake

from lmdeploy_hostcache.config import ConfigError
from lmdeploy_hostcache.l3 import L3Corrupt, L3Missing, L3Timeout, L3Unavailable, objects
from lmdeploy_hostcache.l3.client import L3Client, buffer_need
from lmdeploy_hostcache.l3.config import parse_l3_section
from lmdeploy_hostcache.l3.keys import StoreKeyspace
from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.metrics import L3TierMetrics

BS = 4
MIB = 1 << 20


# -- Mooncake's client buffer allocator (offset allocator, size classes of 3 mantissa bits; Mooncake
#    rounds every allocation up to its class) ------------------------------------------------------
def _class_bytes(size: int, up: bool) -> int:
    if size < 8:
        return size
    start = size.bit_length() - 4
    mantissa = (size >> start) & 7
    if up and size & ((1 << start) - 1):
        mantissa += 1
    exp, mantissa = start + 1 + (mantissa >> 3), mantissa & 7
    return (mantissa | 8) << (exp - 1)


def fits_buffer(sizes, buffer_bytes: int) -> bool:
    """Whether Mooncake's fresh client buffer takes every object of one call, in this order."""
    free = buffer_bytes
    for s in sizes:
        if _class_bytes(free, up=False) < _class_bytes(s, up=True):
            return False
        free -= _class_bytes(s, up=True)
    return True


class BufferStore:
    """An in-memory store that moves objects through a local buffer as Mooncake's client does."""

    def __init__(self, buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
        self.d: dict[str, bytes] = {}
        self.calls: list[tuple[str, list[int]]] = []   # (method, object sizes) of every call
        self.closed = 0

    def batch_is_exist(self, keys):
        return [1 if k in self.d else 0 for k in keys]

    def put(self, key, value):
        self.calls.append(("put", [len(value)]))
        if not fits_buffer([len(value)], self.buffer_bytes):
            return -600
        self.d.setdefault(key, bytes(value))
        return 0

    def put_batch(self, keys, values):
        self.calls.append(("put_batch", [len(v) for v in values]))
        if not fits_buffer([len(v) for v in values], self.buffer_bytes):
            return -600
        for k, v in zip(keys, values):
            self.d.setdefault(k, bytes(v))
        return 0

    def get_batch(self, keys):
        sizes = [len(self.d[k]) for k in keys if k in self.d]
        self.calls.append(("get_batch", sizes))
        if not fits_buffer(sizes, self.buffer_bytes):
            return [b""] * len(keys)
        return [self.d.get(k, b"") for k in keys]

    def close(self):
        self.closed += 1


def _space(tag: str, nbytes: int) -> StoreKeyspace:
    return StoreKeyspace(Namespace(model="m", block_size=BS, tenant_salt=tag), block_nbytes=nbytes)


def _blocks(space: StoreKeyspace, n: int, nbytes: int):
    digests, tb = chain_digests(space.namespace, list(range(n * BS)))
    payloads = [bytes([i % 251 + 1]) * nbytes for i in range(n)]
    return digests, tb, payloads


# -- the allocator model and the bound ----------------------------------------------------------
def test_buffer_need_is_enough_for_the_allocator_whatever_the_order():
    """Every batch buffer_need admits fits Mooncake's allocator in every order; a plain byte sum would not."""
    rng = random.Random(7)
    for _ in range(3000):
        buf = rng.choice([MIB, 4 * MIB, int(0.001 * (1 << 30)), 5_557_452, 512 * MIB])
        sizes = [rng.choice([rng.randint(1, buf // 3), 2 ** rng.randint(8, 22) + 1]) for _ in range(rng.randint(1, 12))]
        while len(sizes) > 1 and buffer_need(sizes, buf) > buf:
            sizes.pop()
        if buffer_need(sizes, buf) > buf:
            continue
        assert fits_buffer(sizes, buf) and fits_buffer(sizes[::-1], buf), (buf, sizes)
        rng.shuffle(sizes)
        assert fits_buffer(sizes, buf), (buf, sizes)
    # three objects whose bytes fit 4 MiB but not Mooncake's size classes
    assert 3 * 1_328_196 <= 4 * MIB and not fits_buffer([1_328_196] * 3, 4 * MIB)
    assert buffer_need([1_328_196] * 3, 4 * MIB) > 4 * MIB


# -- get ---------------------------------------------------------------------------------------
def test_get_blocks_larger_than_the_buffer_is_split_in_order():
    """The audit's case: a restore of more bytes than the buffer failed every time as 'vanished'."""
    slot = 1536 * 1024
    store = BufferStore(4 * MIB)
    metrics = L3TierMetrics()
    client = L3Client(store, timeout_s=5, metrics=metrics, buffer_bytes=4 * MIB)
    space = _space("get", slot)
    digests, tb, payloads = _blocks(space, 7, slot)
    assert client.put_blocks(space, digests, tb, payloads) == [True] * 7
    store.calls.clear()
    got = client.get_blocks(space, digests, tb, slot)
    assert [bytes(g) for g in got] == payloads                      # all of them, in order
    gets = [sizes for op, sizes in store.calls if op == "get_batch"]
    assert len(gets) > 1 and sum(len(s) for s in gets) == 7
    assert all(fits_buffer(s, 4 * MIB) for s in gets)
    assert metrics.snapshot()["missing"] == 0 and metrics.snapshot()["get_blocks"] == 7
    # one call per object when even two do not fit; block_nbytes stands in for payload_len
    store.calls.clear()
    tight = L3Client(store, timeout_s=5, buffer_bytes=2 * MIB)
    assert [bytes(g) for g in tight.get_blocks(space, digests, tb)] == payloads
    assert [len(s) for op, s in store.calls] == [1] * 7
    # without the buffer's size: one call, which Mooncake answers with nothing
    with pytest.raises(L3Missing):
        L3Client(store, timeout_s=5).get_blocks(space, digests, tb, slot)


def test_split_get_is_all_or_nothing_and_stops_at_the_first_missing_object():
    slot = MIB
    store = BufferStore(3 * MIB)
    client = L3Client(store, timeout_s=5, buffer_bytes=3 * MIB)
    space = _space("gone", slot)
    digests, tb, payloads = _blocks(space, 8, slot)
    client.put_blocks(space, digests, tb, payloads)
    lo, per_call = client._spans([objects.object_nbytes(BS * 4, slot)] * 8, 8)[0]
    assert 1 < per_call < 4
    del store.d[space.key(digests[per_call])]          # first object of the second call: evicted
    store.calls.clear()
    with pytest.raises(L3Missing, match="vanished"):
        client.get_blocks(space, digests, tb, slot)
    assert len(store.calls) == 2                        # the calls after the miss are not made
    client.put_blocks(space, digests, tb, payloads)
    key = space.key(digests[-1])                        # the last call's object corrupted
    store.d[key] = store.d[key][:-1] + b"\0"
    with pytest.raises(L3Corrupt):
        client.get_blocks(space, digests, tb, slot)
    # raw get: None where absent, every call made, in order
    del store.d[space.key(digests[0])]
    blobs = client.get(space.keys(digests), [objects.object_nbytes(BS * 4, slot)] * 8)
    assert blobs[0] is None and all(b is not None for b in blobs[1:]) and len(blobs) == 8


def test_each_call_of_a_split_batch_has_the_deadline():
    """A split batch's calls each wait at most timeout_s; a stuck one stops the rest (L3Timeout),
    and the next call is refused at once."""
    slot = MIB
    release = threading.Event()
    store = BufferStore(3 * MIB)
    client = L3Client(store, timeout_s=0.3, buffer_bytes=3 * MIB)
    space = _space("deadline", slot)
    digests, tb, payloads = _blocks(space, 6, slot)
    client.put_blocks(space, digests, tb, payloads)
    real = store.get_batch
    calls = []

    def slow_second(keys):
        calls.append(len(keys))
        if len(calls) == 2:
            release.wait(10)
        return real(keys)

    store.get_batch = slow_second
    t0 = time.monotonic()
    with pytest.raises(L3Timeout):
        client.get_blocks(space, digests, tb, slot)
    assert time.monotonic() - t0 < 2.0 and len(calls) == 2
    with pytest.raises(L3Unavailable, match="still blocked"):
        client.get_blocks(space, digests, tb, slot)
    release.set()
    time.sleep(0.1)
    with pytest.raises(L3Unavailable, match="backing off"):   # the stuck call returned; the backoff holds
        client.get_blocks(space, digests, tb, slot)
    time.sleep(max(0.0, client._retry_at - time.monotonic()) + 0.05)
    assert [bytes(g) for g in client.get_blocks(space, digests, tb, slot)] == payloads
    client.close()


def test_a_failing_store_is_backed_off_not_waited_on_at_every_call(monkeypatch):
    """While the master does not answer, one call per interval waits its deadline; the others fail at
    once, the interval doubles per failure, a probe that fails extends it without a backend call, and
    the first call that succeeds ends it. (Before, every call after the stuck one returned waited
    timeout_s again: a master down for minutes stalled the scheduler's thread about half the time.)"""
    from lmdeploy_hostcache.l3 import client as client_mod

    monkeypatch.setattr(client_mod, "BACKOFF_MIN_S", 0.3)
    hung = threading.Event()
    hung.set()
    calls = []

    class Store:
        def batch_is_exist(self, keys):
            calls.append(len(keys))
            if hung.is_set():
                time.sleep(0.08)      # past the deadline: a master that does not answer
            return [0] * len(keys)

        def close(self):
            pass

    reachable = [True]
    client = L3Client(Store(), timeout_s=0.05, probe=lambda: reachable[0])
    with pytest.raises(L3Timeout):
        client.exists(["k"])
    time.sleep(0.1)                                     # the stuck call returns
    t0 = time.monotonic()
    for _ in range(50):                                 # within the interval: no backend call, no wait
        with pytest.raises(L3Unavailable, match="backing off"):
            client.exists(["k"])
    assert time.monotonic() - t0 < 0.1 and len(calls) == 1
    time.sleep(client._retry_at - time.monotonic() + 0.01)
    with pytest.raises(L3Timeout):                      # one call per interval tries, and times out again
        client.exists(["k"])
    assert len(calls) == 2 and client._backoff_s == pytest.approx(0.6)    # doubled
    time.sleep(0.1)
    reachable[0] = False                                # the master refuses connections: no call at all
    time.sleep(client._retry_at - time.monotonic() + 0.01)
    with pytest.raises(L3Unavailable, match="backing off"):
        client.exists(["k"])
    assert len(calls) == 2 and client._backoff_s == pytest.approx(1.2)
    reachable[0] = True
    hung.clear()
    time.sleep(client._retry_at - time.monotonic() + 0.01)
    assert client.exists(["k"]) == [False] and client._backoff_s == 0.0   # answered: the backoff ends
    assert client.exists(["k"]) == [False] and len(calls) == 4
    client.close()


# -- put ---------------------------------------------------------------------------------------
def test_put_larger_than_the_buffer_is_split_into_batches_that_fit():
    slot = 1536 * 1024
    store = BufferStore(4 * MIB)
    metrics = L3TierMetrics()
    client = L3Client(store, timeout_s=5, metrics=metrics, buffer_bytes=4 * MIB)
    space = _space("put", slot)
    digests, tb, payloads = _blocks(space, 5, slot)
    assert client.put_blocks(space, digests, tb, payloads, strict=True) == [True] * 5
    assert all(fits_buffer(sizes, 4 * MIB) for _, sizes in store.calls)   # no call refused for the buffer
    assert sum(len(s) for op, s in store.calls if op in ("put", "put_batch")) == 5
    assert metrics.snapshot()["put_blocks"] == 5 and metrics.snapshot()["errors"] == 0
    # a later call's failure raises after the earlier calls' objects were stored (and counted)
    space2 = _space("put2", slot)
    more_d, more_tb, more_p = _blocks(space2, 5, slot)
    real_put_batch, n = store.put_batch, []

    def fail_second(keys, values):
        n.append(1)
        return -1 if len(n) == 2 else real_put_batch(keys, values)

    store.put_batch = fail_second
    store.put = lambda k, v: -1
    with pytest.raises(L3Unavailable):
        client.put_blocks(space2, more_d, more_tb, more_p)
    assert store.batch_is_exist(space2.keys(more_d))[0] == 1 and metrics.snapshot()["put_blocks"] > 5


def test_a_single_object_too_big_for_the_buffer_gets_a_call_of_its_own():
    store = BufferStore(MIB)
    client = L3Client(store, timeout_s=5, buffer_bytes=MIB)
    with pytest.raises(L3Unavailable, match="status -600"):
        client.put([("small", b"s" * 1000), ("big", b"b" * (2 * MIB)), ("small2", b"t" * 1000)])
    assert [sizes for _, sizes in store.calls][:2] == [[1000], [2 * MIB]]


def test_buffer_bytes_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="buffer_bytes"):
            L3Client(BufferStore(MIB), buffer_bytes=bad)


def test_connect_gives_the_client_the_buffer_size(monkeypatch):
    from lmdeploy_hostcache.l3 import backend

    monkeypatch.setattr(backend, "open_mooncake", lambda cfg, t=30.0: BufferStore(cfg.local_buffer_bytes))
    cfg = parse_l3_section({"master_address": "127.0.0.1:1", "local_buffer_gb": 0.25})
    client = backend.connect(cfg)
    assert client.buffer_bytes == cfg.local_buffer_bytes == 1 << 28
    client.close()


# -- start-up refusal: one block's object must fit the buffer ----------------------------------------
def _worker(cfg, slot_bytes: int, block_size: int = 64):
    return SimpleNamespace(hostcache=SimpleNamespace(l3=cfg), tp_size=1, tp_rank=0, extra={},
                           pool=SimpleNamespace(slot_bytes=slot_bytes),
                           cache_config=SimpleNamespace(block_size=block_size))


def test_a_worker_whose_buffer_cannot_hold_one_block_refuses_to_start(monkeypatch):
    from lmdeploy_hostcache.integration import l3_tier

    opened = []
    monkeypatch.setattr(l3_tier, "connect", lambda cfg, **kw: opened.append(cfg))
    small = parse_l3_section({"master_address": "127.0.0.1:1", "local_buffer_gb": 0.001})   # ~1 MiB
    with pytest.raises(ConfigError) as err:
        l3_tier.WorkerL3.build(_worker(small, 4 * MIB))
    assert err.value.field == "l3.local_buffer_gb" and len(err.value.errors) == 1
    msg = str(err.value)
    obj = objects.object_nbytes(4 * 64, 4 * MIB)
    min_gb = -(-buffer_need([obj], 2 * obj) * 1000 // (1 << 30)) / 1000
    assert "l3.local_buffer_gb" in msg and str(obj) in msg and f"at least {min_gb:g}" in msg and min_gb > 0.004
    assert opened == []                                  # refused before any store client is opened
    # an object that fits byte for byte but not with the allocator's rounding is refused too
    with pytest.raises(ConfigError, match="l3.local_buffer_gb"):
        l3_tier.check_local_buffer(small, 64, small.local_buffer_bytes - objects.object_nbytes(256, 0))
    # the minimum the error names is enough, and the default buffer holds a Llama-8B block (8 MiB)
    ok = parse_l3_section({"master_address": "127.0.0.1:1", "local_buffer_gb": min_gb})
    l3_tier.check_local_buffer(ok, 64, 4 * MIB)
    assert fits_buffer([obj], ok.local_buffer_bytes)
    assert l3_tier.WorkerL3.build(_worker(parse_l3_section({"master_address": "127.0.0.1:1"}), 8 * MIB)) is None
    assert len(opened) == 1
    # the scheduler's client only checks existence: its small buffer never holds an object, and a
    # slot far bigger than it is no reason to refuse
    sched = SimpleNamespace(hostcache=SimpleNamespace(l3=small), cache_config=SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"host_slot_bytes": 64 * MIB})))
    assert l3_tier.SchedulerL3.build(sched) is None
    assert len(opened) == 2 and opened[1].local_buffer_bytes < 64 * MIB




# -- close after a stuck call --------------------------------------------------------------------
class Hung:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()
        self.closes = 0
        self.running = False
        self.closed_while_running = False

    def batch_is_exist(self, keys):
        self.running = True
        self.release.wait(30)
        self.running = False
        return [0] * len(keys)

    def close(self):
        self.closes += 1
        self.closed_while_running |= self.running
        self.closed.set()


def test_close_after_a_stuck_call_returns_at_once_and_closes_the_backend_later():
    backend = Hung()
    client = L3Client(backend, timeout_s=0.2)
    with pytest.raises(L3Timeout):
        client.exists(["k"])
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 1.0                   # was 10 s
    assert not backend.closed.is_set()                   # never under the running call
    client.close()                                       # idempotent, and still prompt
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(L3Unavailable, match="closed"):
        client.exists(["k"])
    backend.release.set()
    assert backend.closed.wait(5)                        # was never: cancelled behind the stuck call
    client.closer.join(5)
    assert backend.closes == 1 and not backend.closed_while_running
    client.close()
    assert backend.closes == 1

    calm = Hung()                                        # no stuck call: closed before close returns
    calm.release.set()
    client = L3Client(calm, timeout_s=1)
    assert client.exists(["k"]) == [False]
    client.close()
    client.close()
    assert calm.closes == 1 and getattr(client, "closer", None) is None


# -- master_address ----------------------------------------------------------------------------------
def test_master_address_is_a_bare_host_port():
    """A URL or whitespace in l3.master_address is refused naming the field (a URL used to pass and
    fail only at start-up as an unknown host: with on_unreachable: warn, silently no third tier)."""
    for address in ("http://127.0.0.1:50051", "https://10.0.0.5:50051", "etcd://h:2379", "127.0.0.1 :50051",
                    "127.0. 0.1:50051", "my host:50051", "host:\t50051"):
        with pytest.raises(ConfigError) as err:
            parse_l3_section({"master_address": address, "on_unreachable": "warn"})
        assert err.value.field == "l3.master_address" and len(err.value.errors) == 1, address
        assert ("without a scheme" if "://" in address else "without spaces") in str(err.value), address
    for address in ("127.0.0.1:50051", " 10.0.0.5:50051 ", "[::1]:50051", "master.local:1"):
        assert parse_l3_section({"master_address": address}).master_address == address.strip()
    for address in ("::1", "fe80::1", "::1:50051"):     # '::1' was host ':' port 1
        with pytest.raises(ConfigError, match="in brackets") as err:
            parse_l3_section({"master_address": address})
        assert err.value.field == "l3.master_address", address


# -- a real mooncake_master -----------------------------------------------------------------------------
@needs_mooncake
def test_restore_larger_than_the_buffer_through_a_real_store(own_master):
    """The audit's repro end to end: a 4 MiB buffer, 1.5 MiB blocks, write-back and stage of 5."""
    from lmdeploy_hostcache.l3.backend import connect
    from lmdeploy_hostcache.l3.chain import WorkerChain, WriteBack

    cfg = parse_l3_section({"master_address": own_master.address, "global_segment_gb": 64 / 1024,
                            "local_buffer_gb": 4 / 1024, "timeout_ms": 5000})
    metrics = L3TierMetrics()
    client = connect(cfg, metrics=metrics)
    try:
        slot, n = 1536 * 1024, 5
        space = _space("real", slot)
        digests, tb, payloads = _blocks(space, n, slot)
        pool = [bytearray(p) for p in payloads] + [bytearray(slot) for _ in range(n)]

        def write(s, p):
            pool[s][:] = bytes(p)

        chain = WorkerChain(client, space, slot, lambda s: memoryview(pool[s]), write)
        assert chain.write_back([WriteBack(d, t, i) for i, (d, t) in enumerate(zip(digests, tb))]) == n
        assert chain.write_back_errors == 0
        assert chain.stage(digests, tb, list(range(n, 2 * n)))
        assert [bytes(p) for p in pool[n:]] == payloads
        s = metrics.snapshot()
        assert s["missing"] == 0 and s["errors"] == 0 and s["get_blocks"] == n
        assert s["get_latency_count"] > 1                    # more than one call
        # BufferStore's allocator model answers as this Mooncake's buffer does
        for i, (k, size) in enumerate([(3, 1_328_196), (3, 1_258_291), (7, 593_194), (7, 569_226), (2, 2 * MIB)]):
            keys = [f"sim{i}/{j}" for j in range(k)]
            assert (client.backend.put_batch(keys, [b"x" * size] * k) == 0) == fits_buffer([size] * k, 4 * MIB)
    finally:
        client.close()


@pytest.mark.parametrize("local, master, warned", [
    ("127.0.0.1", "10.0.0.2:50051", True),       # default local_hostname, master on another host
    ("localhost", "[2001:db8::1]:50051", True),
    ("10.0.0.7", "10.0.0.2:50051", False),
    ("127.0.0.1", "127.0.0.1:50051", False),     # one machine: loopback both
    ("::1", "localhost:50051", False),
])
def test_a_loopback_segment_under_a_remote_master_is_warned(local, master, warned):
    from lmdeploy_hostcache.l3.backend import segment_address_warning
    from lmdeploy_hostcache.l3.config import parse_l3_section

    cfg = parse_l3_section({"master_address": master, "local_hostname": local})
    msg = segment_address_warning(cfg)
    assert (msg is not None) == warned
    if warned:
        assert "l3.local_hostname" in msg and master in msg


def test_a_process_exits_while_a_store_call_never_returns(tmp_path):
    """A Mooncake call that never returns (its master hung) must not keep the engine's process from
    exiting: the client's call thread is a daemon (a ThreadPoolExecutor's is joined at exit)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent("""
        import threading
        from lmdeploy_hostcache.l3.client import L3Client
        from lmdeploy_hostcache.l3.errors import L3Timeout

        class Hung:
            def batch_is_exist(self, keys):
                threading.Event().wait()      # never answers
            def close(self):
                pass

        c = L3Client(Hung(), timeout_s=0.2)
        try:
            c.exists(["k"])
        except L3Timeout:
            print("timed out")
        c.close()
        print("closed")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["timed", "out", "closed"]
