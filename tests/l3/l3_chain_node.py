"""A "node" for the chain tests: a HostIndex, per-rank host pools (bytearrays), the scheduler
and worker sides of l3/chain.py, and prefix-oracle payloads (importable from a subprocess)."""
from __future__ import annotations

import xxhash

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.tier.host_index import HostIndex
from lmdeploy_hostcache.l3.chain import SchedulerChain, WorkerChain
from lmdeploy_hostcache.l3.keys import StoreKeyspace

BS = 4
HEADS = 8
SLOT = 8192            # bytes of one block over all ranks


def namespace(kv_format: str = "native/kb64", salt: str = "") -> Namespace:
    return Namespace(model="chain-model", block_size=BS, kv_format=kv_format, tenant_salt=salt)


def oracle(digest: int, rank: int, tp: int, nbytes: int) -> bytes:
    """KV bytes of one block on one rank: a function of the whole prefix (its chained digest) and
    of the rank's head shard, so a TP1 rank's bytes are the concatenation of the TP2 ranks'."""
    heads = HEADS // tp
    per_head = SLOT // HEADS
    out = bytearray()
    for h in range(rank * heads, (rank + 1) * heads):
        seed = xxhash.xxh3_64_intdigest(digest.to_bytes(16, "little") + h.to_bytes(4, "little"))
        out += b"".join(xxhash.xxh3_64_digest(i.to_bytes(4, "little"), seed) for i in range(per_head // 8))
    assert len(out) == nbytes
    return bytes(out)


class Node:
    def __init__(self, client, slots: int, tp: int = 1, ns: Namespace | None = None,
                 write_policy: str = "write_back") -> None:
        self.ns = ns or namespace()
        self.tp = tp
        self.slot_r = SLOT // tp
        self.index = HostIndex(slots, policy="lru")
        spaces = [StoreKeyspace(self.ns, tp_size=tp, tp_rank=r, head_start=r * HEADS // tp,
                                head_count=HEADS // tp, block_nbytes=self.slot_r) for r in range(tp)]
        self.chain = SchedulerChain(self.index, client, spaces, write_policy)
        self.index.on_evict = self.chain.on_host_evict
        self.pools = [bytearray(slots * self.slot_r) for _ in range(tp)]
        self.workers = [WorkerChain(client, spaces[r], self.slot_r, self._reader(r), self._writer(r))
                        for r in range(tp)]

    def _reader(self, r):
        return lambda slot: memoryview(self.pools[r])[slot * self.slot_r:(slot + 1) * self.slot_r]

    def _writer(self, r):
        def write(slot, payload):
            self.pools[r][slot * self.slot_r:(slot + 1) * self.slot_r] = bytes(payload)
        return write

    def _worker_step(self):
        wbs = self.chain.take_write_backs()
        return [w.write_back(wbs) for w in self.workers]

    def chain_of(self, tokens):
        return chain_digests(self.ns, tokens)

    def demote(self, tokens) -> None:
        """The GPU evicts a prompt's blocks leaf first; each lands in a host slot (write-backs of
        the host's victims run before the slot is rewritten, as in one worker step)."""
        digests, tb = self.chain_of(tokens)
        for i in reversed(range(len(digests))):
            parent = digests[i - 1] if i else self.ns.root
            slot = self.index.prepare_store(digests[i], parent, tb[i])
            self._worker_step()
            if slot is None:
                continue
            for r in range(self.tp):
                self._writer(r)(slot, oracle(digests[i], r, self.tp, self.slot_r))
            self.index.complete_store(digests[i], True)

    def flush(self) -> None:
        """Evict everything from the host (write-back of every block)."""
        self.index.evict(len(self.index))
        self._worker_step()

    def restore(self, tokens, before_stage=None):
        """Lookup past an empty host match, reserve, stage on every rank, finish: (n, ok, slots)."""
        digests, tb = self.chain_of(tokens)
        n = self.chain.lookup(digests, tb)
        if n == 0:
            return 0, False, []
        parents = [self.ns.root] + digests[:n - 1]
        slots = self.chain.reserve(digests[:n], parents, tb[:n])
        assert slots is not None
        self._worker_step()
        if before_stage is not None:
            before_stage()
        ok = all([w.stage(digests[:n], tb[:n], slots) for w in self.workers])
        self.chain.finish(digests[:n], ok)
        return n, ok, slots

    def slot_bytes_match_oracle(self, tokens, n, slots) -> bool:
        digests, _ = self.chain_of(tokens)
        return all(bytes(self._reader(r)(s)) == oracle(d, r, self.tp, self.slot_r)
                   for d, s in zip(digests[:n], slots) for r in range(self.tp))
